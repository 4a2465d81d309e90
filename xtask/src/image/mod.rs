//! `cargo xtask image`: the agent's runtime image, built here with no registry.
//!
//! The Dockerfile's runtime stage is built as written, on a Debian bookworm made by debootstrap
//! (cached) instead of `debian:bookworm-slim`, with the builder stage replaced by the agent built
//! on the host (see [`containerfile`]). [`daemonset`] turns the DaemonSet's pod spec into the
//! `podman run` that reproduces it; [`podman`] is podman configured for this machine.

pub mod base;
pub mod containerfile;
pub mod daemonset;
pub mod podman;
pub mod seccomp;

use crate::cmd::{run_quiet, CmdError};
use crate::file_error::FileError;
use podman::Podman;
use std::path::{Path, PathBuf};

/// The image the DaemonSet runs (deploy/base/daemonset.yaml; kustomization.yaml sets the tag,
/// the workspace version).
pub const IMAGE: &str = "ghcr.io/aksnet/aksnet-agent";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "{0}\n  the image build needs root, podman, runc and debootstrap (`cargo xtask setup`)"
    )]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {detail}")]
    Dockerfile { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    DaemonSet { path: PathBuf, detail: String },
    #[error("seccomp profile {path}: {detail}")]
    Seccomp { path: PathBuf, detail: String },
    #[error(transparent)]
    Apt(#[from] crate::apt::AptError),
    #[error("podman reported an image size that is not a number: {0:?}")]
    Size(String),
}

/// Bound of the slow steps: debootstrap, the image build (its `apt-get install` reaches Debian's
/// mirror), the import.
pub(crate) const BUILD_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// An image in podman's store.
pub struct Built {
    pub tag: String,
    pub bytes: u64,
}

/// Where the image build keeps its cache (the debootstrapped base) and its build contexts.
pub fn work_dir(workspace: &Path) -> PathBuf {
    workspace.join("target/aksnet-image")
}

/// Builds the Dockerfile's runtime stage around `agent` (a binary built on this host) and tags it
/// `tag`.
pub fn build(workspace: &Path, agent: &Path, tag: &str) -> Result<Built, ImageError> {
    let work = work_dir(workspace);
    std::fs::create_dir_all(&work).map_err(FileError::on(
        "cannot create the image work directory",
        &work,
    ))?;
    let podman = Podman::configured(&work)?;
    let base = base::ensure(&podman, &work)?;
    let dockerfile = workspace.join("Dockerfile");
    let text = std::fs::read_to_string(&dockerfile)
        .map_err(FileError::on("cannot read the Dockerfile", &dockerfile))?;
    let containerfile =
        containerfile::with_prebuilt_agent(&text).map_err(|detail| ImageError::Dockerfile {
            path: dockerfile.clone(),
            detail,
        })?;
    // One context per build: only the Containerfile and the binary, nothing else is sent.
    let context = work.join(format!("context-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)
        .map_err(FileError::on("cannot create the build context", &context))?;
    let built = build_in(&podman, &context, &containerfile, agent, &base, tag);
    let _ = std::fs::remove_dir_all(&context);
    built
}

fn build_in(
    podman: &Podman,
    context: &Path,
    containerfile: &str,
    agent: &Path,
    base: &str,
    tag: &str,
) -> Result<Built, ImageError> {
    let file = context.join("Containerfile");
    std::fs::write(&file, containerfile)
        .map_err(FileError::on("cannot write the Containerfile", &file))?;
    let binary = context.join(containerfile::AGENT_IN_CONTEXT);
    std::fs::copy(agent, &binary).map_err(FileError::on("cannot copy the agent binary", agent))?;
    run_quiet(
        podman
            .cmd_within(BUILD_LIMIT)
            // Nothing is pulled: the base is local, the builder stage is `scratch`.
            .args(["build", "--pull=never", "--network", "host"])
            .arg("--build-arg")
            .arg(format!("{}={base}", containerfile::BASE_ARG))
            .arg("-f")
            .arg(&file)
            .args(["-t", tag])
            .arg(context),
    )?;
    // The stage holding the binary is a layer of its own, as large as the binary, and nothing
    // is based on it: remove it (and any an earlier build left).
    let stages = podman
        .cmd()
        .args(["images", "--all", "--quiet", "--filter"])
        .arg(format!("label={}", containerfile::AGENT_STAGE_LABEL))
        .output_string()?;
    let stages: Vec<&str> = stages.split_whitespace().collect();
    if !stages.is_empty() {
        run_quiet(podman.cmd().args(["rmi", "--force"]).args(&stages))?;
    }
    let size = podman
        .cmd()
        .args(["image", "inspect", "--format", "{{.Size}}", tag])
        .output_string()?;
    let bytes = size
        .trim()
        .parse()
        .map_err(|_| ImageError::Size(size.trim().to_owned()))?;
    Ok(Built {
        tag: tag.to_owned(),
        bytes,
    })
}

/// `cargo xtask image`: release build of the agent on the host, then the runtime image around it.
pub fn run(workspace: &Path) -> anyhow::Result<()> {
    crate::setup::run()?;
    println!("image: building the agent (release)");
    crate::cmd::Cmd::new("cargo")
        .current_dir(workspace)
        .args(["build", "--release", "--locked", "-p", "aksnet-agent"])
        .run_visible()?;
    let agent = workspace.join("target/release/aksnet-agent");
    let tag = format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"));
    println!("image: building {tag} from the Dockerfile's runtime stage");
    let built = build(workspace, &agent, &tag)?;
    println!(
        "image: {} built, {:.1} MB (podman image inspect)",
        built.tag,
        built.bytes as f64 / 1e6
    );
    Ok(())
}
