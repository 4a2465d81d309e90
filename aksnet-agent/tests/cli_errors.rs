//! What a user sees when the agent cannot start: one line on stderr naming the cause and the way
//! out, a non-zero exit code, and no panic or backtrace.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const AGENT: &str = env!("CARGO_BIN_EXE_aksnet-agent");

/// A complete kubenet topology, so that only what a test changes can fail.
const TOPOLOGY: &str = r#"cni = "kubenet"
node_ips = ["10.224.0.4"]
vnet_cidrs = ["10.224.0.0/12"]
service_cidr = "10.0.0.0/16"
pod_cidr = "10.244.0.0/16"
"#;

/// A config file readable by any user, removed when dropped.
struct Config(PathBuf);

impl Config {
    fn new(name: &str, text: &str) -> Config {
        let path =
            std::env::temp_dir().join(format!("aksnet-cli-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config(path)
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn agent(args: &[&str], config: &Path) -> Output {
    Command::new(AGENT)
        .args(args)
        .arg("--config")
        .arg(config)
        .args(["--duration", "1"])
        .env("RUST_LOG", "error")
        .output()
        .expect("cannot run aksnet-agent")
}

/// Asserts a failed start with exactly one error line that contains every `words`.
fn assert_one_line_error(out: &Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status, stderr: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("aksnet-agent: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    for word in words {
        assert!(
            errors[0].contains(word),
            "{word:?} missing from {:?}",
            errors[0]
        );
    }
}

#[test]
fn unprivileged_user_is_told_which_capabilities_to_grant() {
    // setns, BPF and conntrack netlink all need privileges: run as nobody through setpriv.
    if Command::new("setpriv").arg("--version").output().is_err() {
        panic!("setpriv (util-linux) is needed to run the agent as an unprivileged user");
    }
    let config = Config::new("ok", TOPOLOGY);
    for source in ["ebpf", "auto"] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", AGENT])
            .args(["--dump", "--source", source, "--duration", "1", "--config"])
            .arg(&config.0)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert_one_line_error(&out, &["CAP_BPF", "run the agent as root"]);
    }
}

#[test]
fn unknown_namespace_names_where_it_looked() {
    let config = Config::new("ns", TOPOLOGY);
    let out = agent(
        &["--dump", "--netns", "aksnet-no-such-namespace"],
        &config.0,
    );
    assert_one_line_error(
        &out,
        &["/run/netns/aksnet-no-such-namespace", "ip netns list"],
    );
}

#[test]
fn a_bad_config_names_file_line_and_field() {
    let config = Config::new(
        "bad",
        &format!("{TOPOLOGY}\n[[lb_frontends]]\nip = \"192.0.2.300\"\n"),
    );
    let out = agent(&["--dump"], &config.0);
    let file_line = format!("{}:8", config.0.display());
    assert_one_line_error(&out, &[&file_line, "lb_frontends.ip", "invalid IP address"]);
}

/// A network namespace of this test's own, deleted when dropped (also when the test panics).
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        aksnet_tests::require_root();
        let name = format!(
            "aksnet-cli-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("cannot run `ip` (iproute2)");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `aksnet-agent topology` with `args`, in a namespace of its own (so discovery reads nothing of
/// the host's: no iptables, no interfaces) without IMDS and without a Kubernetes API (no
/// kubeconfig, not in a pod).
fn topology(args: &[&str]) -> Output {
    let home = std::env::temp_dir().join(format!("aksnet-cli-home-{}", std::process::id()));
    let netns = Netns::new();
    Command::new(AGENT)
        .arg("topology")
        .args(["--netns", &netns.0, "--no-imds"])
        .args(args)
        .env("RUST_LOG", "error")
        .env("HOME", &home)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("cannot run aksnet-agent")
}

/// An incomplete topology is listed, with what is missing and the flag that gives it: it no
/// longer stops the agent.
#[test]
fn an_incomplete_topology_is_listed_with_the_way_to_complete_it() {
    let config = Config::new("partial", "cni = \"azure-cni\"\n");
    let out = topology(&[
        "--config",
        config.0.to_str().unwrap(),
        "--api-server",
        "10.0.0.200",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |fact: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(fact))
    };
    let words = |fact| line(fact).map(|l| l.split_whitespace().take(3).collect::<Vec<_>>());
    assert_eq!(
        words("cni"),
        Some(vec!["cni", "config", "azure-cni"]),
        "{stdout}"
    );
    assert_eq!(
        words("api_server"),
        Some(vec!["api_server", "flag", "10.0.0.200"]),
        "{stdout}"
    );
    assert_eq!(
        words("outbound_type"),
        Some(vec!["outbound_type", "default", "loadBalancer"]),
        "{stdout}"
    );
    // azure-cni has no pod CIDR of its own; an empty namespace shows no vnet.
    assert!(!stdout.contains("missing: `pod_cidr`"), "{stdout}");
    assert!(
        stdout.contains(
            "missing: `vnet_cidrs` (give it with --vnet-cidr or `vnet_cidrs` in the config)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("\nkube-proxy: "), "{stdout}");
}

#[test]
fn the_topology_as_json_names_each_source() {
    let out = topology(&[
        "--output",
        "json",
        "--cni",
        "kubenet",
        "--vnet-cidr",
        "10.224.0.0/12",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let source = |fact: &str| {
        report["facts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["fact"] == fact)
            .map(|f| f["source"].as_str().unwrap().to_string())
    };
    assert_eq!(source("cni").as_deref(), Some("flag"));
    assert_eq!(source("vnet_cidrs").as_deref(), Some("flag"));
    assert_eq!(source("health_probe_sources").as_deref(), Some("default"));
    let missing: Vec<&str> = report["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["fact"].as_str().unwrap())
        .collect();
    // An empty namespace reveals no pod CIDR.
    assert!(missing.contains(&"pod_cidr"), "{report}");
    assert!(
        !missing.contains(&"cni") && !missing.contains(&"vnet_cidrs"),
        "{report}"
    );
}
