//! A real Prometheus server (Debian's `prometheus`) inside a lab namespace, scraping a target
//! there every second, queried through its HTTP API; and `promtool check metrics`.

use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long Prometheus may take to open its storage and answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Prometheus, killed and its storage removed when dropped.
pub struct Prometheus {
    netns: String,
    listen: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

/// Runs `args` inside `netns` (`ip netns exec`) and returns its standard output.
pub fn in_netns(netns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {} in {netns}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{} in {netns} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `url` from inside `netns` (curl there) until it answers 2xx, for at most `timeout`;
/// returns the body, or the last failure.
pub fn poll_ok(netns: &str, url: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match in_netns(netns, &["curl", "-sS", "--fail", "--max-time", "2", url]) {
            Ok(body) => return Ok(body),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

impl Prometheus {
    /// Starts Prometheus in `netns`, listening on `listen` there and scraping `target` (an
    /// address in the same namespace) every second, and waits until it is ready.
    pub fn start(
        netns: &str,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<Prometheus, String> {
        Self::start_with_rules(netns, listen, target, None)
    }

    /// [`start`](Self::start), also evaluating the rule file `rules` every second.
    pub fn start_with_rules(
        netns: &str,
        listen: SocketAddr,
        target: SocketAddr,
        rules: Option<&std::path::Path>,
    ) -> Result<Prometheus, String> {
        let dir =
            std::env::temp_dir().join(format!("aksnet-prometheus-{}-{netns}", std::process::id()));
        std::fs::create_dir_all(dir.join("data"))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // From here on, Drop removes the directory whatever fails.
        let mut prometheus = Prometheus {
            netns: netns.to_string(),
            listen,
            dir,
            child: None,
        };
        let config = prometheus.dir.join("prometheus.yml");
        let mut text = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: aksnet\n    static_configs:\n      - targets: ['{target}']\n"
        );
        if let Some(rules) = rules {
            text.push_str(&format!("rule_files:\n  - '{}'\n", rules.display()));
        }
        std::fs::write(&config, text)
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prometheus.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start prometheus in {netns}: {e} (is it installed?)"))?;
        prometheus.child = Some(child);
        let ready = format!("http://{listen}/-/ready");
        let deadline = Instant::now() + READY_TIMEOUT;
        while in_netns(netns, &["curl", "-sS", "--fail", "--max-time", "1", &ready]).is_err() {
            if let Some(status) = prometheus.exited() {
                return Err(format!(
                    "prometheus in {netns} exited at start-up ({status})"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "prometheus in {netns} was not ready within {READY_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// An instant PromQL query through `/api/v1/query`: each result's labels and value.
    pub fn query(&self, promql: &str) -> Result<Vec<(Value, f64)>, String> {
        let url = format!("http://{}/api/v1/query", self.listen);
        let query = format!("query={promql}");
        let body = in_netns(
            &self.netns,
            &[
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "5",
                "-G",
                "--data-urlencode",
                &query,
                &url,
            ],
        )?;
        parse_vector(&body).map_err(|e| format!("query {promql:?}: {e}; the answer was {body}"))
    }

    /// Polls `promql` until it returns one sample satisfying `done` or `timeout` passes; returns
    /// the last value seen (`None`: no sample yet).
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(f64) -> bool,
    ) -> Result<Option<f64>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql)?;
            if result.len() > 1 {
                return Err(format!(
                    "{promql:?} returned {} series, expected one",
                    result.len()
                ));
            }
            let value = result.first().map(|(_, v)| *v);
            if value.is_some_and(&done) || Instant::now() > deadline {
                return Ok(value);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The samples of an instant-vector answer: `{"status":"success","data":{"resultType":"vector",
/// "result":[{"metric":{...},"value":[time,"v"]}]}}`.
fn parse_vector(body: &str) -> Result<Vec<(Value, f64)>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!("status {}: {}", v["status"], v["error"]));
    }
    if v["data"]["resultType"] != "vector" {
        return Err(format!(
            "result type {}, expected vector",
            v["data"]["resultType"]
        ));
    }
    v["data"]["result"]
        .as_array()
        .ok_or("no result array")?
        .iter()
        .map(|sample| {
            let value = sample["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad sample value {}", sample["value"]))?;
            Ok((sample["metric"].clone(), value))
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// `promtool check metrics` on a text exposition: `Ok` when it finds no problem, else its
/// report.
pub fn check_metrics(exposition: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e} (is prometheus installed?)"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(exposition.as_bytes())
        .map_err(|e| format!("cannot feed promtool: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("promtool: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instant_vectors_and_errors() {
        let ok = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"pod":"default/app"},"value":[1715000000.1,"5"]}]}}"#;
        let samples = parse_vector(ok).unwrap();
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].0["pod"], "default/app");
        assert_eq!(samples[0].1, 5.0);
        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(parse_vector(bad).unwrap_err().contains("parse error"));
    }

    #[test]
    fn promtool_accepts_a_documented_counter_and_refuses_an_undocumented_one() {
        let good = "# HELP a_total Things.\n# TYPE a_total counter\na_total 1\n";
        assert_eq!(check_metrics(good), Ok(()));
        assert!(check_metrics("a_total 1\n")
            .unwrap_err()
            .contains("no help"));
    }
}
