//! Issue 16: the runtime image, run by podman as the kubelet would run the DaemonSet.
//!
//! The image is the Dockerfile's runtime stage around the agent cargo built for this test
//! (`xtask::image::build`, as `cargo xtask image` does with a release build); it is removed at the
//! end. The `podman run` arguments come from deploy/base/daemonset.yaml (`xtask::image::
//! daemonset`): capabilities dropped and added, no privilege escalation, read-only root, the
//! seccomp profile, `/sys/kernel/btf` read-only, the config from a mounted ConfigMap directory,
//! the DaemonSet's arguments and environment, and host networking meaning a lab node's namespace.
//! The test adds only `--dump --output json --show-ends --metrics-listen 0.0.0.0:9965` after the
//! DaemonSet's arguments, to see each flow, and `--duration 120` as a bound.
//!
//! - `RuntimeDefault` under podman 4.3 (its own profile) and under containerd's rules (what AKS
//!   applies): the agent attaches, captures every lab scenario exactly as `conntrack -E` sees it,
//!   on its path, conforming, with the source each profile permits (netlink under podman's, with
//!   the WARN line naming seccomp; eBPF under containerd's), and answers `/metrics`, `/healthz`,
//!   `/readyz` to curl running outside the container.
//! - Without CAP_BPF, and under a profile that denies bpf(2), `--source ebpf` exits with one line
//!   naming what is missing.
//!
//! Built as a test of aksnet-agent (see its Cargo.toml). Needs root, podman, runc, debootstrap.

use aksnet_tests::agent::{assert_no_failures, run_scenarios, Agent};
use aksnet_tests::conntrack::{self, Witness};
use aksnet_tests::exactness::node_capture;
use aksnet_tests::prometheus::poll_ok;
use aksnet_tests::require_root;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use xtask::image::daemonset::{AgentPod, Node};
use xtask::image::podman::Podman;
use xtask::image::seccomp;
use xtask::lab::layout::plan;
use xtask::lab::{CniMode, Host, Lab, LabOptions, Scenario};

const METRICS: &str = "0.0.0.0:9965";
const SCRAPE: &str = "http://127.0.0.1:9965";
/// How long a refused agent may take to exit (podman starts the container first).
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An image built for this test, removed when dropped.
struct TestImage<'a> {
    podman: &'a Podman,
    tag: String,
}

impl Drop for TestImage<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .cmd()
            .args(["rmi", "-f", &self.tag])
            .output_string();
    }
}

/// A container by name, removed (whatever its state) when dropped.
struct ContainerName<'a> {
    podman: &'a Podman,
    name: String,
}

impl Drop for ContainerName<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .cmd()
            .args(["rm", "-f", "-t", "0", &self.name])
            .output_string();
    }
}

/// What RuntimeDefault resolves to in a run.
#[derive(Clone, Copy, Debug)]
enum RuntimeDefault {
    /// podman's own profile.
    Podman,
    /// podman's profile with containerd's rules for bpf and perf_event_open.
    Containerd,
}

impl RuntimeDefault {
    /// The capture source the DaemonSet's agent must run with, stated, not derived from the code
    /// under test: podman 4.3's profile allows bpf(2) only with CAP_SYS_ADMIN, which the
    /// DaemonSet does not grant, so the agent falls back to netlink; containerd's rules allow it
    /// with CAP_BPF, so eBPF runs.
    fn expected_source(self) -> &'static str {
        match self {
            RuntimeDefault::Podman => "netlink",
            RuntimeDefault::Containerd => "ebpf",
        }
    }
}

/// Everything one test needs around the image: podman, the DaemonSet's pod, a directory for the
/// ConfigMap and the seccomp profiles.
struct Rig<'a> {
    podman: &'a Podman,
    image: &'a str,
    dir: PathBuf,
}

impl Rig<'_> {
    /// The `podman run` of `pod` on `lab`'s node, with `extra` agent arguments, RuntimeDefault
    /// meaning `default`.
    fn command(
        &self,
        pod: &AgentPod,
        lab: &Lab,
        name: &str,
        default: RuntimeDefault,
        extra: &[&str],
    ) -> std::process::Command {
        let config_map = self.dir.join("aksnet-config");
        std::fs::create_dir_all(&config_map).unwrap();
        std::fs::copy(lab.topology_path(), config_map.join("config.toml")).unwrap();
        let netns = PathBuf::from("/run/netns").join(lab.node_netns());
        let node = Node {
            netns: &netns,
            name: plan::NODE_NAME,
            config_maps: BTreeMap::from([("aksnet-config".to_string(), config_map)]),
            seccomp_root: &self.dir,
        };
        let mut args = pod
            .podman_run_args(name, self.image, &node, extra)
            .unwrap_or_else(|e| panic!("the DaemonSet does not translate: {e}"));
        if let RuntimeDefault::Containerd = default {
            let path = self.profile("containerd-runtime-default.json", |podman| {
                seccomp::containerd_default(podman)
            });
            let image = args.iter().position(|a| a == self.image).unwrap();
            args.insert(image, format!("--security-opt=seccomp={}", path.display()));
        }
        let mut command = self.podman.command();
        command.args(["run", "--rm"]).args(args);
        command
    }

    /// Writes the profile `derive` makes from podman's default under `name`; returns its path.
    fn profile(
        &self,
        name: &str,
        derive: impl Fn(&serde_json::Value) -> serde_json::Value,
    ) -> PathBuf {
        let podman = seccomp::load(Path::new(seccomp::PODMAN_DEFAULT)).unwrap();
        let path = self.dir.join(name);
        seccomp::store(&derive(&podman), &path).unwrap();
        path
    }

    /// The profile RuntimeDefault means in `default`.
    fn default_profile(&self, default: RuntimeDefault) -> serde_json::Value {
        let podman = seccomp::load(Path::new(seccomp::PODMAN_DEFAULT)).unwrap();
        match default {
            RuntimeDefault::Podman => podman,
            RuntimeDefault::Containerd => seccomp::containerd_default(&podman),
        }
    }
}

/// Capability names in the kernel's bit order (include/uapi/linux/capability.h).
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What the kernel says of the agent in container `name` (its pid 1, seen from the host): it
/// holds exactly `caps` (effective, permitted and bounding), no_new_privs and a seccomp filter are
/// set, and the root, the config and `/sys/kernel/btf` are mounted read-only, as `pod` says.
fn confinement(podman: &Podman, name: &str, caps: &[String], pod: &AgentPod) -> Vec<String> {
    let pid = podman
        .cmd()
        .args(["inspect", "--format", "{{.State.Pid}}", name])
        .output_string()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let proc_dir = PathBuf::from("/proc").join(pid.trim());
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap();
    let mountinfo = std::fs::read_to_string(proc_dir.join("mountinfo")).unwrap();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let expected: u64 = caps
        .iter()
        .map(|c| {
            let bit = CAPABILITIES
                .iter()
                .position(|known| c.strip_prefix("CAP_") == Some(known))
                .unwrap_or_else(|| panic!("unknown capability {c}"));
            1u64 << bit
        })
        .sum();
    let mut failures = Vec::new();
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let held = u64::from_str_radix(&field(set), 16).unwrap_or(u64::MAX);
        if held != expected {
            failures.push(format!(
                "{set} {held:016x}, the DaemonSet grants {expected:016x}"
            ));
        }
    }
    if field("CapAmb:") != "0000000000000000" || field("CapInh:") != "0000000000000000" {
        failures.push(format!("ambient or inheritable capabilities: {status}"));
    }
    if field("NoNewPrivs:") != "1" {
        failures.push("no_new_privs is not set (allowPrivilegeEscalation: false)".into());
    }
    if field("Seccomp:") != "2" {
        failures.push(format!(
            "seccomp mode {}, expected a filter",
            field("Seccomp:")
        ));
    }
    // mountinfo: id parent major:minor root mount-point options ...
    let read_only = |point: &str| {
        mountinfo.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.get(4) == Some(&point)
                && fields
                    .get(5)
                    .is_some_and(|o| o.split(',').any(|o| o == "ro"))
        })
    };
    let mounts = pod.container().volume_mounts.iter();
    let ro_points = mounts
        .filter(|m| m.read_only)
        .map(|m| m.mount_path.as_str());
    for point in std::iter::once("/").chain(ro_points) {
        if !read_only(point) {
            failures.push(format!("{point} is not mounted read-only in the container"));
        }
    }
    failures
}

/// The agent in the DaemonSet's security context on a `cni` lab: exact capture, scraped from
/// outside. Returns what it verified, for the summary.
fn daemonset_captures_exactly(
    rig: &Rig,
    pod: &AgentPod,
    cni: CniMode,
    default: RuntimeDefault,
) -> String {
    let lab = Lab::up(LabOptions::new(cni)).unwrap_or_else(|e| panic!("{cni} lab: {e}"));
    let node = lab.node_netns();
    let name = format!("aksnet-test-{}-{cni}", std::process::id());
    let _container = ContainerName {
        podman: rig.podman,
        name: name.clone(),
    };
    let caps = pod.capabilities().unwrap();
    let source = default.expected_source();
    let mut failures = Vec::new();
    // xtask's reading of the profile must agree with what the run shows.
    let allowed = seccomp::allows(&rig.default_profile(default), "bpf", &caps);
    if allowed != (source == "ebpf") {
        failures.push(format!(
            "seccomp::allows says bpf(2) is {} under {default:?}, but the agent must run {source}",
            if allowed { "allowed" } else { "denied" }
        ));
    }
    let witness = Witness::start(&node).unwrap();
    let dump = [
        "--dump",
        "--output",
        "json",
        "--show-ends",
        "--metrics-listen",
        METRICS,
        // A bound on the run even if the test never stops it.
        "--duration",
        "120",
    ];
    let command = rig.command(pod, &lab, &name, default, &dump);
    let mut agent = Agent::spawn(command).unwrap_or_else(|e| {
        panic!("{cni}, RuntimeDefault = {default:?}: the agent did not attach: {e}")
    });
    if source == "netlink" {
        // The fallback must say why eBPF is off, naming the seccomp profile.
        if let Err(e) = agent.wait_for_log("seccomp profile denies bpf", Duration::from_secs(5)) {
            failures.push(format!("no log line on why eBPF is off: {e}"));
        }
    }
    failures.extend(confinement(rig.podman, &name, &caps, pod));
    let scenarios = Scenario::all(cni);
    run_scenarios(&lab, &scenarios);
    let mut answers = Vec::new();
    for path in ["/healthz", "/readyz", "/metrics"] {
        // From the node namespace, outside the container.
        match poll_ok(&node, &format!("{SCRAPE}{path}"), Duration::from_secs(10)) {
            Ok(body) => answers.push((path, body)),
            Err(e) => failures.push(format!("{path} from outside the container: {e}")),
        }
    }
    if let Some((_, metrics)) = answers.iter().find(|(p, _)| *p == "/metrics") {
        let series = format!("aksnet_capture_source_info{{source=\"{source}\"}} 1");
        if !metrics.lines().any(|l| l == series) {
            failures.push(format!("/metrics lacks `{series}`"));
        }
        if source == "ebpf"
            && !metrics.lines().any(|l| {
                l.starts_with("aksnet_capture_hook_attached{hook=\"tp_btf/net_dev_start_xmit\"}")
                    && l.ends_with(" 1")
            })
        {
            failures.push("/metrics does not show tp_btf/net_dev_start_xmit attached".into());
        }
    }
    // The scrapes are connections on the node too: the witness sees them before it stops, and
    // conntrack -E loses what is still in its socket when stopped.
    std::thread::sleep(Duration::from_millis(300));
    let witnessed = witness.finish();
    conntrack::flush(&node).unwrap();
    let lines = agent.finish();
    let capture = node_capture(Host::Node, &scenarios, &witnessed, &lines);
    let opened = capture.opened.len();
    failures.extend(capture.failures);
    lab.down().unwrap();
    assert_no_failures(
        format_args!("{cni} in podman, RuntimeDefault = {default:?}"),
        &failures,
    );
    format!(
        "{cni}, RuntimeDefault = {default:?}: source {source}, {opened} flows reported once \
         each, all {} witnessed by conntrack -E, every scenario on its path and conforming; \
         /healthz, /readyz, /metrics answered outside the container",
        witnessed.len()
    )
}

/// Runs the agent with `--source ebpf` as `pod` says and returns its exit status and stderr; it
/// must exit by itself within [`EXIT_TIMEOUT`].
fn refused_run(
    rig: &Rig,
    pod: &AgentPod,
    lab: &Lab,
    name: &str,
) -> (std::process::ExitStatus, String) {
    let _container = ContainerName {
        podman: rig.podman,
        name: name.into(),
    };
    let mut child = rig
        .command(
            pod,
            lab,
            name,
            RuntimeDefault::Podman,
            &["--source", "ebpf"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: the agent did not exit within {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, reader.join().unwrap())
}

/// The refused agent's stderr ends with exactly one error line, which contains every one of
/// `names`; no panic.
fn check_refusal(
    what: &str,
    status: std::process::ExitStatus,
    stderr: &str,
    names: &[&str],
    failures: &mut Vec<String>,
) {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("aksnet-agent: "))
        .collect();
    if status.success() {
        failures.push(format!("{what}: the agent exited 0; stderr:\n{stderr}"));
    }
    if stderr.contains("panicked") {
        failures.push(format!("{what}: the agent panicked:\n{stderr}"));
    }
    match errors.as_slice() {
        [line] if stderr.trim_end().ends_with(line) => {
            for name in names {
                if !line.contains(name) {
                    failures.push(format!("{what}: the error does not name {name}: {line}"));
                }
            }
            println!("{what}: {line}");
        }
        _ => failures.push(format!(
            "{what}: expected one closing `aksnet-agent:` line; stderr:\n{stderr}"
        )),
    }
}

/// Without CAP_BPF, and under a profile that denies bpf(2), the agent exits naming what to fix.
fn refusals(rig: &Rig, pod: &AgentPod) -> Vec<String> {
    let lab =
        Lab::up(LabOptions::new(CniMode::Kubenet)).unwrap_or_else(|e| panic!("kubenet lab: {e}"));
    let mut failures = Vec::new();

    let mut no_bpf = pod.clone();
    no_bpf
        .container_mut()
        .security_context
        .capabilities
        .add
        .retain(|c| c != "BPF");
    let name = format!("aksnet-test-{}-nobpf", std::process::id());
    let (status, stderr) = refused_run(rig, &no_bpf, &lab, &name);
    check_refusal(
        "without CAP_BPF",
        status,
        &stderr,
        &["CAP_BPF", "capabilities.add"],
        &mut failures,
    );

    // containerd's profile (which lets the DaemonSet's agent load eBPF) without bpf(2).
    let path = rig.profile("deny-bpf.json", |podman| {
        seccomp::denying(&seccomp::containerd_default(podman), "bpf")
    });
    let mut denied = pod.clone();
    denied.spec.security_context.seccomp_profile = Some(xtask::image::daemonset::SeccompProfile {
        kind: "Localhost".into(),
        localhost_profile: Some(path.file_name().unwrap().to_string_lossy().into_owned()),
    });
    let name = format!("aksnet-test-{}-denybpf", std::process::id());
    let (status, stderr) = refused_run(rig, &denied, &lab, &name);
    check_refusal(
        "seccomp denying bpf",
        status,
        &stderr,
        &["seccomp", "bpf"],
        &mut failures,
    );

    lab.down().unwrap();
    failures
}

#[test]
fn daemonset_security_context_in_podman() {
    require_root();
    let workspace = workspace();
    let work = xtask::image::work_dir(&workspace);
    std::fs::create_dir_all(&work).unwrap();
    let podman = Podman::configured(&work).unwrap();
    let tag = format!("localhost/aksnet-agent-test:{}", std::process::id());
    let image = TestImage {
        podman: &podman,
        tag: tag.clone(),
    };
    let built = xtask::image::build(
        &workspace,
        Path::new(env!("CARGO_BIN_EXE_aksnet-agent")),
        &tag,
    )
    .unwrap_or_else(|e| panic!("cannot build the test image: {e}"));
    println!("{}: {:.1} MB", built.tag, built.bytes as f64 / 1e6);
    let dir = work.join(format!("test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rig = Rig {
        podman: &podman,
        image: &image.tag,
        dir: dir.clone(),
    };
    let pod = AgentPod::load(&workspace.join("deploy/base/daemonset.yaml")).unwrap();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut summary = vec![
            daemonset_captures_exactly(&rig, &pod, CniMode::Kubenet, RuntimeDefault::Podman),
            daemonset_captures_exactly(&rig, &pod, CniMode::AzureCni, RuntimeDefault::Containerd),
        ];
        let failures = refusals(&rig, &pod);
        assert_no_failures("refused starts", &failures);
        summary.push(
            "without CAP_BPF and under a profile denying bpf: one error line each, naming it"
                .into(),
        );
        summary
    }));
    let _ = std::fs::remove_dir_all(&dir);
    drop(image);
    match result {
        Ok(summary) => println!("{}", summary.join("\n")),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
