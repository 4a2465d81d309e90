//! The metrics endpoint: a minimal HTTP/1.1 server for Prometheus scrapes and kubelet probes.
//!
//! `GET /metrics` (text exposition 0.0.4), `GET /healthz` (the process answers), `GET /readyz`
//! (200 once the capture is attached, 503 before); 404 elsewhere. One request per connection,
//! which is all scrapers and probes need, so no keep-alive, chunking or request bodies.

use super::{Metrics, MetricsError};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Content type of the text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
/// Request heads of scrapers and probes are a few hundred bytes.
const MAX_HEAD: usize = 8192;
/// A client that has not sent its request by then is dropped, so it cannot hold a task.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the agent is ready: the lead sets it once the capture is attached.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Binds the metrics endpoint's socket (port 0 picks a free port; see `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves requests on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, readiness: Readiness) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors or an aborted handshake: both pass, so wait and retry
                // rather than spin or stop serving.
                log::warn!("metrics endpoint: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, metrics, &readiness).await {
                log::debug!("metrics endpoint: answering a request failed: {e}");
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    metrics: Arc<Metrics>,
    readiness: &Readiness,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match head {
        Some(head) => respond(&head, metrics, readiness).await,
        None => Response::text(400, "Bad Request", "malformed or oversized request head\n"),
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line that ends the request head. `None`: the head is too large, not
/// UTF-8, or the client closed the connection before finishing it.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

async fn respond(head: &str, metrics: Arc<Metrics>, readiness: &Readiness) -> Response {
    let mut request_line = head.lines().next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target), Some(version), None) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        return Response::text(400, "Bad Request", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(505, "HTTP Version Not Supported", "HTTP/1.x only\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::text(405, "Method Not Allowed", "GET or HEAD only\n"),
    };
    let path = target.split('?').next().unwrap_or(target);
    let mut response = match path {
        "/metrics" => {
            // Rendering walks the whole SNAT table: keep it off the async workers.
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(Ok(text)) => Response::new(200, "OK", METRICS_CONTENT_TYPE, text),
                Ok(Err(e)) => Response::text(500, "Internal Server Error", &format!("{e}\n")),
                Err(e) => Response::text(
                    500,
                    "Internal Server Error",
                    &format!("rendering metrics failed: {e}\n"),
                ),
            }
        }
        "/healthz" => Response::text(200, "OK", "ok\n"),
        "/readyz" if readiness.is_ready() => Response::text(200, "OK", "ready\n"),
        "/readyz" => Response::text(
            503,
            "Service Unavailable",
            "not ready: the capture is not attached yet\n",
        ),
        _ => Response::text(
            404,
            "Not Found",
            "not found; this endpoint serves /metrics, /healthz and /readyz\n",
        ),
    };
    response.head_only = head_only;
    response
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

impl Response {
    fn new(status: u16, reason: &'static str, content_type: &'static str, body: String) -> Self {
        Response {
            status,
            reason,
            content_type,
            body,
            head_only: false,
        }
    }

    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Response::new(status, reason, TEXT, body.to_owned())
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{CaptureHealth, HookStatus};
    use crate::events::{FlowKey, Proto, SourceKind, Tuple};
    use crate::metrics::{FlowObservation, MetricsConfig, NatHop};
    use std::io::Write;
    use std::process::{Command, Stdio};

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        let read = stream.read_to_string(&mut raw);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the server answers and closes within 10 s")
            .unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        Reply {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    /// A server on a free loopback port, with one outbound connection and an attached capture.
    async fn start() -> (SocketAddr, Readiness, tokio::task::JoinHandle<()>) {
        let metrics = Metrics::new(&MetricsConfig::default()).unwrap();
        let t = |src: &str, sport, dst: &str, dport| Tuple {
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        };
        let key = FlowKey {
            netns: 4026531840,
            zone: 0,
            proto: Proto::Tcp,
            orig: t("10.244.0.5", 40000, "198.51.100.7", 443),
        };
        metrics.observe_new(&FlowObservation {
            key,
            translated: t("10.224.0.4", 50000, "198.51.100.7", 443),
            path: "pod-to-internet",
            cni: "kubenet",
            verdict: "matches",
            deviation: None,
            hops: &[NatHop::NodeSnat, NatHop::LbSnatInferred],
            pod: Some("web/a"),
        });
        let health = Arc::new(CaptureHealth::default());
        health.record_hook(HookStatus {
            name: "tp_btf/net_dev_start_xmit".into(),
            attached: true,
            detail: String::new(),
        });
        health.count_event();
        metrics.set_capture(health, SourceKind::Ebpf);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Readiness::default();
        let server = tokio::spawn(serve(listener, Arc::new(metrics), readiness.clone()));
        (addr, readiness, server)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let (addr, readiness, server) = start().await;

        let metrics = request(addr, "GET", "/metrics").await;
        assert_eq!(metrics.status, 200, "{}", metrics.head);
        assert!(
            metrics.head.contains(METRICS_CONTENT_TYPE),
            "{}",
            metrics.head
        );
        let flows = "aksnet_flows_observed_total{cni=\"kubenet\",path=\"pod-to-internet\",\
                     verdict=\"matches\"} 1";
        assert!(metrics.body.lines().any(|l| l == flows), "{}", metrics.body);
        let length = format!("Content-Length: {}", metrics.body.len());
        assert!(metrics.head.contains(&length), "{}", metrics.head);

        let with_query = request(addr, "GET", "/metrics?name[]=x").await;
        assert_eq!(with_query.status, 200);

        assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
        let not_ready = request(addr, "GET", "/readyz").await;
        assert_eq!(not_ready.status, 503);
        assert!(not_ready.body.contains("capture"), "{}", not_ready.body);
        readiness.set_ready(true);
        assert_eq!(request(addr, "GET", "/readyz").await.status, 200);
        readiness.set_ready(false);
        assert_eq!(request(addr, "GET", "/readyz").await.status, 503);

        assert_eq!(request(addr, "GET", "/").await.status, 404);
        assert_eq!(request(addr, "GET", "/metricsx").await.status, 404);
        let post = request(addr, "POST", "/metrics").await;
        assert_eq!(post.status, 405);
        assert!(post.head.contains("Allow: GET, HEAD"), "{}", post.head);
        let head = request(addr, "HEAD", "/healthz").await;
        assert_eq!((head.status, head.body.as_str()), (200, ""));
        server.abort();
    }

    #[tokio::test]
    async fn malformed_and_unfinished_requests_do_not_stop_the_server() {
        let (addr, _, server) = start().await;
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"hello\r\n\r\n").await.unwrap();
        let mut raw = String::new();
        garbage.read_to_string(&mut raw).await.unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");

        let mut oversized = TcpStream::connect(addr).await.unwrap();
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 1));
        oversized.write_all(long.as_bytes()).await.unwrap();
        let mut raw = String::new();
        oversized.read_to_string(&mut raw).await.unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");

        // A client that connects and says nothing holds one task, not the server.
        let _idle = TcpStream::connect(addr).await.unwrap();
        assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
        server.abort();
    }

    #[tokio::test]
    async fn binding_a_used_address_says_which() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn scrape_passes_promtool_check_metrics() {
        let (addr, _, server) = start().await;
        let scrape = request(addr, "GET", "/metrics").await;
        server.abort();
        assert_eq!(scrape.status, 200);
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run promtool: {e}; install it with `cargo xtask setup` (Debian \
                     package prometheus)"
                )
            });
        child
            .stdin
            .take()
            .unwrap()
            .write_all(scrape.body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool check metrics: {report}");
        assert!(report.trim().is_empty(), "promtool lint findings: {report}");
    }
}
