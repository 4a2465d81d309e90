//! The kernel matrix: Debian cloud kernels, fetched with apt from their suites into a cache of
//! their own. apt runs with a temporary sources list and its own state and cache directories, so
//! the machine's apt configuration and package lists are never touched.

use crate::cmd::{run_quiet, Cmd};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One kernel of the matrix.
#[derive(Debug)]
pub struct Kernel {
    /// What `--kernel` accepts.
    pub name: &'static str,
    /// The Debian suite whose `linux-image-cloud-amd64` is this kernel.
    pub suite: &'static str,
}

/// Oldest first. 5.10 is older than any AKS node (5.15), so what loads there loads on AKS; 6.1
/// is the obtainable kernel closest to AKS's 5.15/6.6, 6.12 the newest.
pub const MATRIX: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        suite: "bullseye",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
    },
];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// An unpacked kernel package.
pub struct KernelFiles {
    /// `uname -r` of the kernel, for example `6.1.0-50-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
}

/// `$XDG_CACHE_HOME/aksnet/vm` (else `~/.cache/aksnet/vm`): kernels survive `cargo clean` and
/// fresh clones.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("aksnet/vm")
}

/// The unpacked kernel, downloading it only when the cache lacks it.
pub fn fetch(kernel: &Kernel, cache: &Path) -> Result<KernelFiles> {
    let root = cache.join("kernels").join(kernel.suite);
    let stamp = root.join("release");
    if !stamp.exists() {
        let package = image_package(kernel, cache)?;
        println!(
            "vm-test: downloading {package} ({} kernel {})",
            kernel.suite, kernel.name
        );
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs)?;
        run_quiet(
            apt("apt-get", cache)
                .args(["download", &package])
                .current_dir(&debs),
        )?;
        let deb = find_deb(&debs, &package)?;
        let tree = root.join("tree");
        if tree.exists() {
            std::fs::remove_dir_all(&tree)?;
        }
        std::fs::create_dir_all(&tree)?;
        run_quiet(Cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        let release = package
            .strip_prefix("linux-image-")
            .context("unexpected kernel package name")?;
        std::fs::write(&stamp, release)?;
    }
    let release = std::fs::read_to_string(&stamp)?.trim().to_owned();
    let tree = root.join("tree");
    // trixie's packages ship modules under /usr (merged /usr), older ones under /lib.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| tree.join(dir).join(&release))
        .find(|dir| dir.exists())
        .unwrap_or_else(|| tree.join("lib/modules").join(&release));
    let files = KernelFiles {
        vmlinuz: tree.join(format!("boot/vmlinuz-{release}")),
        modules,
        release,
    };
    if !files.vmlinuz.exists() || !files.modules.exists() {
        bail!(
            "the cached kernel in {} is incomplete (no {} or {}); delete that directory and run again",
            root.display(),
            files.vmlinuz.display(),
            files.modules.display()
        );
    }
    Ok(files)
}

/// The versioned image package the suite's `linux-image-cloud-amd64` depends on.
fn image_package(kernel: &Kernel, cache: &Path) -> Result<String> {
    update_lists(cache)?;
    let meta = format!("linux-image-cloud-amd64/{}", kernel.suite);
    let show = apt("apt-cache", cache)
        .args(["show", &meta])
        .output_string()?;
    show.lines()
        .find_map(|line| line.strip_prefix("Depends: "))
        .and_then(|deps| {
            deps.split([' ', ','])
                .find(|d| d.starts_with("linux-image-"))
        })
        .map(str::to_owned)
        .with_context(|| format!("{meta} names no linux-image package in its Depends"))
}

/// Downloads the three suites' package lists into the cache, once per run.
fn update_lists(cache: &Path) -> Result<()> {
    let apt_dir = cache.join("apt");
    for dir in ["state/lists/partial", "cache/archives/partial", "etc/parts"] {
        std::fs::create_dir_all(apt_dir.join(dir))?;
    }
    let status = apt_dir.join("state/status");
    if !status.exists() {
        std::fs::write(&status, "")?;
    }
    // The mirror this machine's apt already uses: any Debian suite is under it.
    let archive = crate::apt::debian_archive()?;
    let sources: String = MATRIX
        .iter()
        .map(|k| format!("deb [signed-by={KEYRING}] {archive} {} main\n", k.suite))
        .collect();
    std::fs::write(apt_dir.join("etc/sources.list"), sources)?;
    let updated = apt_dir.join("state/updated");
    let fresh = std::fs::metadata(&updated)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() < 600));
    if !fresh {
        println!("vm-test: reading the package lists of {archive} (bullseye, bookworm, trixie)");
        run_quiet(apt("apt-get", cache).arg("update"))?;
        std::fs::write(&updated, "")?;
    }
    Ok(())
}

/// apt pointed at the cache's own sources, state and archives instead of the machine's.
fn apt(program: &str, cache: &Path) -> Cmd {
    let dir = cache.join("apt");
    let opt = |key: &str, value: PathBuf| format!("{key}={}", value.display());
    Cmd::new(program).args([
        "-o".into(),
        opt("Dir::Etc::SourceList", dir.join("etc/sources.list")),
        "-o".into(),
        opt("Dir::Etc::SourceParts", dir.join("etc/parts")),
        "-o".into(),
        opt("Dir::Etc::PreferencesParts", dir.join("etc/parts")),
        "-o".into(),
        opt("Dir::State", dir.join("state")),
        "-o".into(),
        opt("Dir::State::status", dir.join("state/status")),
        "-o".into(),
        opt("Dir::Cache", dir.join("cache")),
        "-o".into(),
        "Debug::NoLocking=1".to_owned(),
        "-o".into(),
        "APT::Architecture=amd64".to_owned(),
        "-o".into(),
        "APT::Sandbox::User=root".to_owned(),
    ])
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!(
        "apt-get download {package} left no .deb in {}",
        dir.display()
    )
}
