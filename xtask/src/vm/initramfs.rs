//! The guest's initramfs: busybox, this machine's `ip`, `iptables` (legacy), `conntrack`, `socat`
//! and the agent with the libraries `ldd` lists, the kernel's netfilter modules in dependency
//! order, and the guest script as `/init`.

use super::kernels::KernelFiles;
use crate::cmd::{run_quiet, Cmd};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Loaded before the namespaces are made.
const LINK_MODULES: &[&str] = &["veth"];
/// Loaded after the first agent starts: conntrack, NAT, ctnetlink, the iptables matches and
/// targets the guest's rules use.
const NETFILTER_MODULES: &[&str] = &[
    "nf_conntrack",
    "nf_nat",
    "nf_conntrack_netlink",
    "iptable_nat",
    "ip6table_nat",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_conntrack",
    "xt_tcpudp",
];

/// Host programs copied in, as `(host path, name in the guest's /bin)`.
const PROGRAMS: &[(&str, &str)] = &[
    ("/usr/sbin/ip", "ip"),
    ("/usr/sbin/conntrack", "conntrack"),
    ("/usr/bin/socat", "socat"),
    ("/usr/sbin/xtables-legacy-multi", "xtables-legacy-multi"),
];
const IPTABLES_NAMES: &[&str] = &[
    "iptables",
    "ip6tables",
    "iptables-save",
    "ip6tables-save",
    "iptables-restore",
    "ip6tables-restore",
];
const XTABLES_PLUGINS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// The agent's topology file in the guest: the guest's router plays a kubenet node.
const AGENT_CONFIG: &str = "cni = \"kubenet\"
vnet_cidrs = [\"10.224.0.0/12\"]
node_subnet = \"10.224.0.0/16\"
pod_cidr = \"10.0.0.0/16\"
service_cidr = \"10.96.0.0/16\"
health_probe_sources = [\"168.63.129.16\"]
outbound_type = \"loadBalancer\"
";

/// Builds `<work>/initramfs.cpio` for `kernel`; the guest checks each of `sources` in turn.
/// `programs_test` is the agent's test binary that loads every kernel program.
pub fn build(
    kernel: &KernelFiles,
    agent: &Path,
    programs_test: &Path,
    sources: &[&str],
    work: &Path,
) -> Result<PathBuf> {
    let root = work.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for dir in ["bin", "dev", "proc", "sys", "run", "tmp", "etc", "modules"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    busybox(&root)?;
    let mut libraries = BTreeSet::new();
    for (host, name) in PROGRAMS {
        copy_program(
            Path::new(host),
            &root.join("bin").join(name),
            &mut libraries,
        )?;
    }
    for name in IPTABLES_NAMES {
        std::os::unix::fs::symlink("xtables-legacy-multi", root.join("bin").join(name))?;
    }
    // Stripped: the guest's RAM holds the initramfs, and debug info is most of a debug build.
    for (binary, name) in [(agent, "aksnet-agent"), (programs_test, "programs-load")] {
        run_quiet(
            Cmd::new("strip")
                .arg("-o")
                .arg(root.join("bin").join(name))
                .arg(binary),
        )?;
        libraries.extend(needed_libraries(binary)?);
    }
    let plugins = copy_tree(Path::new(XTABLES_PLUGINS), &root)?;
    for plugin in plugins {
        libraries.extend(needed_libraries(&plugin)?);
    }
    for lib in &libraries {
        copy_file(lib, &root)?;
    }
    for file in ["/etc/protocols", "/etc/services"] {
        copy_file(Path::new(file), &root)?;
    }
    std::fs::write(root.join("etc/aksnet.toml"), AGENT_CONFIG)?;
    let links = modules(&kernel.modules, LINK_MODULES, &BTreeSet::new(), &root)?;
    let loaded: BTreeSet<String> = links.iter().cloned().collect();
    let netfilter = modules(&kernel.modules, NETFILTER_MODULES, &loaded, &root)?;
    std::fs::write(root.join("modules.links"), links.join("\n"))?;
    std::fs::write(root.join("modules.netfilter"), netfilter.join("\n"))?;
    std::fs::write(root.join("sources"), sources.join("\n"))?;
    let init = root.join("init");
    std::fs::write(&init, include_str!("guest.sh"))?;
    set_mode(&init, 0o755)?;

    let cpio = work.join("initramfs.cpio");
    let list = Cmd::new("sh")
        .args(["-c", "find . -mindepth 1 | sort"])
        .current_dir(&root)
        .output_string()?;
    let archive = std::fs::File::create(&cpio)?;
    let status = std::process::Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(std::process::Stdio::piped())
        .stdout(archive)
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin is piped")
                .write_all(list.as_bytes())?;
            child.wait()
        })
        .context("cannot run cpio (apt-get install cpio)")?;
    if !status.success() {
        bail!("cpio failed ({status}) packing {}", root.display());
    }
    Ok(cpio)
}

/// `/bin/busybox` and a link per applet, except where a real program is copied in.
fn busybox(root: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    std::fs::copy(busybox, root.join("bin/busybox"))
        .context("cannot copy /bin/busybox (apt-get install busybox-static)")?;
    let applets = Cmd::new(busybox).arg("--list").output_string()?;
    let real: BTreeSet<&str> = PROGRAMS
        .iter()
        .map(|(_, name)| *name)
        .chain(IPTABLES_NAMES.iter().copied())
        .collect();
    for applet in applets
        .lines()
        .filter(|a| *a != "busybox" && !real.contains(a))
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    Ok(())
}

fn copy_program(host: &Path, guest: &Path, libraries: &mut BTreeSet<PathBuf>) -> Result<()> {
    std::fs::copy(host, guest).with_context(|| {
        format!(
            "cannot copy {} into the initramfs (`cargo xtask setup` installs it)",
            host.display()
        )
    })?;
    libraries.extend(needed_libraries(host)?);
    Ok(())
}

/// The absolute paths `ldd` prints: the libraries and the dynamic loader.
fn needed_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Cmd::new("ldd").arg(binary).output_string()?;
    Ok(out
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

/// Copies `file`'s content (links followed) to the same path under `root`.
fn copy_file(file: &Path, root: &Path) -> Result<()> {
    let dest = root.join(file.strip_prefix("/").unwrap_or(file));
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(file, &dest).with_context(|| format!("cannot copy {}", file.display()))?;
    Ok(())
}

/// Copies every file of `dir` to the same place under `root`; returns the host paths.
fn copy_tree(dir: &Path, root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            copy_file(&path, root)?;
            files.push(path);
        }
    }
    Ok(files)
}

/// Copies `wanted` and what they depend on (modinfo's `depends`) to `root/modules`, uncompressed;
/// returns their names in load order, leaving out `loaded` and modules built into the kernel.
fn modules(
    tree: &Path,
    wanted: &[&str],
    loaded: &BTreeSet<String>,
    root: &Path,
) -> Result<Vec<String>> {
    let files = module_files(&tree.join("kernel"))?;
    let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    let mut seen = loaded.clone();
    for name in wanted {
        visit(name, &files, &builtin, &mut seen, &mut order, 0)?;
    }
    for name in &order {
        let file = &files[name];
        let dest = root.join("modules").join(format!("{name}.ko"));
        let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "ko" => {
                std::fs::copy(file, &dest)?;
            }
            "xz" | "zst" => {
                let tool = if ext == "xz" { "xz" } else { "zstd" };
                let out = std::process::Command::new(tool)
                    .arg("-dc")
                    .arg(file)
                    .output()
                    .with_context(|| format!("cannot run {tool} -dc"))?;
                if !out.status.success() {
                    bail!("{tool} -dc {} failed", file.display());
                }
                std::fs::write(&dest, out.stdout)?;
            }
            other => bail!("module {} has an unknown extension {other}", file.display()),
        }
    }
    Ok(order)
}

/// Depth-first: a module's dependencies land in `order` before it.
fn visit(
    name: &str,
    files: &std::collections::BTreeMap<String, PathBuf>,
    builtin: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
    depth: u32,
) -> Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    if depth > 32 {
        bail!("module dependencies nest too deep at {name}");
    }
    let Some(file) = files.get(&name) else {
        if builtin.lines().any(|l| {
            l.rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with(&format!("{name}.ko")))
        }) {
            return Ok(());
        }
        bail!("the kernel has no module {name}, and it is not built in");
    };
    let depends = Cmd::new("modinfo")
        .args(["-F", "depends"])
        .arg(file)
        .output_string()?;
    for dep in depends.trim().split(',').filter(|d| !d.is_empty()) {
        visit(dep, files, builtin, seen, order, depth + 1)?;
    }
    order.push(name);
    Ok(())
}

/// Every module file under `dir`, by module name (hyphens as underscores).
fn module_files(dir: &Path) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if let Some(stem) = name.split(".ko").next().filter(|_| name.contains(".ko")) {
                files.insert(stem.replace('-', "_"), path.clone());
            }
        }
    }
    Ok(files)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
