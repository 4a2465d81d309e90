//! `--dump`: one line per flow as it is seen, as text for a person or JSON for a program.

use crate::events::{EventKind, FlowEvent, Proto, SourceKind, Tuple};
use crate::model::{Classification, Evidence, HopKind, HopMark, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::Arc;

/// How `--dump` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Everything one dump line shows about a flow.
pub struct FlowView<'a> {
    /// What happened: opened, NAT changed, ended.
    pub kind: EventKind,
    pub event: &'a FlowEvent,
    pub in_iface: Option<Arc<str>>,
    pub out_iface: Option<Arc<str>>,
    /// `namespace/pod` or `namespace/service` for the addresses the enrichment knows.
    pub names: BTreeMap<IpAddr, String>,
    /// The AKS path and verdict, once classified (a flow's end is shown without).
    pub classification: Option<&'a Classification>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: String,
    event: EventKind,
    source: SourceKind,
    proto: Proto,
    orig: &'a Tuple,
    reply: &'a Tuple,
    translated: Tuple,
    nat: Vec<&'static str>,
    in_iface: Option<&'a str>,
    out_iface: Option<&'a str>,
    netns: u32,
    zone: u16,
    mark: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    packets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    names: &'a BTreeMap<IpAddr, String>,
    /// `path`, `verdict`, `hops`, `reason` (and the model row's `seed` sentence).
    #[serde(flatten)]
    classification: Option<&'a Classification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_address_lost: Option<ClientAddressLost>,
}

/// An inbound connection that reaches its pod without the client's address: which hop replaced
/// it, and what keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientAddressLost {
    /// The hop, in the model's words, e.g. "kube-proxy MASQUERADE (KUBE-MARK-MASQ)".
    pub hop: String,
    /// A short fixed name of the hop, for metric labels: `kube_proxy_masquerade`,
    /// `application_gateway`, `application_gateway_for_containers` or `ingress_proxy`.
    #[serde(skip)]
    pub hop_class: &'static str,
    /// What the operator can do to get the client address.
    pub fix: &'static str,
}

const FIX_ETP_LOCAL: &str = "set `externalTrafficPolicy: Local` on the Service: the load \
    balancer then sends only to nodes with a ready pod and kube-proxy keeps the client address";
const FIX_XFF: &str = "the proxy terminates the client's connection and opens its own: read the \
    client address from the X-Forwarded-For header it adds";

/// Health probes come from Azure's probe address, not from a client whose address matters.
const HEALTH_PROBE_PATH: &str = "lb-health-probe";

/// Whether the client's address was replaced on the way to the pod, and by which hop: a proxy
/// that terminates the client's connection (Application Gateway, AGC, an ingress controller), or
/// the node's MASQUERADE of a connection that also went through kube-proxy's DNAT
/// (`externalTrafficPolicy: Cluster`).
pub fn client_address_lost(class: &Classification) -> Option<ClientAddressLost> {
    let at = client_address_lost_at(class, &class.hop_marks())?;
    // The hop chain is rendered only for the one hop named, and only when the address was lost.
    let hop = class.hops().into_iter().nth(at.index)?;
    Some(ClientAddressLost {
        hop: hop.what,
        hop_class: at.hop_class,
        fix: at.fix,
    })
}

/// Where [`client_address_lost`] finds the client's address replaced, decided from the hops'
/// kinds and evidence alone (`marks`, [`Classification::hop_marks`]), so that the metrics
/// render no text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostAt {
    /// The hop's position in the chain (`hop_marks` and `hops` list the same hops).
    pub index: usize,
    /// See [`ClientAddressLost::hop_class`].
    pub hop_class: &'static str,
    pub fix: &'static str,
}

pub fn client_address_lost_at(class: &Classification, marks: &[HopMark]) -> Option<LostAt> {
    if class
        .path
        .as_ref()
        .is_some_and(|p| p.0 == HEALTH_PROBE_PATH)
    {
        return None;
    }
    let seen = || {
        marks
            .iter()
            .enumerate()
            .filter(|(_, hop)| hop.evidence != Evidence::ExpectedNotSeen)
    };
    let proxy = seen().find_map(|(index, hop)| {
        let hop_class = match hop.kind {
            HopKind::AppgwProxy => "application_gateway",
            HopKind::AgcProxy => "application_gateway_for_containers",
            HopKind::IngressProxy => "ingress_proxy",
            _ => return None,
        };
        Some(LostAt {
            index,
            hop_class,
            fix: FIX_XFF,
        })
    });
    if proxy.is_some() {
        return proxy;
    }
    let from_client = marks.first().is_some_and(|hop| hop.kind == HopKind::Client);
    let dnat = seen().any(|(_, hop)| hop.kind == HopKind::NodeDnat);
    let (index, _) = seen().find(|(_, hop)| hop.kind == HopKind::NodeSnat)?;
    (from_client && dnat).then_some(LostAt {
        index,
        hop_class: "kube_proxy_masquerade",
        fix: FIX_ETP_LOCAL,
    })
}

/// The fields of a JSON dump line that make up the flow again (`explain --from-dump`).
#[derive(Deserialize)]
struct ReadLine {
    ts: String,
    event: EventKind,
    source: SourceKind,
    proto: String,
    orig: Tuple,
    reply: Tuple,
    in_iface: Option<String>,
    out_iface: Option<String>,
    netns: u32,
    zone: u16,
    mark: u32,
    packets: Option<u64>,
    bytes: Option<u64>,
}

/// A flow read back from a JSON dump line, with the interface names it was printed with.
pub struct ReadFlow {
    pub event: FlowEvent,
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
}

/// Parses one `--dump --output json` line back into the flow it shows.
pub fn read_line(line: &str) -> Result<ReadFlow, String> {
    let l: ReadLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let ts = humantime::parse_rfc3339(&l.ts).map_err(|e| format!("ts {:?}: {e}", l.ts))?;
    let event = FlowEvent {
        kind: l.event,
        source: l.source,
        ts,
        proto: l.proto.parse()?,
        orig: l.orig,
        reply: l.reply,
        status: 0,
        mark: l.mark,
        zone: l.zone,
        netns: l.netns,
        in_ifindex: None,
        out_ifindex: None,
        packets: l.packets,
        bytes: l.bytes,
        hook: None,
        instance: None,
    };
    Ok(ReadFlow {
        event,
        in_iface: l.in_iface,
        out_iface: l.out_iface,
    })
}

/// Writes dump lines to a writer through a buffer: the caller [`flush`](Dump::flush)es once per
/// batch of handled events, so a pipe reader sees flows live at one write(2) per batch rather
/// than one per line.
pub struct Dump<W: Write> {
    format: Format,
    out: io::BufWriter<W>,
}

/// Room for a batch of lines before the buffer writes out early (about 150 JSON lines).
const BUFFER: usize = 64 * 1024;

impl<W: Write> Dump<W> {
    pub fn new(format: Format, out: W) -> Self {
        Dump {
            format,
            out: io::BufWriter::with_capacity(BUFFER, out),
        }
    }

    pub fn write(&mut self, view: &FlowView<'_>) -> io::Result<()> {
        let line = match self.format {
            Format::Text => text_line(view),
            Format::Json => json_line(view),
        };
        self.write_raw(&line)
    }

    /// Writes a pre-rendered block (an `explain` diagram) the same way.
    pub fn write_raw(&mut self, text: &str) -> io::Result<()> {
        writeln!(self.out, "{text}")
    }

    /// Hands what was written since the last flush to the writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Conforms => "conforms",
        Verdict::Deviates => "DEVIATES",
        Verdict::Unclassified => "unclassified",
    }
}

fn rfc3339(ts: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(ts).to_string()
}

fn json_line(view: &FlowView<'_>) -> String {
    let ev = view.event;
    let line = JsonLine {
        ts: rfc3339(ev.ts),
        event: view.kind,
        source: ev.source,
        proto: ev.proto,
        orig: &ev.orig,
        reply: &ev.reply,
        translated: ev.translated(),
        nat: ev.nat().names(),
        in_iface: view.in_iface.as_deref(),
        out_iface: view.out_iface.as_deref(),
        netns: ev.netns,
        zone: ev.zone,
        mark: ev.mark,
        packets: ev.packets,
        bytes: ev.bytes,
        names: &view.names,
        classification: view.classification,
        client_address_lost: view.classification.and_then(client_address_lost),
    };
    serde_json::to_string(&line).expect("dump lines hold only serialisable plain data")
}

fn text_line(view: &FlowView<'_>) -> String {
    let ev = view.event;
    let kind = match view.kind {
        EventKind::New => "new",
        EventKind::NatChanged => "nat-changed",
        EventKind::Destroy => "end",
    };
    let mut line = format!(
        "{} {kind:<5} {:<4} {} => {} {:<4} in={} out={}",
        rfc3339(ev.ts),
        ev.proto,
        ev.orig,
        ev.translated(),
        ev.nat(),
        view.in_iface.as_deref().unwrap_or("-"),
        view.out_iface.as_deref().unwrap_or("-"),
    );
    if let Some(class) = view.classification {
        let path = class.path.as_ref().map_or("-", |p| p.0.as_str());
        line.push_str(&format!(" path={path} {}", verdict_word(class.verdict)));
        if class.verdict != Verdict::Conforms {
            if let Some(reason) = class.reason() {
                line.push_str(&format!(" ({reason})"));
            }
        }
    }
    for (addr, name) in &view.names {
        line.push_str(&format!(" {addr}={name}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn lb_event() -> FlowEvent {
        FlowEvent {
            kind: EventKind::New,
            source: SourceKind::Ebpf,
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            proto: Proto::Tcp,
            orig: Tuple {
                src: "203.0.113.10".parse().unwrap(),
                sport: 40000,
                dst: "192.0.2.10".parse().unwrap(),
                dport: 80,
            },
            reply: Tuple {
                src: "10.244.0.10".parse().unwrap(),
                sport: 8080,
                dst: "10.244.0.1".parse().unwrap(),
                dport: 61000,
            },
            status: 0,
            mark: 0x4000,
            zone: 0,
            netns: 4026532000,
            in_ifindex: Some(2),
            out_ifindex: Some(5),
            packets: None,
            bytes: None,
            hook: None,
            instance: None,
        }
    }

    fn view(ev: &FlowEvent) -> FlowView<'_> {
        FlowView {
            kind: EventKind::New,
            event: ev,
            in_iface: Some("eth0".into()),
            out_iface: Some("cbr0".into()),
            names: BTreeMap::from([(
                "10.244.0.10".parse().unwrap(),
                "default/app-7d4b9c-x2x9z".into(),
            )]),
            classification: None,
        }
    }

    #[test]
    fn text_line_shows_both_tuples_nat_and_interfaces() {
        let ev = lb_event();
        assert_eq!(
            text_line(&view(&ev)),
            "2026-11-18T11:06:40.123Z new   tcp  203.0.113.10:40000 -> 192.0.2.10:80 => \
             10.244.0.1:61000 -> 10.244.0.10:8080 both in=eth0 out=cbr0 10.244.0.10=default/app-7d4b9c-x2x9z"
        );
    }

    #[test]
    fn json_line_has_the_documented_fields_with_numeric_ports() {
        let ev = lb_event();
        let v: serde_json::Value = serde_json::from_str(&json_line(&view(&ev))).unwrap();
        assert_eq!(v["ts"], "2026-11-18T11:06:40.123Z");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(
            v["orig"],
            serde_json::json!({"src": "203.0.113.10", "sport": 40000, "dst": "192.0.2.10", "dport": 80})
        );
        assert_eq!(v["reply"]["src"], "10.244.0.10");
        assert_eq!(v["reply"]["sport"], 8080);
        assert_eq!(v["nat"], serde_json::json!(["dnat", "snat"]));
        assert_eq!(
            (v["in_iface"].as_str(), v["out_iface"].as_str()),
            (Some("eth0"), Some("cbr0"))
        );
        assert_eq!(v["netns"], 4026532000u64);
        assert_eq!(v["names"]["10.244.0.10"], "default/app-7d4b9c-x2x9z");
        assert!(v.get("packets").is_none());
    }

    #[test]
    fn a_json_line_reads_back_into_the_same_flow() {
        let ev = lb_event();
        let read = read_line(&json_line(&view(&ev))).unwrap();
        assert_eq!(
            (read.event.proto, read.event.orig, read.event.reply),
            (ev.proto, ev.orig, ev.reply)
        );
        assert_eq!(read.event.ts, ev.ts);
        assert_eq!(
            (read.in_iface.as_deref(), read.out_iface.as_deref()),
            (Some("eth0"), Some("cbr0"))
        );
        assert!(read_line("{}").is_err());
    }

    #[test]
    fn names_the_hop_that_lost_the_client_address_and_the_fix() {
        use crate::model::tests::flow;
        use crate::model::{Classifier, Model};
        use crate::topology::CniMode;
        let lost = |cni, src: &str, dst: &str, nat_src: &str, nat_dst: &str| {
            let topology = crate::model::tests::lab_topology(cni);
            let classifier = Classifier::new(Model::load_builtin(cni).unwrap(), topology).unwrap();
            let class = classifier.classify(&flow(Proto::Tcp, src, dst, nat_src, nat_dst));
            assert_ne!(class.verdict, Verdict::Unclassified, "{class:?}");
            client_address_lost(&class)
        };
        let k = CniMode::Kubenet;
        let etp_cluster = lost(
            k,
            "203.0.113.10:40000",
            "192.0.2.10:80",
            "10.244.0.1:40000",
            "10.244.0.10:8080",
        )
        .expect("eTP Cluster MASQUERADEs the client");
        assert_eq!(etp_cluster.hop_class, "kube_proxy_masquerade");
        assert!(etp_cluster.hop.contains("MASQUERADE"), "{etp_cluster:?}");
        assert!(etp_cluster.fix.contains("externalTrafficPolicy: Local"));
        let json = serde_json::to_value(&etp_cluster).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 2, "hop and fix: {json}");

        let appgw = lost(
            k,
            "10.226.0.4:50000",
            "10.244.0.10:8080",
            "10.226.0.4:50000",
            "10.244.0.10:8080",
        )
        .expect("the Application Gateway terminates the client connection");
        assert_eq!(appgw.hop_class, "application_gateway");
        assert!(appgw.fix.contains("X-Forwarded-For"));
        let agc = lost(
            CniMode::AzureCni,
            "10.228.0.4:50000",
            "10.224.0.10:8080",
            "10.228.0.4:50000",
            "10.224.0.10:8080",
        )
        .expect("AGC terminates the client connection");
        assert_eq!(agc.hop_class, "application_gateway_for_containers");

        let kept = [
            (
                "203.0.113.10:40001",
                "192.0.2.12:80",
                "203.0.113.10:40001",
                "10.244.0.13:8080",
            ),
            (
                "10.244.0.10:40000",
                "198.51.100.20:80",
                "10.224.0.4:40000",
                "198.51.100.20:80",
            ),
            (
                "10.244.0.10:40007",
                "10.0.80.80:80",
                "10.244.0.1:40007",
                "10.244.0.10:8080",
            ),
            (
                "168.63.129.16:60001",
                "10.224.0.4:30080",
                "10.244.0.1:60001",
                "10.244.0.10:8080",
            ),
        ];
        for (src, dst, nat_src, nat_dst) in kept {
            assert_eq!(lost(k, src, dst, nat_src, nat_dst), None, "{src} -> {dst}");
        }

        // The JSON line carries it; a flow that keeps its client address has no such field.
        let topology = crate::model::tests::lab_topology(k);
        let classifier = Classifier::new(Model::load_builtin(k).unwrap(), topology).unwrap();
        let ev = lb_event();
        let class = classifier.classify(&ev);
        let line = json_line(&FlowView {
            classification: Some(&class),
            ..view(&ev)
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v["client_address_lost"]["hop"], "kube-proxy MASQUERADE (KUBE-MARK-MASQ)",
            "{line}"
        );
        assert!(v["client_address_lost"]["fix"]
            .as_str()
            .unwrap()
            .contains("externalTrafficPolicy: Local"));
        assert!(
            read_line(&line).is_ok(),
            "explain --from-dump still reads it"
        );
        let plain: serde_json::Value = serde_json::from_str(&json_line(&view(&ev))).unwrap();
        assert!(plain.get("client_address_lost").is_none());
    }
}
