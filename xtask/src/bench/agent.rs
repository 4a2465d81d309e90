//! The agent binary under test: spawned with `--dump --output json` on the lab's node, its stdout
//! lines timestamped as they arrive, its metrics scraped, and stopped by pid (never left running).

use crate::bench::error::BenchError;
use crate::cmd::CmdError;
use crate::file_error::FileError;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the agent has to exit after SIGINT before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How the agent runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--dump --output json`, lines read by the bench as they come.
    Dump,
    /// `--dump --output json` into this file.
    DumpToFile(PathBuf),
    /// As the DaemonSet runs it: no `--dump`, metrics only (give it a metrics address).
    Daemon,
}

/// What to run the agent with.
#[derive(Clone, Debug)]
pub struct AgentArgs<'a> {
    pub binary: &'a Path,
    pub netns: &'a str,
    pub config: &'a Path,
    pub mode: Mode,
    /// `--count N`: exit after N flows.
    pub count: Option<u64>,
    pub metrics: Option<SocketAddr>,
    /// A cgroup v1 directory (cpu controller) the agent joins as soon as it runs.
    pub cgroup: Option<&'a Path>,
    /// Environment variables beyond the bench's own.
    pub env: &'a [(String, String)],
}

/// One stdout line and when it arrived.
pub struct Line {
    pub at: Instant,
    pub text: String,
}

pub struct Agent {
    child: Option<Child>,
    pub started: Instant,
    lines: Receiver<Line>,
    stderr: Option<JoinHandle<String>>,
}

/// What the agent printed over its life.
pub struct AgentOutput {
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Agent {
    pub fn spawn(args: &AgentArgs<'_>) -> Result<Agent, BenchError> {
        let mut cmd = Command::new(args.binary);
        cmd.args(["--source", "ebpf", "--netns", args.netns])
            .arg("--config")
            .arg(args.config)
            .env("RUST_LOG", "info")
            .envs(args.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match &args.mode {
            Mode::Dump => {
                cmd.args(["--dump", "--output", "json"]);
            }
            Mode::DumpToFile(path) => {
                let file =
                    std::fs::File::create(path).map_err(FileError::on("cannot create", path))?;
                cmd.args(["--dump", "--output", "json"]).stdout(file);
            }
            Mode::Daemon => {}
        }
        if let Some(n) = args.count {
            cmd.args(["--count", &n.to_string()]);
        }
        if let Some(addr) = args.metrics {
            cmd.args(["--metrics-listen", &addr.to_string()]);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| CmdError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        if let Some(cgroup) = args.cgroup {
            let procs = cgroup.join("cgroup.procs");
            if let Err(source) = std::fs::write(&procs, child.id().to_string()) {
                let _ = child.kill();
                let _ = child.wait();
                let what = "cannot move the agent into its CPU-capped cgroup";
                return Err(FileError::on(what, procs)(source).into());
            }
        }
        let stdout = child.stdout.take();
        let mut stderr = child.stderr.take().expect("stderr was requested as a pipe");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let Some(stdout) = stdout else {
                return;
            };
            for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx
                    .send(Line {
                        at: Instant::now(),
                        text,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Agent {
            child: Some(child),
            started,
            lines,
            stderr: Some(stderr),
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The next stdout line, or `None` after `timeout`, or once the agent closed its stdout.
    pub fn next_line(&self, timeout: Duration) -> Option<Line> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Whether the process is gone.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGINT, a grace period, then SIGKILL; returns everything it printed not yet consumed.
    pub fn stop(mut self) -> AgentOutput {
        if let Some(mut child) = self.child.take() {
            end(&mut child);
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        // The stdout reader ends with the process; collect what it forwarded.
        let lines = self.lines.iter().map(|l| l.text).collect();
        AgentOutput { lines, stderr }
    }

    /// Builds an error that carries what the agent said on stderr.
    pub fn fail(self, what: impl Into<String>) -> BenchError {
        let out = self.stop();
        BenchError::Agent {
            what: what.into(),
            stderr: tail(&out.stderr, 40),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            end(&mut child);
        }
    }
}

/// Stops our own child by pid: SIGINT, then SIGKILL after [`STOP_GRACE`].
fn end(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sum of every sample of `metric` on the agent's Prometheus endpoint.
pub fn scrape(addr: SocketAddr, metric: &str) -> Result<f64, BenchError> {
    let fail = |what| {
        move |source| BenchError::Socket {
            what,
            addr: addr.to_string(),
            source,
        }
    };
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(fail("cannot reach the agent's metrics endpoint"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail("cannot set a read timeout on"))?;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(fail("cannot send the metrics request to"))?;
    let mut body = String::new();
    conn.read_to_string(&mut body)
        .map_err(fail("cannot read the metrics from"))?;
    sum_samples(&body, metric).ok_or_else(|| BenchError::Parse {
        what: format!("the metrics at {addr}"),
        detail: format!(
            "no `{metric}` sample; the agent serves:\n{}",
            tail(&body, 20)
        ),
    })
}

/// Adds up `name` and `name{labels}` samples in a text exposition.
fn sum_samples(exposition: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = match rest.chars().next() {
            Some(' ') => rest,
            Some('{') => rest.split_once('}').map_or("", |(_, v)| v),
            _ => continue,
        };
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_labelled_and_bare_samples_only_of_the_metric() {
        let text = "# HELP aksnet_capture_events_lost_total lost\n\
                    aksnet_capture_events_lost_total{source=\"ebpf\"} 3\n\
                    aksnet_capture_events_lost_total{source=\"netlink\"} 4\n\
                    aksnet_capture_events_lost_total_other 100\n\
                    aksnet_capture_events_total 9\n";
        assert_eq!(
            sum_samples(text, "aksnet_capture_events_lost_total"),
            Some(7.0)
        );
        assert_eq!(sum_samples("aksnet_x 0\n", "aksnet_x"), Some(0.0));
        assert_eq!(sum_samples("aksnet_y 1\n", "aksnet_x"), None);
    }
}
