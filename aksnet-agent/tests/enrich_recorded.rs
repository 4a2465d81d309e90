//! Kubernetes enrichment against recorded API responses.
//!
//! No API server can be installed on this machine, so the fake API of `aksnet_tests::kubeapi`
//! replays list and watch responses from `tests/fixtures/kube/` (modelled on a real API server's:
//! resourceVersions, newline-delimited watch events, close-delimited bodies; the pods and
//! Services are the node lab's). The pods watch breaks in the middle of an event, as a connection
//! to the API server does when it is lost; the enricher must resume it from the last
//! resourceVersion it saw.

use aksnet_agent::enrich::{Enricher, Owner, OwnerKind};
use aksnet_agent::events::Proto;
use aksnet_agent::topology::Etp;
use aksnet_tests::kubeapi::{AfterWatch, KubeApi, Route};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

const NODE: &str = "aks-nodepool1-00000000-vmss000000";
const PODS_LIST: &str = include_str!("../../tests/fixtures/kube/pods-list.json");
/// Served to the first pods watch (from the list's resourceVersion 104211), which then breaks.
const PODS_WATCH_1: &str = include_str!("../../tests/fixtures/kube/pods-watch-1.jsonl");
/// Served to the resumed pods watch (from 104300, the last event of the first one). Half of it
/// is also what the first watch was sending when it broke.
const PODS_WATCH_2: &str = include_str!("../../tests/fixtures/kube/pods-watch-2.jsonl");
const SERVICES_LIST: &str = include_str!("../../tests/fixtures/kube/services-list.json");
const SERVICES_WATCH: &str = include_str!("../../tests/fixtures/kube/services-watch.jsonl");

fn recorded() -> Vec<Route> {
    let cut = PODS_WATCH_2.len() / 2;
    let broken = format!("{PODS_WATCH_1}{}", &PODS_WATCH_2[..cut]);
    vec![
        Route::list("/api/v1/pods", PODS_LIST.into()),
        Route::list("/api/v1/services", SERVICES_LIST.into()),
        Route::watch("/api/v1/pods", "104211", broken, AfterWatch::Break),
        Route::watch(
            "/api/v1/pods",
            "104300",
            PODS_WATCH_2.into(),
            AfterWatch::HoldOpen,
        ),
        Route::watch(
            "/api/v1/services",
            "104211",
            SERVICES_WATCH.into(),
            AfterWatch::HoldOpen,
        ),
    ]
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
    let api = KubeApi::start(recorded()).unwrap();
    let enricher = Enricher::start_with_client(client(api.addr()), NODE.to_string()).unwrap();
    eventually("the initial lists", || enricher.is_synced()).await;

    let pod = |name| Some(owner(OwnerKind::Pod, name));
    let service = |name| Some(owner(OwnerKind::Service, name));
    assert_eq!(
        enricher.lookup(ip("10.244.0.10")),
        pod("default/app-6d8f7c9b5-x2kqp")
    );
    assert_eq!(
        enricher.lookup(ip("fd00:10:244::a")),
        pod("default/app-6d8f7c9b5-x2kqp")
    );
    assert_eq!(
        enricher.lookup(ip("10.244.0.11")),
        pod("default/dns-echo-7b9c6d5f4-m8zrt")
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
            == Some("ingress-nginx/ingress-nginx-controller-5c8d66c76d-4wq9n".to_string())
    })
    .await;

    // Added after the first watch broke: only the resumed watch delivers it.
    eventually("the pod added after the break", || {
        enricher.lookup(ip("10.244.0.14")) == pod("default/web-5c8d9-zz1yy")
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

    let requests = api.requests();
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
        .unwrap()
        .local_addr()
        .unwrap();
    let enricher = Enricher::start_with_client(client(addr), NODE.to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!enricher.is_synced());
    assert_eq!(enricher.lookup(ip("10.244.0.10")), None);

    let _api = KubeApi::serve(TcpListener::bind(addr).unwrap(), recorded()).unwrap();
    eventually("the retried lists", || enricher.is_synced()).await;
    assert_eq!(
        enricher.lookup(ip("10.244.0.10")),
        Some(owner(OwnerKind::Pod, "default/app-6d8f7c9b5-x2kqp"))
    );
}
