//! Time to SNAT exhaustion: a least-squares line through the busiest destination's recent port
//! usage, extended to the allocation. The same idea as PromQL's `predict_linear`, computed in the
//! agent so that the answer is there without recording rules.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Usage samples over the last `window`, and the forecast they imply.
#[derive(Debug)]
pub struct Forecast {
    window: Duration,
    /// Samples closer together than this replace each other: two scrapers do not double weight.
    spacing: Duration,
    samples: VecDeque<(Instant, f64)>,
}

impl Forecast {
    pub fn new(window: Duration, spacing: Duration) -> Forecast {
        Forecast {
            window,
            spacing,
            samples: VecDeque::new(),
        }
    }

    /// Records `used` ports at `now` and forgets samples older than the window.
    pub fn record(&mut self, now: Instant, used: f64) {
        match self.samples.back_mut() {
            Some((at, value)) if now.saturating_duration_since(*at) < self.spacing => *value = used,
            _ => self.samples.push_back((now, used)),
        }
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Seconds until usage reaches `limit` at its recent rate of growth: 0 when it already has,
    /// `+Inf` when it is not growing or there are not yet two samples.
    pub fn seconds_until(&self, limit: f64) -> f64 {
        let Some(&(last_at, last)) = self.samples.back() else {
            return f64::INFINITY;
        };
        if last >= limit {
            return 0.0;
        }
        let slope = self.slope(last_at);
        if slope > 0.0 {
            (limit - last) / slope
        } else {
            f64::INFINITY
        }
    }

    /// Growth per second by least squares over the samples (0 with fewer than two).
    fn slope(&self, origin: Instant) -> f64 {
        let n = self.samples.len() as f64;
        if n < 2.0 {
            return 0.0;
        }
        // Times relative to the newest sample keep the sums small and exact enough.
        let points = || {
            self.samples
                .iter()
                .map(move |(at, v)| (-(origin.duration_since(*at).as_secs_f64()), *v))
        };
        let mean_t = points().map(|(t, _)| t).sum::<f64>() / n;
        let mean_v = points().map(|(_, v)| v).sum::<f64>() / n;
        let (mut cov, mut var) = (0.0, 0.0);
        for (t, v) in points() {
            cov += (t - mean_t) * (v - mean_v);
            var += (t - mean_t) * (t - mean_t);
        }
        if var == 0.0 {
            0.0
        } else {
            cov / var
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forecast() -> Forecast {
        Forecast::new(Duration::from_secs(120), Duration::from_millis(500))
    }

    #[test]
    fn steady_growth_gives_the_time_left_and_it_falls_as_ports_fill() {
        let mut f = forecast();
        let t0 = Instant::now();
        assert_eq!(f.seconds_until(100.0), f64::INFINITY, "no samples");
        f.record(t0, 10.0);
        assert_eq!(f.seconds_until(100.0), f64::INFINITY, "one sample");
        let mut previous = f64::INFINITY;
        for s in 1..=8u64 {
            f.record(t0 + Duration::from_secs(s), 10.0 + 10.0 * s as f64);
            let left = f.seconds_until(100.0);
            assert!(left < previous, "{left} after {previous}");
            previous = left;
        }
        // 90 used, 10 per second: one second left.
        assert!((f.seconds_until(100.0) - 1.0).abs() < 1e-9);
        f.record(t0 + Duration::from_secs(9), 100.0);
        assert_eq!(f.seconds_until(100.0), 0.0);
    }

    #[test]
    fn flat_or_falling_usage_never_runs_out() {
        let mut f = forecast();
        let t0 = Instant::now();
        for s in 0..5u64 {
            f.record(t0 + Duration::from_secs(s), 50.0);
        }
        assert_eq!(f.seconds_until(100.0), f64::INFINITY);
        for s in 5..10u64 {
            f.record(t0 + Duration::from_secs(s), 50.0 - s as f64);
        }
        assert_eq!(f.seconds_until(100.0), f64::INFINITY);
    }

    #[test]
    fn old_samples_leave_the_window_and_close_ones_replace_each_other() {
        let mut f = forecast();
        let t0 = Instant::now();
        // Fast growth long ago, flat now: only the flat part counts.
        for s in 0..10u64 {
            f.record(t0 + Duration::from_secs(s), 10.0 * s as f64);
        }
        for s in 200..210u64 {
            f.record(t0 + Duration::from_secs(s), 90.0);
        }
        assert_eq!(f.seconds_until(100.0), f64::INFINITY);
        assert_eq!(f.samples.len(), 10);
        f.record(t0 + Duration::from_millis(209_100), 95.0);
        assert_eq!(f.samples.len(), 10, "replaced the sample 100 ms before");
        assert_eq!(f.samples.back().unwrap().1, 95.0);
    }
}
