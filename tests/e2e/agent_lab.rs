//! The agent end to end on the node lab: for each CNI and each capture source, the agent's
//! `--dump --output json` runs on the lab node while every scenario sends its traffic, with
//! `conntrack -E` beside it as an independent witness. Every connection the node NATs must appear
//! exactly once with the exact original and translated tuples, the same as the witness saw, on
//! the documented AKS path, conforming to the model.
//!
//! Built as a test of aksnet-agent (see its Cargo.toml) so that cargo builds the agent binary
//! fresh before it runs; the file lives here with the other end-to-end tests. Needs root.

use aksnet_tests::conntrack::{Entry, Witness};
use aksnet_tests::require_root;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddrV4;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use xtask::lab::{Cni, Lab, LabOptions, NatKind, Proto, Scenario, Tuple};

/// The agent under test, stopped with SIGTERM when dropped.
struct Agent {
    child: Child,
    stdout: Option<std::process::ChildStdout>,
}

impl Agent {
    /// Starts the dump on the lab's node and waits for the capture to be attached.
    fn start(lab: &Lab, source: &str) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_aksnet-agent"))
            .args([
                "--dump",
                "--output",
                "json",
                "--source",
                source,
                "--show-ends",
            ])
            .args(["--netns", &lab.node_netns(), "--config"])
            .arg(lab.topology_path())
            // A bound on the run even if the test never stops it.
            .args(["--duration", "120"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start aksnet-agent");
        let stderr = child.stderr.take().expect("piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if line.contains("capturing conntrack NAT") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let stdout = child.stdout.take();
        let mut agent = Agent { child, stdout };
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let status = agent.child.try_wait().ok().flatten();
            panic!("aksnet-agent --source {source} did not attach within 30 s (exit: {status:?})");
        }
        agent
    }

    /// Stops the agent and returns its dump lines.
    fn finish(mut self) -> Vec<Value> {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let mut out = String::new();
        self.stdout
            .take()
            .expect("read once")
            .read_to_string(&mut out)
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "aksnet-agent exited with {status}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad dump line {l:?}: {e}")))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One dump line, as the lab's types see it.
struct Dumped {
    proto: Proto,
    original: Tuple,
    reply: Tuple,
    nat: Vec<String>,
    path: Option<String>,
    verdict: String,
    reason: Option<String>,
    line: String,
}

fn tuple(v: &Value) -> Tuple {
    let addr = |ip: &str, port: &str| {
        SocketAddrV4::new(
            v[ip].as_str().unwrap().parse().unwrap(),
            v[port].as_u64().unwrap() as u16,
        )
    };
    Tuple {
        src: addr("src", "sport"),
        dst: addr("dst", "dport"),
    }
}

fn dumped(v: &Value) -> Option<Dumped> {
    let proto = match v["proto"].as_str()? {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    Some(Dumped {
        proto,
        original: tuple(&v["orig"]),
        reply: tuple(&v["reply"]),
        nat: v["nat"]
            .as_array()?
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect(),
        path: v["path"].as_str().map(str::to_owned),
        verdict: v["verdict"].as_str().unwrap_or("none").to_owned(),
        reason: v["reason"].as_str().map(str::to_owned),
        line: v.to_string(),
    })
}

fn nat_names(kind: NatKind) -> Vec<&'static str> {
    match kind {
        NatKind::None => vec![],
        NatKind::Dnat => vec!["dnat"],
        NatKind::Snat => vec!["snat"],
        NatKind::DnatSnat => vec!["dnat", "snat"],
    }
}

fn end_to_end(cni: Cni, source: &str) {
    require_root();
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let node = lab.node_netns();
    let witness = Witness::start(&node).unwrap();
    let agent = Agent::start(&lab, source);
    let scenarios = Scenario::all(cni);
    for scenario in &scenarios {
        lab.run(scenario)
            .unwrap_or_else(|e| panic!("{cni} {}: {e}", scenario.name));
    }
    // Let the last replies leave the node before stopping the observers.
    std::thread::sleep(Duration::from_millis(500));
    let witnessed = witness.finish();
    let lines = agent.finish();

    let opened: Vec<Dumped> = lines
        .iter()
        .filter(|v| v["event"] == "new")
        .filter_map(dumped)
        .collect();
    let mut failures = Vec::new();

    // Exactly once: no connection is reported opened twice.
    for (i, a) in opened.iter().enumerate() {
        if opened[..i]
            .iter()
            .any(|b| b.proto == a.proto && b.original == a.original)
        {
            failures.push(format!("reported twice: {}", a.line));
        }
    }
    // The witness and the agent agree on every NAT translation, both ways.
    let same = |d: &Dumped, e: &Entry| {
        d.proto == e.proto && d.original == e.original && d.reply == e.reply
    };
    for entry in &witnessed {
        if !opened.iter().any(|d| same(d, entry)) {
            failures.push(format!(
                "conntrack -E saw it, the agent did not: {}",
                entry.line
            ));
        }
    }
    for d in &opened {
        if !witnessed.iter().any(|e| same(d, e)) {
            failures.push(format!(
                "the agent reported it, conntrack -E did not: {}",
                d.line
            ));
        }
    }
    // Every scenario's expected entries: right tuples, NAT, path and verdict.
    for scenario in &scenarios {
        for expected in scenario.expected_on_node() {
            let matching: Vec<&Dumped> = opened
                .iter()
                .filter(|d| expected.matches(d.proto, &d.original, &d.reply))
                .collect();
            if matching.is_empty() {
                failures.push(format!(
                    "{}: the agent did not report {expected}",
                    scenario.name
                ));
            }
            for d in matching {
                if d.nat != nat_names(expected.nat) {
                    failures.push(format!(
                        "{}: NAT {:?}, expected {expected}",
                        scenario.name, d.nat
                    ));
                }
                if d.path.as_deref() != Some(expected.path.as_str()) || d.verdict != "conforms" {
                    failures.push(format!(
                        "{}: classified {:?} {} ({:?}), expected {} conforms: {}",
                        scenario.name,
                        d.path,
                        d.verdict,
                        d.reason,
                        expected.path.as_str(),
                        d.line
                    ));
                }
            }
        }
    }
    let started = Instant::now();
    lab.down().unwrap();
    assert!(
        failures.is_empty(),
        "{cni} with --source {source}: {} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "{cni} --source {source}: {} flows reported once each, all {} witnessed by conntrack -E, \
         every scenario on its path and conforming (teardown {:?})",
        opened.len(),
        witnessed.len(),
        started.elapsed()
    );
}

#[test]
fn kubenet_ebpf() {
    end_to_end(Cni::Kubenet, "ebpf");
}

#[test]
fn azure_cni_ebpf() {
    end_to_end(Cni::AzureCni, "ebpf");
}

#[test]
fn kubenet_netlink() {
    end_to_end(Cni::Kubenet, "netlink");
}

#[test]
fn azure_cni_netlink() {
    end_to_end(Cni::AzureCni, "netlink");
}
