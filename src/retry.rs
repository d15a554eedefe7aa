//! Retry timing: exponential backoff with full jitter, bounded by attempts and elapsed time.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How a stage retries a transient failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No retry starts after this much time has passed since the first attempt.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(15),
            max_attempts: 6,
            max_elapsed: Duration::from_secs(180),
        }
    }
}

impl RetryPolicy {
    /// This policy with a job's overrides applied.
    pub fn with_overrides(&self, spec: Option<&crate::job::RetrySpec>) -> Self {
        let Some(spec) = spec else {
            return self.clone();
        };
        let mut policy = self.clone();
        if let Some(n) = spec.max_attempts {
            policy.max_attempts = n;
        }
        if let Some(ms) = spec.initial_delay_ms {
            policy.initial_delay = Duration::from_millis(ms);
        }
        if let Some(secs) = spec.max_delay_secs {
            policy.max_delay = Duration::from_secs(secs);
        }
        if let Some(secs) = spec.max_elapsed_secs {
            policy.max_elapsed = Duration::from_secs(secs);
        }
        policy.max_delay = policy.max_delay.max(policy.initial_delay);
        policy
    }

    /// The delays between attempts: each drawn uniformly from zero up to the exponential
    /// ceiling ("full jitter"), so that workers retrying the same failure spread out.
    pub fn delays(&self) -> Delays {
        self.jittered(Some(self.max_attempts.saturating_sub(1) as usize))
    }

    /// The delays while a hypervisor cannot be reached at all, as while its daemon restarts:
    /// full jitter under the same ceilings, but not counted against the attempts, because
    /// the stage's work was not tried. Only `max_elapsed` ends them.
    pub fn reconnect_delays(&self) -> Delays {
        self.jittered(None)
    }

    fn jittered(&self, times: Option<usize>) -> Delays {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0);
        let builder = match times {
            Some(n) => builder.with_max_times(n),
            None => builder.without_max_times(),
        };
        Delays {
            ceilings: Box::new(builder.build()),
        }
    }
}

/// The delay before each retry; ends when the attempts are used up.
pub struct Delays {
    ceilings: Box<dyn Iterator<Item = Duration> + Send>,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let ceiling = self.ceilings.next()?;
        Some(ceiling.mul_f64(fastrand::f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_the_ceiling_and_stop_after_the_attempts() {
        let policy = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
            max_attempts: 5,
            max_elapsed: Duration::from_secs(60),
        };
        let delays: Vec<Duration> = policy.delays().collect();
        assert_eq!(delays.len(), 4);
        let ceilings = [100, 200, 400, 400];
        for (delay, ceiling) in delays.iter().zip(ceilings) {
            assert!(
                *delay <= Duration::from_millis(ceiling),
                "{delay:?} above {ceiling} ms"
            );
        }
    }

    #[test]
    fn reconnect_delays_outlast_the_attempts_under_the_same_ceiling() {
        let policy = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(400),
            max_attempts: 2,
            max_elapsed: Duration::from_secs(60),
        };
        let delays: Vec<Duration> = policy.reconnect_delays().take(50).collect();
        assert_eq!(delays.len(), 50);
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
    }
}
