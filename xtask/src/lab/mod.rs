//! The node lab: a two-node AKS network (kubenet, azure-cni or azure-cni Overlay) in network
//! namespaces, with the Azure Load Balancer, the vnet, an Application Gateway, Application
//! Gateway for Containers, a private endpoint, the API server, IMDS and the internet around it,
//! and every documented traffic path as a named [`Scenario`] stating what each node's conntrack
//! must show.
//!
//! ```no_run
//! use xtask::lab::{CniMode, Lab, LabOptions, Scenario};
//! let lab = Lab::up(LabOptions::new(CniMode::Kubenet))?;
//! for scenario in Scenario::all(lab.cni()) {
//!     let report = lab.run(&scenario)?;
//!     println!("{} ok, node must show {:?}", report.scenario, scenario.expected_on_node());
//! }
//! # Ok::<(), xtask::lab::LabError>(())
//! ```
//! Dropping the [`Lab`] tears it down (processes, namespaces, files).

pub mod agent_config;
mod build;
pub mod cli;
mod daemons;
pub mod error;
pub(crate) mod exec;
mod hash;
pub mod kubeproxy;
pub mod layout;
pub mod misconfig;
pub mod netns;
pub mod paths;
pub mod scenario;
mod state;
pub mod traffic;

pub use error::LabError;
pub use layout::{ApiServerAccess, CniMode, Host, Layout, Proto};
pub use misconfig::{Misconfig, NodeChange, SeenAs, Symptom, MISCONFIG_NAMES};
pub use paths::PathId;
pub use scenario::{
    EndpointMatch, ExpectedConntrack, InferredHop, NatKind, PortMatch, Scenario, Traffic, Tuple,
    TupleMatch, SCENARIO_NAMES,
};
pub use state::LabState;
pub use traffic::{Answer, ScenarioReport, StepReport};

use crate::file_error::FileError;
use daemons::Daemon;
use std::path::{Path, PathBuf};

/// Where labs keep their files (configs, certificate, logs, topology.toml) and the CLI's state.
pub const DEFAULT_STATE_DIR: &str = "/run/aksnet-lab";

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub cni: CniMode,
    pub state_dir: PathBuf,
    /// Namespace-name prefix of this instance (`aksl-<pid>-<seq>-`); unique per process and lab.
    pub prefix: String,
    /// Where `default/kubernetes` sends pods: a public or a private API server.
    pub api_server: ApiServerAccess,
}

impl LabOptions {
    pub fn new(cni: CniMode) -> LabOptions {
        LabOptions {
            cni,
            state_dir: DEFAULT_STATE_DIR.into(),
            prefix: netns::new_prefix(),
            api_server: ApiServerAccess::default(),
        }
    }
}

pub struct Lab {
    cni: CniMode,
    prefix: String,
    work_dir: PathBuf,
    layout: Layout,
    daemons: Vec<Daemon>,
    /// Whether dropping this handle tears the lab down (false once persisted or when attached).
    owned: bool,
}

fn work_dir(state_dir: &Path, prefix: &str) -> PathBuf {
    state_dir.join(prefix.trim_end_matches('-'))
}

impl Lab {
    /// Builds the lab. On any failure, what was built is torn down before the error returns.
    pub fn up(opts: LabOptions) -> Result<Lab, LabError> {
        let work_dir = work_dir(&opts.state_dir, &opts.prefix);
        std::fs::create_dir_all(&work_dir)
            .map_err(FileError::on("cannot create the lab directory", &work_dir))?;
        let mut lab = Lab {
            cni: opts.cni,
            prefix: opts.prefix,
            work_dir,
            layout: Layout::with_api_server(opts.cni, opts.api_server),
            daemons: Vec::new(),
            owned: true,
        };
        netns::create(&lab.prefix)?;
        build::apply(&lab.prefix, &lab.layout)?;
        daemons::start(&lab.prefix, &lab.work_dir, &lab.layout, &mut lab.daemons)?;
        for node in Host::NODES {
            let path = lab.agent_config_path(node);
            std::fs::write(&path, agent_config::render_on(&lab.layout, node))
                .map_err(FileError::on("cannot write the agent config", &path))?;
        }
        Ok(lab)
    }

    /// Every scenario of this lab (its CNI and API server), in `SCENARIO_NAMES` order.
    pub fn scenarios(&self) -> Vec<Scenario> {
        Scenario::all_in(&self.layout)
    }

    /// Runs a scenario's traffic and checks every answer (who answered, the address the server
    /// saw, X-Forwarded-For, the LB's SNAT port range).
    pub fn run(&self, scenario: &Scenario) -> Result<ScenarioReport, LabError> {
        if scenario.cni != self.cni {
            return Err(LabError::UnknownScenario {
                name: format!("{} (built for {})", scenario.name, scenario.cni),
                cni: self.cni.to_string(),
                known: self
                    .scenarios()
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        traffic::run(&self.prefix, &self.work_dir, scenario)
    }

    /// Misconfigures the running lab's node (see [`Misconfig`]); the agent's config keeps what
    /// the operator declared. Apply it before the traffic that should show it.
    pub fn apply(&self, misconfig: &Misconfig) -> Result<(), LabError> {
        if misconfig.cni != self.cni {
            return Err(LabError::UnknownMisconfig {
                name: format!("{} (built for {})", misconfig.name, misconfig.cni),
                cni: self.cni.to_string(),
                known: Misconfig::all(self.cni)
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        misconfig::apply(&self.node_netns(), &self.layout, misconfig)
    }

    pub fn cni(&self) -> CniMode {
        self.cni
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn netns(&self, host: Host) -> String {
        netns::netns_name(&self.prefix, host)
    }

    /// The node's namespace: where the agent runs and conntrack is read.
    pub fn node_netns(&self) -> String {
        self.netns(Host::Node)
    }

    /// The `--config` file of the agent on the first node.
    pub fn topology_path(&self) -> PathBuf {
        self.agent_config_path(Host::Node)
    }

    /// The `--config` file of the agent on `node` (`Host::Node` or `Host::Node2`).
    pub fn agent_config_path(&self, node: Host) -> PathBuf {
        match node {
            Host::Node => self.work_dir.join("topology.toml"),
            other => self
                .work_dir
                .join(format!("topology-{}.toml", other.suffix())),
        }
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Tears the lab down now and reports what could not be removed.
    pub fn down(mut self) -> Result<(), LabError> {
        let failures = self.teardown();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown { failures })
        }
    }

    /// Leaves the lab up after this process exits and records it for `attach`.
    pub fn persist(mut self, state_dir: &Path) -> Result<LabState, LabError> {
        let lab_state = LabState {
            cni: self.cni.to_string(),
            prefix: self.prefix.clone(),
            work_dir: self.work_dir.clone(),
            topology: self.topology_path(),
            pids: self.daemons.iter().map(|d| d.child.id()).collect(),
            api_server: self.layout.api_server.to_string(),
        };
        state::write(&state::state_file(state_dir), &lab_state)?;
        self.owned = false;
        Ok(lab_state)
    }

    /// A handle on the lab a previous `persist` recorded; dropping it leaves the lab up.
    pub fn attach(state_dir: &Path) -> Result<Lab, LabError> {
        let path = state::state_file(state_dir);
        let s = state::read(&path)?;
        let cni: CniMode = s.cni.parse().map_err(|unknown| LabError::State {
            path: path.clone(),
            detail: format!("`{}`: {unknown}", s.cni),
        })?;
        let api_server: ApiServerAccess =
            s.api_server.parse().map_err(|detail| LabError::State {
                path: path.clone(),
                detail,
            })?;
        Ok(Lab {
            cni,
            prefix: s.prefix,
            work_dir: s.work_dir,
            layout: Layout::with_api_server(cni, api_server),
            daemons: Vec::new(),
            owned: false,
        })
    }

    /// Whether a persisted lab is recorded in `state_dir`.
    pub fn persisted(state_dir: &Path) -> bool {
        state::state_file(state_dir).exists()
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut failures = netns::teardown(&self.prefix);
        for d in &mut self.daemons {
            // Killed with its namespace; reap it so no zombie outlives the lab.
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        self.daemons.clear();
        if self.work_dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.work_dir) {
                failures.push(format!("{}: {e}", self.work_dir.display()));
            }
        }
        self.owned = false;
        failures
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            for failure in self.teardown() {
                eprintln!("lab teardown: {failure}");
            }
        }
    }
}

/// Tears down the persisted lab (if any) and every lab whose creating process is gone (crashed
/// runs); returns the prefixes removed. Labs of live processes (parallel tests) are left alone.
pub fn clean_up(state_dir: &Path) -> Result<Vec<String>, LabError> {
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    let state_path = state::state_file(state_dir);
    if state_path.exists() {
        if let Ok(mut lab) = Lab::attach(state_dir) {
            if netns::exists(&lab.prefix) {
                removed.push(lab.prefix.clone());
            }
            failures.extend(lab.teardown());
        }
        std::fs::remove_file(&state_path)
            .map_err(FileError::on("cannot remove the lab state", &state_path))?;
    }
    for prefix in netns::orphaned_prefixes() {
        failures.extend(netns::teardown(&prefix));
        let dir = work_dir(state_dir, &prefix);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                failures.push(format!("{}: {e}", dir.display()));
            }
        }
        removed.push(prefix);
    }
    if failures.is_empty() {
        Ok(removed)
    } else {
        Err(LabError::Teardown { failures })
    }
}

/// Tears down one instance by prefix (the CLI's signal handler, which has no `Lab` handle).
pub fn teardown_prefix(state_dir: &Path, prefix: &str) -> Vec<String> {
    let mut failures = netns::teardown(prefix);
    let dir = work_dir(state_dir, prefix);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            failures.push(format!("{}: {e}", dir.display()));
        }
    }
    failures
}
