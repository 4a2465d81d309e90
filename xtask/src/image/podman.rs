//! podman with a runtime configuration that works on this machine, given to every podman call
//! through its own containers.conf (`CONTAINERS_CONF`); the system's configuration is left alone.
//!
//! As installed (podman 4.3), `podman run` fails here in two ways:
//! - crun refuses hybrid cgroups (v1 controllers plus a v2 `unified` mount), even with
//!   `--cgroups=disabled`: runc, with the cgroupfs manager, runs;
//! - podman asks for RLIMIT_NOFILE 1048576 and raises no limit without CAP_SYS_RESOURCE, which
//!   this machine's bounding set lacks (`--ulimit host` is not honoured by 4.3): the defaults are
//!   set to the limits this process already has, which need no privilege.

use super::ImageError;
use crate::cmd::Cmd;
use crate::file_error::FileError;
use std::path::{Path, PathBuf};

/// podman lowers its own RLIMIT_NPROC to this at start, so a container cannot be given more.
const PODMAN_NPROC: u64 = 32_768;

pub struct Podman {
    conf: PathBuf,
}

impl Podman {
    /// Writes the containers.conf into `work` and returns podman configured by it.
    pub fn configured(work: &Path) -> Result<Podman, ImageError> {
        let conf = work.join("containers.conf");
        std::fs::write(&conf, containers_conf())
            .map_err(FileError::on("cannot write podman's configuration", &conf))?;
        Ok(Podman { conf })
    }

    /// A podman command line.
    pub fn cmd(&self) -> Cmd {
        Cmd::new("podman").env("CONTAINERS_CONF", &self.conf)
    }

    /// A podman command line killed after `limit` (exit status 124: `timeout` ended it), for the
    /// steps that reach the network or copy much: builds and imports.
    pub fn cmd_within(&self, limit: std::time::Duration) -> Cmd {
        Cmd::new("timeout")
            .arg(limit.as_secs().to_string())
            .arg("podman")
            .env("CONTAINERS_CONF", &self.conf)
    }

    /// A podman command, for a process the caller supervises (a container run in the foreground).
    pub fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new("podman");
        command.env("CONTAINERS_CONF", &self.conf);
        command
    }
}

fn containers_conf() -> String {
    let nofile = finite(hard_limit(libc::RLIMIT_NOFILE), nr_open());
    let nproc = finite(hard_limit(libc::RLIMIT_NPROC), PODMAN_NPROC).min(PODMAN_NPROC);
    format!(
        "# Written by cargo xtask (xtask/src/image/podman.rs) for this machine.\n\
         [containers]\n\
         default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         [engine]\n\
         runtime = \"runc\"\n\
         cgroup_manager = \"cgroupfs\"\n"
    )
}

/// The kernel's ceiling on RLIMIT_NOFILE: an unlimited hard limit cannot be given as such.
const NR_OPEN: &str = "/proc/sys/fs/nr_open";
/// The kernel's default nr_open, where it cannot be read.
const NR_OPEN_DEFAULT: u64 = 1_048_576;

fn nr_open() -> u64 {
    std::fs::read_to_string(NR_OPEN)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(NR_OPEN_DEFAULT)
}

/// `limit`, or `cap` when it is unlimited (RLIM_INFINITY, which a container's ulimit cannot be).
fn finite(limit: u64, cap: u64) -> u64 {
    if limit == libc::RLIM_INFINITY {
        cap
    } else {
        limit
    }
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let ok = unsafe { libc::getrlimit(resource, &mut limit) } == 0;
    if ok {
        limit.rlim_max
    } else {
        1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unlimited_hard_limit_becomes_the_cap() {
        assert_eq!(finite(libc::RLIM_INFINITY, 1_048_576), 1_048_576);
        assert_eq!(finite(4096, 1_048_576), 4096);
    }

    #[test]
    fn the_configuration_has_finite_limits() {
        let conf = containers_conf();
        assert!(!conf.contains(&libc::RLIM_INFINITY.to_string()), "{conf}");
        assert!(nr_open() > 0);
    }
}
