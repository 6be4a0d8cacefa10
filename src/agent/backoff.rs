//! Reconnect delays: exponential backoff with full jitter between a floor and a cap.
//!
//! Attempt n waits a random time between `min` and `min(max, min * 2^n)`. After an
//! authorization refusal the wait is between `max / 2` and `max`: retrying bad credentials fast
//! helps nobody, and a fleet refused together must not come back together.

use std::time::Duration;

use rand::Rng;

pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        jitter(self.min, cap)
    }

    pub fn refused(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        jitter(self.max / 2, self.max)
    }
}

fn jitter(low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    rand::thread_rng().gen_range(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let caps = [1, 2, 4, 8, 16, 32, 60, 60, 60];
        for cap in caps {
            let delay = backoff.next_delay();
            assert!(
                delay >= Duration::from_secs(1) && delay <= Duration::from_secs(cap),
                "{delay:?} > {cap}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
        for _ in 0..20 {
            let delay = backoff.refused();
            assert!(delay >= Duration::from_secs(30) && delay <= Duration::from_secs(60));
        }
    }
}
