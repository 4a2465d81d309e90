//! Seccomp profiles in the runtime-spec JSON form podman reads (`/usr/share/containers/
//! seccomp.json`): what one lets through for a given capability set, and the variants the tests
//! run under.

use super::ImageError;
use crate::file_error::FileError;
use serde_json::{json, Value};
use std::path::Path;

/// podman's default profile: what `RuntimeDefault` means under podman.
pub const PODMAN_DEFAULT: &str = "/usr/share/containers/seccomp.json";

pub fn load(path: &Path) -> Result<Value, ImageError> {
    let text = std::fs::read_to_string(path).map_err(FileError::on("cannot read", path))?;
    let profile: Value = serde_json::from_str(&text).map_err(|e| ImageError::Seccomp {
        path: path.into(),
        detail: e.to_string(),
    })?;
    if !profile["syscalls"].is_array() {
        return Err(ImageError::Seccomp {
            path: path.into(),
            detail: "no `syscalls` list".into(),
        });
    }
    Ok(profile)
}

pub fn store(profile: &Value, path: &Path) -> Result<(), ImageError> {
    std::fs::write(path, profile.to_string()).map_err(FileError::on("cannot write", path))?;
    Ok(())
}

/// Whether `profile` lets a process holding `caps` (`CAP_…` names) call `syscall` with any
/// arguments, as podman resolves its capability conditions. A rule that holds only on some
/// architectures or kernels (`arches`, `minKernel`) is not an unconditional allow.
pub fn allows(profile: &Value, syscall: &str, caps: &[String]) -> bool {
    let held = |list: &Value| -> Vec<String> {
        list["caps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect()
    };
    let applies = |rule: &&Value| {
        names(rule).any(|n| n == syscall)
            && held(&rule["includes"]).iter().all(|c| caps.contains(c))
            && !held(&rule["excludes"]).iter().any(|c| caps.contains(c))
    };
    let rules: Vec<&Value> = syscalls(profile).filter(applies).collect();
    if rules.is_empty() {
        return profile["defaultAction"] == "SCMP_ACT_ALLOW";
    }
    rules.iter().all(|rule| {
        rule["action"] == "SCMP_ACT_ALLOW"
            && rule["args"].as_array().is_none_or(Vec::is_empty)
            && !conditional(rule)
    })
}

/// Whether `rule` applies only on some architectures or from some kernel version on.
fn conditional(rule: &Value) -> bool {
    ["includes", "excludes"].iter().any(|side| {
        rule[side]["arches"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
            || !rule[side]["minKernel"].is_null()
    })
}

/// `profile` with `syscall` taken out of every rule: the default action (an error) answers it.
pub fn denying(profile: &Value, syscall: &str) -> Value {
    let mut out = profile.clone();
    let rules = out["syscalls"].as_array_mut().expect("checked by load");
    for rule in rules.iter_mut() {
        if let Some(list) = rule["names"].as_array_mut() {
            list.retain(|n| n != syscall);
        }
    }
    rules.retain(|rule| names(rule).next().is_some());
    out
}

/// containerd's RuntimeDefault (1.7 and 2.x, what AKS node images run) differs from podman 4.3's
/// where the agent cares: it allows bpf(2) only to a container holding CAP_BPF or CAP_SYS_ADMIN,
/// and perf_event_open(2) only to one holding CAP_PERFMON or CAP_SYS_ADMIN (containerd's
/// contrib/seccomp), where podman allows bpf(2) with CAP_SYS_ADMIN alone. This is podman's profile
/// with containerd's rules for those two calls in place of podman's.
pub fn containerd_default(podman_default: &Value) -> Value {
    let gated = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    let mut out = podman_default.clone();
    let rules = out["syscalls"].as_array_mut().expect("checked by load");
    for rule in rules.iter_mut() {
        if let Some(list) = rule["names"].as_array_mut() {
            list.retain(|n| !gated.iter().any(|(call, _)| n == call));
        }
    }
    rules.retain(|rule| names(rule).next().is_some());
    for (call, cap) in gated {
        for cap in [cap, "CAP_SYS_ADMIN"] {
            rules.push(json!({
                "names": [call],
                "action": "SCMP_ACT_ALLOW",
                "includes": {"caps": [cap]},
            }));
        }
    }
    out
}

fn syscalls(profile: &Value) -> impl Iterator<Item = &Value> {
    profile["syscalls"].as_array().into_iter().flatten()
}

fn names(rule: &Value) -> impl Iterator<Item = &str> {
    rule["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|c| c.to_string()).collect()
    }

    /// The shape of podman 4.3's rules for bpf: allowed with CAP_SYS_ADMIN, EPERM without.
    fn podman_like() -> Value {
        json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read", "perf_event_open"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["bpf", "mount"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["bpf", "mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                 "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            ]
        })
    }

    #[test]
    fn bpf_follows_the_capability_conditions() {
        let profile = podman_like();
        let agent = caps(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        assert!(!allows(&profile, "bpf", &agent));
        assert!(allows(&profile, "bpf", &caps(&["CAP_SYS_ADMIN"])));
        assert!(allows(&profile, "read", &agent));
        assert!(
            !allows(&profile, "ptrace", &agent),
            "the default action applies"
        );

        let containerd = containerd_default(&profile);
        assert!(allows(&containerd, "bpf", &agent));
        assert!(!allows(&containerd, "bpf", &caps(&["CAP_NET_ADMIN"])));
        assert!(allows(&containerd, "perf_event_open", &agent));
        assert!(!allows(
            &containerd,
            "perf_event_open",
            &caps(&["CAP_NET_ADMIN"])
        ));
        assert!(
            !allows(&containerd, "mount", &agent),
            "other calls keep their conditions"
        );

        let denied = denying(&containerd, "bpf");
        assert!(!allows(&denied, "bpf", &agent));
        assert!(allows(&denied, "read", &agent));
    }

    #[test]
    fn an_arch_or_kernel_condition_is_not_an_unconditional_allow() {
        let profile = json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"arches": ["amd64"]}},
                {"names": ["bpf"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "5.8"}},
                {"names": ["clone3"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"arches": []}},
            ]
        });
        let none = caps(&[]);
        assert!(allows(&profile, "read", &none));
        assert!(!allows(&profile, "arch_prctl", &none));
        assert!(!allows(&profile, "bpf", &none));
        assert!(
            allows(&profile, "clone3", &none),
            "an empty list is no condition"
        );
    }
}
