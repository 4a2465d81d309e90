//! Conntrack pressure of the observed namespace: its entry count against the table's limit, and
//! the kernel's per-CPU statistics (insert failures, drops, early drops, …) summed over CPUs.
//!
//! Both come over ctnetlink, on a socket opened once inside the observed namespace:
//! `IPCTNL_MSG_CT_GET_STATS` answers `nf_conntrack_count` of that namespace and the global
//! `nf_conntrack_max`; `IPCTNL_MSG_CT_GET_STATS_CPU` dumps one message per CPU with that
//! namespace's counters (what `conntrack -S` prints).

use crate::capture::netlink::parse::{
    align4, be_u32, Attrs, ParseError, NFGENMSG_LEN, NFNL_SUBSYS_CTNETLINK, NLMSG_HDRLEN,
};
use crate::capture::netlink::{open_socket, set_opt, NetlinkError};
use crate::capture::netns::Netns;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// `enum cntl_msg_types`.
const IPCTNL_MSG_CT_GET_STATS_CPU: u16 = 4;
const IPCTNL_MSG_CT_GET_STATS: u16 = 5;
/// `enum ctattr_stats_global`.
const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;
/// `enum ctattr_stats_cpu`.
const CTA_STATS_FOUND: u16 = 2;
const CTA_STATS_INVALID: u16 = 4;
const CTA_STATS_INSERT: u16 = 8;
const CTA_STATS_INSERT_FAILED: u16 = 9;
const CTA_STATS_DROP: u16 = 10;
const CTA_STATS_EARLY_DROP: u16 = 11;
const CTA_STATS_ERROR: u16 = 12;
const CTA_STATS_SEARCH_RESTART: u16 = 13;
const CTA_STATS_CLASH_RESOLVE: u16 = 14;
const CTA_STATS_CHAIN_TOOLONG: u16 = 15;
/// `include/uapi/linux/netlink.h`.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// A scrape waits this long for the kernel's answer at most.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// One message per CPU, about 150 bytes each: room for 400 CPUs per datagram.
const RECV_BUF: usize = 64 * 1024;

/// What the kernel's per-CPU conntrack statistics add up to, and the table's fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// `nf_conntrack_count`: entries in the observed namespace's table.
    pub entries: u64,
    /// `nf_conntrack_max`: the limit, shared by every namespace.
    pub max: u64,
    pub found: u64,
    pub invalid: u64,
    pub insert: u64,
    /// Entries that could not be inserted at confirm time: a clash (e.g. the UDP race of
    /// kubernetes#56903, two DNS queries of one socket DNATed to different backends) or a full
    /// hash chain. The packet is dropped.
    pub insert_failed: u64,
    /// New connections refused because the table was full.
    pub drop: u64,
    /// Entries evicted to make room for new ones when the table was full.
    pub early_drop: u64,
    pub error: u64,
    pub search_restart: u64,
    pub clash_resolve: u64,
    pub chain_toolong: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(transparent)]
    Open(#[from] NetlinkError),
    #[error("asking conntrack for its statistics in {netns} failed: {source}")]
    Io { netns: String, source: io::Error },
    #[error("the kernel refused the conntrack statistics request in {netns}: {source} (is nf_conntrack loaded?)")]
    Refused { netns: String, source: io::Error },
    #[error("conntrack statistics answer in {netns}: {source}")]
    Parse { netns: String, source: ParseError },
}

/// A ctnetlink socket in the observed namespace, asked at every scrape.
#[derive(Debug)]
pub struct ConntrackReader {
    sock: OwnedFd,
    netns: String,
    seq: u32,
}

impl ConntrackReader {
    /// Opens the socket inside `netns`: it answers for that namespace from then on.
    pub fn open(netns: &Netns) -> Result<ConntrackReader, StatsError> {
        let label = netns.to_string();
        let sock = netns
            .run_in(|| open_socket(&label))
            .map_err(NetlinkError::from)??;
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        set_opt(&sock, libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout).map_err(|source| {
            StatsError::Io {
                netns: label.clone(),
                source,
            }
        })?;
        Ok(ConntrackReader {
            sock,
            netns: label,
            seq: 0,
        })
    }

    /// The table's fill and the per-CPU counters summed, as of now.
    pub fn read(&mut self) -> Result<ConntrackStats, StatsError> {
        let mut stats = ConntrackStats::default();
        // Not a dump: its one answer is followed by the acknowledgement asked for.
        for body in self.ask(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST | NLM_F_ACK)? {
            add_attrs(&mut stats, &body, true).map_err(|e| self.parse_error(e))?;
        }
        for body in self.ask(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP)? {
            add_attrs(&mut stats, &body, false).map_err(|e| self.parse_error(e))?;
        }
        Ok(stats)
    }

    fn parse_error(&self, source: ParseError) -> StatsError {
        StatsError::Parse {
            netns: self.netns.clone(),
            source,
        }
    }

    /// Sends one request and collects the bodies of its answer's messages of that type.
    fn ask(&mut self, message: u16, flags: u16) -> Result<Vec<Vec<u8>>, StatsError> {
        self.seq = self.seq.wrapping_add(1);
        let msg_type = NFNL_SUBSYS_CTNETLINK << 8 | message;
        let request = request(msg_type, flags, self.seq);
        let io_err = |source| StatsError::Io {
            netns: self.netns.clone(),
            source,
        };
        // SAFETY: request is valid for reads of its length.
        let sent = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io_err(io::Error::last_os_error()));
        }
        let mut bodies = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err(err));
            }
            match frame(&buf[..n as usize], msg_type, self.seq, &mut bodies) {
                Ok(Answer::More) => continue,
                Ok(Answer::Done) => return Ok(bodies),
                Ok(Answer::Error(errno)) => {
                    return Err(StatsError::Refused {
                        netns: self.netns.clone(),
                        source: io::Error::from_raw_os_error(errno),
                    })
                }
                Err(e) => return Err(self.parse_error(e)),
            }
        }
    }
}

/// A request: `nlmsghdr` and an `nfgenmsg` for any family, no attributes.
fn request(msg_type: u16, flags: u16, seq: u32) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&msg_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, resource id 0.
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A dump continues in the next datagram.
    More,
    Done,
    /// `NLMSG_ERROR` with this errno.
    Error(i32),
}

/// Splits one datagram into messages; bodies of `msg_type` answering `seq` go to `bodies`. The
/// answer ends with `NLMSG_DONE` (a dump) or an acknowledgement (`NLMSG_ERROR`, code 0).
fn frame(
    buf: &[u8],
    msg_type: u16,
    seq: u32,
    bodies: &mut Vec<Vec<u8>>,
) -> Result<Answer, ParseError> {
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HDRLEN {
            return Err(ParseError::ShortHeader(rest.len()));
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(ParseError::MessageLength {
                len,
                left: rest.len(),
            });
        }
        let ty = u16::from_ne_bytes([rest[4], rest[5]]);
        let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        let body = &rest[NLMSG_HDRLEN..len];
        rest = &rest[align4(len).min(rest.len())..];
        if msg_seq != seq {
            // A late answer to an earlier request that timed out.
            continue;
        }
        match ty {
            NLMSG_DONE => return Ok(Answer::Done),
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or(ParseError::ShortNfgenmsg(body.len()))?;
                return Ok(if code == 0 {
                    Answer::Done
                } else {
                    Answer::Error(-code)
                });
            }
            t if t == msg_type => bodies.push(body.to_vec()),
            _ => {}
        }
    }
    Ok(Answer::More)
}

/// Adds one statistics message's attributes to `stats`: `global` for the answer to
/// `IPCTNL_MSG_CT_GET_STATS`, else one CPU's counters (the two number their attributes apart).
fn add_attrs(stats: &mut ConntrackStats, body: &[u8], global: bool) -> Result<(), ParseError> {
    if body.len() < NFGENMSG_LEN {
        return Err(ParseError::ShortNfgenmsg(body.len()));
    }
    for attr in Attrs(&body[NFGENMSG_LEN..]) {
        let (ty, value) = attr?;
        let field = match (global, ty) {
            (true, CTA_STATS_GLOBAL_ENTRIES) => &mut stats.entries,
            (true, CTA_STATS_GLOBAL_MAX_ENTRIES) => &mut stats.max,
            (false, CTA_STATS_FOUND) => &mut stats.found,
            (false, CTA_STATS_INVALID) => &mut stats.invalid,
            (false, CTA_STATS_INSERT) => &mut stats.insert,
            (false, CTA_STATS_INSERT_FAILED) => &mut stats.insert_failed,
            (false, CTA_STATS_DROP) => &mut stats.drop,
            (false, CTA_STATS_EARLY_DROP) => &mut stats.early_drop,
            (false, CTA_STATS_ERROR) => &mut stats.error,
            (false, CTA_STATS_SEARCH_RESTART) => &mut stats.search_restart,
            (false, CTA_STATS_CLASH_RESOLVE) => &mut stats.clash_resolve,
            (false, CTA_STATS_CHAIN_TOOLONG) => &mut stats.chain_toolong,
            // Counters the kernel no longer maintains, and any it adds later.
            _ => continue,
        };
        *field += u64::from(be_u32(value, "CTA_STATS_*")?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message: header, an nfgenmsg for `cpu`, then `(type, u32)` attributes.
    fn message(msg_type: u16, seq: u32, cpu: u16, attrs: &[(u16, u32)]) -> Vec<u8> {
        let mut body = vec![0, 0];
        body.extend_from_slice(&cpu.to_be_bytes());
        for (ty, value) in attrs {
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&ty.to_ne_bytes());
            body.extend_from_slice(&value.to_be_bytes());
        }
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&msg_type.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn error(seq: u32, code: i32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
        out.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&code.to_ne_bytes());
        out
    }

    const CPU: u16 = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS_CPU;
    const GLOBAL: u16 = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS;

    #[test]
    fn per_cpu_counters_are_summed_until_done() {
        let cpu0 = [
            (CTA_STATS_INSERT_FAILED, 3),
            (CTA_STATS_DROP, 1),
            (CTA_STATS_FOUND, 9),
        ];
        let cpu1 = [
            (CTA_STATS_INSERT_FAILED, 4),
            (CTA_STATS_EARLY_DROP, 2),
            (99, 5),
        ];
        let mut first = message(CPU, 7, 0, &cpu0);
        // A late answer to an earlier request is skipped.
        first.extend(message(CPU, 6, 0, &[(CTA_STATS_DROP, 100)]));
        let mut bodies = Vec::new();
        assert_eq!(frame(&first, CPU, 7, &mut bodies), Ok(Answer::More));
        let mut second = message(CPU, 7, 1, &cpu1);
        second.extend(message(NLMSG_DONE, 7, 0, &[]));
        assert_eq!(frame(&second, CPU, 7, &mut bodies), Ok(Answer::Done));
        let mut stats = ConntrackStats::default();
        for body in &bodies {
            add_attrs(&mut stats, body, false).unwrap();
        }
        assert_eq!(
            stats,
            ConntrackStats {
                insert_failed: 7,
                drop: 1,
                early_drop: 2,
                found: 9,
                ..ConntrackStats::default()
            }
        );
    }

    #[test]
    fn the_global_answer_gives_count_and_limit_and_ends_with_its_ack() {
        let mut datagram = message(
            GLOBAL,
            1,
            0,
            &[
                (CTA_STATS_GLOBAL_ENTRIES, 42),
                (CTA_STATS_GLOBAL_MAX_ENTRIES, 262_144),
            ],
        );
        datagram.extend(error(1, 0));
        let mut bodies = Vec::new();
        assert_eq!(frame(&datagram, GLOBAL, 1, &mut bodies), Ok(Answer::Done));
        let mut stats = ConntrackStats::default();
        add_attrs(&mut stats, &bodies[0], true).unwrap();
        assert_eq!((stats.entries, stats.max, stats.found), (42, 262_144, 0));
    }

    #[test]
    fn refusals_and_broken_answers_are_errors() {
        let mut bodies = Vec::new();
        let refused = error(3, -libc::EOPNOTSUPP);
        assert_eq!(
            frame(&refused, GLOBAL, 3, &mut bodies),
            Ok(Answer::Error(libc::EOPNOTSUPP))
        );
        let mut truncated = message(CPU, 3, 0, &[(CTA_STATS_DROP, 1)]);
        truncated.truncate(truncated.len() - 2);
        assert!(frame(&truncated, CPU, 3, &mut bodies).is_err());
        let mut stats = ConntrackStats::default();
        let short_value = {
            let mut m = message(CPU, 3, 0, &[]);
            m.extend_from_slice(&6u16.to_ne_bytes());
            m.extend_from_slice(&CTA_STATS_DROP.to_ne_bytes());
            m.extend_from_slice(&[0, 1, 0, 0]);
            m
        };
        assert!(add_attrs(&mut stats, &short_value[NLMSG_HDRLEN..], false).is_err());
        assert_eq!(
            request(CPU, NLM_F_REQUEST | NLM_F_DUMP, 9).len(),
            NLMSG_HDRLEN + NFGENMSG_LEN
        );
    }
}
