//! The agent binary under test on a lab node, and its dump lines in the lab's types.

use crate::kubeapi::KubeApi;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use xtask::lab::layout::plan;
use xtask::lab::{ExpectedConntrack, Host, Lab, Proto, Scenario, Tuple};

/// The agent under test, stopped with SIGTERM when dropped.
pub struct Agent {
    child: Child,
    stdout: Option<std::process::ChildStdout>,
    /// The agent's log lines, as its stderr thread reads them.
    log: mpsc::Receiver<String>,
    /// Log lines already taken from `log`.
    seen: Vec<String>,
}

/// The log line the agent writes once its capture is attached.
const ATTACHED: &str = "capturing conntrack NAT";
/// The agent's log line once the pods and Services are listed (aksnet-agent's enrich module).
const SYNCED: &str = "kubernetes enrichment synced";

/// Where the agent under test runs.
#[derive(Clone, Copy, Debug)]
pub enum Placement {
    /// Outside the lab, observing its node through `--netns`.
    Beside,
    /// Inside the node's namespace (`ip netns exec`), as a hostNetwork DaemonSet pod does: its
    /// metrics listener and its API client live there.
    OnNode,
}

impl Agent {
    /// Starts `binary --dump --output json` on the lab's node, placed as `placement` says, with
    /// `extra` arguments and environment, and waits for the capture to be attached.
    pub fn start(
        binary: &Path,
        lab: &Lab,
        placement: Placement,
        source: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        Agent::start_on(binary, lab, Host::Node, placement, source, extra, env)
    }

    /// As [`Agent::start`], on `node_host` (`Host::Node` or `Host::Node2`) with that node's
    /// config.
    pub fn start_on(
        binary: &Path,
        lab: &Lab,
        node_host: Host,
        placement: Placement,
        source: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let config = lab.agent_config_path(node_host);
        let config = ["--config", config.to_str().expect("a UTF-8 path")];
        let args = [&config, extra].concat();
        Agent::start_in(binary, &lab.netns(node_host), placement, source, &args, env)
    }

    /// [`Agent::start`] on any namespace (`ip netns` name) and without the lab's config file:
    /// the agent has only what it discovers and what `args` give.
    pub fn start_in(
        binary: &Path,
        node: &str,
        placement: Placement,
        source: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut command = match placement {
            Placement::Beside => {
                let mut command = Command::new(binary);
                command.args(["--netns", node]);
                command
            }
            Placement::OnNode => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", node]).arg(binary);
                command
            }
        };
        command
            .args([
                "--dump",
                "--output",
                "json",
                "--source",
                source,
                "--show-ends",
            ])
            // A bound on the run even if the test never stops it.
            .args(["--duration", "120"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        Agent::spawn(command)
            .unwrap_or_else(|e| panic!("aksnet-agent --source {source} did not attach: {e}"))
    }

    /// Starts `command`, an agent writing dump lines on stdout and its log on stderr (directly or
    /// through a container runtime), and waits for its capture to be attached.
    pub fn spawn(mut command: Command) -> Result<Agent, String> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", command.get_program()))?;
        let stderr = child.stderr.take().expect("piped");
        let (log_tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                let _ = log_tx.send(line);
            }
        });
        let stdout = child.stdout.take();
        let mut agent = Agent {
            child,
            stdout,
            log,
            seen: Vec::new(),
        };
        if let Err(e) = agent.wait_for_log(ATTACHED, Duration::from_secs(30)) {
            let status = agent.child.try_wait().ok().flatten();
            return Err(format!("{e} (exit: {status:?})"));
        }
        Ok(agent)
    }

    /// Waits until the agent has logged a line containing `needle` (at any time since it
    /// started), for at most `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        if self.seen.iter().any(|line| line.contains(needle)) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("no log line with {needle:?} within {timeout:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the agent exited without logging {needle:?}"))
                }
            }
        }
    }

    /// Starts the fake Kubernetes API of the lab where the agent's API client will run, then
    /// the agent (with `KUBECONFIG` and `NODE_NAME` pointing at it, `--source auto`), and waits
    /// until its enrichment has listed the pods and Services.
    pub fn start_enriched(
        binary: &Path,
        lab: &Lab,
        placement: Placement,
        extra: &[&str],
    ) -> (Agent, KubeApi) {
        let node = lab.node_netns();
        let api_netns = match placement {
            Placement::Beside => None,
            Placement::OnNode => Some(node.as_str()),
        };
        let api =
            KubeApi::lab(lab.layout(), api_netns).expect("cannot start the fake Kubernetes API");
        let kubeconfig = lab.work_dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let mut agent = Agent::start(
            binary,
            lab,
            placement,
            "auto",
            extra,
            &[
                ("KUBECONFIG", kubeconfig.to_str().unwrap()),
                ("NODE_NAME", plan::NODE_NAME),
            ],
        );
        agent
            .wait_for_log(SYNCED, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{}: the enrichment did not sync: {e}", lab.cni()));
        (agent, api)
    }

    /// Stops the agent and returns the flows it reported opened (TCP and UDP).
    pub fn finish_opened(self) -> Vec<Dumped> {
        let lines = self.finish();
        of_event(&lines, "new").filter_map(dumped).collect()
    }

    /// Stops the agent (it shows what it captured before the stop, then exits) and returns its
    /// dump lines.
    pub fn finish(mut self) -> Vec<Value> {
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

/// Runs each scenario on the lab; any failure (no answer, wrong peer) fails the test, naming it.
pub fn run_scenarios(lab: &Lab, scenarios: &[Scenario]) {
    for scenario in scenarios {
        lab.run(scenario)
            .unwrap_or_else(|e| panic!("{} scenario {}: {e}", lab.cni(), scenario.name));
    }
}

/// The dump lines of one `event` kind ("new", "destroy").
pub fn of_event<'a>(lines: &'a [Value], event: &'a str) -> impl Iterator<Item = &'a Value> {
    lines.iter().filter(move |v| v["event"] == event)
}

/// The flows of `opened` that match `expected`, one of `scenario`'s entries on the node; where
/// there are none, adds that to `failures`.
pub fn reported<'a>(
    opened: &'a [Dumped],
    scenario: &Scenario,
    expected: &ExpectedConntrack,
    failures: &mut Vec<String>,
) -> Vec<&'a Dumped> {
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
    matching
}

/// Fails the test with every one of `failures`, after `context`, if there are any.
pub fn assert_no_failures(context: impl Display, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{context}: {} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One dump line, as the lab's types see it.
pub struct Dumped {
    pub proto: Proto,
    pub original: Tuple,
    pub reply: Tuple,
    pub nat: Vec<String>,
    pub path: Option<String>,
    pub verdict: String,
    pub reason: Option<String>,
    /// Pod and Service names the enrichment gave the flow's addresses.
    pub names: BTreeMap<Ipv4Addr, String>,
    pub line: String,
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

/// The TCP and UDP flows of dump lines; `None` for other protocols.
pub fn dumped(v: &Value) -> Option<Dumped> {
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
        names: v["names"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(ip, name)| (ip.parse().unwrap(), name.as_str().unwrap().to_owned()))
            .collect(),
        line: v.to_string(),
    })
}
