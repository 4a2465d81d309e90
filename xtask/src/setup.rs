//! `cargo xtask setup`: installs what aksnet needs on a fresh Debian machine, idempotently.
//!
//! Each step checks first and installs only what is missing, saying what it does, so running it on
//! every `demo` and `test` costs a few process spawns once everything is in place.

use crate::cmd::{run_quiet, succeeds, Cmd};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Debian packages the lab, the tests and the benchmarks run.
const DEBIAN_PACKAGES: &[&str] = &[
    "conntrack",    // conntrack -E / -L: the independent witness of NAT translations
    "iptables",     // kube-proxy and ip-masq-agent rules in the lab
    "nftables",     // iptables-nft's backend
    "iproute2",     // ip netns, veth, bridges, routes
    "nginx-light",  // Application Gateway and ingress-nginx stand-ins
    "dnsmasq-base", // Azure DNS stand-in answering the privatelink zone
    "openssl",      // the Application Gateway's lab certificate
    "curl",         // HTTP(S) clients of the lab scenarios
    "socat",        // the lab pods' HTTP and UDP echo servers
    "prometheus",   // real Prometheus server and promtool for the metrics tests
    "podman",       // the runtime image's build and the container test (xtask image)
    "runc",         // podman's OCI runtime here: crun refuses hybrid cgroups
    "debootstrap",  // the runtime image's Debian base, with no registry
    // `cargo xtask vm-test`: QEMU, and what the guests' initramfs is made of.
    "qemu-system-x86", // boots Debian's cloud kernels under TCG
    "busybox-static",  // the guests' shell and tools
    "cpio",            // packs the initramfs
    "kmod",            // modinfo: the order the guests load modules in
    "binutils",        // strip: the agent without debug info fits the guests' memory
    "xz-utils",        // decompresses xz modules
    "zstd",            // and zstd ones
];

/// PyPI packages: the manifests' schema validator.
const PYTHON_PACKAGES: &[&str] = &["kubernetes-validate"];

/// bpf-linker release that builds against nightly's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the link to nightly's libLLVM lives. It must outlast the install: the linker loads the
/// library through it at every eBPF build.
const LLVM_PREFIX: &str = "/opt/aksnet-llvm";

pub fn run() -> Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    python_packages()?;
    println!("setup: everything is in place");
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !debian_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    run_quiet(Cmd::new("apt-get").args(["update", "-qq"]))?;
    run_quiet(
        Cmd::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().copied())
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

fn debian_installed(pkg: &str) -> bool {
    Cmd::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output_string()
        .is_ok_and(|status| status.contains("install ok installed"))
}

fn nightly_rust_src() -> Result<()> {
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output_string()
        .context("no nightly toolchain: `rustup toolchain list` must show one (aksnet-ebpf needs nightly's -Z build-std)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: nightly rust-src present");
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain");
    run_quiet(Cmd::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let llvm = nightly_libllvm()?;
    let prefix_lib = Path::new(LLVM_PREFIX).join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let full_name = llvm.file_name().context("libLLVM path has no file name")?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(full_name)] {
        relink(&llvm, &link)?;
    }
    if succeeds(Cmd::new("bpf-linker").arg("--version")) {
        println!("setup: bpf-linker present");
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM (about a minute)"
    );
    run_quiet(
        Cmd::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    if !succeeds(Cmd::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// nightly's `lib/libLLVM.so.<version>-rust-<version>-nightly`.
fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot = Cmd::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output_string()?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.ends_with("-nightly"))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.*-nightly in {}: bpf-linker needs nightly's LLVM",
                lib.display()
            )
        })
}

fn relink(target: &Path, link: &Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn python_packages() -> Result<()> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !succeeds(Cmd::new("python3").args(["-m", "pip", "show", "-q", pkg])))
        .collect();
    if missing.is_empty() {
        println!("setup: Python packages present");
        return Ok(());
    }
    println!("setup: installing Python packages: {}", missing.join(" "));
    run_quiet(
        Cmd::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(missing.iter().copied()),
    )?;
    Ok(())
}
