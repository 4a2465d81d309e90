//! Lab instances' namespaces: naming (a per-instance prefix, so labs can coexist), creation, and
//! teardown, including finding what a crashed run left behind.

use crate::lab::error::LabError;
use crate::lab::exec;
use crate::lab::layout::Host;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// All lab namespaces start with this; then `<creator pid>-<sequence>-`.
pub const NETNS_PREFIX: &str = "aksl-";
const NETNS_DIR: &str = "/run/netns";
/// `ip netns exec` bind-mounts files from here (the pods' resolv.conf).
const ETC_NETNS_DIR: &str = "/etc/netns";

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A fresh instance prefix for a lab created by this process.
pub fn new_prefix() -> String {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{NETNS_PREFIX}{}-{seq}-", std::process::id())
}

pub fn netns_name(prefix: &str, host: Host) -> String {
    format!("{prefix}{}", host.suffix())
}

pub fn etc_netns_dir(netns: &str) -> std::path::PathBuf {
    Path::new(ETC_NETNS_DIR).join(netns)
}

pub fn create(prefix: &str) -> Result<(), LabError> {
    for host in Host::ALL {
        exec::run("ip", &["netns", "add", &netns_name(prefix, host)])?;
    }
    Ok(())
}

/// Lab namespaces currently present.
fn existing() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect();
    names.sort();
    names
}

/// Whether any namespace of the instance exists.
pub fn exists(prefix: &str) -> bool {
    existing().iter().any(|n| n.starts_with(prefix))
}

/// The instance prefix of a lab namespace name (`aksl-<pid>-<seq>-`).
fn prefix_of(netns: &str) -> Option<(String, u32)> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let seq: u32 = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((format!("{NETNS_PREFIX}{pid}-{seq}-"), pid))
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Prefixes of labs whose creating process is gone (crashed test runs, or a lab left up by
/// `cargo xtask lab up`, whose process exits by design).
pub fn orphaned_prefixes() -> Vec<String> {
    let mut prefixes: Vec<String> = existing()
        .iter()
        .filter_map(|n| prefix_of(n))
        .filter(|(_, pid)| !process_alive(*pid))
        .map(|(p, _)| p)
        .collect();
    prefixes.dedup();
    prefixes
}

/// The processes inside `netns`; none when it cannot be listed (it is gone).
pub fn pids_in(netns: &str) -> Vec<i32> {
    exec::run("ip", &["netns", "pids", netns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process inside the instance's namespaces (servers, nginx, dnsmasq, clients), then
/// deletes the namespaces and their /etc/netns files. Best effort: it runs on error paths too,
/// so it keeps going and returns what it could not remove.
pub fn teardown(prefix: &str) -> Vec<String> {
    let names: Vec<String> = existing()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let pids: Vec<i32> = names.iter().flat_map(|n| pids_in(n)).collect();
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(*pid, signal) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && names.iter().any(|n| !pids_in(n).is_empty()) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut failures = Vec::new();
    for name in &names {
        if let Err(e) = exec::run("ip", &["netns", "del", name]) {
            failures.push(format!("{name}: {e}"));
        }
        let etc = etc_netns_dir(name);
        if etc.exists() {
            if let Err(e) = std::fs::remove_dir_all(&etc) {
                failures.push(format!("{}: {e}", etc.display()));
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trips_through_namespace_names() {
        let prefix = new_prefix();
        let name = netns_name(&prefix, Host::PodIngress);
        assert_eq!(prefix_of(&name), Some((prefix, std::process::id())));
        assert_eq!(prefix_of("aksl-notapid-0-node"), None);
    }
}
