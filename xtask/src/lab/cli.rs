//! `cargo xtask lab ...`: up, run, down, list, demo.

use crate::cmd::{Cmd, CmdError};
use crate::lab::layout::plan;
use crate::lab::{
    clean_up, teardown_prefix, ApiServerAccess, CniMode, Host, Lab, LabError, LabOptions, Layout,
    Scenario, DEFAULT_STATE_DIR,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build a lab and leave it up (state in --state-dir).
    Up {
        #[arg(long)]
        cni: CniMode,
        /// Where `default/kubernetes` sends pods: public or private.
        #[arg(long, default_value = "public")]
        api_server: ApiServerAccess,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Run scenarios (all of them when none is named) on the lab that is up.
    Run {
        scenarios: Vec<String>,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Tear down the lab that is up, and any lab a crashed run left behind.
    Down {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List the scenarios and the conntrack entries each must produce on each node.
    List {
        #[arg(long, default_value = "kubenet")]
        cni: CniMode,
        #[arg(long, default_value = "public")]
        api_server: ApiServerAccess,
    },
    /// Bring a lab up, run the agent's dump on the node while all scenarios run, tear down.
    Demo {
        #[command(flatten)]
        demo: DemoArgs,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// What `lab demo` and `cargo xtask demo` take.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "kubenet")]
    pub cni: CniMode,
    /// Upper bound, in seconds, on each agent run; the demo stops the agent as soon as the
    /// scenarios are done.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
}

pub fn execute(cmd: LabCommand) -> Result<(), LabError> {
    match cmd {
        LabCommand::Up {
            cni,
            api_server,
            state_dir,
        } => {
            if Lab::persisted(&state_dir) {
                return Err(LabError::AlreadyUp { path: state_dir });
            }
            let opts = LabOptions {
                state_dir: state_dir.clone(),
                api_server,
                ..LabOptions::new(cni)
            };
            teardown_on_signal(&state_dir, &opts.prefix);
            let lab = Lab::up(opts)?;
            println!("lab up: {cni}, {api_server} API server");
            for node in Host::NODES {
                println!(
                    "  node namespace {}, agent config {}",
                    lab.netns(node),
                    lab.agent_config_path(node).display()
                );
            }
            for host in Host::ALL {
                println!("  {}", lab.netns(host));
            }
            lab.persist(&state_dir)?;
            Ok(())
        }
        LabCommand::Run {
            scenarios,
            state_dir,
        } => {
            let lab = Lab::attach(&state_dir)?;
            let selected = if scenarios.is_empty() {
                lab.scenarios()
            } else {
                scenarios
                    .iter()
                    .map(|n| Scenario::find_in(lab.layout(), n))
                    .collect::<Result<_, _>>()?
            };
            run_scenarios(&lab, &selected)
        }
        LabCommand::Down { state_dir } => {
            let removed = clean_up(&state_dir)?;
            if removed.is_empty() {
                println!("no lab to tear down");
            }
            for prefix in removed {
                println!("torn down: {prefix}*");
            }
            Ok(())
        }
        LabCommand::List { cni, api_server } => {
            for s in Scenario::all_in(&Layout::with_api_server(cni, api_server)) {
                println!("{} — {}", s.name, s.summary);
                print_expected(&s);
            }
            Ok(())
        }
        LabCommand::Demo {
            demo: args,
            state_dir,
        } => demo(args.cni, args.duration, &state_dir),
    }
}

fn run_scenarios(lab: &Lab, scenarios: &[Scenario]) -> Result<(), LabError> {
    for s in scenarios {
        let report = lab.run(s)?;
        println!("{}: ok", report.scenario);
        for step in &report.steps {
            let peer = step
                .answer
                .peer
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into());
            println!(
                "    {} → {} saw {peer}",
                step.step,
                step.answer.server.as_deref().unwrap_or("server")
            );
        }
        print_expected(s);
    }
    Ok(())
}

fn print_expected(s: &Scenario) {
    for node in Host::NODES {
        for e in s.expected_on(node) {
            println!("    {} must show: {e}", node.suffix());
        }
    }
}

fn demo(cni: CniMode, duration: u64, state_dir: &Path) -> Result<(), LabError> {
    build_agent()?;
    let opts = LabOptions {
        state_dir: state_dir.to_path_buf(),
        ..LabOptions::new(cni)
    };
    teardown_on_signal(state_dir, &opts.prefix);
    let lab = Lab::up(opts)?;
    println!(
        "demo: {cni} lab is up; aksnet-agent --dump watches its node while every scenario runs"
    );
    let dump = spawn_agent(&lab, &["--dump"], duration)?;
    let result = run_scenarios(&lab, &lab.scenarios());
    stop_agent(dump, Duration::from_millis(500));
    result?;

    let server = plan::INET_SERVER.to_string();
    println!("\ndemo: one flow's hop chain: aksnet-agent explain --match {server}");
    let explain = spawn_agent(
        &lab,
        &["explain", "--match", &server, "--count", "1"],
        duration,
    )?;
    lab.run(&Scenario::find(cni, "pod-to-internet")?)?;
    stop_agent(explain, Duration::from_secs(5));
    Ok(())
}

/// Waits up to `grace` for the agent to finish by itself (`--count`), then stops it like
/// Kubernetes would, with SIGTERM.
fn stop_agent(mut agent: Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while agent.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if agent.try_wait().ok().flatten().is_none() {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    }
    let _ = agent.wait();
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn build_agent() -> Result<(), LabError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    Cmd::new(cargo)
        .args(["build", "-p", "aksnet-agent"])
        .current_dir(workspace_root())
        .run_visible()?;
    Ok(())
}

/// The one place that knows the agent's command line: `args` on the lab's node, bounded by
/// `duration` seconds. Returns once the capture is attached, so no scenario traffic is missed.
fn spawn_agent(lab: &Lab, args: &[&str], duration: u64) -> Result<Child, LabError> {
    let agent = workspace_root().join("target/debug/aksnet-agent");
    let mut cmd = Command::new(&agent);
    cmd.args(args)
        .args(["--netns", &lab.node_netns(), "--config"])
        .arg(lab.topology_path())
        .args(["--duration", &duration.to_string()])
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| CmdError::Spawn {
        command: format!("{cmd:?}"),
        source,
    })?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (attached_tx, attached_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains("capturing conntrack NAT") {
                let _ = attached_tx.send(());
            }
        }
    });
    if attached_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(CmdError::Failed {
            command: format!("{cmd:?}"),
            status: "did not attach within 30 s".into(),
            stderr: "see its log lines above".into(),
        }
        .into());
    }
    Ok(child)
}

/// Write end of the self-pipe the signal handler writes to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; the fd was stored before the handler was installed.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&byte as *const u8).cast(),
            1,
        )
    };
}

/// On SIGINT/SIGTERM/SIGHUP, tear down the lab being built or demoed, then exit. The handler only
/// writes to a pipe; a thread does the teardown outside signal context.
fn teardown_on_signal(state_dir: &Path, prefix: &str) {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("warning: no signal pipe ({}); Ctrl-C will not tear the lab down, run `cargo xtask lab down`", std::io::Error::last_os_error());
        return;
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a valid handler and empty mask is a valid argument.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    let (state_dir, prefix, read_fd) = (state_dir.to_path_buf(), prefix.to_string(), fds[0]);
    std::thread::spawn(move || {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a valid buffer from our own pipe.
        if unsafe { libc::read(read_fd, (&mut byte as *mut u8).cast(), 1) } == 1 {
            eprintln!("signal {byte}: tearing down lab {prefix}*");
            for failure in teardown_prefix(&state_dir, &prefix) {
                eprintln!("lab teardown: {failure}");
            }
            std::process::exit(130);
        }
    });
}
