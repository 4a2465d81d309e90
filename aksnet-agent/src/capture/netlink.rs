//! Conntrack NEW/DESTROY events over `NETLINK_NETFILTER` (ctnetlink): the capture source that
//! needs no eBPF.
//!
//! The socket is opened inside the observed namespace, so it reports that namespace's conntrack
//! table. Only the NEW and DESTROY groups are joined: the kernel sends NEW when the entry is
//! confirmed, after DNAT (PREROUTING/OUTPUT) and SNAT (POSTROUTING/INPUT) are both set up, so NEW
//! already carries the translated reply tuple; UPDATE would add an event per TCP state change.
//! The kernel reports no interfaces here, so `in_ifindex`/`out_ifindex` are always `None`.

pub(crate) mod parse;

pub use parse::{parse_datagram, ParseError};

use super::netns::{Netns, NetnsError};
use super::{CaptureHealth, HookStatus};
use crate::events::FlowEvent;
use parse::{NFNLGRP_CONNTRACK_DESTROY, NFNLGRP_CONNTRACK_NEW};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc::{self, error::TrySendError};

/// Kernel switch for conntrack event delivery; per network namespace.
const EVENTS_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_events";
/// How often the receive thread looks at its stop flag when no event arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Pause after the socket was emptied: bounds how late an event is handled on a quiet node.
const READ_PAUSE: Duration = Duration::from_millis(10);
/// Pause between attempts to hand an event to a full channel.
const BACKPRESSURE_WAIT: Duration = Duration::from_millis(5);
/// Datagrams read by one `recvmmsg(2)`: a busy node's events cost a system call per batch.
const RECV_BATCH: usize = 64;
/// Room for one datagram: each holds one ctnetlink event, well under 1 KiB (a longer one is
/// truncated by the kernel, and counted as undecodable).
const DATAGRAM_BUF: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("could not {action} the conntrack netlink socket in {netns}: {source}")]
    Socket {
        action: &'static str,
        netns: String,
        source: io::Error,
    },
    #[error("permission denied subscribing to conntrack events in {netns}: needs CAP_NET_ADMIN (run as root or add the capability)")]
    Permission { netns: String },
    #[error("conntrack event delivery is off in {netns} (net.netfilter.nf_conntrack_events = 0) and turning it on failed: {source}; set it to 1 in that namespace (`sysctl -w net.netfilter.nf_conntrack_events=1`)")]
    EventsDisabled { netns: String, source: io::Error },
    #[error("could not start the netlink capture thread: {0}")]
    Thread(io::Error),
}

/// Tuning of the event socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetlinkOptions {
    /// Socket receive buffer. Events arriving while it is full are dropped by the kernel.
    pub rcvbuf_bytes: usize,
    /// Subscribe to NEW events too; without, only connection ends (DESTROY) arrive, which is all
    /// the eBPF source needs from netlink, at a fraction of the socket load.
    pub new_events: bool,
}

impl Default for NetlinkOptions {
    fn default() -> Self {
        // Room for tens of thousands of events: a node's connection bursts fit.
        NetlinkOptions {
            rcvbuf_bytes: 16 << 20,
            new_events: true,
        }
    }
}

/// A running ctnetlink event capture; it stops (and its thread exits) when dropped.
#[derive(Debug)]
pub struct NetlinkCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    delivered: Arc<AtomicU64>,
}

impl NetlinkCapture {
    /// Starts capturing in `netns` with [`NetlinkOptions::default`].
    pub fn start(
        netns: &Netns,
        tx: mpsc::Sender<FlowEvent>,
        health: Arc<CaptureHealth>,
    ) -> Result<NetlinkCapture, NetlinkError> {
        Self::start_with(netns, NetlinkOptions::default(), tx, health)
    }

    pub fn start_with(
        netns: &Netns,
        options: NetlinkOptions,
        tx: mpsc::Sender<FlowEvent>,
        health: Arc<CaptureHealth>,
    ) -> Result<NetlinkCapture, NetlinkError> {
        let label = netns.to_string();
        let sock = netns.run_in(|| {
            ensure_events_enabled(&label)?;
            open_event_socket(&label, options)
        })??;
        let events = if options.new_events {
            "NEW and DESTROY"
        } else {
            "DESTROY"
        };
        health.record_hook(HookStatus {
            name: "netlink/ctnetlink-events".into(),
            attached: true,
            detail: format!("conntrack {events} events in {label}"),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let receiver = Receiver {
            sock,
            netns: netns.inode(),
            label,
            tx,
            health,
            stop: stop.clone(),
            delivered: Arc::clone(&delivered),
        };
        let thread = std::thread::Builder::new()
            .name("aksnet-netlink".into())
            .spawn(move || receiver.run())
            .map_err(NetlinkError::Thread)?;
        Ok(NetlinkCapture {
            stop,
            thread: Some(thread),
            delivered,
        })
    }

    /// Events this capture handed to the pipeline so far.
    pub fn delivered(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.delivered)
    }
}

impl Drop for NetlinkCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread notices the flag within POLL_INTERVAL; a panic there was already
            // reported by the panic hook.
            let _ = thread.join();
        }
    }
}

/// Makes sure the kernel generates conntrack events in the current thread's namespace.
/// `/proc/sys/net` shows the namespace of the thread that opens it.
fn ensure_events_enabled(label: &str) -> Result<(), NetlinkError> {
    match std::fs::read_to_string(EVENTS_SYSCTL) {
        // 1 = on, 2 = on while someone listens (the default on recent kernels).
        Ok(value) if value.trim() != "0" => Ok(()),
        Ok(_) => {
            std::fs::write(EVENTS_SYSCTL, "1").map_err(|source| NetlinkError::EventsDisabled {
                netns: label.to_string(),
                source,
            })?;
            log::warn!(
                "net.netfilter.nf_conntrack_events was 0 in {label}, so conntrack sent no events; \
                 set it to 1 in that namespace only (the one being observed)"
            );
            Ok(())
        }
        Err(e) => {
            log::warn!(
                "could not read {EVENTS_SYSCTL} in {label} ({e}): cannot tell whether conntrack \
                 events are enabled; subscribing anyway"
            );
            Ok(())
        }
    }
}

/// Opens, binds and subscribes the event socket in the current thread's namespace.
fn open_event_socket(label: &str, options: NetlinkOptions) -> Result<OwnedFd, NetlinkError> {
    let rcvbuf = options.rcvbuf_bytes;
    let sock = open_socket(label)?;
    let groups: &[u32] = if options.new_events {
        &[NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY]
    } else {
        &[NFNLGRP_CONNTRACK_DESTROY]
    };
    for &group in groups {
        if let Err(source) = set_opt(
            &sock,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            group,
        ) {
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => NetlinkError::Permission {
                    netns: label.to_string(),
                },
                _ => NetlinkError::Socket {
                    action: "join the conntrack event groups of",
                    netns: label.to_string(),
                    source,
                },
            });
        }
    }

    let wanted = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
    // SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN; SO_RCVBUF is capped.
    if let Err(e) = set_opt(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, wanted) {
        log::warn!(
            "SO_RCVBUFFORCE {rcvbuf} bytes on the conntrack event socket in {label} failed ({e}); \
             using SO_RCVBUF, which net.core.rmem_max caps: expect dropped events under load"
        );
        set_opt(&sock, libc::SOL_SOCKET, libc::SO_RCVBUF, wanted).map_err(|source| {
            NetlinkError::Socket {
                action: "set the receive buffer of",
                netns: label.to_string(),
                source,
            }
        })?;
    }

    let timeout = libc::timeval {
        tv_sec: POLL_INTERVAL.as_secs() as libc::time_t,
        tv_usec: POLL_INTERVAL.subsec_micros() as libc::suseconds_t,
    };
    set_opt(&sock, libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout).map_err(|source| {
        NetlinkError::Socket {
            action: "set the receive timeout of",
            netns: label.to_string(),
            source,
        }
    })?;
    Ok(sock)
}

/// A ctnetlink socket, bound, in the current thread's namespace (the conntrack statistics
/// requests of `metrics::conntrack` use it too).
pub(crate) fn open_socket(label: &str) -> Result<OwnedFd, NetlinkError> {
    let fail = |action: &'static str| NetlinkError::Socket {
        action,
        netns: label.to_string(),
        source: io::Error::last_os_error(),
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(fail("create"));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: addr is a valid sockaddr_nl and the length matches it.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(fail("bind"));
    }
    Ok(sock)
}

pub(crate) fn set_opt<T>(
    sock: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> io::Result<()> {
    // SAFETY: value lives across the call and the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The receive loop's state, moved onto its thread.
struct Receiver {
    sock: OwnedFd,
    netns: u32,
    label: String,
    tx: mpsc::Sender<FlowEvent>,
    health: Arc<CaptureHealth>,
    stop: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
}

impl Receiver {
    fn run(self) {
        let mut batch = Batch::new();
        // Blocking until a datagram comes, then without blocking until the socket is empty.
        let mut flags = 0;
        while !self.stop.load(Ordering::Relaxed) {
            let received = match batch.receive(&self.sock, flags) {
                Ok(n) => n,
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) if flags == libc::MSG_DONTWAIT => {
                        // Emptied: let the next events gather in the socket's buffer, so that
                        // a busy node costs a wake-up per batch, not one per connection.
                        flags = 0;
                        std::thread::sleep(READ_PAUSE);
                        continue;
                    }
                    Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        // The kernel says only that it dropped events, not how many.
                        self.health.count_lost(1);
                        log::warn!(
                            "conntrack event socket in {} overflowed: the kernel dropped an \
                             unknown number of events (counted as 1 lost); give the socket a \
                             larger receive buffer",
                            self.label
                        );
                        continue;
                    }
                    _ => {
                        log::error!(
                            "receiving conntrack events in {} failed: {err}; the netlink capture stops",
                            self.label
                        );
                        return;
                    }
                },
            };
            flags = libc::MSG_DONTWAIT;
            let ts = SystemTime::now();
            for i in 0..received {
                let Some(datagram) = batch.datagram(i) else {
                    self.undecodable(&format!(
                        "a datagram longer than {DATAGRAM_BUF} bytes was cut short"
                    ));
                    continue;
                };
                for parsed in parse_datagram(datagram, self.netns, ts) {
                    match parsed {
                        Ok(event) => {
                            if !self.deliver(event) {
                                return;
                            }
                            self.health.count_event();
                            self.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => self.undecodable(&e.to_string()),
                    }
                }
            }
        }
    }

    fn undecodable(&self, why: &str) {
        self.health.decode_errors.fetch_add(1, Ordering::Relaxed);
        log::warn!("undecodable conntrack event in {}: {why}", self.label);
    }

    /// Hands one event to the pipeline, waiting while the channel is full but still honouring
    /// the stop flag (a plain `blocking_send` could keep `Drop` waiting forever). False when
    /// the capture should end.
    fn deliver(&self, mut event: FlowEvent) -> bool {
        loop {
            match self.tx.try_send(event) {
                Ok(()) => return true,
                Err(TrySendError::Closed(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return false;
                    }
                    event = back;
                    std::thread::sleep(BACKPRESSURE_WAIT);
                }
            }
        }
    }
}

/// Buffers for [`RECV_BATCH`] datagrams, read by one `recvmmsg(2)`. It stays on the receive
/// thread: its message headers point into its own buffers.
struct Batch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Batch {
        let mut bufs = vec![0u8; RECV_BATCH * DATAGRAM_BUF];
        let mut iovs: Vec<libc::iovec> = bufs
            .chunks_exact_mut(DATAGRAM_BUF)
            .map(|buf| libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            })
            .collect();
        let msgs = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid value (no name, no
                // control data).
                let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
                msg.msg_hdr.msg_iov = iov;
                msg.msg_hdr.msg_iovlen = 1;
                msg
            })
            .collect();
        // Moving the vectors into the struct moves no heap memory: the pointers stay valid.
        Batch { bufs, iovs, msgs }
    }

    /// Receives up to [`RECV_BATCH`] datagrams; with `flags` 0 it blocks until the first one
    /// (or the socket's receive timeout), never for the rest. Returns how many arrived.
    fn receive(&mut self, sock: &OwnedFd, flags: libc::c_int) -> io::Result<usize> {
        // MSG_WAITFORONE: wait for the first datagram only, then take what is already queued.
        // SAFETY: msgs point at iovs, which point into bufs; all three live in self, outlive
        // the call and are never resized; msgs.len() is their number.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                self.msgs.len() as libc::c_uint,
                flags | libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// The `i`th datagram of the last receive; `None` when it did not fit its buffer.
    fn datagram(&self, i: usize) -> Option<&[u8]> {
        let msg = &self.msgs[i];
        if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let start = i * DATAGRAM_BUF;
        let len = (msg.msg_len as usize).min(self.iovs[i].iov_len);
        Some(&self.bufs[start..start + len])
    }
}
