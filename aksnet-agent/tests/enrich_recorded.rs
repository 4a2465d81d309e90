//! Kubernetes enrichment against recorded API responses.
//!
//! No API server can be installed on this machine, so a small hand-written HTTP/1.1 server on
//! 127.0.0.1 replays list and watch responses from `tests/fixtures/kube/` (modelled on a real
//! API server's: resourceVersions, newline-delimited watch events, close-delimited bodies). The
//! pods watch breaks in the middle of an event, as a connection to the API server does when it
//! is lost; the enricher must resume it from the last resourceVersion it saw.

use aksnet_agent::enrich::{Enricher, Owner, OwnerKind};
use aksnet_agent::events::Proto;
use aksnet_agent::topology::Etp;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const NODE: &str = "aks-nodepool1-00000000-vmss000000";
const PODS_LIST: &str = include_str!("fixtures/kube/pods-list.json");
/// Served to the first pods watch (from the list's resourceVersion 104211), which then breaks.
const PODS_WATCH_1: &str = include_str!("fixtures/kube/pods-watch-1.jsonl");
/// Served to the resumed pods watch (from 104300, the last event of the first one). Half of it
/// is also what the first watch was sending when it broke.
const PODS_WATCH_2: &str = include_str!("fixtures/kube/pods-watch-2.jsonl");
const SERVICES_LIST: &str = include_str!("fixtures/kube/services-list.json");
const SERVICES_WATCH: &str = include_str!("fixtures/kube/services-watch.jsonl");

/// Request targets (`path?query`) the recorded API received, in order.
type RequestLog = Arc<Mutex<Vec<String>>>;

fn serve(listener: TcpListener) -> RequestLog {
    let log = RequestLog::default();
    let accepted = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, accepted.clone()));
        }
    });
    log
}

/// Answers one request, then closes the connection (`Connection: close`), which kube's client
/// handles by opening a new one per request.
async fn answer(stream: TcpStream, log: RequestLog) {
    let mut stream = BufReader::new(stream);
    let mut request_line = String::new();
    if stream.read_line(&mut request_line).await.is_err() {
        return;
    }
    // GET requests have no body: skip the headers up to the blank line.
    let mut header = String::new();
    while stream.read_line(&mut header).await.is_ok_and(|n| n > 2) {
        header.clear();
    }
    let target = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    log.lock().unwrap().push(target.clone());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let watching = param("watch") == Some("true");
    let stream = stream.get_mut();
    match (path, watching, param("resourceVersion")) {
        ("/api/v1/pods", false, _) => reply(stream, "200 OK", PODS_LIST).await,
        ("/api/v1/services", false, _) => reply(stream, "200 OK", SERVICES_LIST).await,
        ("/api/v1/pods", true, Some("104211")) => {
            let cut = PODS_WATCH_2.len() / 2;
            stream_events(stream, &[PODS_WATCH_1, &PODS_WATCH_2[..cut]]).await;
            // Dropping the socket here is the break: the last event never completes.
        }
        ("/api/v1/pods", true, Some("104300")) => {
            stream_events(stream, &[PODS_WATCH_2]).await;
            hold_open(stream).await;
        }
        ("/api/v1/services", true, Some("104211")) => {
            stream_events(stream, &[SERVICES_WATCH]).await;
            hold_open(stream).await;
        }
        _ => {
            let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"not recorded","reason":"NotFound","code":404}"#;
            reply(stream, "404 Not Found", status).await
        }
    }
}

async fn reply(stream: &mut TcpStream, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

/// A watch response: no length, the body ends when the connection does.
async fn stream_events(stream: &mut TcpStream, parts: &[&str]) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
    let _ = stream.write_all(head.as_bytes()).await;
    for part in parts {
        let _ = stream.write_all(part.as_bytes()).await;
        let _ = stream.flush().await;
    }
}

/// Keeps a watch open, with no more events, until the client goes away.
async fn hold_open(stream: &mut TcpStream) {
    let mut sink = [0u8; 64];
    while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
}

fn client(addr: SocketAddr) -> kube::Client {
    let url = format!("http://{addr}").parse().unwrap();
    kube::Client::try_from(kube::Config::new(url)).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn owner(kind: OwnerKind, name: &str) -> Owner {
    let (namespace, name) = name.split_once('/').unwrap();
    Owner {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Polls `check` until it holds, for at most 15 s (the watcher's backoff starts at 0.8 s).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn names_pods_services_and_frontends_and_resumes_a_broken_watch() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = serve(listener);
    let enricher = Enricher::start_with_client(client(addr), NODE.to_string()).unwrap();
    eventually("the initial lists", || enricher.is_synced()).await;

    let pod = |name| Some(owner(OwnerKind::Pod, name));
    let service = |name| Some(owner(OwnerKind::Service, name));
    assert_eq!(
        enricher.lookup(ip("10.244.0.10")),
        pod("default/app-7d4b9c-x2x9z")
    );
    assert_eq!(
        enricher.lookup(ip("fd00:10:244::a")),
        pod("default/app-7d4b9c-x2x9z")
    );
    assert_eq!(
        enricher.lookup(ip("10.244.0.11")),
        pod("default/dns-5f6d7-abcde")
    );
    // The node's own address belongs to no hostNetwork pod, a finished pod's address to no one.
    assert_eq!(enricher.lookup(ip("10.224.0.4")), None);
    assert_eq!(enricher.lookup(ip("10.244.0.9")), None);

    assert_eq!(enricher.lookup(ip("10.0.12.34")), service("default/app"));
    assert_eq!(enricher.lookup(ip("fd00:10::1234")), service("default/app"));
    assert_eq!(enricher.lookup(ip("10.0.0.53")), service("default/dns"));
    let ingress = "ingress-nginx/ingress-nginx-controller";
    assert_eq!(enricher.lookup(ip("10.0.80.80")), service(ingress));
    assert_eq!(enricher.lookup(ip("192.0.2.11")), service(ingress));
    let shared = ip("192.0.2.10");
    assert_eq!(
        enricher.lookup_port(shared, Proto::Tcp, 80),
        service("default/app")
    );
    assert_eq!(
        enricher.lookup_port(shared, Proto::Udp, 53),
        service("default/dns")
    );
    // The ingress pod was Pending in the list; the first watch event gives it its address.
    eventually("the ingress pod's address", || {
        enricher.lookup(ip("10.244.0.12")).map(|o| o.to_string())
            == Some("ingress-nginx/ingress-nginx-controller-6c9f8-qwert".to_string())
    })
    .await;

    // Added after the first watch broke: only the resumed watch delivers it.
    eventually("the pod added after the break", || {
        enricher.lookup(ip("10.244.0.13")) == pod("default/web-5c8d9-zz1yy")
    })
    .await;
    eventually("the deleted service to go", || {
        enricher.lookup(ip("10.0.99.99")).is_none()
    })
    .await;
    assert_eq!(
        enricher.lb_frontends(),
        vec![
            (shared, "default/app".into(), Etp::Cluster),
            (shared, "default/dns".into(), Etp::Cluster),
            (ip("192.0.2.11"), ingress.into(), Etp::Local),
        ]
    );

    let requests = requests.lock().unwrap().clone();
    let pods: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods?"))
        .collect();
    let selector = format!("fieldSelector=spec.nodeName%3D{NODE}");
    assert!(pods.iter().all(|r| r.contains(&selector)), "{pods:#?}");
    let rv = |r: &&&String| r.contains("watch=true") && r.contains("resourceVersion=104300");
    assert_eq!(
        pods.iter().filter(|r| !r.contains("watch=true")).count(),
        1,
        "resumed without relisting: {pods:#?}"
    );
    assert!(
        pods.iter().any(|r| rv(&r)),
        "resumed from 104300: {pods:#?}"
    );
}

#[tokio::test]
async fn keeps_answering_while_the_api_is_down_and_catches_up_when_it_returns() {
    // Reserve a port, then leave it closed: the API is down when the enricher starts.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let enricher = Enricher::start_with_client(client(addr), NODE.to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!enricher.is_synced());
    assert_eq!(enricher.lookup(ip("10.244.0.10")), None);

    serve(TcpListener::bind(addr).await.unwrap());
    eventually("the retried lists", || enricher.is_synced()).await;
    assert_eq!(
        enricher.lookup(ip("10.244.0.10")),
        Some(owner(OwnerKind::Pod, "default/app-7d4b9c-x2x9z"))
    );
}
