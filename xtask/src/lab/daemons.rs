//! The lab's servers, started inside their namespaces as separate processes (so a lab left up by
//! `cargo xtask lab up` keeps serving): HTTP/UDP echo servers (socat + sh, answering with the peer
//! address and the request headers) as pods, VMs, the API server, IMDS and kubelet, nginx as
//! Application Gateway, as AGC and as in-cluster ingress, dnsmasq as Azure DNS and as CoreDNS,
//! kube-proxy's healthCheckNodePort server.

use crate::cmd::CmdError;
use crate::file_error::FileError;
use crate::lab::error::LabError;
use crate::lab::exec;
use crate::lab::layout::{plan, CniMode, Host, Layout, Service, Workload};
use crate::lab::netns::{etc_netns_dir, netns_name};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs one per connection under socat (SOCAT_PEERADDR/PORT are socat's): answers 200 with
/// `server=`, `peer=` and the request head, so clients can check who connected and the headers.
const HTTP_ECHO_SH: &str = r#"#!/bin/sh
cr=$(printf '\r')
head=""
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  head="$head$line
"
done
body="server=$1
peer=$SOCAT_PEERADDR:$SOCAT_PEERPORT
$head"
printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
"#;

/// One per datagram under socat: answers with the peer address and the query.
const UDP_ECHO_SH: &str = r#"#!/bin/sh
IFS= read -r query
printf 'server=%s\npeer=%s:%s\nquery=%s\n' "$1" "$SOCAT_PEERADDR" "$SOCAT_PEERPORT" "$query"
"#;

/// kube-proxy's healthCheckNodePort answer for a Service with local endpoints.
const HEALTHZ_SH: &str = r#"#!/bin/sh
cr=$(printf '\r')
while IFS= read -r line; do line=${line%"$cr"}; [ -z "$line" ] && break; done
body="{\"service\":{\"namespace\":\"$1\",\"name\":\"$2\"},\"localEndpoints\":$3}"
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
"#;

/// A server the lab started.
pub struct Daemon {
    pub what: String,
    pub netns: String,
    pub child: Child,
    log: PathBuf,
    /// `tcp`/`udp` and the port it listens on, for the readiness check.
    listen: (&'static str, u16),
}

struct Launcher<'a> {
    prefix: &'a str,
    dir: &'a Path,
    daemons: Vec<Daemon>,
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(FileError::on("cannot write lab file", path))?;
    Ok(())
}

impl Launcher<'_> {
    fn spawn(
        &mut self,
        host: Host,
        what: &str,
        listen: (&'static str, u16),
        argv: &[String],
    ) -> Result<(), LabError> {
        let netns = netns_name(self.prefix, host);
        let log = self
            .dir
            .join(format!("{}-{}.log", host.suffix(), what.replace(' ', "-")));
        let open = |p: &Path| File::create(p).map_err(FileError::on("cannot create daemon log", p));
        let child = Command::new("ip")
            .args(["netns", "exec", &netns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(open(&log)?)
            .stderr(open(&log)?)
            // Its own process group: a Ctrl-C on the terminal reaches only the xtask, which then
            // tears the lab down in order.
            .process_group(0)
            .spawn()
            .map_err(|source| CmdError::Spawn {
                command: format!("ip netns exec {netns} {}", argv.join(" ")),
                source,
            })?;
        self.daemons.push(Daemon {
            what: what.to_string(),
            netns,
            child,
            log,
            listen,
        });
        Ok(())
    }

    fn script(&self, name: &str, text: &str) -> Result<String, LabError> {
        let path = self.dir.join(name);
        write(&path, text)?;
        Ok(path.display().to_string())
    }

    fn http_echo(
        &mut self,
        host: Host,
        name: &str,
        bind: Option<Ipv4Addr>,
        port: u16,
    ) -> Result<(), LabError> {
        let script = self.script("http-echo.sh", HTTP_ECHO_SH)?;
        let bind = bind.map(|ip| format!(",bind={ip}")).unwrap_or_default();
        let argv = vec![
            "socat".to_string(),
            format!("TCP4-LISTEN:{port},fork,reuseaddr{bind}"),
            format!("EXEC:/bin/sh {script} {name}"),
        ];
        self.spawn(host, &format!("http-echo {name}"), ("tcp", port), &argv)
    }

    fn nginx(&mut self, host: Host, name: &str, port: u16, servers: &str) -> Result<(), LabError> {
        let dir = self.dir.join(format!("nginx-{name}"));
        std::fs::create_dir_all(&dir)
            .map_err(FileError::on("cannot create nginx directory", &dir))?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log notice;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{servers}}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        write(&conf_path, &conf)?;
        let argv: Vec<String> = [
            "nginx",
            "-p",
            &d.to_string(),
            "-e",
            &format!("{d}/error.log"),
            "-c",
            &conf_path.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        self.spawn(host, &format!("nginx {name}"), ("tcp", port), &argv)
    }

    fn dnsmasq(
        &mut self,
        host: Host,
        name: &str,
        listen: Ipv4Addr,
        port: u16,
        extra: &[String],
    ) -> Result<(), LabError> {
        let mut argv: Vec<String> = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
            "--log-facility=-",
            "--log-queries",
        ]
        .map(String::from)
        .to_vec();
        argv.push(format!("--listen-address={listen}"));
        argv.push(format!("--port={port}"));
        argv.extend_from_slice(extra);
        self.spawn(host, &format!("dnsmasq {name}"), ("udp", port), &argv)
    }
}

/// The lab's self-signed certificate for the Application Gateway listener.
fn make_certificate(dir: &Path) -> Result<(PathBuf, PathBuf), LabError> {
    let (crt, key) = (dir.join("appgw.crt"), dir.join("appgw.key"));
    exec::run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={}", plan::APPGW_HOST),
            "-addext",
            &format!("subjectAltName=DNS:{}", plan::APPGW_HOST),
            "-keyout",
            &key.display().to_string(),
            "-out",
            &crt.display().to_string(),
        ],
    )?;
    Ok((crt, key))
}

/// Path of the certificate clients trust to reach the gateway.
pub fn certificate_path(dir: &Path) -> PathBuf {
    dir.join("appgw.crt")
}

/// Application Gateway: TLS termination, host and path rules, X-Forwarded-For, and a new
/// connection from its private IP. AGIC's backend pool is the app pod's IP (both CNIs); the
/// `/nodeport/` rule is the hand-made backend pool on the node's NodePort (kubenet variant).
fn appgw_servers(layout: &Layout, crt: &Path, key: &Path) -> String {
    let tls = format!(
        "    ssl_certificate {};\n    ssl_certificate_key {};\n",
        crt.display(),
        key.display()
    );
    let proxy = |target: String| {
        format!(
            "proxy_pass http://{target}; proxy_bind {}; proxy_set_header Host $host; \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto https;",
            plan::APPGW_IP
        )
    };
    let app = layout.pod(Host::PodApp).ip;
    let mut locations = format!(
        "    location / {{ {} }}\n",
        proxy(format!("{app}:{}", plan::APP_PORT))
    );
    if layout.cni == CniMode::Kubenet {
        locations.push_str(&format!(
            "    location /nodeport/ {{ {} }}\n",
            proxy(format!("{}:{}", plan::NODE_IP, plan::APP_NODE_PORT))
        ));
    }
    let listen = format!("{}:443", plan::APPGW_PUBLIC);
    format!(
        "  server {{\n    listen {listen} ssl default_server;\n{tls}    return 404;\n  }}\n\
         \x20 server {{\n    listen {listen} ssl;\n    server_name {};\n{tls}{locations}  }}\n",
        plan::APPGW_HOST
    )
}

/// Application Gateway for Containers: plain HTTP on its frontend, a new connection from its
/// subnet address to the app pod IP, X-Forwarded-For.
fn agc_servers(layout: &Layout) -> String {
    format!(
        "  server {{\n    listen {}:80;\n    location / {{ proxy_pass http://{}:{}; proxy_bind {}; \
         proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }}\n  }}\n",
        plan::AGC_FRONTEND,
        layout.pod(Host::PodApp).ip,
        plan::APP_PORT,
        plan::AGC_IP
    )
}

/// The pods' resolv.conf, as kubelet writes it for dnsPolicy ClusterFirst.
fn pod_resolv_conf() -> String {
    format!(
        "nameserver {}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        plan::KUBE_DNS_IP
    )
}

fn health_checked(layout: &Layout) -> Vec<&Service> {
    layout
        .services
        .iter()
        .filter(|s| s.health_check_node_port.is_some())
        .collect()
}

/// Starts every server of the layout and waits until each listens. What it started is in
/// `started` even when it fails, so the caller can reap it.
pub fn start(
    prefix: &str,
    dir: &Path,
    layout: &Layout,
    started: &mut Vec<Daemon>,
) -> Result<(), LabError> {
    let mut l = Launcher {
        prefix,
        dir,
        daemons: Vec::new(),
    };
    let result = start_all(&mut l, layout);
    started.append(&mut l.daemons);
    result
}

fn start_all(l: &mut Launcher, layout: &Layout) -> Result<(), LabError> {
    let (crt, key) = make_certificate(l.dir)?;
    l.http_echo(
        Host::Inet,
        "inet-server",
        Some(plan::INET_SERVER),
        plan::HTTP_PORT,
    )?;
    l.http_echo(Host::Vm, "vm", None, plan::HTTP_PORT)?;
    l.http_echo(Host::Pe, "private-endpoint", None, plan::HTTP_PORT)?;
    // The API server (plain HTTP: the lab checks addresses, not TLS) at both of its addresses:
    // the public one on the internet side, the private one in its delegated subnet.
    l.http_echo(
        Host::Inet,
        "kube-apiserver",
        Some(plan::API_SERVER_PUBLIC),
        plan::API_SERVER_PORT,
    )?;
    l.http_echo(
        Host::ApiServer,
        "kube-apiserver",
        None,
        plan::API_SERVER_PORT,
    )?;
    l.http_echo(Host::Imds, "imds", Some(plan::IMDS), plan::HTTP_PORT)?;
    l.http_echo(
        Host::Node,
        "kubelet",
        Some(plan::NODE_IP),
        plan::KUBELET_PORT,
    )?;
    l.dnsmasq(
        Host::Lb,
        "azure-dns",
        plan::WIRESERVER,
        53,
        &[format!("--address=/{}/{}", plan::PE_FQDN, plan::PE_IP)],
    )?;
    l.nginx(
        Host::Appgw,
        "appgw",
        443,
        &appgw_servers(layout, &crt, &key),
    )?;
    if layout.cni != CniMode::Kubenet {
        l.nginx(Host::Agc, "agc", 80, &agc_servers(layout))?;
    }
    let healthz = l.script("healthz.sh", HEALTHZ_SH)?;
    for svc in health_checked(layout) {
        let port = svc
            .health_check_node_port
            .expect("filtered on health_check_node_port");
        let argv = vec![
            "socat".to_string(),
            format!("TCP4-LISTEN:{port},fork,reuseaddr"),
            format!(
                "EXEC:/bin/sh {healthz} {} {} {}",
                svc.namespace,
                svc.name,
                svc.endpoints.len()
            ),
        ];
        l.spawn(
            Host::Node,
            &format!("kube-proxy healthz {port}"),
            ("tcp", port),
            &argv,
        )?;
    }
    for pod in layout.pods.iter().chain(&layout.node2_pods) {
        let netns = netns_name(l.prefix, pod.host);
        let etc = etc_netns_dir(&netns);
        std::fs::create_dir_all(&etc)
            .map_err(FileError::on("cannot create the pod's /etc/netns", &etc))?;
        write(&etc.join("resolv.conf"), &pod_resolv_conf())?;
        let name = pod
            .k8s_name
            .split('/')
            .nth(1)
            .unwrap_or(pod.k8s_name)
            .to_string();
        match &pod.workload {
            Workload::HttpEcho { port } => l.http_echo(pod.host, &name, None, *port)?,
            Workload::UdpEcho { port } => {
                let script = l.script("udp-echo.sh", UDP_ECHO_SH)?;
                let argv = vec![
                    "socat".to_string(),
                    format!("UDP4-RECVFROM:{port},fork"),
                    format!("EXEC:/bin/sh {script} {name}"),
                ];
                l.spawn(pod.host, &format!("udp-echo {name}"), ("udp", *port), &argv)?;
            }
            Workload::Ingress {
                port,
                upstream,
                upstream_port,
            } => {
                // ingress-nginx proxies to endpoint (pod) IPs, not to the Service's ClusterIP.
                let servers = format!(
                    "  server {{\n    listen {port};\n    location / {{ proxy_pass http://{}:{upstream_port}; \
                     proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }}\n  }}\n",
                    layout.pod(*upstream).ip
                );
                l.nginx(pod.host, "ingress", *port, &servers)?;
            }
            Workload::ClusterDns { port } => {
                l.dnsmasq(
                    pod.host,
                    "coredns",
                    pod.ip,
                    *port,
                    &[
                        format!("--server={}", plan::WIRESERVER),
                        "--cache-size=0".into(),
                    ],
                )?;
            }
        }
    }
    for daemon in &l.daemons {
        wait_listening(daemon)?;
    }
    Ok(())
}

const READY_TIMEOUT: Duration = Duration::from_secs(5);

fn wait_listening(d: &Daemon) -> Result<(), LabError> {
    let (proto, port) = d.listen;
    let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let out = exec::in_ns(&d.netns, &["ss", flag])?;
        if out.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|a| a.ends_with(&format!(":{port}")))
        }) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LabError::NotReady {
                what: d.what.clone(),
                netns: d.netns.clone(),
                seconds: READY_TIMEOUT.as_secs(),
                log: std::fs::read_to_string(&d.log).unwrap_or_default(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
