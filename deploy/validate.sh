#!/usr/bin/env bash
# Renders every overlay under deploy/overlays and validates the result:
#  1. `kubernetes-validate --strict` against the Kubernetes versions AKS supports (unknown fields
#     are errors). The PodMonitor is a CRD kind it has no schema for: it reports a WARN, which is
#     accepted for PodMonitor only; a WARN for any other kind (a misspelt apiVersion) fails.
#  2. Cross-object checks no schema can make: the PodMonitor, the Service and the prometheus.io
#     annotations all point at the agent's named metrics port, and the PodMonitor selects the
#     agent's pods.
#  3. The monitoring component (components/monitoring, off by default) on the kubenet overlay:
#     schema-valid, its PrometheusRule and Grafana dashboard ConfigMap where they belong.
# Exits non-zero on any failure. Needs kubectl (or kustomize) and `pip install kubernetes-validate`.
set -euo pipefail

deploy_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# AKS's supported minor versions (bump as AKS moves on).
versions=(1.31.0 1.32.0 1.33.0)

if command -v kubectl >/dev/null; then
    render() { kubectl kustomize "$1"; }
elif command -v kustomize >/dev/null; then
    render() { kustomize build "$1"; }
else
    echo "validate.sh: neither kubectl nor kustomize is installed: cannot render the overlays" >&2
    exit 2
fi
if ! command -v kubernetes-validate >/dev/null; then
    echo "validate.sh: kubernetes-validate is missing: pip install kubernetes-validate" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=0
checked=0
for overlay in "$deploy_dir"/overlays/*/; do
    name=$(basename "$overlay")
    out="$work/$name.yaml"
    checked=$((checked + 1))
    if ! render "$overlay" >"$out" 2>"$work/render.err"; then
        echo "FAIL $name: kustomize cannot render it:"
        cat "$work/render.err"
        failed=$((failed + 1))
        continue
    fi
    args=()
    for v in "${versions[@]}"; do args+=(-k "$v"); done
    rc=0
    kubernetes-validate --strict --quiet "${args[@]}" "$out" >"$work/validate.out" 2>&1 || rc=$?
    sed "s|$out|$name|" "$work/validate.out"
    if [ "$rc" -ne 0 ] || grep -v '^WARN .*for kind PodMonitor with api version monitoring.coreos.com/v1 ' "$work/validate.out" | grep -q .; then
        echo "FAIL $name: schema validation (kubernetes-validate exit $rc)"
        failed=$((failed + 1))
        continue
    fi
    if ! python3 - "$out" <<'EOF'
import sys
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
problems = []
(ds,) = by_kind["DaemonSet"]
template = ds["spec"]["template"]
(container,) = template["spec"]["containers"]
ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
if "metrics" not in ports:
    problems.append("the agent container has no port named metrics")
labels = template["metadata"].get("labels", {})
annotations = template["metadata"].get("annotations", {})
if annotations.get("prometheus.io/port") != str(ports.get("metrics")):
    problems.append("prometheus.io/port is not the metrics container port")
for pm in by_kind.get("PodMonitor", []):
    spec = pm["spec"]
    unknown = set(spec) - {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    if unknown:
        problems.append(f"PodMonitor spec has fields it does not define: {sorted(unknown)}")
    wanted = spec["selector"].get("matchLabels", {})
    if not wanted or any(labels.get(k) != v for k, v in wanted.items()):
        problems.append(f"PodMonitor selector {wanted} does not select the agent pods {labels}")
    if pm["metadata"].get("namespace") != ds["metadata"].get("namespace"):
        problems.append("PodMonitor is not in the agent's namespace")
    for ep in spec.get("podMetricsEndpoints", []):
        if ep.get("port") not in ports:
            problems.append(f"PodMonitor endpoint port {ep.get('port')!r} is not a container port name")
        if ep.get("honorLabels") is not True:
            problems.append("PodMonitor endpoint lacks honorLabels: true (the agent's pod label would become exported_pod)")
for svc in by_kind.get("Service", []):
    for p in svc["spec"]["ports"]:
        if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
            problems.append(f"Service {svc['metadata']['name']} targets port {p.get('targetPort')!r}, not a container port")
for p in problems:
    print("ERROR", p)
sys.exit(1 if problems else 0)
EOF
    then
        echo "FAIL $name: cross-object checks"
        failed=$((failed + 1))
        continue
    fi
    echo "ok   $name: $(grep -c '^kind:' "$out") objects, valid for Kubernetes ${versions[*]} (PodMonitor: CRD, schema not known to kubernetes-validate, checked by hand)"
done

# The monitoring component (off by default) on top of an overlay: schema-valid, the
# PrometheusRule in the agent's namespace, the dashboard ConfigMap labelled for Grafana's sidecar
# and holding valid JSON. Its rules are checked by components/monitoring/check.sh (promtool).
with="$work/with-monitoring"
mkdir -p "$with"
printf 'resources:\n  - %s\ncomponents:\n  - %s\n' \
    "$(realpath --relative-to="$with" "$deploy_dir/overlays/kubenet")" \
    "$(realpath --relative-to="$with" "$deploy_dir/components/monitoring")" >"$with/kustomization.yaml"
checked=$((checked + 1))
out="$work/with-monitoring.yaml"
if ! render "$with" >"$out" 2>"$work/render.err"; then
    echo "FAIL kubenet + components/monitoring: kustomize cannot render it:"
    cat "$work/render.err"
    failed=$((failed + 1))
else
    args=()
    for v in "${versions[@]}"; do args+=(-k "$v"); done
    rc=0
    kubernetes-validate --strict --quiet "${args[@]}" "$out" >"$work/validate.out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ] || grep -v -e '^WARN .*for kind PodMonitor with api version monitoring.coreos.com/v1 ' \
        -e '^WARN .*for kind PrometheusRule with api version monitoring.coreos.com/v1 ' "$work/validate.out" | grep -q .; then
        cat "$work/validate.out"
        echo "FAIL kubenet + components/monitoring: schema validation (kubernetes-validate exit $rc)"
        failed=$((failed + 1))
    elif ! python3 - "$out" <<'EOF'
import json
import sys
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems = []
rules = [d for d in docs if d["kind"] == "PrometheusRule"]
if len(rules) != 1 or rules[0]["metadata"].get("namespace") != "aksnet":
    problems.append("expected one PrometheusRule in namespace aksnet")
boards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "aksnet-grafana-dashboard"]
if len(boards) != 1:
    problems.append("expected the aksnet-grafana-dashboard ConfigMap")
else:
    if boards[0]["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
        problems.append("the dashboard ConfigMap lacks the grafana_dashboard label")
    try:
        json.loads(boards[0]["data"]["aksnet.json"])
    except (KeyError, ValueError) as e:
        problems.append(f"the dashboard ConfigMap holds no valid aksnet.json: {e}")
for p in problems:
    print("ERROR", p)
sys.exit(1 if problems else 0)
EOF
    then
        echo "FAIL kubenet + components/monitoring: cross-object checks"
        failed=$((failed + 1))
    else
        echo "ok   kubenet + components/monitoring: $(grep -c '^kind:' "$out") objects (PrometheusRule: CRD, rules checked by promtool)"
    fi
fi

if [ "$checked" -eq 0 ]; then
    echo "validate.sh: no overlay found under $deploy_dir/overlays" >&2
    exit 1
fi
echo "deploy: $((checked - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
