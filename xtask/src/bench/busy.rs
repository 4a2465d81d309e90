//! The whole machine's busy CPU time over a run, from `/proc/stat`: every core's wall time less
//! the idle, I/O-wait and stolen time the kernel reports for it.
//!
//! A datapath ratio in CPU time holds where one in wall time does not: on this shared machine
//! other guests take slices of a run (the hypervisor's stolen time), and the same bulk stream ran
//! at 268–414 MB/s in consecutive runs without the agent. The kernel keeps idle time exactly (the
//! idle period under way included) and prints the cores' sum in `USER_HZ` ticks, so a run's
//! figure is off by less than one tick (10 ms): 1% of a half-second run on two cores, 0.2% of a
//! 3 s one.

use crate::bench::error::BenchError;
use crate::file_error::FileError;
use std::time::{Duration, Instant};

const PROC_STAT: &str = "/proc/stat";

/// A reading of the machine's clocks at the start of a run.
pub struct BusyClock {
    at: Instant,
    sample: Sample,
}

impl BusyClock {
    pub fn start() -> Result<BusyClock, BenchError> {
        Ok(BusyClock {
            at: Instant::now(),
            sample: Sample::read()?,
        })
    }

    /// CPU time the machine spent busy since [`BusyClock::start`], all cores together.
    pub fn busy(&self) -> Result<Duration, BenchError> {
        let wall = self.at.elapsed();
        let now = Sample::read()?;
        let not_busy = now
            .not_busy_ticks
            .saturating_sub(self.sample.not_busy_ticks);
        let not_busy = Duration::from_secs_f64(not_busy as f64 / user_hz());
        Ok((wall * now.cores).saturating_sub(not_busy))
    }
}

/// The `USER_HZ` ticks a second in which `/proc` prints CPU times.
pub fn user_hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

#[derive(Debug, PartialEq)]
struct Sample {
    /// Online cores: the `cpuN` lines.
    cores: u32,
    /// idle + iowait + steal of the `cpu` line, in `USER_HZ` ticks.
    not_busy_ticks: u64,
}

impl Sample {
    fn read() -> Result<Sample, BenchError> {
        let text =
            std::fs::read_to_string(PROC_STAT).map_err(FileError::on("cannot read", PROC_STAT))?;
        Sample::parse(&text).map_err(|detail| BenchError::Parse {
            what: format!("the machine's CPU times in {PROC_STAT}"),
            detail,
        })
    }

    fn parse(text: &str) -> Result<Sample, String> {
        let mut lines = text.lines();
        let total = lines
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .ok_or("its first line is not the `cpu` total")?;
        // user nice system idle iowait irq softirq steal guest guest_nice (proc(5))
        let fields: Vec<u64> = total
            .split_whitespace()
            .map(|f| {
                f.parse()
                    .map_err(|_| format!("`{f}` in the `cpu` line is not a count"))
            })
            .collect::<Result<_, _>>()?;
        let field = |i: usize, name: &str| {
            fields
                .get(i)
                .copied()
                .ok_or(format!("the `cpu` line has no {name} field"))
        };
        let not_busy_ticks = field(3, "idle")? + field(4, "iowait")? + field(7, "steal")?;
        let cores = lines
            .take_while(|l| l.starts_with("cpu"))
            .filter(|l| l[3..].starts_with(|c: char| c.is_ascii_digit()))
            .count() as u32;
        if cores == 0 {
            return Err("no `cpuN` line follows the `cpu` total".into());
        }
        Ok(Sample {
            cores,
            not_busy_ticks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_busy_is_idle_iowait_and_steal_over_the_online_cores() {
        let text = "cpu  3390784 69043 711649 3489475 28293 0 119939 2540 0 0\n\
                    cpu0 1665254 34605 340387 1795516 9319 0 59329 1256 0 0\n\
                    cpu1 1725529 34437 371261 1693959 18974 0 60610 1284 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(
            Sample::parse(text),
            Ok(Sample {
                cores: 2,
                not_busy_ticks: 3489475 + 28293 + 2540
            })
        );
    }

    #[test]
    fn a_file_that_is_not_proc_stat_says_what_is_missing() {
        assert_eq!(
            Sample::parse("intr 1 2 3\n"),
            Err("its first line is not the `cpu` total".into())
        );
        assert_eq!(
            Sample::parse("cpu  1 2 3 4\ncpu0 1 2 3 4\n"),
            Err("the `cpu` line has no iowait field".into())
        );
        assert_eq!(
            Sample::parse("cpu  1 2 3 4 5 6 7 8 0 0\nintr 1\n"),
            Err("no `cpuN` line follows the `cpu` total".into())
        );
    }

    fn thread_cpu_time() -> Duration {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(
            // SAFETY: `t` is a valid timespec for the call to fill.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) },
            0
        );
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    #[test]
    fn a_thread_spinning_makes_the_machine_busy() {
        let clock = BusyClock::start().unwrap();
        let began = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - began < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let busy = clock.busy().unwrap();
        // This thread's 200 ms, less the tick a reading may be off and any time the hypervisor
        // stole that this thread's clock counted.
        assert!(busy >= Duration::from_millis(150), "{busy:?}");
    }
}
