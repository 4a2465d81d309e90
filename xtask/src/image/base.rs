//! The runtime stage's base: Debian bookworm from debootstrap, standing in for
//! `debian:bookworm-slim`, which no registry here can give. Made once (about 30 s), kept as a
//! tarball in the image work directory and as an image in podman's store.

use super::podman::Podman;
use super::{ImageError, BUILD_LIMIT};
use crate::cmd::{run_quiet, succeeds, Cmd};
use crate::file_error::FileError;
use std::path::Path;

/// The recipe's revision, in the cache's names: bump it when the recipe changes, so that a
/// cached base made by an older one is not used.
const REVISION: u32 = 2;
const SUITE: &str = "bookworm";
/// What bookworm-slim leaves out, so that packages installed later leave it out too.
const SLIM_DPKG_CFG: &str = "\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
";
/// As bookworm-slim's apt configuration: no package cache (two 39 MB files) or downloaded package
/// left in a layer after `apt-get install`.
const SLIM_APT_CONF: &str = r#"Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Acquire::Languages "none";
"#;

/// The base image's name in podman's store.
fn base_image() -> String {
    format!("localhost/aksnet-base:{SUITE}-minbase-r{REVISION}")
}

/// The base image's name, importing it (and running debootstrap) only when it is missing.
pub fn ensure(podman: &Podman, work: &Path) -> Result<String, ImageError> {
    let image = base_image();
    if succeeds(podman.cmd().args(["image", "exists", &image])) {
        return Ok(image);
    }
    let tarball = work.join(format!("debian-{SUITE}-minbase-r{REVISION}.tar"));
    if !tarball.exists() {
        // The mirror this machine's apt uses: the project names no registry host itself.
        let mirror = crate::apt::debian_archive()?;
        println!("image: debootstrap {SUITE} (minbase) from {mirror}, once (about 30 s)");
        let rootfs = work.join(format!("rootfs-{}", std::process::id()));
        let made = debootstrap(&rootfs, &tarball, &mirror);
        let _ = std::fs::remove_dir_all(&rootfs);
        made?;
    }
    run_quiet(
        podman
            .cmd_within(BUILD_LIMIT)
            .arg("import")
            .arg(&tarball)
            .arg(&image),
    )?;
    Ok(image)
}

fn debootstrap(rootfs: &Path, tarball: &Path, mirror: &str) -> Result<(), ImageError> {
    let _ = std::fs::remove_dir_all(rootfs);
    run_quiet(
        Cmd::new("timeout")
            .arg(BUILD_LIMIT.as_secs().to_string())
            .args(["debootstrap", "--variant=minbase", SUITE])
            .arg(rootfs)
            .arg(mirror),
    )?;
    slim(rootfs)?;
    // Written aside and renamed: an interrupted run leaves no truncated cache behind.
    let partial = tarball.with_extension("tar.partial");
    run_quiet(
        Cmd::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["--numeric-owner", "-cf"])
            .arg(&partial)
            .arg("."),
    )?;
    std::fs::rename(&partial, tarball)
        .map_err(FileError::on("cannot store the base tarball", tarball))?;
    Ok(())
}

/// What debian:bookworm-slim also drops: the package cache and lists, documentation, manuals
/// and translations, now and in later installs.
fn slim(rootfs: &Path) -> Result<(), ImageError> {
    let cfg = rootfs.join("etc/dpkg/dpkg.cfg.d/slim");
    std::fs::write(&cfg, SLIM_DPKG_CFG)
        .map_err(FileError::on("cannot write the dpkg config", &cfg))?;
    let apt = rootfs.join("etc/apt/apt.conf.d/slim");
    std::fs::write(&apt, SLIM_APT_CONF)
        .map_err(FileError::on("cannot write the apt config", &apt))?;
    let kept_by_apt = |name: &str| name != "partial" && name != "lock";
    empty(&rootfs.join("var/cache/apt"), |name| name.ends_with(".bin"))?;
    empty(&rootfs.join("var/cache/apt/archives"), |name| {
        name.ends_with(".deb")
    })?;
    empty(&rootfs.join("var/lib/apt/lists"), kept_by_apt)?;
    for dir in ["usr/share/man", "usr/share/info", "usr/share/locale"] {
        empty(&rootfs.join(dir), |_| true)?;
    }
    let docs = rootfs.join("usr/share/doc");
    let entries = std::fs::read_dir(&docs).map_err(FileError::on("cannot list", &docs))?;
    for package in entries.filter_map(Result::ok) {
        empty(&package.path(), |name| name != "copyright")?;
    }
    Ok(())
}

/// Removes the entries of `dir` whose name passes `remove`; nothing when `dir` is not a
/// directory.
fn empty(dir: &Path, remove: impl Fn(&str) -> bool) -> Result<(), ImageError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name();
        if !remove(&name.to_string_lossy()) {
            continue;
        }
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(FileError::on("cannot remove", &path))?;
    }
    Ok(())
}
