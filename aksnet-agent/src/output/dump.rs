//! `--dump`: one line per flow as it is seen, as text for a person or JSON for a program.

use crate::events::{EventKind, FlowEvent, Proto, SourceKind, Tuple};
use crate::model::{Classification, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::IpAddr;

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
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
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

/// Writes dump lines to a writer, flushing each so that a pipe reader sees flows live.
pub struct Dump<W: Write> {
    format: Format,
    out: W,
}

impl<W: Write> Dump<W> {
    pub fn new(format: Format, out: W) -> Self {
        Dump { format, out }
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
        writeln!(self.out, "{text}")?;
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
    let iface = |name: &Option<String>| name.clone().unwrap_or_else(|| "-".into());
    let mut line = format!(
        "{} {kind:<5} {:<4} {} => {} {:<4} in={} out={}",
        rfc3339(ev.ts),
        ev.proto,
        ev.orig,
        ev.translated(),
        ev.nat(),
        iface(&view.in_iface),
        iface(&view.out_iface),
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
}
