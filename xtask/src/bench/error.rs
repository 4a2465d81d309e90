//! What can stop `cargo xtask bench`, with the way out.

use crate::cmd::CmdError;
use crate::lab::LabError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the node lab: {0}")]
    Lab(#[from] LabError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    File(#[from] crate::file_error::FileError),
    #[error("cannot enter network namespace {netns}: {source} (the bench needs root)")]
    Netns {
        netns: String,
        source: std::io::Error,
    },
    #[error("{what} {addr}: {source}")]
    Socket {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("the agent {what}; its stderr:\n{stderr}")]
    Agent { what: String, stderr: String },
    #[error("cannot {what} with bpf(2) (the bench needs root)")]
    Bpf {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("{what} did not finish: {detail}")]
    Failed { what: String, detail: String },
}
