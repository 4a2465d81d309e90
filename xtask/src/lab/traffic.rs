//! Drives a scenario's traffic with bounded clients (curl, socat) inside the lab namespaces and
//! checks each answer against the scenario's expectations.

use crate::cmd::CmdError;
use crate::lab::daemons::certificate_path;
use crate::lab::error::LabError;
use crate::lab::exec;
use crate::lab::netns::netns_name;
use crate::lab::scenario::{Expect, HttpRequest, Scenario, Traffic, UdpQuery};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

/// Every client gives up after this long: traffic is bounded even when a path is broken.
const CLIENT_TIMEOUT_SECS: &str = "5";
/// socat waits this long for the UDP answer after sending the query.
const UDP_WAIT_SECS: &str = "1";

/// What an echo server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub server: Option<String>,
    pub peer: Option<SocketAddrV4>,
    pub forwarded_for: Option<String>,
    pub body: String,
}

impl Answer {
    fn parse(body: String) -> Answer {
        let field = |key: &str| {
            body.lines().find_map(|l| {
                let (k, v) = l.split_once(['=', ':'])?;
                k.trim()
                    .eq_ignore_ascii_case(key)
                    .then(|| v.trim().to_string())
            })
        };
        Answer {
            server: field("server"),
            peer: field("peer").and_then(|p| p.parse().ok()),
            forwarded_for: field("x-forwarded-for"),
            body,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StepReport {
    pub step: String,
    pub answer: Answer,
}

#[derive(Clone, Debug)]
pub struct ScenarioReport {
    pub scenario: &'static str,
    pub steps: Vec<StepReport>,
}

pub fn run(prefix: &str, dir: &Path, scenario: &Scenario) -> Result<ScenarioReport, LabError> {
    let mut steps = Vec::new();
    for traffic in &scenario.traffic {
        let step = traffic.to_string();
        let (sent, expect) = match traffic {
            Traffic::Http(r) => (http(prefix, dir, r), &r.expect),
            Traffic::Udp(q) => (udp(prefix, q), &q.expect),
        };
        let body = sent.map_err(|e| match e {
            // A client that gets no answer is a broken path, not a missing tool.
            LabError::Cmd(CmdError::Failed {
                command, stderr, ..
            }) => LabError::NoAnswer {
                scenario: scenario.name.to_string(),
                step: step.clone(),
                command,
                detail: stderr,
            },
            other => other,
        })?;
        let answer = Answer::parse(body);
        check(expect, &answer).map_err(|detail| LabError::Expectation {
            scenario: scenario.name.to_string(),
            step: step.clone(),
            detail: format!("{detail}; the answer was:\n{}", answer.body),
        })?;
        steps.push(StepReport { step, answer });
    }
    Ok(ScenarioReport {
        scenario: scenario.name,
        steps,
    })
}

fn http(prefix: &str, dir: &Path, r: &HttpRequest) -> Result<String, LabError> {
    let netns = netns_name(prefix, r.from);
    let mut args: Vec<String> = ["curl", "-sS", "--fail", "--max-time", CLIENT_TIMEOUT_SECS]
        .map(String::from)
        .to_vec();
    if let Some(bind) = r.bind {
        args.extend(["--interface".into(), bind.to_string()]);
    }
    if let Some(ip) = r.resolve_to {
        let host = r
            .url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default();
        args.extend(["--resolve".into(), format!("{host}:443:{ip}")]);
        args.extend([
            "--cacert".into(),
            certificate_path(dir).display().to_string(),
        ]);
    }
    args.push(r.url.clone());
    exec::in_ns(&netns, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn udp(prefix: &str, q: &UdpQuery) -> Result<String, LabError> {
    let netns = netns_name(prefix, q.from);
    let bind = q.bind.map(|b| format!(",bind={b}")).unwrap_or_default();
    let target = format!("UDP4:{}{bind}", q.dst);
    let out = exec::in_ns_with_input(
        &netns,
        &[
            "socat",
            "-T",
            CLIENT_TIMEOUT_SECS,
            "-t",
            UDP_WAIT_SECS,
            "STDIO",
            &target,
        ],
        &format!("{}\n", q.payload),
    )?;
    if !out.contains(&format!("query={}", q.payload)) {
        return Err(CmdError::Failed {
            command: format!("socat STDIO {target}"),
            status: "no answer".into(),
            stderr: format!("no UDP answer within {UDP_WAIT_SECS}s (got {out:?})"),
        }
        .into());
    }
    Ok(out)
}

fn check(expect: &Expect, answer: &Answer) -> Result<(), String> {
    if let Some(server) = &expect.server {
        if answer.server.as_ref() != Some(server) {
            return Err(format!(
                "expected an answer from {server}, got {:?}",
                answer.server
            ));
        }
    }
    if let Some(ip) = expect.peer_ip {
        let peer = answer.peer.ok_or("the answer carries no peer address")?;
        if *peer.ip() != ip {
            return Err(format!(
                "the server saw the connection from {peer}, expected {ip}"
            ));
        }
        if let Some((lo, hi)) = expect.peer_ports {
            if !(lo..=hi).contains(&peer.port()) {
                return Err(format!(
                    "source port {} outside the expected range {lo}-{hi}",
                    peer.port()
                ));
            }
        }
    }
    if let Some(client) = expect.forwarded_for {
        let first: Option<Ipv4Addr> = answer
            .forwarded_for
            .as_deref()
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok());
        if first != Some(client) {
            return Err(format!(
                "X-Forwarded-For is {:?}, expected {client}",
                answer.forwarded_for
            ));
        }
    }
    if let Some(text) = expect.body_contains {
        if !answer.body.contains(text) {
            return Err(format!("the answer does not contain {text:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_echo_answers() {
        let a = Answer::parse(
            "server=app\npeer=10.244.0.1:4242\nGET / HTTP/1.0\nHost: x\nX-Forwarded-For: 203.0.113.10, 10.0.0.1\n".into(),
        );
        assert_eq!(a.server.as_deref(), Some("app"));
        assert_eq!(a.peer, Some("10.244.0.1:4242".parse().unwrap()));
        assert_eq!(a.forwarded_for.as_deref(), Some("203.0.113.10, 10.0.0.1"));
        let expect = Expect {
            server: Some("app".into()),
            peer_ip: Some("10.244.0.1".parse().unwrap()),
            peer_ports: Some((1024, 2047)),
            forwarded_for: Some("203.0.113.10".parse().unwrap()),
            body_contains: None,
        };
        assert!(check(&expect, &a).unwrap_err().contains("outside"));
        assert!(check(
            &Expect {
                peer_ports: None,
                ..expect
            },
            &a
        )
        .is_ok());
    }
}
