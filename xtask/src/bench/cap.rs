//! The DaemonSet's CPU limit (its manifest is read by `daemonset`), applied to the agent with a
//! cgroup v1 cpu group (`cpu.cfs_quota_us` over `cpu.cfs_period_us`), as the kubelet applies it on
//! a node.

use crate::bench::error::BenchError;
use crate::file_error::FileError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup v1's cpu controller is mounted.
const CPU_CONTROLLER: &str = "/sys/fs/cgroup/cpu";
/// The kubelet's CFS period.
const PERIOD_US: u64 = 100_000;

/// A CPU limit in millicores (`500m` = half a core).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuLimit {
    pub millicores: u64,
}

impl CpuLimit {
    /// The `cpu:` line of the first `limits:` block, as a Kubernetes quantity.
    pub(super) fn parse_manifest(text: &str) -> Option<CpuLimit> {
        let mut lines = text.lines().map(str::trim);
        lines.find(|l| *l == "limits:")?;
        let quantity = lines
            // The block's own `key: value` lines, up to the next block.
            .take_while(|l| !l.ends_with(':'))
            .find_map(|l| l.strip_prefix("cpu:"))?
            .trim()
            .trim_matches('"');
        let millicores = match quantity.strip_suffix('m') {
            Some(m) => m.parse().ok()?,
            None => (quantity.parse::<f64>().ok()? * 1000.0).round() as u64,
        };
        (millicores > 0).then_some(CpuLimit { millicores })
    }

    pub fn quota_us(self) -> u64 {
        PERIOD_US * self.millicores / 1000
    }
}

/// A cgroup v1 cpu group with the limit's quota; removed on drop, once its processes left.
pub struct CpuGroup {
    pub dir: PathBuf,
}

impl CpuGroup {
    pub fn create(limit: CpuLimit) -> Result<CpuGroup, BenchError> {
        let dir = Path::new(CPU_CONTROLLER).join(format!("aksnet-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(FileError::on(
            "cannot create a cgroup v1 cpu group (is the cpu controller mounted there?)",
            &dir,
        ))?;
        let group = CpuGroup { dir };
        group.write("cpu.cfs_period_us", PERIOD_US)?;
        group.write("cpu.cfs_quota_us", limit.quota_us())?;
        Ok(group)
    }

    fn write(&self, file: &str, value: u64) -> Result<(), BenchError> {
        let path = self.dir.join(file);
        std::fs::write(&path, value.to_string()).map_err(FileError::on("cannot write", &path))?;
        Ok(())
    }

    /// Periods in which the group used up its quota and waited (`cpu.stat` `nr_throttled`).
    pub fn throttled_periods(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join("cpu.stat"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // The agent was stopped before; its exit may take a moment to leave the group.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limit_not_the_request() {
        let manifest = "          resources:\n            requests:\n              cpu: 50m\n              memory: 128Mi\n            limits:\n              cpu: 500m\n              memory: 384Mi\n";
        assert_eq!(
            CpuLimit::parse_manifest(manifest),
            Some(CpuLimit { millicores: 500 })
        );
        let whole = "limits:\n  memory: 1Gi\n  cpu: \"1.5\"\n";
        assert_eq!(
            CpuLimit::parse_manifest(whole),
            Some(CpuLimit { millicores: 1500 })
        );
        assert_eq!(CpuLimit::parse_manifest("limits:\n  memory: 1Gi\n"), None);
        assert_eq!(CpuLimit { millicores: 500 }.quota_us(), 50_000);
    }
}
