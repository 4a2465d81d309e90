//! Running external commands with errors that say which command failed and what it printed.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// A command line, built up and then run one of three ways.
pub struct Cmd(Command);

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd(Command::new(program))
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.0.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.0.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.0.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<std::path::Path>) -> Self {
        self.0.current_dir(dir);
        self
    }

    fn describe(&self) -> String {
        let mut line = self.0.get_program().to_string_lossy().into_owned();
        for arg in self.0.get_args() {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }

    /// Runs with stdout captured; fails with the command line and its stderr.
    pub fn output_string(mut self) -> Result<String> {
        let line = self.describe();
        let out = self
            .0
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot start `{line}`"))?;
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs with the terminal attached, for long steps whose progress the user should see.
    pub fn run_visible(mut self) -> Result<()> {
        let line = self.describe();
        let status = self
            .0
            .status()
            .with_context(|| format!("cannot start `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(())
    }
}

/// Runs a command, showing its output only if it fails.
pub fn run_quiet(cmd: Cmd) -> Result<()> {
    cmd.output_string().map(drop)
}

/// Whether the command runs and exits 0; for presence checks.
pub fn succeeds(cmd: Cmd) -> bool {
    let Cmd(mut command) = cmd;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
