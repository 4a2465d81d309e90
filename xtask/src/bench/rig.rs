//! The bench's node lab: a kubenet lab whose app pod answers with the bench's own accept loop,
//! and the agent started on its node, ready once it has shown a probe connection.

use crate::bench::agent::{scrape, Agent, AgentArgs, Line, Mode};
use crate::bench::error::BenchError;
use crate::bench::load::{self, EchoServer};
use crate::lab::layout::plan;
use crate::lab::netns::pids_in;
use crate::lab::{CniMode, Host, Lab, LabOptions};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the measured connections go: the LB frontend, DNATed by kube-proxy to the app pod.
pub const FRONTEND: SocketAddrV4 = SocketAddrV4::new(plan::FRONTEND_APP, 80);
/// The measured connections come from this internet client...
pub const CLIENT: Ipv4Addr = plan::CLIENT;
/// ...and the readiness probes from this one, so that counts can leave the probes out.
pub const PROBE_CLIENT: Ipv4Addr = plan::CLIENT2;
/// The bulk sink on the internet server, reached from the app pod through the node's SNAT.
pub const BULK_SINK: SocketAddrV4 = SocketAddrV4::new(plan::INET_SERVER, 5201);
/// Accept threads of the app pod's server: enough for the storm's concurrency.
const SERVER_THREADS: usize = 16;
/// Probes are this far apart while waiting for the agent's first line.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Events the agent's capture delivered: a daemon is ready once this counts a probe.
pub const EVENTS_METRIC: &str = "aksnet_capture_events_total";

/// Which agent binary to start, and how.
#[derive(Clone, Debug)]
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub mode: Mode,
    pub count: Option<u64>,
    pub metrics: Option<SocketAddr>,
    pub cgroup: Option<&'a Path>,
}

pub struct Rig {
    // Field order is drop order: the server's sockets go before the lab's namespaces.
    server: Option<EchoServer>,
    pub lab: Lab,
    pub agent_binary: PathBuf,
    config: PathBuf,
    /// The DaemonSet's environment, which every agent started here gets.
    env: Vec<(String, String)>,
}

impl Rig {
    pub fn up(agent_binary: &Path, env: Vec<(String, String)>) -> Result<Rig, BenchError> {
        let lab = Lab::up(LabOptions::new(CniMode::Kubenet))?;
        let pod = lab.netns(Host::PodApp);
        // The lab's app server is socat forking a shell per connection: a few hundred
        // connections a second, which would hide the datapath. The bench answers instead.
        stop_lab_server(&pod);
        let server = start_server(&pod)?;
        let config = lab.topology_path();
        Ok(Rig {
            server: Some(server),
            lab,
            agent_binary: agent_binary.to_path_buf(),
            config,
            env,
        })
    }

    pub fn inet(&self) -> String {
        self.lab.netns(Host::Inet)
    }

    pub fn pod(&self) -> String {
        self.lab.netns(Host::PodApp)
    }

    pub fn node(&self) -> String {
        self.lab.node_netns()
    }

    /// Opens `count` connections from the internet client to the app's LB frontend, `workers`
    /// at a time; stops early at `deadline`.
    pub fn storm(
        &self,
        count: u64,
        workers: usize,
        deadline: Duration,
    ) -> Result<load::Storm, BenchError> {
        load::storm(&self.inet(), CLIENT, FRONTEND, count, workers, deadline)
    }

    /// Starts `launch` and waits until it shows a probe connection: its first stdout line
    /// (returned), its first bytes in the dump file, or its first captured event in the metrics.
    pub fn launch(
        &self,
        launch: &Launch<'_>,
        timeout: Duration,
    ) -> Result<(Agent, Option<Line>), BenchError> {
        let node = self.node();
        let mut agent = Agent::spawn(&AgentArgs {
            binary: launch.binary,
            netns: &node,
            config: &self.config,
            mode: launch.mode.clone(),
            count: launch.count,
            metrics: launch.metrics,
            cgroup: launch.cgroup,
            env: &self.env,
        })?;
        let shown = match (&launch.mode, launch.metrics) {
            (Mode::Dump, _) => self
                .probe_until(&mut agent, timeout, |a| {
                    a.next_line(Duration::from_millis(20))
                })?
                .map(Some),
            (Mode::DumpToFile(path), _) => self.probe_until(&mut agent, timeout, |_| {
                std::thread::sleep(Duration::from_millis(20));
                let len = std::fs::metadata(path).map_or(0, |m| m.len());
                (len > 0).then_some(None)
            })?,
            (Mode::Daemon, Some(addr)) => self.probe_until(&mut agent, timeout, |_| {
                std::thread::sleep(Duration::from_millis(20));
                scrape(addr, EVENTS_METRIC)
                    .ok()
                    .filter(|events| *events >= 1.0)
                    .map(|_| None)
            })?,
            (Mode::Daemon, None) => {
                return Err(agent.fail("was started as a daemon without a metrics address to watch"))
            }
        };
        match shown {
            Some(line) => Ok((agent, line)),
            None => Err(agent.fail(format!(
                "showed no flow within {timeout:?} while probes went to {FRONTEND}"
            ))),
        }
    }

    /// Sends probe connections until `shown` returns something; returns it, or `None` when the
    /// agent exited or `timeout` passed first.
    fn probe_until<T>(
        &self,
        agent: &mut Agent,
        timeout: Duration,
        mut shown: impl FnMut(&mut Agent) -> Option<T>,
    ) -> Result<Option<T>, BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let (inet, stop) = (self.inet(), Arc::clone(&stop));
            std::thread::spawn(move || -> Result<(), BenchError> {
                load::enter(&inet)?;
                let deadline = Instant::now() + timeout;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    // A failed probe is simply followed by the next; the agent is what we wait for.
                    let _ = load::connect_once(PROBE_CLIENT, FRONTEND);
                    std::thread::sleep(PROBE_EVERY);
                }
                Ok(())
            })
        };
        let deadline = Instant::now() + timeout;
        let found = loop {
            if let Some(found) = shown(agent) {
                break Some(found);
            }
            if agent.exited() || Instant::now() > deadline {
                break None;
            }
        };
        stop.store(true, Ordering::Relaxed);
        let probed = prober.join().map_err(|_| BenchError::Failed {
            what: "the readiness prober".into(),
            detail: "it panicked".into(),
        })?;
        probed.map(|()| found)
    }

    /// Starts the workspace's agent with `--dump --output json` and waits until it shows a
    /// probe; returns it with that first line.
    pub fn ready_agent(
        &self,
        count: Option<u64>,
        metrics: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<(Agent, Line), BenchError> {
        let launch = Launch {
            binary: &self.agent_binary,
            mode: Mode::Dump,
            count,
            metrics,
            cgroup: None,
        };
        let (agent, line) = self.launch(&launch, timeout)?;
        match line {
            Some(line) => Ok((agent, line)),
            None => Err(agent.fail("printed no line although it runs with --dump")),
        }
    }

    /// Stops the bench's server, then tears the lab down.
    pub fn down(mut self) -> Result<(), BenchError> {
        if let Some(server) = self.server.take() {
            server.stop()?;
        }
        self.lab.down()?;
        Ok(())
    }
}

/// Ends the lab's socat server in the pod: only a process this process started (the lab's
/// daemon, a direct child), found by pid.
fn stop_lab_server(pod_netns: &str) {
    let me = std::process::id().to_string();
    for pid in pids_in(pod_netns) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1);
        if comm.ends_with("(socat") && ppid == Some(me.as_str()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

/// The app pod's server on its port; retried while the killed socat releases it.
fn start_server(pod_netns: &str) -> Result<EchoServer, BenchError> {
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, plan::APP_PORT);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match EchoServer::start(pod_netns, addr, SERVER_THREADS) {
            Ok(server) => return Ok(server),
            Err(BenchError::Socket { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}
