//! The bench's traffic: threads that `setns(2)` into a lab namespace and then open many short TCP
//! connections, serve them, or stream bulk data. Every loop is bounded in count and time; every
//! socket has a timeout.

use crate::bench::error::BenchError;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Any single socket operation gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often blocked accept loops look at their stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
const BULK_CHUNK: usize = 128 * 1024;

/// Moves the calling thread into a lab namespace (`/run/netns/NAME`); other threads stay put.
pub fn enter(netns: &str) -> Result<(), BenchError> {
    let path = Path::new("/run/netns").join(netns);
    let fail = |source| BenchError::Netns {
        netns: netns.to_string(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(fail)?;
    // SAFETY: the fd is open for the call's duration; setns affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn socket_error(
    what: &'static str,
    addr: impl ToString,
) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Socket {
        what,
        addr: addr.to_string(),
        source,
    }
}

/// Runs `f` on a new thread inside `netns`.
fn spawn_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T, BenchError> + Send + 'static,
) -> JoinHandle<Result<T, BenchError>> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        enter(&netns)?;
        f()
    })
}

fn join<T>(handle: JoinHandle<Result<T, BenchError>>, what: &str) -> Result<T, BenchError> {
    handle.join().map_err(|_| BenchError::Failed {
        what: what.to_string(),
        detail: "the thread panicked".into(),
    })?
}

/// A listening socket whose `accept` returns every [`ACCEPT_POLL`], so its loop can stop.
fn listener(addr: SocketAddrV4) -> Result<TcpListener, BenchError> {
    let fail = |what| socket_error(what, addr);
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(fail("cannot create a listening socket for"))?;
    socket
        .set_reuse_address(true)
        .map_err(fail("cannot set SO_REUSEADDR on"))?;
    socket
        .bind(&SockAddr::from(addr))
        .map_err(fail("cannot bind"))?;
    socket.listen(4096).map_err(fail("cannot listen on"))?;
    // SO_RCVTIMEO bounds accept(2) too.
    socket
        .set_read_timeout(Some(ACCEPT_POLL))
        .map_err(fail("cannot set the accept timeout on"))?;
    Ok(socket.into())
}

fn accept_timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Answers each connection's one byte with one byte, then waits for the client to close.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Result<u64, BenchError>>>,
}

impl EchoServer {
    /// Listens on `addr` inside `netns` with `workers` accept threads.
    pub fn start(
        netns: &str,
        addr: SocketAddrV4,
        workers: usize,
    ) -> Result<EchoServer, BenchError> {
        let listener = Arc::new(join(
            spawn_in(netns, move || listener(addr)),
            "the echo server",
        )?);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|_| {
                let (listener, stop) = (Arc::clone(&listener), Arc::clone(&stop));
                std::thread::spawn(move || serve(&listener, &stop))
            })
            .collect();
        Ok(EchoServer { stop, workers })
    }

    /// Stops the accept loops; returns how many connections were answered.
    pub fn stop(mut self) -> Result<u64, BenchError> {
        self.stop.store(true, Ordering::Relaxed);
        let mut served = 0;
        for worker in std::mem::take(&mut self.workers) {
            served += join(worker, "the echo server")?;
        }
        Ok(served)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) -> Result<u64, BenchError> {
    let mut served = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if accept_timed_out(&e) => continue,
            Err(e) => return Err(socket_error("cannot accept on", "the echo server")(e)),
        };
        // A misbehaving client costs at most IO_TIMEOUT; its failure is the client's to count.
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let mut byte = [0u8; 1];
        if conn.read_exact(&mut byte).is_ok() && conn.write_all(&byte).is_ok() {
            served += 1;
            // Wait for the client's reset so that no side keeps TIME_WAIT state.
            let _ = conn.read(&mut byte);
        }
    }
    Ok(served)
}

/// One client connection: connect from `src`, one byte each way, then close with a reset (no
/// TIME_WAIT, so thousands of runs do not exhaust the client's ports). Returns the source port.
pub fn connect_once(src: Ipv4Addr, dst: SocketAddrV4) -> Result<u16, std::io::Error> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to an int of the size passed. Choosing the port at
    // connect time makes it unique per destination instead of per source address.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))?;
    socket.connect_timeout(&SockAddr::from(dst), IO_TIMEOUT)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.set_linger(Some(Duration::ZERO))?;
    let mut stream: TcpStream = socket.into();
    let port = stream.local_addr()?.port();
    stream.write_all(&[1])?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(port)
}

/// What a connection storm achieved.
#[derive(Clone, Debug)]
pub struct Storm {
    pub ok: u64,
    /// Completed connections whose source port (so whole 4-tuple) an earlier one in this storm
    /// had used: without TIME_WAIT the kernel hands ports out again at once.
    pub reused: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub first_error: Option<String>,
    /// Each completed connection's source port and when it began, in time order: a shortfall
    /// can then name the connection missed (the port and its nth use).
    pub connections: Vec<(u16, SystemTime)>,
}

impl Storm {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// Opens `count` connections from `src` to `dst` inside `netns`, `workers` at a time, as fast as
/// they complete; stops early at `deadline`.
pub fn storm(
    netns: &str,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    count: u64,
    workers: usize,
    deadline: Duration,
) -> Result<Storm, BenchError> {
    let next = Arc::new(AtomicU64::new(0));
    // Workers enter the namespace first, then all start together with the clock.
    let start = Arc::new(Barrier::new(workers + 1));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (next, start) = (Arc::clone(&next), Arc::clone(&start));
            let netns = netns.to_string();
            std::thread::spawn(move || {
                let entered = enter(&netns);
                start.wait();
                entered?;
                let began = Instant::now();
                let (mut ports, mut failed, mut first_error) = (Vec::new(), 0u64, None);
                while next.fetch_add(1, Ordering::Relaxed) < count && began.elapsed() < deadline {
                    let at = SystemTime::now();
                    match connect_once(src, dst) {
                        Ok(port) => ports.push((port, at)),
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                Ok::<_, BenchError>((ports, failed, first_error))
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut total = Storm {
        ok: 0,
        reused: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        first_error: None,
        connections: Vec::new(),
    };
    let results = handles
        .into_iter()
        .map(|h| join(h, "a connection worker"))
        .collect::<Result<Vec<_>, _>>()?;
    total.elapsed = began.elapsed();
    for (ports, failed, first_error) in results {
        total.connections.extend(ports);
        total.failed += failed;
        total.first_error = total.first_error.or(first_error);
    }
    total.connections.sort_by_key(|&(_, at)| at);
    let mut used = HashSet::new();
    for &(port, _) in &total.connections {
        total.ok += 1;
        total.reused += u64::from(!used.insert(port));
    }
    Ok(total)
}

/// Bytes one TCP stream carried and how long the receiver took for them.
#[derive(Clone, Copy, Debug)]
pub struct Bulk {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Bulk {
    pub fn gbit_per_second(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Streams data from `sender_netns` to a sink on `sink` in `sink_netns` for `duration`.
pub fn bulk(
    sender_netns: &str,
    sink_netns: &str,
    sink: SocketAddrV4,
    duration: Duration,
) -> Result<Bulk, BenchError> {
    let listener = join(
        spawn_in(sink_netns, move || listener(sink)),
        "the bulk sink",
    )?;
    let receiver = std::thread::spawn(move || receive(&listener, sink, duration));
    let sender = spawn_in(sender_netns, move || send(sink, duration));
    let sent = join(sender, "the bulk sender");
    let received = join(receiver, "the bulk sink")?;
    sent?;
    Ok(received)
}

fn send(sink: SocketAddrV4, duration: Duration) -> Result<(), BenchError> {
    let fail = |what| socket_error(what, sink);
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(sink), IO_TIMEOUT)
        .map_err(fail("cannot connect the bulk stream to"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(fail("cannot set a write timeout towards"))?;
    let chunk = vec![0x5a_u8; BULK_CHUNK];
    let began = Instant::now();
    while began.elapsed() < duration {
        stream
            .write_all(&chunk)
            .map_err(fail("the bulk stream broke towards"))?;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(fail("cannot close the bulk stream to"))
}

/// Counts bytes from the first one received to the sender's close.
fn receive(
    listener: &TcpListener,
    sink: SocketAddrV4,
    duration: Duration,
) -> Result<Bulk, BenchError> {
    let fail = |what| socket_error(what, sink);
    let waited = Instant::now();
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if accept_timed_out(&e) && waited.elapsed() < IO_TIMEOUT * 2 => continue,
            Err(e) => return Err(fail("no bulk stream arrived at")(e)),
        }
    };
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(fail("cannot set a read timeout on"))?;
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut bytes = 0u64;
    let mut began = None;
    let limit = duration + IO_TIMEOUT * 2;
    loop {
        let n = conn
            .read(&mut buf)
            .map_err(fail("the bulk stream broke at"))?;
        if n == 0 {
            break;
        }
        let first = *began.get_or_insert_with(Instant::now);
        bytes += n as u64;
        if first.elapsed() > limit {
            return Err(BenchError::Failed {
                what: format!("the bulk stream to {sink}"),
                detail: format!("still running after {limit:?}"),
            });
        }
    }
    let elapsed = began.map_or(Duration::ZERO, |b| b.elapsed());
    if bytes == 0 || elapsed.is_zero() {
        return Err(BenchError::Failed {
            what: format!("the bulk stream to {sink}"),
            detail: "no data arrived".into(),
        });
    }
    Ok(Bulk { bytes, elapsed })
}

/// One UDP connection from a client namespace to a sink, answered once so that conntrack holds
/// it as established (`IPS_SEEN_REPLY`), as a long-lived flow is.
pub struct UdpFlow {
    client: UdpSocket,
    /// Kept open so that datagrams find a socket (and are dropped when its buffer is full)
    /// instead of drawing ICMP errors; it also sends the answers.
    sink_socket: UdpSocket,
    sink: SocketAddrV4,
    /// The client's address as the sink sees it (after the node's SNAT), for answers.
    client_seen_as: SocketAddr,
}

impl UdpFlow {
    pub fn establish(
        client_netns: &str,
        sink_netns: &str,
        sink: SocketAddrV4,
    ) -> Result<UdpFlow, BenchError> {
        let fail = |what| socket_error(what, sink);
        let server = join(
            spawn_in(sink_netns, move || {
                UdpSocket::bind(sink).map_err(socket_error("cannot bind the UDP sink", sink))
            }),
            "the UDP sink",
        )?;
        let client = join(
            spawn_in(client_netns, move || {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                    .map_err(socket_error("cannot bind a UDP client towards", sink))?;
                socket
                    .connect(sink)
                    .map_err(socket_error("cannot connect a UDP client to", sink))?;
                Ok(socket)
            }),
            "the UDP client",
        )?;
        for socket in [&server, &client] {
            socket
                .set_read_timeout(Some(IO_TIMEOUT))
                .map_err(fail("cannot set a read timeout towards"))?;
        }
        let mut buf = [0u8; 64];
        client
            .send(b"hello")
            .map_err(fail("cannot send the first datagram to"))?;
        let (_, from) = server
            .recv_from(&mut buf)
            .map_err(fail("the first datagram did not arrive at"))?;
        server
            .send_to(b"hello", from)
            .map_err(fail("cannot answer the first datagram from"))?;
        client
            .recv(&mut buf)
            .map_err(fail("no answer came back from"))?;
        Ok(UdpFlow {
            client,
            sink_socket: server,
            sink,
            client_seen_as: from,
        })
    }

    /// Sends `datagrams` 64-byte datagrams as fast as the socket takes them.
    pub fn send(&self, datagrams: u64) -> Result<(), BenchError> {
        let payload = [0x5a_u8; 64];
        for _ in 0..datagrams {
            self.client
                .send(&payload)
                .map_err(socket_error("the UDP stream broke towards", self.sink))?;
        }
        Ok(())
    }

    /// Sends `datagrams` 64-byte datagrams back from the sink to the client (the connection's
    /// reply direction), as fast as the socket takes them.
    pub fn answer(&self, datagrams: u64) -> Result<(), BenchError> {
        let payload = [0x5a_u8; 64];
        for _ in 0..datagrams {
            self.sink_socket
                .send_to(&payload, self.client_seen_as)
                .map_err(socket_error("the UDP answers broke from", self.sink))?;
        }
        Ok(())
    }
}
