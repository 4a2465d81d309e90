//! Runs a node tool (`iptables-save`, `nft`) with a deadline: a hung tool (a stuck xtables lock,
//! a wedged netlink socket) must not hold discovery, and so `aksnet-agent topology`, for ever.

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long discovery waits for one tool.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ToolError {
    #[error("cannot run `{tool}`: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("`{tool}` did not finish within {} s and was killed", deadline.as_secs_f32())]
    TimedOut { tool: String, deadline: Duration },
    #[error("waiting for `{tool}` failed: {source}")]
    Wait {
        tool: String,
        source: std::io::Error,
    },
}

/// Runs `tool args…`, killing it if it has not exited within `deadline`.
pub(crate) fn run(tool: &str, args: &[&str], deadline: Duration) -> Result<Output, ToolError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ToolError::Spawn {
            tool: tool.into(),
            source,
        })?;
    // Read both pipes while waiting: a tool writing more than a pipe holds would otherwise block.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_until(&mut child, Instant::now() + deadline);
    let status = match status {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ToolError::TimedOut {
                tool: tool.into(),
                deadline,
            });
        }
        Err(source) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ToolError::Wait {
                tool: tool.into(),
                source,
            });
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn wait_until(
    child: &mut Child,
    until: Instant,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_collected() {
        let out = run("sh", &["-c", "echo out; echo err >&2; exit 3"], DEADLINE).unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn a_hung_tool_is_killed_at_the_deadline() {
        let err = run("sleep", &["30"], Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(err, ToolError::TimedOut { ref tool, .. } if tool == "sleep"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "`sleep` did not finish within 0.2 s and was killed"
        );
    }

    #[test]
    fn a_missing_tool_is_a_spawn_error() {
        let err = run("aksnet-no-such-tool", &[], DEADLINE).unwrap_err();
        assert!(matches!(err, ToolError::Spawn { .. }), "{err}");
    }
}
