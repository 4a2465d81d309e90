//! The lab's error type: what failed, where, and what to do about it.

use crate::cmd::CmdError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command of the lab's failed; the lab needs root and what set-up installs.
    #[error("{0}\n  the lab needs root and the tools `cargo xtask setup` installs (iproute2, iptables, conntrack, nginx-light, dnsmasq-base, socat, curl, openssl)")]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    File(#[from] crate::file_error::FileError),
    #[error("{what} in namespace {netns} did not start within {seconds}s; its log: {log}")]
    NotReady {
        what: String,
        netns: String,
        seconds: u64,
        log: String,
    },
    #[error("scenario {scenario}, step `{step}`: {detail}")]
    Expectation {
        scenario: String,
        step: String,
        detail: String,
    },
    #[error(
        "scenario {scenario}, step `{step}`: no answer ({detail}); the client was `{command}`"
    )]
    NoAnswer {
        scenario: String,
        step: String,
        command: String,
        detail: String,
    },
    #[error("no lab state at {path}: run `cargo xtask lab up --cni kubenet|azure-cni|azure-cni-overlay` first")]
    NoLab { path: PathBuf },
    #[error("lab state {path} is unreadable ({detail}); run `cargo xtask lab down` to clean up")]
    State { path: PathBuf, detail: String },
    #[error("unknown scenario `{name}` for {cni}; known: {known}")]
    UnknownScenario {
        name: String,
        cni: String,
        known: String,
    },
    #[error("unknown misconfiguration `{name}` for {cni}; known: {known}")]
    UnknownMisconfig {
        name: String,
        cni: String,
        known: String,
    },
    #[error("teardown left things behind: {}; run `cargo xtask lab down` again", failures.join("; "))]
    Teardown { failures: Vec<String> },
    #[error("a lab is already up (state {path}); run `cargo xtask lab down` first")]
    AlreadyUp { path: PathBuf },
}
