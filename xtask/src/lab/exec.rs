//! The lab's commands (`ip`, `iptables-restore`, clients), run inside its namespaces.

use crate::cmd::Cmd;
use crate::lab::error::LabError;

/// Runs a command to completion, feeding `stdin`, and returns its stdout.
pub(crate) fn run_with_input(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, LabError> {
    let cmd = Cmd::new(program).args(args);
    let cmd = match stdin {
        Some(text) => cmd.input(text),
        None => cmd,
    };
    Ok(cmd.output_string()?)
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
