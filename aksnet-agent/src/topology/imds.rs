//! The Azure Instance Metadata Service: the node's private IPs and subnet prefix, and the load
//! balancer's public IPs (the frontends of its inbound and outbound rules).
//!
//! IMDS answers only the VM itself, on its host network, and only on Azure: the agent asks it
//! only when it observes its own (host) namespace on an Azure VM ([`on_azure`]), with short
//! timeouts, and an answer that does not come is a note, never an error that stops the agent.
//! Plain HTTP over a TCP socket: IMDS must never go through a proxy, and this is all it needs.

use super::{Cidr, LbFrontend, TopologyLayer};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Where IMDS listens, from every Azure VM.
pub const IMDS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);
/// Connect, read and write timeouts: IMDS answers in milliseconds or not at all.
pub const IMDS_TIMEOUT: Duration = Duration::from_millis(500);

const NETWORK: &str = "/metadata/instance/network?api-version=2021-02-01";
const LOADBALANCER: &str = "/metadata/loadbalancer?api-version=2020-10-01";
/// Azure's chassis asset tag, which every Azure VM's firmware reports.
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085";

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("cannot reach IMDS at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("IMDS request {path} failed: {source}")]
    Io {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("IMDS answered {path} with `{status}`")]
    Status { path: &'static str, status: String },
    #[error("IMDS answer to {path} is not what the API documents: {why}")]
    Body { path: &'static str, why: String },
}

/// Whether this machine is an Azure VM, from its firmware's chassis asset tag.
pub fn on_azure() -> bool {
    std::fs::read_to_string("/sys/class/dmi/id/chassis_asset_tag")
        .is_ok_and(|tag| tag.trim() == AZURE_ASSET_TAG)
}

/// A client of one IMDS endpoint (tests point it at a local server).
#[derive(Clone, Copy, Debug)]
pub struct Imds {
    addr: SocketAddr,
    timeout: Duration,
}

impl Imds {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Imds {
        Imds { addr, timeout }
    }

    /// What IMDS says about the node: its primary private IP(s) and subnet prefix(es), and the
    /// LB's outbound IPs; what it could not answer is a note.
    pub fn layer(&self) -> (TopologyLayer, Vec<String>) {
        let mut layer = TopologyLayer::default();
        let mut notes = Vec::new();
        match self.get(NETWORK).and_then(|body| network(&body)) {
            Ok((ips, subnets)) => {
                layer.node_ips = Some(ips).filter(|v| !v.is_empty());
                layer.node_subnet = Some(subnets).filter(|v| !v.is_empty());
            }
            Err(e) => notes.push(format!(
                "{e}; the node's IPs and subnet come from its interfaces"
            )),
        }
        match self.get(LOADBALANCER).and_then(|body| lb_ips(&body)) {
            Ok((inbound, outbound)) => {
                let frontends = inbound.into_iter().map(|ip| LbFrontend {
                    ip,
                    service: None,
                    external_traffic_policy: None,
                });
                layer.lb_frontends = Some(frontends.collect()).filter(|v: &Vec<_>| !v.is_empty());
                layer.lb_outbound_ips = Some(outbound).filter(|v| !v.is_empty());
            }
            Err(e) => notes.push(format!("{e}; the LB's public IPs are unknown")),
        }
        (layer, notes)
    }

    /// `GET path` with the `Metadata: true` header IMDS requires; the body of a 200.
    fn get(&self, path: &'static str) -> Result<String, ImdsError> {
        let io = |source| ImdsError::Io { path, source };
        let mut stream =
            TcpStream::connect_timeout(&self.addr, self.timeout).map_err(|source| {
                ImdsError::Connect {
                    addr: self.addr,
                    source,
                }
            })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nMetadata: true\r\nConnection: close\r\n\r\n",
            self.addr.ip()
        )
        .map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or(ImdsError::Body {
            path,
            why: "no end of headers".into(),
        })?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(ImdsError::Status {
                path,
                status: status.to_string(),
            });
        }
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .replace(' ', "")
                .starts_with("transfer-encoding:chunked")
        });
        if chunked {
            dechunk(body).ok_or(ImdsError::Body {
                path,
                why: "bad chunked encoding".into(),
            })
        } else {
            Ok(body.to_string())
        }
    }
}

/// Joins the chunks of a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

fn json(path: &'static str, body: &str) -> Result<Value, ImdsError> {
    serde_json::from_str(body).map_err(|e| ImdsError::Body {
        path,
        why: e.to_string(),
    })
}

/// Each interface's primary private address (the first; azure-cni's pod IPs are secondary
/// addresses of the same NIC) and its subnet prefixes, IPv4 and IPv6.
fn network(body: &str) -> Result<(Vec<IpAddr>, Vec<Cidr>), ImdsError> {
    let v = json(NETWORK, body)?;
    let interfaces = v["interface"].as_array().ok_or(ImdsError::Body {
        path: NETWORK,
        why: "no `interface` list".into(),
    })?;
    let (mut ips, mut subnets) = (Vec::new(), Vec::new());
    for family in interfaces.iter().flat_map(|i| [&i["ipv4"], &i["ipv6"]]) {
        let primary = family["ipAddress"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|a| a["privateIpAddress"].as_str()?.parse::<IpAddr>().ok());
        ips.extend(primary);
        for subnet in family["subnet"].as_array().into_iter().flatten() {
            let (Some(addr), Some(prefix)) =
                (subnet["address"].as_str(), subnet["prefix"].as_str())
            else {
                continue;
            };
            if let Ok(cidr) = format!("{addr}/{prefix}").parse::<Cidr>() {
                subnets.push(cidr);
            }
        }
    }
    Ok((ips, subnets))
}

/// The frontends of the LB's inbound rules (Services' public IPs) and of its outbound rules
/// (the public IPs the node's outbound traffic is SNATed to).
fn lb_ips(body: &str) -> Result<(Vec<IpAddr>, Vec<IpAddr>), ImdsError> {
    let v = json(LOADBALANCER, body)?;
    let frontends = |rules: &str| {
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in v["loadbalancer"][rules]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["frontendIpAddress"].as_str()?.parse().ok())
        {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips
    };
    Ok((frontends("inboundRules"), frontends("outboundRules")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// IMDS's answers as documented (learn.microsoft.com, "Azure Instance Metadata Service"),
    /// for an azure-cni node whose NIC also holds pod IPs.
    const NETWORK_BODY: &str = r#"{"interface":[{"ipv4":{"ipAddress":[{"privateIpAddress":"10.224.0.4","publicIpAddress":""},{"privateIpAddress":"10.224.0.10","publicIpAddress":""}],"subnet":[{"address":"10.224.0.0","prefix":"16"}]},"ipv6":{"ipAddress":[]},"macAddress":"000D3A123456"}]}"#;
    const LB_BODY: &str = r#"{"loadbalancer":{"publicIpAddresses":[{"frontendIpAddress":"192.0.2.10","privateIpAddress":"10.224.0.4"}],"inboundRules":[{"frontendIpAddress":"192.0.2.10","protocol":"tcp","frontendPort":80,"backendPort":80,"privateIpAddress":"10.224.0.4"}],"outboundRules":[{"frontendIpAddress":"192.0.2.100","privateIpAddress":"10.224.0.4"},{"frontendIpAddress":"192.0.2.100","privateIpAddress":"10.224.0.4"}]}}"#;

    /// A local stand-in for IMDS on loopback: answers `requests` connections, refusing (400)
    /// those without `Metadata: true` as IMDS does; the network answer is chunked.
    fn fake_imds(requests: usize) -> (SocketAddr, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for stream in listener.incoming().take(requests) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    head.push(line.trim().to_string());
                }
                let target = head[0].split_whitespace().nth(1).unwrap().to_string();
                let reply = if !head.iter().any(|h| h == "Metadata: true") {
                    "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_string()
                } else if target == NETWORK {
                    let (a, b) = NETWORK_BODY.split_at(40);
                    format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                        a.len(),
                        b.len()
                    )
                } else if target == LOADBALANCER {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{LB_BODY}",
                        LB_BODY.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
                };
                stream.write_all(reply.as_bytes()).unwrap();
                seen.push(target);
            }
            seen
        });
        (addr, server)
    }

    #[test]
    fn node_addresses_subnet_and_outbound_ips() {
        let (addr, server) = fake_imds(2);
        let (layer, notes) = Imds::new(addr, Duration::from_secs(5)).layer();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(layer.node_ips, Some(vec!["10.224.0.4".parse().unwrap()]));
        assert_eq!(
            layer.node_subnet,
            Some(vec!["10.224.0.0/16".parse().unwrap()])
        );
        assert_eq!(
            layer.lb_outbound_ips,
            Some(vec!["192.0.2.100".parse().unwrap()])
        );
        let frontends = layer.lb_frontends.unwrap();
        assert_eq!(
            frontends.iter().map(|f| f.ip).collect::<Vec<_>>(),
            vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(server.join().unwrap(), vec![NETWORK, LOADBALANCER]);
    }

    #[test]
    fn an_absent_imds_is_a_note_not_an_error() {
        // A port nothing listens on: bind one, then free it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (layer, notes) = Imds::new(addr, Duration::from_secs(1)).layer();
        assert_eq!(layer, TopologyLayer::default());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("cannot reach IMDS"), "{notes:?}");
    }

    #[test]
    fn a_silent_imds_times_out() {
        // Accepts the connection (the backlog does) and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let imds = Imds::new(listener.local_addr().unwrap(), Duration::from_millis(200));
        let err = imds.get(NETWORK).unwrap_err();
        assert!(matches!(err, ImdsError::Io { .. }), "{err}");
        drop(listener);
    }

    #[test]
    fn http_errors_and_bad_bodies_are_reported() {
        assert!(network("{}").is_err());
        assert!(network("not json").is_err());
        assert_eq!(
            lb_ips(r#"{"loadbalancer":{}}"#).unwrap(),
            (Vec::new(), Vec::new())
        );
        assert_eq!(dechunk("3\r\nabc\r\n0\r\n\r\n").as_deref(), Some("abc"));
        assert_eq!(dechunk("zz\r\n"), None);
    }
}
