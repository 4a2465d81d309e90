//! No optional hook counts as attached until it is seen firing. A probe can attach to a function
//! that some callers bypass (Debian 5.10's `nf_ct_delete`, whose flush path calls
//! `nf_ct_delete.part.0` directly): attached is not the same as complete.
//!
//! Until proven, whatever replaces a hook keeps running beside it (for `nf_ct_delete`: netlink
//! DESTROY events; the flow table ignores a second end of the same connection). The proof reads
//! the kernel's run counts of the hook's programs (BPF statistics, enabled only while proving) and
//! the events each source reported: `nf_nat_setup_info` is proven by one run or one connection it
//! reported; `nf_ct_delete` once netlink has reported [`PROOF_ENDS`] connection ends and the hook
//! reported at least as many itself (and ran at least as often, where run counts are available).
//! Without netlink, `nf_ct_delete` is the only source of ends and is proven by reporting one.
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
            log::info!("cannot enable BPF run statistics ({err}); optional hooks are proven by the events they report alone (connections from nf_nat_setup_info, ends from nf_ct_delete)");
            None
        }
    };
    let ids: Vec<u32> = pending.iter().flat_map(|h| h.prog_ids.clone()).collect();
    let runs_at_start = run_counts(&ids);
    let ebpf_ends_at_start = health.ebpf_ends.load(Ordering::Relaxed);
    let nat_events_at_start = health.nat_setup_events.load(Ordering::Relaxed);
    let netlink_ends =
        |stand_in: &Option<EndsStandIn>| stand_in.as_ref().map(|s| s.ends.load(Ordering::Relaxed));
    let mut interval = tokio::time::interval(PROOF_POLL);
    // The first tick is immediate: netlink's ends are counted from one poll later, so that each
    // has its eBPF report (written before netlink's message is sent) inside the eBPF window.
    interval.tick().await;
    let deadline = tokio::time::Instant::now() + PROOF_WINDOW;
    let mut netlink_base = None;
    let mut netlink_settled = netlink_ends(&stand_in).map(|_| 0);
    while !pending.is_empty() && tokio::time::Instant::now() < deadline {
        interval.tick().await;
        let netlink_now = netlink_ends(&stand_in);
        let base = *netlink_base.get_or_insert(netlink_now);
        let evidence = Evidence {
            stats: stats.is_some(),
            netlink_ends: netlink_settled,
            ebpf_ends: health.ebpf_ends.load(Ordering::Relaxed) - ebpf_ends_at_start,
            nat_setup_events: health.nat_setup_events.load(Ordering::Relaxed) - nat_events_at_start,
        };
        // Counted at this poll, judged at the next: by then the eBPF reports of these ends have
        // had a whole poll to be read from the ring buffer.
        netlink_settled = netlink_now.zip(base).map(|(now, base)| now - base);
        let runs_now = run_counts(&ids);
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
                        evidence.ebpf_ends,
                        evidence.netlink_ends.unwrap_or(0),
                        hook.fallback
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
    /// BPF run statistics are on, so `runs` counts.
    stats: bool,
    /// Ends netlink reported from one poll after proving began to the previous poll; `None`
    /// when netlink could not start.
    netlink_ends: Option<u64>,
    /// Ends the eBPF source reported since proving began.
    ebpf_ends: u64,
    /// Connections the `nf_nat_setup_info` hook reported since proving began.
    nat_setup_events: u64,
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
        match (proof, self.netlink_ends) {
            (Proof::Runs, _) if runs > 0 || self.nat_setup_events > 0 => Judgement::Fires,
            (Proof::Runs, _) => Judgement::Undecided,
            // Nothing to compare with: the hook is the only source of ends, and reporting one
            // shows it fires and reads the right argument.
            (Proof::EveryEnd, None) if self.ebpf_ends > 0 => Judgement::Fires,
            (Proof::EveryEnd, None) => Judgement::Undecided,
            (Proof::EveryEnd, Some(netlink)) if netlink < PROOF_ENDS => Judgement::Undecided,
            // Both count the observed namespace's ends: a hook that sees every end reports at
            // least as many as netlink over the same window. Runs count every namespace's ends,
            // so they too are at least netlink's.
            (Proof::EveryEnd, Some(netlink))
                if self.ebpf_ends >= netlink && (!self.stats || runs >= netlink) =>
            {
                Judgement::Fires
            }
            (Proof::EveryEnd, Some(_)) => Judgement::Misses,
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
            netlink_ends: Some(netlink_ends),
            ebpf_ends,
            nat_setup_events: 0,
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
    fn a_delete_hook_that_reports_every_end_fires() {
        assert_eq!(
            evidence(PROOF_ENDS, PROOF_ENDS).judge(Proof::EveryEnd, PROOF_ENDS + 4),
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
        // One end of its own is not enough when netlink saw three, however often it ran.
        assert_eq!(
            evidence(PROOF_ENDS, 1).judge(Proof::EveryEnd, 50),
            Judgement::Misses
        );
        // Runs but never a reported end: it reads the wrong argument.
        assert_eq!(
            evidence(PROOF_ENDS, 0).judge(Proof::EveryEnd, 50),
            Judgement::Misses
        );
    }

    #[test]
    fn without_statistics_reported_ends_alone_judge_the_delete_hook() {
        let judge = |ebpf_ends| {
            Evidence {
                stats: false,
                ..evidence(PROOF_ENDS, ebpf_ends)
            }
            .judge(Proof::EveryEnd, 0)
        };
        assert_eq!(judge(PROOF_ENDS), Judgement::Fires);
        assert_eq!(judge(PROOF_ENDS - 1), Judgement::Misses);
    }

    #[test]
    fn without_netlink_the_delete_hook_is_proven_by_its_own_ends() {
        let alone = |ebpf_ends| Evidence {
            netlink_ends: None,
            ..evidence(0, ebpf_ends)
        };
        assert_eq!(alone(0).judge(Proof::EveryEnd, 10), Judgement::Undecided);
        assert_eq!(alone(1).judge(Proof::EveryEnd, 1), Judgement::Fires);
    }

    #[test]
    fn a_nat_hook_fires_on_its_first_run() {
        assert_eq!(evidence(0, 0).judge(Proof::Runs, 0), Judgement::Undecided);
        assert_eq!(evidence(0, 0).judge(Proof::Runs, 1), Judgement::Fires);
    }

    #[test]
    fn without_statistics_a_nat_hook_is_proven_by_a_connection_it_reported() {
        let e = Evidence {
            stats: false,
            nat_setup_events: 1,
            ..evidence(0, 0)
        };
        assert_eq!(e.judge(Proof::Runs, 0), Judgement::Fires);
    }
}
