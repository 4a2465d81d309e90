#!/usr/bin/env bash
# Checks the monitoring component's rules: extracts the rule groups from the PrometheusRule
# (its `spec` is a Prometheus rule file), runs `promtool check rules` on them and
# `promtool test rules` on rules.test.yaml, which unit-tests every alert with synthetic series.
# With an argument, only writes the extracted rule file there (the end-to-end test loads it into
# a real Prometheus). Needs promtool (Debian package prometheus) and python3-yaml.
set -euo pipefail

dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

extract() {
    python3 - "$dir/prometheusrule.yaml" "$1" <<'PY'
import sys
import yaml

with open(sys.argv[1]) as f:
    rule = yaml.safe_load(f)
if rule.get("kind") != "PrometheusRule" or "groups" not in rule.get("spec", {}):
    sys.exit(f"{sys.argv[1]}: not a PrometheusRule with spec.groups")
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(rule["spec"], f, sort_keys=False, width=1000)
PY
}

if [ $# -eq 1 ]; then
    extract "$1"
    exit 0
fi
if ! command -v promtool >/dev/null; then
    echo "check.sh: promtool is missing: apt-get install prometheus" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
extract "$work/rules.yaml"
cp "$dir/rules.test.yaml" "$work/"
promtool check rules "$work/rules.yaml"
(cd "$work" && promtool test rules rules.test.yaml)
