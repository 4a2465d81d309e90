//! Builds the kernel programs (`aksnet-ebpf`) for `bpfel-unknown-none` with nightly, so the agent
//! can embed the object with `aya::include_bytes_aligned!`. The `rerun-if-changed` lines make
//! every change to the kernel side or to the shared types rebuild the object.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("aksnet-agent lives in the workspace root");
    let ebpf_dir = root.join("aksnet-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));

    println!("cargo::rerun-if-changed=build.rs");
    for path in [
        "aksnet-ebpf/src",
        "aksnet-ebpf/Cargo.toml",
        "aksnet-ebpf/Cargo.lock",
        "aksnet-ebpf/rust-toolchain.toml",
        "aksnet-common/src",
        "aksnet-common/Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(path).display());
    }

    if let Err(missing) = check_toolchain() {
        println!(
            "cargo::error=cannot build the eBPF programs (aksnet-ebpf): {missing}; run `cargo xtask setup`"
        );
        return;
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf_dir)
        .args(["+nightly", "build", "--release", "-Z", "build-std=core"])
        .args(["--target", BPF_TARGET, "--target-dir"])
        .arg(&target_dir);
    clear_outer_cargo_env(&mut cmd);
    // Probe argument registers differ per architecture: build for the agent's target, not the
    // build host.
    if let Some(arch) = env::var_os("CARGO_CFG_TARGET_ARCH") {
        cmd.env("AYA_BPF_TARGET_ARCH", arch);
    }
    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) => {
            println!(
                "cargo::error=cannot run `cargo +nightly` to build aksnet-ebpf: {err}; run `cargo xtask setup`"
            );
            return;
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            println!("cargo::warning={line}");
        }
        println!(
            "cargo::error=building aksnet-ebpf failed ({}); its compiler output is above",
            output.status
        );
        return;
    }
    let object = target_dir.join(BPF_TARGET).join("release").join("aksnet");
    if let Err(err) = std::fs::copy(&object, out_dir.join("aksnet-ebpf.o")) {
        println!(
            "cargo::error=aksnet-ebpf built but {} is unreadable: {err}",
            object.display()
        );
    }
}

/// Nightly with rust-src (for `-Z build-std=core`) and bpf-linker; the error names what is
/// missing.
fn check_toolchain() -> Result<(), String> {
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .ok_or("the nightly Rust toolchain is not installed (`rustc +nightly` failed)")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        return Err(format!(
            "the nightly toolchain at {} lacks the rust-src component",
            sysroot.display()
        ));
    }
    let on_path = env::var_os("PATH")
        .map(|path| env::split_paths(&path).any(|dir| is_file(&dir.join("bpf-linker"))))
        .unwrap_or(false);
    if !on_path {
        return Err("bpf-linker is not on PATH".into());
    }
    Ok(())
}

fn is_file(path: &Path) -> bool {
    path.metadata().map(|m| m.is_file()).unwrap_or(false)
}

/// The outer build's settings (host target, flags, wrappers, toolchain pin, target dir) would
/// break or pollute the nightly BPF build.
fn clear_outer_cargo_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTUP_TOOLCHAIN"
                    | "OUT_DIR"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if outer {
            cmd.env_remove(key);
        }
    }
}
