//! Running the lab's commands (`ip`, `iptables-restore`, clients) and reporting their failures.

use crate::lab::error::LabError;
use std::io::Write;
use std::process::{Command, Stdio};

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command to completion, feeding `stdin`, and returns its stdout.
pub(crate) fn run_with_input(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, LabError> {
    let command = describe(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was requested as a pipe");
        pipe.write_all(input.as_bytes())
            .map_err(|source| LabError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    run_with_input(program, args, None)
}

/// Runs a command inside a lab namespace.
pub(crate) fn in_ns(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let full: Vec<&str> = ["netns", "exec", netns]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    run("ip", &full)
}

pub(crate) fn in_ns_with_input(
    netns: &str,
    args: &[&str],
    stdin: &str,
) -> Result<String, LabError> {
    let full: Vec<&str> = ["netns", "exec", netns]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    run_with_input("ip", &full, Some(stdin))
}

/// `ip -n NETNS ...`: configure a namespace without entering it.
pub(crate) fn ip(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let full: Vec<&str> = ["-n", netns]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    run("ip", &full)
}
