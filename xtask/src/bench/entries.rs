//! How many new conntrack entries the storm's connections got on the node, counted by the
//! kernel itself: a rule at the top of the node's nat `PREROUTING` chain, which netfilter
//! evaluates once per new entry (the NAT decision) and never for a packet of a known one.
//!
//! Completed connections are not the same count. When a client port is handed out again at
//! once, the new connection's SYN can reach the node before the old connection's RST (they
//! leave the client on different CPUs); conntrack then finds the old entry still established,
//! lets the SYN through on it and follows the new handshake there. That connection gets no
//! entry, no NAT decision and no conntrack event: there is nothing for the agent to report.

use crate::bench::error::BenchError;
use crate::bench::rig::{CLIENT, FRONTEND};
use crate::lab::exec::in_ns;

const CHAIN: &str = "PREROUTING";

/// The counting rule, installed in the node's nat table while it lives.
pub struct EntryCounter {
    netns: String,
    rule: Vec<String>,
}

impl EntryCounter {
    /// Inserts the rule that counts the measured client's new entries to the frontend.
    pub fn install(node_netns: &str) -> Result<EntryCounter, BenchError> {
        let rule = [
            "-s",
            &format!("{CLIENT}/32"),
            "-d",
            &format!("{}/32", FRONTEND.ip()),
            "-p",
            "tcp",
            "--dport",
            &FRONTEND.port().to_string(),
            "-m",
            "comment",
            "--comment",
            "aksnet bench: new conntrack entries of the storm",
        ]
        .map(str::to_string)
        .to_vec();
        let counter = EntryCounter {
            netns: node_netns.to_string(),
            rule,
        };
        counter.iptables(&["-I", CHAIN, "1"], true)?;
        Ok(counter)
    }

    /// Sets the count to zero.
    pub fn reset(&self) -> Result<(), BenchError> {
        self.iptables(&["-Z", CHAIN, "1"], false).map(drop)
    }

    /// New entries counted since the last [`reset`](Self::reset).
    pub fn read(&self) -> Result<u64, BenchError> {
        let listing = self.iptables(&["-L", CHAIN, "1", "-v", "-x", "-n"], false)?;
        parse_packets(&listing).ok_or_else(|| BenchError::Parse {
            what: format!("the node's nat {CHAIN} rule 1 in {}", self.netns),
            detail: format!("expected its packet count first, got {listing:?}"),
        })
    }

    /// `iptables -t nat` in the node with `args`, followed by the rule when `with_rule`.
    fn iptables(&self, args: &[&str], with_rule: bool) -> Result<String, BenchError> {
        let mut full = vec!["iptables", "-t", "nat"];
        full.extend_from_slice(args);
        if with_rule {
            full.extend(self.rule.iter().map(String::as_str));
        }
        Ok(in_ns(&self.netns, &full)?)
    }
}

impl Drop for EntryCounter {
    fn drop(&mut self) {
        // The lab's teardown removes the namespace anyway; this keeps a lab kept up clean.
        let _ = self.iptables(&["-D", CHAIN], true);
    }
}

/// The packet count of an `iptables -L CHAIN N -v -x -n` line: its first field.
fn parse_packets(listing: &str) -> Option<u64> {
    listing.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_packet_count_of_the_rule() {
        let line = "   29999  1799940            6    --  *      *       203.0.113.10         192.0.2.10           tcp dpt:80 /* aksnet bench: new conntrack entries of the storm */\n";
        assert_eq!(parse_packets(line), Some(29_999));
        assert_eq!(
            parse_packets("iptables: Index of insertion too big.\n"),
            None
        );
        assert_eq!(parse_packets(""), None);
    }
}
