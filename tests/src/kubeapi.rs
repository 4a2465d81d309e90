//! A fake Kubernetes API server for the enrichment's tests, and the lab's pods and Services as the
//! API would list them.
//!
//! No API server can be installed on the test machines, so a small HTTP/1.1 server replays
//! [`Route`]s: list responses with a length, watch responses as newline-delimited events that end
//! when the connection does (as a real API server's do). A watch either stays open with no more
//! events or breaks, mid-event if its body says so, as a lost connection to the API does.
//! Every request target is recorded for the tests to check. It speaks plain HTTP without
//! authentication: [`KubeApi::write_kubeconfig`] points a client at it.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use xtask::lab::layout::{plan, Pod, Service, Workload};
use xtask::lab::Layout;

/// How often the acceptor checks whether the server is being dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// The resourceVersion of the lab's lists, from which clients start their watches.
pub const LAB_RESOURCE_VERSION: &str = "1000";

/// What the server sends to a matching request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A list (or get): `200 OK` with this JSON body.
    Json(String),
    /// A watch: `200 OK`, these newline-delimited events, then `then`.
    Watch { events: String, then: AfterWatch },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterWatch {
    /// No more events; the connection stays open until the client or the server goes away.
    HoldOpen,
    /// The connection is dropped: a broken watch (the events may end in the middle of one).
    Break,
}

/// One request the server answers: `GET path` with `watch=true` or not, and, when given, only
/// from this `resourceVersion`. The first matching route answers; others get a 404 Status.
#[derive(Clone, Debug)]
pub struct Route {
    pub path: String,
    pub watch: bool,
    pub resource_version: Option<String>,
    pub reply: Reply,
}

impl Route {
    /// A list of `path`, whatever its parameters.
    pub fn list(path: &str, body: String) -> Route {
        Route {
            path: path.to_string(),
            watch: false,
            resource_version: None,
            reply: Reply::Json(body),
        }
    }

    /// A watch of `path` started from `resource_version`.
    pub fn watch(path: &str, resource_version: &str, events: String, then: AfterWatch) -> Route {
        Route {
            path: path.to_string(),
            watch: true,
            resource_version: Some(resource_version.to_string()),
            reply: Reply::Watch { events, then },
        }
    }

    fn matches(&self, path: &str, watch: bool, resource_version: Option<&str>) -> bool {
        self.path == path
            && self.watch == watch
            && self
                .resource_version
                .as_deref()
                .is_none_or(|rv| Some(rv) == resource_version)
    }
}

/// The running server; dropping it stops accepting and closes every open connection.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    routes: Vec<Route>,
    /// Request targets (`path?query`) in the order they arrived.
    requests: Mutex<Vec<String>>,
    /// Clones of the connections being answered, by accept order, to close them when the
    /// server stops.
    open: Mutex<HashMap<u64, TcpStream>>,
    stopping: AtomicBool,
}

impl KubeApi {
    /// Serves `routes` on a free port of 127.0.0.1 in the caller's network namespace.
    pub fn start(routes: Vec<Route>) -> io::Result<KubeApi> {
        KubeApi::serve(TcpListener::bind("127.0.0.1:0")?, routes)
    }

    /// Serves `routes` on 127.0.0.1 inside the named network namespace (`ip netns` name), for
    /// a client that runs there.
    pub fn start_in_netns(netns: &str, routes: Vec<Route>) -> io::Result<KubeApi> {
        KubeApi::serve(listen_in_netns(netns)?, routes)
    }

    /// Serves `routes` on a bound listener.
    pub fn serve(listener: TcpListener, routes: Vec<Route>) -> io::Result<KubeApi> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            routes,
            requests: Mutex::default(),
            open: Mutex::default(),
            stopping: AtomicBool::new(false),
        });
        let state = shared.clone();
        let acceptor = std::thread::spawn(move || accept(&listener, &state));
        Ok(KubeApi {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The lab's pods (on its node) and Services, with watches that stay open and quiet.
    pub fn lab(layout: &Layout, netns: Option<&str>) -> io::Result<KubeApi> {
        let routes = lab_routes(layout);
        match netns {
            Some(netns) => KubeApi::start_in_netns(netns, routes),
            None => KubeApi::start(routes),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The request targets received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// Writes a kubeconfig whose current context is this server, without credentials.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, kubeconfig(self.addr))
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for (_, stream) in lock(&self.shared.open).drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A kubeconfig with one cluster, one user without credentials and one context.
fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
         current-context: fake\n"
    )
}

/// A listener on a free port of 127.0.0.1 in `netns`: bound from a thread that enters the
/// namespace and then ends, since a socket stays in the namespace it was created in.
fn listen_in_netns(netns: &str) -> io::Result<TcpListener> {
    let path = Path::new("/run/netns").join(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = std::fs::File::open(&path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
                })?;
                // SAFETY: a valid namespace fd; setns changes only this short-lived thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot enter network namespace {netns}: {e}"),
                    ));
                }
                TcpListener::bind("127.0.0.1:0")
            })
            .join()
            .expect("the binding thread does not panic")
    })
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stopping.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(clone) = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.try_clone())
                else {
                    continue;
                };
                let id = next_id;
                next_id += 1;
                lock(&shared.open).insert(id, clone);
                let shared = shared.clone();
                std::thread::spawn(move || {
                    answer(&stream, &shared);
                    // Every reply is close-delimited or says `Connection: close`: end it now,
                    // whatever other handle on the socket is left.
                    let _ = stream.shutdown(Shutdown::Both);
                    lock(&shared.open).remove(&id);
                });
            }
            // Nothing to accept (the listener does not block), or a failed handshake.
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Answers one request, then closes the connection (`Connection: close`), which kube's client
/// handles by opening a new one per request.
fn answer(stream: &TcpStream, shared: &Shared) {
    let Ok(mut reader) = stream.try_clone().map(BufReader::new) else {
        return;
    };
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // GET requests have no body: skip the headers up to the blank line.
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
        header.clear();
    }
    let target = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    lock(&shared.requests).push(target.clone());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let watch = param("watch") == Some("true");
    let route = shared
        .routes
        .iter()
        .find(|r| r.matches(path, watch, param("resourceVersion")));
    let mut stream = stream;
    match route.map(|r| &r.reply) {
        Some(Reply::Json(body)) => reply(stream, "200 OK", body),
        Some(Reply::Watch { events, then }) => {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(events.as_bytes());
            let _ = stream.flush();
            if *then == AfterWatch::HoldOpen {
                // Until the client goes away or the server stops (which shuts the socket down).
                let mut sink = [0u8; 64];
                while reader.read(&mut sink).is_ok_and(|n| n > 0) {}
            }
            // The caller then shuts the connection down: for a broken watch, that is the break.
        }
        None => {
            let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"not recorded","reason":"NotFound","code":404}"#;
            reply(stream, "404 Not Found", status)
        }
    }
}

fn reply(mut stream: &TcpStream, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

/// The lab's pods and Services: lists at [`LAB_RESOURCE_VERSION`], and watches from there that
/// stay open without events.
pub fn lab_routes(layout: &Layout) -> Vec<Route> {
    let quiet = |path| {
        Route::watch(
            path,
            LAB_RESOURCE_VERSION,
            String::new(),
            AfterWatch::HoldOpen,
        )
    };
    vec![
        Route::list("/api/v1/pods", lab_pod_list(layout).to_string()),
        Route::list("/api/v1/services", lab_service_list(layout).to_string()),
        quiet("/api/v1/pods"),
        quiet("/api/v1/services"),
    ]
}

/// A stable, made-up uid for the i-th object of a kind.
fn uid(kind: u8, i: usize) -> String {
    format!("00000000-0000-4000-8{kind:03x}-{:012x}", i + 1)
}

/// `namespace/name` split in two.
fn split_name(namespaced: &str) -> (&str, &str) {
    namespaced
        .split_once('/')
        .expect("lab names are namespace/name")
}

/// The `PodList` the API returns for the lab node's pods (`spec.nodeName` = the lab's node).
pub fn lab_pod_list(layout: &Layout) -> Value {
    let items: Vec<Value> = layout
        .pods
        .iter()
        .enumerate()
        .map(|(i, pod)| pod_object(pod, &uid(1, i)))
        .collect();
    list("PodList", items)
}

fn pod_object(pod: &Pod, uid: &str) -> Value {
    let (namespace, name) = split_name(pod.k8s_name);
    let (port, protocol) = match pod.workload {
        Workload::HttpEcho { port } | Workload::Ingress { port, .. } => (port, "TCP"),
        Workload::UdpEcho { port } | Workload::ClusterDns { port } => (port, "UDP"),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": LAB_RESOURCE_VERSION,
        },
        "spec": {
            "nodeName": plan::NODE_NAME,
            "containers": [{
                "name": pod.host.suffix(),
                "image": "aksnet-lab",
                "ports": [{"containerPort": port, "protocol": protocol}],
            }],
        },
        "status": {
            "phase": "Running",
            "hostIP": plan::NODE_IP.to_string(),
            "hostIPs": [{"ip": plan::NODE_IP.to_string()}],
            "podIP": pod.ip.to_string(),
            "podIPs": [{"ip": pod.ip.to_string()}],
        },
    })
}

/// The `ServiceList` of the lab's Services: one object per Service, with all its ports.
pub fn lab_service_list(layout: &Layout) -> Value {
    let mut by_name: BTreeMap<String, Vec<&Service>> = BTreeMap::new();
    for port in &layout.services {
        by_name
            .entry(port.namespaced_name())
            .or_default()
            .push(port);
    }
    let items: Vec<Value> = by_name
        .values()
        .enumerate()
        .map(|(i, ports)| service_object(ports, &uid(2, i)))
        .collect();
    list("ServiceList", items)
}

fn service_object(ports: &[&Service], uid: &str) -> Value {
    let first = ports[0];
    let kind = if first.lb_ip.is_some() {
        "LoadBalancer"
    } else if first.node_port.is_some() {
        "NodePort"
    } else {
        "ClusterIP"
    };
    let port_specs: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut spec = json!({
                "name": p.port_name,
                "protocol": p.proto.as_str().to_uppercase(),
                "port": p.port,
                "targetPort": p.target_port,
            });
            if let Some(node_port) = p.node_port {
                spec["nodePort"] = json!(node_port);
            }
            spec
        })
        .collect();
    let mut spec = json!({
        "type": kind,
        "clusterIP": first.cluster_ip.to_string(),
        "clusterIPs": [first.cluster_ip.to_string()],
        "ports": port_specs,
    });
    if kind != "ClusterIP" {
        spec["externalTrafficPolicy"] = json!(first.external_traffic_policy.as_str());
    }
    if let Some(port) = first.health_check_node_port {
        spec["healthCheckNodePort"] = json!(port);
    }
    let ingress: Vec<Value> = first
        .lb_ip
        .iter()
        .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": first.name,
            "namespace": first.namespace,
            "uid": uid,
            "resourceVersion": LAB_RESOURCE_VERSION,
        },
        "spec": spec,
        "status": {"loadBalancer": {"ingress": ingress}},
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({
        "kind": kind,
        "apiVersion": "v1",
        "metadata": {"resourceVersion": LAB_RESOURCE_VERSION},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xtask::lab::CniMode;

    /// A raw HTTP/1.1 GET, returning the whole response (the server closes the connection).
    fn get(addr: SocketAddr, target: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn lab_lists_follow_the_topology_of_each_cni() {
        for (cni, app_ip) in [
            (CniMode::Kubenet, "10.244.0.10"),
            (CniMode::AzureCni, "10.224.0.10"),
            (CniMode::AzureCniOverlay, "10.244.0.10"),
        ] {
            let layout = Layout::new(cni);
            let pods = lab_pod_list(&layout);
            let items = pods["items"].as_array().unwrap();
            assert_eq!(items.len(), layout.pods.len());
            let app = items
                .iter()
                .find(|p| p["metadata"]["name"] == "app-6d8f7c9b5-x2kqp")
                .expect("the app pod");
            assert_eq!(app["metadata"]["namespace"], "default");
            assert_eq!(app["status"]["podIP"], app_ip, "{cni}");
            assert_eq!(app["spec"]["nodeName"], plan::NODE_NAME);

            let services = lab_service_list(&layout);
            let names: Vec<String> = services["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    format!(
                        "{}/{}",
                        s["metadata"]["namespace"].as_str().unwrap(),
                        s["metadata"]["name"].as_str().unwrap()
                    )
                })
                .collect();
            assert_eq!(
                names,
                [
                    "default/app",
                    "default/app-internal",
                    "default/dns",
                    "default/kubernetes",
                    "default/web",
                    "ingress-nginx/ingress-nginx-controller",
                    "kube-system/kube-dns"
                ]
            );
            let ingress = &services["items"][5];
            assert_eq!(ingress["spec"]["externalTrafficPolicy"], "Local");
            assert_eq!(ingress["spec"]["healthCheckNodePort"], 32000);
            assert_eq!(
                ingress["status"]["loadBalancer"]["ingress"][0]["ip"],
                "192.0.2.11"
            );
            let kube_dns = &services["items"][6];
            assert_eq!(kube_dns["spec"]["type"], "ClusterIP");
            assert_eq!(kube_dns["spec"]["ports"][0]["protocol"], "UDP");
        }
    }

    #[test]
    fn answers_routes_records_requests_and_refuses_the_rest() {
        let api = KubeApi::start(vec![
            Route::list("/api/v1/pods", r#"{"items":[]}"#.into()),
            Route::watch(
                "/api/v1/pods",
                "7",
                "{\"type\":\"ADDED\"}\n".into(),
                AfterWatch::Break,
            ),
        ])
        .unwrap();
        let list = get(api.addr(), "/api/v1/pods?limit=500");
        assert!(list.starts_with("HTTP/1.1 200 OK"), "{list}");
        assert!(list.contains("Content-Length: 12") && list.ends_with(r#"{"items":[]}"#));
        let watch = get(api.addr(), "/api/v1/pods?watch=true&resourceVersion=7");
        assert!(watch.ends_with("{\"type\":\"ADDED\"}\n"), "{watch}");
        let other = get(api.addr(), "/api/v1/pods?watch=true&resourceVersion=8");
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        assert_eq!(
            api.requests(),
            [
                "/api/v1/pods?limit=500",
                "/api/v1/pods?watch=true&resourceVersion=7",
                "/api/v1/pods?watch=true&resourceVersion=8"
            ]
        );
    }

    #[test]
    fn dropping_the_server_closes_held_watches() {
        let api = KubeApi::start(lab_routes(&Layout::new(CniMode::Kubenet))).unwrap();
        let target = format!("/api/v1/services?watch=true&resourceVersion={LAB_RESOURCE_VERSION}");
        let mut stream = TcpStream::connect(api.addr()).unwrap();
        write!(stream, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut head = [0u8; 15];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200 OK");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        drop(api);
        let mut rest = String::new();
        // Ends (EOF) rather than timing out: the held watch was closed.
        stream.read_to_string(&mut rest).unwrap();
        assert!(rest.ends_with("\r\n\r\n"), "{rest:?}");
    }

    #[test]
    fn the_kubeconfig_names_the_server() {
        let text = kubeconfig("127.0.0.1:4242".parse().unwrap());
        assert!(text.contains("server: http://127.0.0.1:4242\n"));
        assert!(text.contains("current-context: fake\n"));
    }
}
