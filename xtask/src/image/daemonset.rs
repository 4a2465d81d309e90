//! The DaemonSet's pod spec (deploy/base/daemonset.yaml) as the `podman run` arguments that give
//! its container what the kubelet would: network, user, capabilities, privilege escalation, root
//! filesystem, seccomp profile, mounts, environment and arguments.
//!
//! Only the fields that shape the container's privileges and view of the node are translated;
//! the security contexts refuse fields they do not know, so a setting added to the manifest
//! fails the container test until it is translated here too. Probes, resources and scheduling
//! are not (no kubelet and no cgroup limits here).

use super::ImageError;
use crate::file_error::FileError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct DaemonSet {
    spec: DaemonSetSpec,
}

#[derive(Deserialize)]
struct DaemonSetSpec {
    template: Template,
}

#[derive(Deserialize)]
struct Template {
    spec: PodSpec,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub host_network: bool,
    #[serde(default, rename = "hostPID")]
    pub host_pid: bool,
    #[serde(default)]
    pub security_context: PodSecurityContext,
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSecurityContext {
    pub seccomp_profile: Option<SeccompProfile>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeccompProfile {
    #[serde(rename = "type")]
    pub kind: String,
    pub localhost_profile: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub security_context: SecurityContext,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecurityContext {
    pub run_as_user: Option<u32>,
    pub run_as_non_root: Option<bool>,
    #[serde(default)]
    pub privileged: bool,
    /// Kubernetes' default is true.
    pub allow_privilege_escalation: Option<bool>,
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    #[serde(default)]
    pub capabilities: Capabilities,
    pub seccomp_profile: Option<SeccompProfile>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    #[serde(default)]
    pub drop: Vec<String>,
    #[serde(default)]
    pub add: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<EnvSource>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvSource {
    pub field_ref: Option<FieldRef>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldRef {
    pub field_path: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub host_path: Option<HostPath>,
    pub config_map: Option<ConfigMapRef>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HostPath {
    pub path: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ConfigMapRef {
    pub name: String,
}

/// What the cluster gives the pod, which the manifest only names.
pub struct Node<'a> {
    /// The network namespace `hostNetwork` means (a lab node's, here).
    pub netns: &'a Path,
    /// `spec.nodeName`, for `fieldRef` environment variables.
    pub name: &'a str,
    /// Each ConfigMap's content, as a directory of files.
    pub config_maps: BTreeMap<String, PathBuf>,
    /// Where `Localhost` seccomp profiles live (the kubelet's seccomp root).
    pub seccomp_root: &'a Path,
}

/// The agent's pod, as the manifest declares it.
#[derive(Clone, Debug)]
pub struct AgentPod {
    pub spec: PodSpec,
    path: PathBuf,
}

impl AgentPod {
    pub fn load(path: &Path) -> Result<AgentPod, ImageError> {
        let text = std::fs::read_to_string(path).map_err(FileError::on("cannot read", path))?;
        let daemonset: DaemonSet =
            serde_yaml::from_str(&text).map_err(|e| ImageError::DaemonSet {
                path: path.into(),
                detail: e.to_string(),
            })?;
        let pod = AgentPod {
            spec: daemonset.spec.template.spec,
            path: path.into(),
        };
        if pod.spec.containers.len() != 1 {
            return Err(pod.error(format!(
                "{} containers; the translation handles the one agent container",
                pod.spec.containers.len()
            )));
        }
        Ok(pod)
    }

    pub fn container(&self) -> &Container {
        &self.spec.containers[0]
    }

    pub fn container_mut(&mut self) -> &mut Container {
        &mut self.spec.containers[0]
    }

    /// The capabilities the container holds, as `CAP_…` names: those it adds, once it drops ALL
    /// (a partial drop would keep runtime defaults this cannot know).
    pub fn capabilities(&self) -> Result<Vec<String>, ImageError> {
        let caps = &self.container().security_context.capabilities;
        if !caps.drop.iter().any(|c| c == "ALL") {
            return Err(self.error("capabilities.drop is not [ALL]"));
        }
        Ok(caps.add.iter().map(|c| format!("CAP_{c}")).collect())
    }

    /// The seccomp profile in force: the container's, else the pod's.
    pub fn seccomp_profile(&self) -> Option<&SeccompProfile> {
        self.container()
            .security_context
            .seccomp_profile
            .as_ref()
            .or(self.spec.security_context.seccomp_profile.as_ref())
    }

    /// `podman run` arguments (after `run`) for container `name` of `image` on `node`; the
    /// container's own arguments come last, followed by `extra_args`.
    pub fn podman_run_args(
        &self,
        name: &str,
        image: &str,
        node: &Node,
        extra_args: &[&str],
    ) -> Result<Vec<String>, ImageError> {
        let container = self.container();
        let security = &container.security_context;
        let mut args: Vec<String> = vec!["--name".into(), name.into()];
        if !self.spec.host_network {
            return Err(self.error("hostNetwork is false; the agent observes the node's network"));
        }
        args.push(format!("--network=ns:{}", node.netns.display()));
        if self.spec.host_pid {
            args.push("--pid=host".into());
        }
        let user = security
            .run_as_user
            .ok_or_else(|| self.error("no runAsUser: the image's USER would decide"))?;
        if user != 0 && security.run_as_non_root == Some(false) {
            return Err(self.error("runAsNonRoot false with a non-root runAsUser"));
        }
        args.push(format!("--user={user}"));
        if security.privileged {
            args.push("--privileged".into());
        }
        for cap in &security.capabilities.drop {
            args.push(format!("--cap-drop={cap}"));
        }
        for cap in &security.capabilities.add {
            args.push(format!("--cap-add=CAP_{cap}"));
        }
        if security.allow_privilege_escalation == Some(false) {
            args.push("--security-opt=no-new-privileges".into());
        }
        if security.read_only_root_filesystem {
            // Kubernetes mounts no tmpfs of its own on a read-only root; podman would.
            args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        match self.seccomp_profile() {
            // The runtime applies its default itself.
            Some(p) if p.kind == "RuntimeDefault" => {}
            Some(p) if p.kind == "Unconfined" => {
                args.push("--security-opt=seccomp=unconfined".into())
            }
            Some(p) if p.kind == "Localhost" => {
                let file = p.localhost_profile.as_deref().ok_or_else(|| {
                    self.error("a Localhost seccomp profile without localhostProfile")
                })?;
                args.push(format!(
                    "--security-opt=seccomp={}",
                    node.seccomp_root.join(file).display()
                ));
            }
            // The kubelet's default since 1.27 with SeccompDefault: RuntimeDefault.
            None => {}
            Some(p) => return Err(self.error(format!("unknown seccomp profile type {}", p.kind))),
        }
        for mount in &container.volume_mounts {
            let source = self.volume_source(&mount.name, node)?;
            let mode = if mount.read_only { "ro" } else { "rw" };
            args.push(format!(
                "--volume={}:{}:{mode}",
                source.display(),
                mount.mount_path
            ));
        }
        for var in &container.env {
            args.push(format!("--env={}={}", var.name, self.env_value(var, node)?));
        }
        if let Some(entrypoint) = container.command.first() {
            args.push(format!("--entrypoint={entrypoint}"));
        }
        args.push(image.into());
        args.extend(container.command.iter().skip(1).cloned());
        args.extend(container.args.iter().cloned());
        args.extend(extra_args.iter().map(|a| a.to_string()));
        Ok(args)
    }

    fn volume_source(&self, name: &str, node: &Node) -> Result<PathBuf, ImageError> {
        let volume = self
            .spec
            .volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| self.error(format!("volumeMount {name} names no volume")))?;
        match (&volume.host_path, &volume.config_map) {
            (Some(host), None) => Ok(PathBuf::from(&host.path)),
            (None, Some(map)) => node.config_maps.get(&map.name).cloned().ok_or_else(|| {
                self.error(format!("ConfigMap {} was not given to the container", map.name))
            }),
            _ => Err(self.error(format!(
                "volume {name} is neither a hostPath nor a ConfigMap; translate it in xtask/src/image/daemonset.rs"
            ))),
        }
    }

    fn env_value(&self, var: &EnvVar, node: &Node) -> Result<String, ImageError> {
        if let Some(value) = &var.value {
            return Ok(value.clone());
        }
        match var.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
            Some(field) if field.field_path == "spec.nodeName" => Ok(node.name.into()),
            _ => Err(self.error(format!(
                "environment variable {} comes from a source xtask/src/image/daemonset.rs does not translate",
                var.name
            ))),
        }
    }

    fn error(&self, detail: impl Into<String>) -> ImageError {
        ImageError::DaemonSet {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> AgentPod {
        AgentPod::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/base/daemonset.yaml"
        )))
        .unwrap()
    }

    #[test]
    fn the_shipped_daemonset_translates_to_least_privilege() {
        let pod = shipped();
        let node = Node {
            netns: Path::new("/run/netns/n"),
            name: "node-1",
            config_maps: [("aksnet-config".to_string(), PathBuf::from("/tmp/cfg"))].into(),
            seccomp_root: Path::new("/var/lib/kubelet/seccomp"),
        };
        let args = pod.podman_run_args("c", "img", &node, &[]).unwrap();
        for expected in [
            "--network=ns:/run/netns/n",
            "--user=0",
            "--cap-drop=ALL",
            "--cap-add=CAP_BPF",
            "--cap-add=CAP_PERFMON",
            "--cap-add=CAP_NET_ADMIN",
            "--cap-add=CAP_NET_RAW",
            "--security-opt=no-new-privileges",
            "--read-only",
            "--read-only-tmpfs=false",
            "--volume=/tmp/cfg:/etc/aksnet:ro",
            "--volume=/sys/kernel/btf:/sys/kernel/btf:ro",
            "--env=NODE_NAME=node-1",
        ] {
            assert!(
                args.iter().any(|a| a == expected),
                "{expected} missing: {args:?}"
            );
        }
        assert!(!args
            .iter()
            .any(|a| a == "--privileged" || a.contains("seccomp")));
        let image = args.iter().position(|a| a == "img").unwrap();
        assert_eq!(args[image + 1..], pod.container().args[..]);
        assert_eq!(pod.seccomp_profile().unwrap().kind, "RuntimeDefault");
    }

    #[test]
    fn a_missing_config_map_is_named() {
        let pod = shipped();
        let node = Node {
            netns: Path::new("/run/netns/n"),
            name: "node-1",
            config_maps: BTreeMap::new(),
            seccomp_root: Path::new("/"),
        };
        let err = pod.podman_run_args("c", "img", &node, &[]).unwrap_err();
        assert!(err.to_string().contains("aksnet-config"), "{err}");
    }
}
