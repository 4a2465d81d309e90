//! Judging a guest's console: for each capture source, every connection `conntrack -E` saw open
//! (NEW) and end (DESTROY) on the router must be in the agent's dump exactly once, with the same
//! original and reply tuples, and nothing else; the kernel must have refused no program.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;

/// Connections per round (DNAT, SNAT, both; TCP, UDP; IPv4, IPv6), as the guest makes them.
pub const PER_ROUND: usize = 12;
/// How each round's connections end; the guest numbers source ports UR0NN by round R (from 1).
const ROUNDS: [&str; 3] = ["expiry", "conntrack -D", "conntrack -F"];

/// What the agent logs when its eBPF capture attaches to a conntrack loaded after it started.
const LATE_ATTACH: &str = "the eBPF capture is attached";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Tuple {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
}

/// A connection as both observers name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Conn {
    proto: String,
    orig: Tuple,
    reply: Tuple,
}

impl Conn {
    /// The round that made it, from the client's source port; `None` for strangers.
    fn round(&self) -> Option<usize> {
        let round = usize::from(self.orig.sport / 1000 % 10).checked_sub(1)?;
        (round < ROUNDS.len()).then_some(round)
    }
}

impl std::fmt::Display for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |t: &Tuple| format!("{} {} -> {} {}", t.src, t.sport, t.dst, t.dport);
        write!(
            f,
            "{} {} / reply {}",
            self.proto,
            t(&self.orig),
            t(&self.reply)
        )
    }
}

/// What the guest printed for one capture source.
#[derive(Default)]
struct Run {
    witness_new: Vec<Conn>,
    witness_end: Vec<Conn>,
    agent_new: Vec<Conn>,
    /// With the source that reported each end (`ebpf`, or `netlink` standing in).
    agent_end: Vec<(Conn, String)>,
    log: Vec<String>,
    done: bool,
}

/// A kernel's outcome: the one line to print, and whether it passed.
pub struct Verdict {
    pub passed: bool,
    pub line: String,
    /// Why it failed, one reason a line, for the detail after the verdict.
    pub problems: Vec<String>,
}

/// Judges the console of a guest that checked `sources` (in order).
pub fn judge(kernel: &str, console: &str, sources: &[&str], timed_out: bool) -> Verdict {
    let mut runs: BTreeMap<String, Run> = BTreeMap::new();
    let mut release = String::from("?");
    let mut problems = Vec::new();
    let mut programs = Vec::new();
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        // The firmware's escape codes share the console's first line with the guest's.
        let Some(start) = line.find("AKSVM ") else {
            continue;
        };
        let rest = &line[start + "AKSVM ".len()..];
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "kernel" => release = rest.to_owned(),
            "abort" => problems.push(format!("the guest gave up: {rest}")),
            "programs" => programs.push(rest.to_owned()),
            "witness" | "agent" | "log" | "done" => {
                let (source, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let run = runs.entry(source.to_owned()).or_default();
                match kind {
                    "witness" => record_witness(run, text),
                    "agent" => record_agent(run, text, &mut problems),
                    "log" => run.log.push(text.to_owned()),
                    _ => run.done = true,
                }
            }
            _ => {}
        }
    }
    if timed_out {
        problems.push("the guest did not finish in time (killed)".to_owned());
    }
    let mut parts = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        match runs.get(*source) {
            Some(run) if run.done => parts.push(judge_run(source, run, i == 0, &mut problems)),
            _ => problems.push(format!("{source}: the guest printed no result")),
        }
    }
    parts.push(judge_programs(&programs, &mut problems));
    let passed = problems.is_empty();
    let line = format!(
        "vm-test {kernel} ({release}): {} | {}",
        if passed { "PASS" } else { "FAIL" },
        parts.join(" | ")
    );
    Verdict {
        passed,
        line,
        problems,
    }
}

/// `late`: the guest loaded nf_conntrack after this run's agent started.
fn judge_run(source: &str, run: &Run, late: bool, problems: &mut Vec<String>) -> String {
    let mut out = format!("{source}:");
    if late {
        if run.log.iter().any(|l| l.contains(LATE_ATTACH)) {
            out.push_str(" attached once nf_conntrack was loaded;");
        } else {
            problems.push(format!(
                "{source}: nf_conntrack was loaded after the agent started, and the agent never logged \"{LATE_ATTACH}\""
            ));
        }
    }
    let used = run
        .log
        .iter()
        .find_map(|l| {
            l.split(" with ")
                .nth(1)
                .filter(|_| l.contains("capturing conntrack NAT"))
        })
        .map(|s| s.split(';').next().unwrap_or(s).to_owned())
        .unwrap_or_else(|| "none".to_owned());
    let _ = write!(out, " capture {used};");
    let wanted = if source == "netlink" {
        "netlink"
    } else {
        "ebpf"
    };
    if used != wanted {
        problems.push(format!(
            "{source}: the agent captured with {used}, not {wanted}"
        ));
    }
    if run.witness_new.len() != ROUNDS.len() * PER_ROUND {
        problems.push(format!(
            "{source}: the witness saw {} connections open, the guest made {}: its traffic failed",
            run.witness_new.len(),
            ROUNDS.len() * PER_ROUND
        ));
    }
    let opened = compare(
        &run.witness_new,
        &run.agent_new,
        &format!("{source}: open"),
        problems,
    );
    let _ = write!(out, " opened {opened}/{}", run.witness_new.len());
    let agent_ends: Vec<Conn> = run.agent_end.iter().map(|(c, _)| c.clone()).collect();
    for (round, how) in ROUNDS.iter().enumerate() {
        let witness: Vec<Conn> = of_round(&run.witness_end, round);
        let agent: Vec<Conn> = of_round(&agent_ends, round);
        if witness.len() != PER_ROUND {
            problems.push(format!(
                "{source}: the witness saw {} of the {PER_ROUND} connections ended by {how}",
                witness.len()
            ));
        }
        let matched = compare(
            &witness,
            &agent,
            &format!("{source}: end by {how}"),
            problems,
        );
        let _ = write!(out, ", ended by {how} {matched}/{}", witness.len());
    }
    let strangers: Vec<&Conn> = agent_ends.iter().filter(|c| c.round().is_none()).collect();
    if !strangers.is_empty() {
        problems.push(format!(
            "{source}: {} end(s) of connections the guest never made, first {}",
            strangers.len(),
            strangers[0]
        ));
    }
    let mut end_sources: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, from) in &run.agent_end {
        *end_sources.entry(from).or_default() += 1;
    }
    if !end_sources.is_empty() {
        let list: Vec<String> = end_sources
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        let _ = write!(out, " (ends from {})", list.join(", "));
    }
    let hooks = hooks(&run.log);
    let _ = write!(
        out,
        "; hooks {}",
        if hooks.is_empty() {
            "none".into()
        } else {
            hooks.join(", ")
        }
    );
    for line in &run.log {
        if line.contains("load refused") || line.contains("verifier says") {
            problems.push(format!("{source}: the kernel refused a program: {line}"));
        }
    }
    out
}

/// The guest's run of the agent's `programs_load` test: every program loaded, or not attempted
/// for a stated reason; none refused.
fn judge_programs(lines: &[String], problems: &mut Vec<String>) -> String {
    // The first line printed shares its line with the harness's "test every_program_loads ... ".
    let lines: Vec<String> = lines
        .iter()
        .map(|l| {
            l.rsplit_once(" ... ")
                .map_or(l.as_str(), |(_, r)| r)
                .to_owned()
        })
        .collect();
    let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    for line in lines.iter().filter(|l| l.starts_with("refused ")) {
        problems.push(format!("programs: the kernel {line}"));
    }
    if !lines
        .iter()
        .any(|l| l.starts_with("test result: ok. 1 passed"))
    {
        problems.push(format!(
            "programs: the load test did not pass: {}",
            lines.last().map_or("it printed nothing", String::as_str)
        ));
    }
    let skipped: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("not attempted "))
        .collect();
    let mut out = format!("programs: {} loaded", count("loaded "));
    if !skipped.is_empty() {
        let _ = write!(out, ", not attempted: {}", skipped.join(", "));
    }
    out
}

/// Hooks the agent's log reports attached and seen firing, or replaced by their fallback (an
/// attached hook that never proved itself counts as replaced).
fn hooks(log: &[String]) -> Vec<String> {
    let hook_after = |line: &str, marker: &str| -> Option<String> {
        let (_, rest) = line.split_once(marker)?;
        Some(rest.split([' ', ';']).next().unwrap_or(rest).to_owned())
    };
    log.iter()
        .filter_map(|line| {
            if let Some(hook) = hook_after(line, "capture attached to ") {
                return Some(hook);
            }
            let hook = hook_after(line, "optional hook ")?;
            if line.contains(" seen firing (") {
                Some(hook)
            } else if ["unavailable", "not firing", "not seen firing"]
                .iter()
                .any(|m| line.contains(m))
            {
                Some(format!("{hook} replaced"))
            } else {
                None
            }
        })
        .collect()
}

fn of_round(conns: &[Conn], round: usize) -> Vec<Conn> {
    conns
        .iter()
        .filter(|c| c.round() == Some(round))
        .cloned()
        .collect()
}

/// How many of `witness` the agent reported exactly once; every difference is a problem.
fn compare(witness: &[Conn], agent: &[Conn], what: &str, problems: &mut Vec<String>) -> usize {
    let mut counts: BTreeMap<&Conn, (usize, usize)> = BTreeMap::new();
    for c in witness {
        counts.entry(c).or_default().0 += 1;
    }
    for c in agent {
        counts.entry(c).or_default().1 += 1;
    }
    let mut matched = 0;
    for (conn, (seen, reported)) in counts {
        match (seen, reported) {
            (1, 1) => matched += 1,
            (0, n) => problems.push(format!(
                "{what}: agent reported {n}x a connection the witness did not see: {conn}"
            )),
            (_, 0) => problems.push(format!("{what}: agent missed {conn}")),
            (w, n) => problems.push(format!(
                "{what}: witness saw {w}x, agent reported {n}x: {conn}"
            )),
        }
    }
    matched
}

fn record_witness(run: &mut Run, text: &str) {
    let text = text.trim();
    let (list, rest) = if let Some(rest) = text.strip_prefix("[NEW]") {
        (&mut run.witness_new, rest)
    } else if let Some(rest) = text.strip_prefix("[DESTROY]") {
        (&mut run.witness_end, rest)
    } else {
        return;
    };
    if let Some(conn) = parse_witness(rest) {
        list.push(conn);
    }
}

/// A `conntrack -E` line after its tag: the protocol name, then two src/dst/sport/dport sets.
fn parse_witness(line: &str) -> Option<Conn> {
    let proto = line.split_whitespace().next()?;
    if proto != "tcp" && proto != "udp" {
        return None;
    }
    let mut fields: [Vec<&str>; 4] = Default::default();
    for (key, value) in line.split_whitespace().filter_map(|t| t.split_once('=')) {
        if let Some(i) = ["src", "dst", "sport", "dport"]
            .iter()
            .position(|k| *k == key)
        {
            fields[i].push(value);
        }
    }
    let tuple = |n: usize| -> Option<Tuple> {
        Some(Tuple {
            src: fields[0].get(n)?.parse().ok()?,
            dst: fields[1].get(n)?.parse().ok()?,
            sport: fields[2].get(n)?.parse().ok()?,
            dport: fields[3].get(n)?.parse().ok()?,
        })
    };
    Some(Conn {
        proto: proto.to_owned(),
        orig: tuple(0)?,
        reply: tuple(1)?,
    })
}

fn record_agent(run: &mut Run, text: &str, problems: &mut Vec<String>) {
    let parsed: Result<serde_json::Value, _> = serde_json::from_str(text);
    let Some((event, conn, source)) = parsed.ok().and_then(|v| parse_agent(&v)) else {
        problems.push(format!("undecodable agent dump line: {text}"));
        return;
    };
    match event.as_str() {
        "new" => run.agent_new.push(conn),
        "destroy" => run.agent_end.push((conn, source)),
        _ => {}
    }
}

fn parse_agent(v: &serde_json::Value) -> Option<(String, Conn, String)> {
    let tuple = |t: &serde_json::Value| -> Option<Tuple> {
        Some(Tuple {
            src: t["src"].as_str()?.parse().ok()?,
            sport: u16::try_from(t["sport"].as_u64()?).ok()?,
            dst: t["dst"].as_str()?.parse().ok()?,
            dport: u16::try_from(t["dport"].as_u64()?).ok()?,
        })
    };
    Some((
        v["event"].as_str()?.to_owned(),
        Conn {
            proto: v["proto"].as_str()?.to_owned(),
            orig: tuple(&v["orig"])?,
            reply: tuple(&v["reply"])?,
        },
        v["source"].as_str().unwrap_or("?").to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(agent_end_source: &str, drop_one_end: bool) -> String {
        let mut text = String::from("\x1bc\x1b[?7lAKSVM kernel 6.1.0-test\n");
        for round in 1..=3 {
            for i in 0..PER_ROUND {
                let sport = 40000 + round * 1000 + i;
                let witness = format!("src=203.0.113.10 dst=192.0.2.10 sport={sport} dport=80 src=10.0.0.10 dst=203.0.113.10 sport=8080 dport={sport}");
                let json = format!(
                    r#"{{"source":"ebpf","proto":"tcp","orig":{{"src":"203.0.113.10","sport":{sport},"dst":"192.0.2.10","dport":80}},"reply":{{"src":"10.0.0.10","sport":8080,"dst":"203.0.113.10","dport":{sport}}},"event":"EV"}}"#
                );
                text +=
                    &format!("AKSVM witness ebpf     [NEW] tcp      6 120 SYN_SENT {witness}\r\n");
                text += &format!("AKSVM witness ebpf  [DESTROY] tcp      6 {witness} [ASSURED]\n");
                text += &format!("AKSVM agent ebpf {}\n", json.replace("EV", "new"));
                if !(drop_one_end && round == 2 && i == 3) {
                    let end = json.replace("EV", "destroy").replace(
                        r#""source":"ebpf""#,
                        &format!(r#""source":"{agent_end_source}""#),
                    );
                    text += &format!("AKSVM agent ebpf {end}\n");
                }
            }
        }
        text += "AKSVM log ebpf [INFO] nf_conntrack is loaded: the eBPF capture is attached\n";
        text += "AKSVM log ebpf [INFO] eBPF capture attached to tp_btf/net_dev_start_xmit (netns filter: 1)\n";
        text += "AKSVM log ebpf [INFO] optional hook attached: kprobe/nf_nat_setup_info (counts once seen firing)\n";
        text += "AKSVM log ebpf [INFO] optional hook kprobe/nf_nat_setup_info seen firing (1 runs); it counts as attached\n";
        text += "AKSVM log ebpf [INFO] capturing conntrack NAT in network namespace rt with ebpf; kubenet model\n";
        text += "AKSVM done ebpf\n";
        text += "AKSVM programs test every_program_loads ... loaded net_dev_start_xmit\n";
        text += "AKSVM programs not attempted nf_ct_delete_entry: nf_ct_delete is not in vmlinux's BTF\n";
        text += "AKSVM programs test result: ok. 1 passed; 0 failed; 0 ignored\n";
        text
    }

    #[test]
    fn a_complete_run_passes_and_says_where_the_ends_came_from() {
        let v = judge("6.1", &console("netlink", false), &["ebpf"], false);
        assert!(v.passed, "{:?}", v.problems);
        assert!(
            v.line.starts_with("vm-test 6.1 (6.1.0-test): PASS"),
            "{}",
            v.line
        );
        assert!(v.line.contains("opened 36/36"), "{}", v.line);
        assert!(
            v.line.ends_with("programs: 1 loaded, not attempted: nf_ct_delete_entry: nf_ct_delete is not in vmlinux's BTF"),
            "{}",
            v.line
        );
        assert!(
            v.line
                .contains("ebpf: attached once nf_conntrack was loaded;"),
            "{}",
            v.line
        );
        assert!(v.line.contains("ended by conntrack -D 12/12"), "{}", v.line);
        assert!(v.line.contains("(ends from 36 netlink)"), "{}", v.line);
        assert!(
            v.line
                .contains("hooks tp_btf/net_dev_start_xmit, kprobe/nf_nat_setup_info | programs"),
            "{}",
            v.line
        );
    }

    #[test]
    fn a_missed_end_fails_naming_the_connection_and_the_way_it_ended() {
        let v = judge("6.1", &console("ebpf", true), &["ebpf"], false);
        assert!(!v.passed);
        assert!(v.line.contains("ended by conntrack -D 11/12"), "{}", v.line);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(
            v.problems[0].contains("end by conntrack -D: agent missed tcp 203.0.113.10 42003"),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn a_source_without_results_and_a_refused_program_fail() {
        let mut text = console("ebpf", false);
        text += "AKSVM log ebpf [WARN] optional hook nf_ct_delete unavailable: kprobe/nf_ct_delete: load refused: EINVAL\n";
        let v = judge("5.10", &text, &["ebpf", "netlink"], true);
        assert!(!v.passed);
        assert!(v
            .problems
            .iter()
            .any(|p| p.contains("netlink: the guest printed no result")));
        assert!(v.problems.iter().any(|p| p.contains("refused a program")));
        assert!(v
            .problems
            .iter()
            .any(|p| p.contains("did not finish in time")));
        assert!(v.line.contains("nf_ct_delete replaced"), "{}", v.line);
    }
}
