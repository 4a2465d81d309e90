//! No optional hook counts as attached until it is seen firing. A probe can attach to a function
//! that some callers bypass (Debian 5.10's `nf_ct_delete`, whose flush path calls
//! `nf_ct_delete.part.0` directly): attached is not the same as complete.
//!
//! Until proven, whatever replaces a hook keeps running beside it (for `nf_ct_delete`: netlink
//! DESTROY events; the flow table ignores a second end of the same connection). The proof reads
//! the kernel's run counts of the hook's programs (BPF statistics, enabled only while proving) and
//! the ends each source reported: `nf_ct_delete` is proven once netlink has reported
//! [`PROOF_ENDS`] connection ends and the hook ran at least as often and reported ends itself.
//! A hook that fails its proof is reported with one WARN line and `aksnet_capture_hook_attached`
//! 0, and its replacement stays for the life of the process.

use super::ebpf::{AttachedHook, Proof};
use super::netlink::NetlinkCapture;
use super::{CaptureHealth, HookStatus};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connection ends netlink must report before the `nf_ct_delete` hook is judged.
pub const PROOF_ENDS: u64 = 3;
/// How often run counts are read while proving.
const PROOF_POLL: Duration = Duration::from_secs(1);
/// After this, hooks still unproven stay unproven, their replacements running, and the BPF
/// statistics (which cost every BPF program on the node a little) are switched off.
const PROOF_WINDOW: Duration = Duration::from_secs(600);

/// What stands in for `nf_ct_delete` while it is unproven: netlink DESTROY events, and how many
/// of them it delivered.
pub struct EndsStandIn {
    pub capture: NetlinkCapture,
    pub ends: Arc<AtomicU64>,
}

/// Proves `hooks`, then keeps what must outlive the proof (a stand-in whose hook failed). Runs
/// until the capture is dropped (the caller aborts it).
pub async fn prove(
    hooks: Vec<AttachedHook>,
    health: Arc<CaptureHealth>,
    mut stand_in: Option<EndsStandIn>,
) {
    let mut pending: Vec<AttachedHook> = hooks
        .into_iter()
        .filter(|h| !h.prog_ids.is_empty())
        .collect();
    if pending.is_empty() {
        return;
    }
    // Dropping the descriptor switches the statistics off again.
    let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(err) => {
            log::info!("cannot enable BPF run statistics ({err}); optional hooks are proven by the events they report alone");
            None
        }
    };
    let ids: Vec<u32> = pending.iter().flat_map(|h| h.prog_ids.clone()).collect();
    let runs_at_start = run_counts(&ids);
    let ebpf_ends_at_start = health.ebpf_ends.load(Ordering::Relaxed);
    let mut interval = tokio::time::interval(PROOF_POLL);
    let deadline = tokio::time::Instant::now() + PROOF_WINDOW;
    while !pending.is_empty() && tokio::time::Instant::now() < deadline {
        interval.tick().await;
        let runs_now = run_counts(&ids);
        let evidence = Evidence {
            stats: stats.is_some(),
            netlink_ends: stand_in
                .as_ref()
                .map_or(0, |s| s.ends.load(Ordering::Relaxed)),
            ebpf_ends: health.ebpf_ends.load(Ordering::Relaxed) - ebpf_ends_at_start,
        };
        pending.retain(|hook| {
            let runs: u64 = hook
                .prog_ids
                .iter()
                .map(|id| {
                    runs_now.get(id).copied().unwrap_or(0)
                        - runs_at_start.get(id).copied().unwrap_or(0)
                })
                .sum();
            match evidence.judge(hook.proof, runs) {
                Judgement::Undecided => true,
                Judgement::Fires => {
                    log::info!(
                        "optional hook {} seen firing ({runs} runs); it counts as attached",
                        hook.status.name
                    );
                    health.update_hook(HookStatus {
                        attached: true,
                        detail: String::new(),
                        ..hook.status.clone()
                    });
                    if hook.proof == Proof::EveryEnd {
                        // Dropping it stops netlink; the hook reports every end from now on.
                        stand_in = None;
                    }
                    false
                }
                Judgement::Misses => {
                    let detail = format!(
                        "attached but not firing for every connection end: {runs} runs and {} ends reported, while netlink reported {} ends; instead: {}",
                        evidence.ebpf_ends, evidence.netlink_ends, hook.fallback
                    );
                    log::warn!("optional hook {} {detail}", hook.status.name);
                    health.update_hook(HookStatus {
                        attached: false,
                        detail,
                        ..hook.status.clone()
                    });
                    false
                }
            }
        });
    }
    for hook in &pending {
        log::info!(
            "optional hook {} not seen firing within {PROOF_WINDOW:?}; it does not count as attached, and {}",
            hook.status.name,
            hook.fallback
        );
    }
    drop(stats);
    // A stand-in still here replaces a hook that did not prove itself: keep it.
    if stand_in.is_some() {
        std::future::pending::<()>().await;
    }
}

/// What the capture saw since proving began.
struct Evidence {
    stats: bool,
    netlink_ends: u64,
    ebpf_ends: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Judgement {
    Undecided,
    Fires,
    Misses,
}

impl Evidence {
    /// `runs`: the hook's programs' runs since proving began (0 without statistics).
    fn judge(&self, proof: Proof, runs: u64) -> Judgement {
        match proof {
            Proof::Runs if runs > 0 => Judgement::Fires,
            Proof::Runs => Judgement::Undecided,
            Proof::EveryEnd if self.netlink_ends < PROOF_ENDS => Judgement::Undecided,
            // Runs count every namespace's ends, netlink only the observed one's: a hook that
            // sees every end runs at least as often. Its own ends show it reads the right
            // argument.
            Proof::EveryEnd if self.ebpf_ends > 0 && (!self.stats || runs >= self.netlink_ends) => {
                Judgement::Fires
            }
            Proof::EveryEnd => Judgement::Misses,
        }
    }
}

/// Run counts of the programs with these ids.
fn run_counts(ids: &[u32]) -> BTreeMap<u32, u64> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| ids.contains(&info.id()))
        .map(|info| (info.id(), info.run_count()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(netlink_ends: u64, ebpf_ends: u64) -> Evidence {
        Evidence {
            stats: true,
            netlink_ends,
            ebpf_ends,
        }
    }

    #[test]
    fn a_delete_hook_is_judged_only_after_enough_ends() {
        assert_eq!(
            evidence(PROOF_ENDS - 1, 0).judge(Proof::EveryEnd, 0),
            Judgement::Undecided
        );
    }

    #[test]
    fn a_delete_hook_that_runs_for_every_end_fires() {
        assert_eq!(
            evidence(PROOF_ENDS, 2).judge(Proof::EveryEnd, PROOF_ENDS + 4),
            Judgement::Fires
        );
    }

    #[test]
    fn a_delete_hook_bypassed_by_some_ends_misses() {
        // The 5.10 case: the probe on the wrapper ran for `conntrack -D` but not for a flush.
        assert_eq!(
            evidence(PROOF_ENDS + 3, 1).judge(Proof::EveryEnd, 1),
            Judgement::Misses
        );
        // Runs but never a reported end: it reads the wrong argument.
        assert_eq!(
            evidence(PROOF_ENDS, 0).judge(Proof::EveryEnd, 50),
            Judgement::Misses
        );
    }

    #[test]
    fn without_statistics_reported_ends_prove_the_delete_hook() {
        let e = Evidence {
            stats: false,
            netlink_ends: PROOF_ENDS,
            ebpf_ends: 1,
        };
        assert_eq!(e.judge(Proof::EveryEnd, 0), Judgement::Fires);
    }

    #[test]
    fn a_nat_hook_fires_on_its_first_run() {
        assert_eq!(evidence(0, 0).judge(Proof::Runs, 0), Judgement::Undecided);
        assert_eq!(evidence(0, 0).judge(Proof::Runs, 1), Judgement::Fires);
    }
}
