//! Why the kernel refused bpf(2) with EPERM: a capability the process lacks, or a seccomp filter
//! (a container runtime's profile) that denies the call whatever the capabilities. Read from
//! `/proc/self/status`, so the error can name the one thing to change.

use std::fmt;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What stands between the agent and bpf(2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Capabilities missing from the effective set (`CAP_BPF`, `CAP_PERFMON`).
    Capabilities(Vec<&'static str>),
    /// The capabilities are there; a seccomp filter is in force and refuses the call.
    Seccomp,
    /// Neither explains it (an LSM, `kernel.unprivileged_bpf_disabled` with a user namespace…).
    Unknown,
}

impl Refusal {
    /// The refusal for this process.
    pub fn of_this_process() -> Refusal {
        match std::fs::read_to_string("/proc/self/status") {
            Ok(status) => Refusal::from_status(&status),
            Err(_) => Refusal::Unknown,
        }
    }

    /// The refusal a process with this `/proc/<pid>/status` text meets.
    pub fn from_status(status: &str) -> Refusal {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
        };
        let Some(effective) = field("CapEff:").and_then(|hex| u64::from_str_radix(hex, 16).ok())
        else {
            return Refusal::Unknown;
        };
        let holds = |cap: u32| effective & (1 << cap) != 0;
        // CAP_SYS_ADMIN stands in for both on every kernel; before 5.8 it is the only way.
        let missing: Vec<&'static str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|&(cap, _)| !holds(cap) && !holds(CAP_SYS_ADMIN))
            .map(|(_, name)| name)
            .collect();
        if !missing.is_empty() {
            return Refusal::Capabilities(missing);
        }
        match field("Seccomp:") {
            Some(mode) if mode != "0" => Refusal::Seccomp,
            _ => Refusal::Unknown,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Capabilities(caps) => {
                let added: Vec<&str> = caps.iter().map(|c| &c["CAP_".len()..]).collect();
                let caps = caps.join(" and ");
                write!(
                    f,
                    "the agent lacks {caps}: run the agent as root, or grant {caps} (in a \
                     container: add {} to securityContext.capabilities.add)",
                    added.join(" and ")
                )
            }
            Refusal::Seccomp => write!(
                f,
                "the agent holds CAP_BPF but a seccomp profile denies bpf(2): run it under a \
                 profile that allows bpf with CAP_BPF (containerd 1.7 and later's RuntimeDefault \
                 does; podman 4's default allows it only with CAP_SYS_ADMIN), or use --source netlink"
            ),
            Refusal::Unknown => write!(
                f,
                "run the agent as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cap_eff: &str, seccomp: &str) -> String {
        format!("Name:\taksnet-agent\nCapEff:\t{cap_eff}\nNoNewPrivs:\t1\nSeccomp:\t{seccomp}\n")
    }

    #[test]
    fn names_what_is_missing() {
        // The DaemonSet's set: NET_ADMIN (12), NET_RAW (13), PERFMON (38), BPF (39).
        let daemonset = "000000c000003000";
        assert_eq!(
            Refusal::from_status(&status(daemonset, "2")),
            Refusal::Seccomp
        );
        assert_eq!(
            Refusal::from_status(&status(daemonset, "0")),
            Refusal::Unknown
        );
        let without_bpf = "0000004000003000";
        let refusal = Refusal::from_status(&status(without_bpf, "2"));
        assert_eq!(refusal, Refusal::Capabilities(vec!["CAP_BPF"]));
        assert!(refusal
            .to_string()
            .starts_with("the agent lacks CAP_BPF: run the agent as root, or grant CAP_BPF (in a container: add BPF "));
        let sys_admin_only = "0000000000200000";
        assert_eq!(
            Refusal::from_status(&status(sys_admin_only, "2")),
            Refusal::Seccomp
        );
        assert_eq!(Refusal::from_status("Name:\tx\n"), Refusal::Unknown);
    }
}
