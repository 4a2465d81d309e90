//! `explain`: one flow's hop chain drawn in the seed notes' style, each hop marked observed or
//! inferred (and from what), with the addresses before and after each NAT. With `--verbose` it
//! also quotes the seed note the path encodes and aks-facts' correction of it.

use crate::events::FlowEvent;
use crate::model::{Classification, Evidence, Hop, HopKind, Verdict};
use std::fmt::Write;

/// Renders the classification of `ev` as a diagram; `verbose` adds the seed quotation.
pub fn render(ev: &FlowEvent, c: &Classification, verbose: bool) -> String {
    let mut out = String::new();
    let tr = ev.translated();
    let _ = write!(out, "flow {} {}", ev.proto, ev.orig);
    if ev.nat().dnat || ev.nat().snat {
        let _ = write!(out, " (after NAT on the node: {tr})");
    }
    out.push('\n');
    let verdict = match c.verdict {
        Verdict::Conforms => "conforms",
        Verdict::Deviates => "DEVIATES",
        Verdict::Unclassified => "unclassified",
    };
    let model = match c.cni {
        Some(cni) => format!("{cni} model"),
        None => "no model: the network mode is unknown".to_string(),
    };
    match &c.path {
        Some(path) => {
            let variant = c
                .variant
                .as_deref()
                .map(|v| format!(" ({v})"))
                .unwrap_or_default();
            let _ = writeln!(out, "path {path}{variant}, {model}: {verdict}");
        }
        None => {
            let _ = writeln!(out, "{verdict} ({model})");
        }
    }
    for (i, hop) in c.hops().iter().enumerate() {
        if i > 0 {
            out.push_str("   |\n");
        }
        out.push_str(&hop_line(hop));
        out.push('\n');
    }
    if let Some(reason) = c.reason() {
        let _ = writeln!(out, "reason: {reason}");
    }
    if let Some(lost) = crate::output::dump::client_address_lost(c) {
        let _ = writeln!(out, "client address lost at [{}]: {}", lost.hop, lost.fix);
    }
    if !verbose {
        return out;
    }
    if let Some(seed) = c.seed() {
        let _ = writeln!(out, "seed: \"{seed}\"");
    }
    if let Some(refines) = c.refines() {
        let _ = writeln!(out, "refined by {refines}");
    }
    out
}

fn hop_line(hop: &Hop) -> String {
    let mut line = format!("[{}]", hop.what);
    if let Some(at) = &hop.at {
        let _ = write!(line, " {at}");
    }
    if let (Some(before), Some(after)) = (&hop.before, &hop.after) {
        let which = match hop.kind {
            HopKind::NodeDnat | HopKind::AzureLb => "dst",
            _ => "src",
        };
        let _ = write!(line, " {which} {before} -> {after}");
    }
    let mark = match (hop.evidence, hop.in_model) {
        (Evidence::Observed, true) => "(observed)".to_string(),
        (Evidence::Observed, false) => "(observed, NOT in the model)".to_string(),
        (Evidence::Inferred, _) => match &hop.inferred_from {
            Some(from) => format!("(inferred: {from})"),
            None => "(inferred)".to_string(),
        },
        (Evidence::ExpectedNotSeen, _) => {
            "(expected by the model, NOT seen on the node)".to_string()
        }
    };
    let _ = write!(line, " {mark}");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{flow, lab_topology};
    use crate::model::{Classifier, Model};
    use crate::topology::CniMode;

    #[test]
    fn lb_inbound_snapshot() {
        let cl = Classifier::new(
            Model::load_builtin(CniMode::Kubenet).unwrap(),
            lab_topology(CniMode::Kubenet),
        )
        .unwrap();
        let ev = flow(
            crate::events::Proto::Tcp,
            "203.0.113.10:40000",
            "192.0.2.10:80",
            "10.244.0.1:40000",
            "10.244.0.10:8080",
        );
        let c = cl.classify_with_interfaces(&ev, Some("eth0"), Some("cbr0"));
        let expected = "\
flow tcp 203.0.113.10:40000 -> 192.0.2.10:80 (after NAT on the node: 10.244.0.1:40000 -> 10.244.0.10:8080)
path lb-inbound (etp-cluster), kubenet model: conforms
[Client (internet)] 203.0.113.10:40000 (observed)
   |
[Azure Load Balancer (floating IP)] dst 192.0.2.10:80 -> 192.0.2.10:80 (inferred: floating IP: 192.0.2.10 is the LB frontend of default/app and stays the destination up to the node)
   |
[AKS Node] 10.224.0.4 (in eth0, out cbr0) (observed)
   |
[kube-proxy DNAT to the pod (KUBE-SVC)] dst 192.0.2.10:80 -> 10.244.0.10:8080 (observed)
   |
[kube-proxy MASQUERADE (KUBE-MARK-MASQ)] src 203.0.113.10:40000 -> 10.244.0.1:40000 (observed)
   |
[Pod] 10.244.0.10:8080 (observed)
client address lost at [kube-proxy MASQUERADE (KUBE-MARK-MASQ)]: set `externalTrafficPolicy: Local` on the Service: the load balancer then sends only to nodes with a ready pod and kube-proxy keeps the client address
seed: \"O TCP handshake (SYN, SYN-ACK, ACK) é feito entre o cliente e o IP do Load Balancer (frontend IP).\"
refined by aks-facts: the handshake runs end to end between client and pod through the node's DNAT (floating IP): one conntrack entry, one path. With externalTrafficPolicy Cluster KUBE-MARK-MASQ + KUBE-POSTROUTING also SNAT it (cbr0's gateway for a local pod, the node IP for one on another node), so the client address is lost; the seed omits this SNAT.
";
        assert_eq!(render(&ev, &c, true), expected);
        // Without --verbose the seed's own words stay out of the diagram.
        let plain = render(&ev, &c, false);
        assert!(expected.starts_with(&plain), "{plain}");
        assert!(
            !plain.contains("seed:") && !plain.contains("refined by"),
            "{plain}"
        );
    }

    #[test]
    fn deviation_marks_the_unmodelled_hop() {
        let cl = Classifier::new(
            Model::load_builtin(CniMode::AzureCni).unwrap(),
            lab_topology(CniMode::AzureCni),
        )
        .unwrap();
        let ev = flow(
            crate::events::Proto::Tcp,
            "10.224.0.10:40000",
            "10.224.0.8:80",
            "10.224.0.4:40000",
            "10.224.0.8:80",
        );
        let out = render(&ev, &cl.classify(&ev), false);
        assert!(
            out.contains("path pod-to-vnet, azure-cni model: DEVIATES"),
            "{out}"
        );
        assert!(out.contains("[Node SNAT (not in the model)] src 10.224.0.10:40000 -> 10.224.0.4:40000 (observed, NOT in the model)"), "{out}");
        assert!(
            out.contains("reason: azure-cni pod traffic to 10.224.0.8"),
            "{out}"
        );
    }
}
