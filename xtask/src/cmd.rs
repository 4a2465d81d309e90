//! Running external commands to completion, with errors that say which command failed and what
//! it printed. The one runner of xtask: set-up, checks and the lab all go through it.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{command}`: {source}; is it installed? (`cargo xtask setup`)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        /// What it printed on stderr, or a pointer to where it printed it.
        stderr: String,
    },
}

/// A command line, built up and then run.
pub struct Cmd {
    command: Command,
    input: Option<String>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            command: Command::new(program),
            input: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<std::path::Path>) -> Self {
        self.command.current_dir(dir);
        self
    }

    /// Feeds `text` on standard input (otherwise stdin is empty).
    pub fn input(mut self, text: impl Into<String>) -> Self {
        self.input = Some(text.into());
        self
    }

    /// The command line, for messages.
    pub fn describe(&self) -> String {
        std::iter::once(self.command.get_program())
            .chain(self.command.get_args())
            .map(|part| part.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs with stdout and stderr captured; fails with the command line and its stderr.
    pub fn output_string(mut self) -> Result<String, CmdError> {
        let command = self.describe();
        let spawn_error = |source| CmdError::Spawn {
            command: command.clone(),
            source,
        };
        let stdin = if self.input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut child = self
            .command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let Some(input) = &self.input {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(input.as_bytes()).map_err(spawn_error)?;
        }
        let out = child.wait_with_output().map_err(spawn_error)?;
        if !out.status.success() {
            return Err(CmdError::Failed {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs with the terminal attached, for long steps whose progress the user should see.
    pub fn run_visible(mut self) -> Result<(), CmdError> {
        let command = self.describe();
        let status = self.command.status().map_err(|source| CmdError::Spawn {
            command: command.clone(),
            source,
        })?;
        if !status.success() {
            return Err(CmdError::Failed {
                command,
                status: status.to_string(),
                stderr: "see its output above".into(),
            });
        }
        Ok(())
    }
}

/// Runs a command, showing its output only if it fails.
pub fn run_quiet(cmd: Cmd) -> Result<(), CmdError> {
    cmd.output_string().map(drop)
}

/// Whether the command runs and exits 0; for presence checks.
pub fn succeeds(cmd: Cmd) -> bool {
    let Cmd { mut command, .. } = cmd;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
