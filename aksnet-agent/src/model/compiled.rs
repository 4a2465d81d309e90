//! A model's rows compiled at load into what classifying one flow needs: candidate rows per
//! direction, address classes as bit sets, Service globs split once, templates parsed into
//! pieces. Nothing here allocates per flow; templates are filled only when a person reads them.

use super::{Direction, PathRow, PortRange, ProtoName};
use crate::events::Proto;
use crate::topology::{AddrClass, Etp};

/// A set of address classes, one bit per class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ClassSet(u32);

impl ClassSet {
    pub(super) fn of(classes: &[AddrClass]) -> ClassSet {
        ClassSet(classes.iter().fold(0, |m, c| m | bit(*c)))
    }

    pub(super) fn contains(self, c: AddrClass) -> bool {
        self.0 & bit(c) != 0
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }
}

fn bit(c: AddrClass) -> u32 {
    1 << (c as u32)
}

/// A Service-name pattern: `*` matches any run of characters, nothing else is special. Split
/// once into the text before the first star, after the last, and between.
#[derive(Clone, Debug)]
pub(super) struct Glob {
    /// No star: the whole name.
    exact: Option<String>,
    prefix: String,
    suffix: String,
    middles: Vec<String>,
    min_len: usize,
}

impl Glob {
    pub(super) fn new(pattern: &str) -> Glob {
        let parts: Vec<&str> = pattern.split('*').collect();
        let (prefix, suffix) = (parts[0], parts[parts.len() - 1]);
        let middles: Vec<String> = match parts.len() {
            0..=2 => Vec::new(),
            n => parts[1..n - 1]
                .iter()
                .filter(|m| !m.is_empty())
                .map(|m| m.to_string())
                .collect(),
        };
        Glob {
            exact: (parts.len() == 1).then(|| pattern.to_string()),
            min_len: prefix.len() + suffix.len() + middles.iter().map(String::len).sum::<usize>(),
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
            middles,
        }
    }

    pub(super) fn matches(&self, name: &str) -> bool {
        if let Some(exact) = &self.exact {
            return exact == name;
        }
        // Lengths first: most names fail here without comparing a byte.
        if name.len() < self.min_len
            || (!self.prefix.is_empty() && !name.starts_with(self.prefix.as_str()))
            || (!self.suffix.is_empty() && !name.ends_with(self.suffix.as_str()))
        {
            return false;
        }
        let mut rest = &name[self.prefix.len()..name.len() - self.suffix.len()];
        for mid in &self.middles {
            let found = match mid.as_bytes() {
                [byte] => rest.bytes().position(|b| b == *byte),
                _ => rest.find(mid.as_str()),
            };
            match found {
                Some(i) => rest = &rest[i + mid.len()..],
                None => return false,
            }
        }
        true
    }
}

/// A value a template may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Var {
    Src,
    Dst,
    Dport,
    NatSrc,
    NatDst,
    SrcService,
    DstService,
    Etp,
    Cni,
    NodeIp,
    LbOutbound,
    Outbound,
    InIface,
    OutIface,
    SrcClass,
}

/// Placeholders a template may use, with the value each names.
pub(super) const PLACEHOLDERS: [(&str, Var); 15] = [
    ("src", Var::Src),
    ("dst", Var::Dst),
    ("dport", Var::Dport),
    ("nat_src", Var::NatSrc),
    ("nat_dst", Var::NatDst),
    ("src_service", Var::SrcService),
    ("dst_service", Var::DstService),
    ("etp", Var::Etp),
    ("cni", Var::Cni),
    ("node_ip", Var::NodeIp),
    ("lb_outbound", Var::LbOutbound),
    ("outbound", Var::Outbound),
    ("in_iface", Var::InIface),
    ("out_iface", Var::OutIface),
    ("src_class", Var::SrcClass),
];

#[derive(Clone, Debug)]
enum Piece {
    Text(String),
    Var(Var),
}

/// A template (`"health probe from {src} to {dst}:{dport}"`) split into text and placeholders.
#[derive(Clone, Debug)]
pub(super) struct Template(Vec<Piece>);

impl Template {
    /// Parses `text`, or names the first unknown placeholder and the ones there are.
    pub(super) fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}').map(|c| open + c) else {
                break;
            };
            let name = &rest[open + 1..close];
            let Some((_, var)) = PLACEHOLDERS.iter().find(|(n, _)| *n == name) else {
                return Err(format!(
                    "unknown placeholder {{{name}}}; use one of {}",
                    PLACEHOLDERS
                        .iter()
                        .map(|(p, _)| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            };
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            pieces.push(Piece::Var(*var));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template(pieces))
    }

    /// Fills the template, asking `value` to write each placeholder.
    pub(super) fn fill(&self, mut value: impl FnMut(Var, &mut String)) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => value(*v, &mut out),
            }
        }
        out
    }
}

/// How a row recognises a flow, in the form the matcher tests cheaply.
#[derive(Clone, Debug)]
pub(super) struct RowMatch {
    src: ClassSet,
    dst: ClassSet,
    /// Empty: any translated destination.
    nat_dst: ClassSet,
    proto: Vec<ProtoName>,
    dports: Vec<PortRange>,
    etp: Option<Etp>,
    hairpin: bool,
    src_service: Vec<Glob>,
    dst_service: Vec<Glob>,
}

/// What the matcher asks of one flow; Service lookups are made only when a row needs them.
pub(super) trait FlowFacts {
    fn src_class(&self) -> AddrClass;
    fn dst_class(&self) -> AddrClass;
    fn nat_dst_class(&self) -> AddrClass;
    fn proto(&self) -> Proto;
    fn dport(&self) -> u16;
    fn hairpin(&self) -> bool;
    fn dst_etp(&self) -> Option<Etp>;
    fn src_service(&self) -> Option<&str>;
    fn dst_service(&self) -> Option<&str>;
}

impl RowMatch {
    pub(super) fn new(row: &PathRow) -> RowMatch {
        RowMatch {
            src: ClassSet::of(&row.src),
            dst: ClassSet::of(&row.dst),
            nat_dst: ClassSet::of(&row.nat_dst),
            proto: row.proto.clone(),
            dports: row.dports.clone(),
            etp: row.etp,
            hairpin: row.hairpin,
            src_service: row.src_service.iter().map(|p| Glob::new(p)).collect(),
            dst_service: row.dst_service.iter().map(|p| Glob::new(p)).collect(),
        }
    }

    /// Cheapest tests first; the Service lookups last.
    pub(super) fn matches(&self, f: &impl FlowFacts) -> bool {
        let any_glob = |globs: &[Glob], name: Option<&str>| {
            globs.is_empty() || name.is_some_and(|n| globs.iter().any(|g| g.matches(n)))
        };
        self.src.contains(f.src_class())
            && self.dst.contains(f.dst_class())
            && (self.nat_dst.is_empty() || self.nat_dst.contains(f.nat_dst_class()))
            && (self.proto.is_empty() || self.proto.iter().any(|p| p.matches(f.proto())))
            && (self.dports.is_empty()
                || self.dports.iter().any(|r| (r.0..=r.1).contains(&f.dport())))
            && (!self.hairpin || f.hairpin())
            && (self.etp.is_none() || self.etp == f.dst_etp())
            && any_glob(&self.src_service, f.src_service())
            && any_glob(&self.dst_service, f.dst_service())
    }
}

/// Row indices per direction, in match order.
#[derive(Clone, Debug, Default)]
pub(super) struct Candidates([Vec<usize>; 3]);

impl Candidates {
    pub(super) fn new(rows: &[PathRow]) -> Candidates {
        let mut c = Candidates::default();
        for (i, row) in rows.iter().enumerate() {
            c.0[slot(row.direction)].push(i);
        }
        c
    }

    pub(super) fn of(&self, d: Direction) -> &[usize] {
        &self.0[slot(d)]
    }
}

fn slot(d: Direction) -> usize {
    match d {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
        Direction::Internal => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_stars() {
        for (pattern, name, expected) in [
            (
                "ingress-nginx/*",
                "ingress-nginx/ingress-nginx-controller",
                true,
            ),
            ("*/*ingress*", "web/my-ingress-gw", true),
            ("*/*ingress*", "web/app", false),
            ("default/app", "default/app", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "ac", false),
            ("ab*ba", "aba", false),
            ("*", "", true),
            ("a**b", "ab", true),
            ("*/*", "default", false),
        ] {
            assert_eq!(
                Glob::new(pattern).matches(name),
                expected,
                "{pattern} {name}"
            );
        }
    }

    #[test]
    fn templates_fill_placeholders_and_name_unknown_ones() {
        let t = Template::parse("from {src} to {dst}:{dport}!").unwrap();
        let out = t.fill(|v, out| {
            out.push_str(match v {
                Var::Src => "a",
                Var::Dst => "b",
                _ => "80",
            })
        });
        assert_eq!(out, "from a to b:80!");
        let err = Template::parse("to {dsst}").unwrap_err();
        assert!(
            err.starts_with("unknown placeholder {dsst}; use one of {src}"),
            "{err}"
        );
    }
}
