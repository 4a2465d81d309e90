//! What can stop `cargo xtask bench`, with the way out.

use crate::cmd::CmdError;
use crate::lab::LabError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the node lab: {0}")]
    Lab(#[from] LabError),
    #[error("`{command}` failed ({status}); {hint}")]
    Command {
        command: String,
        status: String,
        hint: String,
    },
    #[error("cannot start `{command}`: {source}; is it installed? (`cargo xtask setup`)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{what} ({path}): {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
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
    #[error("{what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("{what} did not finish: {detail}")]
    Failed { what: String, detail: String },
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: impl Into<PathBuf> + 'a,
) -> impl FnOnce(std::io::Error) -> BenchError + 'a {
    move |source| BenchError::Io {
        what,
        path: path.into(),
        source,
    }
}

impl From<CmdError> for BenchError {
    fn from(err: CmdError) -> BenchError {
        match err {
            CmdError::Spawn { command, source } => BenchError::Spawn { command, source },
            CmdError::Failed {
                command,
                status,
                stderr,
            } => BenchError::Command {
                command,
                status,
                hint: stderr,
            },
        }
    }
}
