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

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);
    /// Draws per attempt: enough that a law broken on purpose (no growth, no jitter, the wrong
    /// bounds) fails every time; the checks on the spread of the draws below would fail by
    /// chance with a probability under 1e-20.
    const DRAWS: usize = 4000;

    /// The upper bound the law gives attempt `n` (counted from 0).
    fn cap(n: u32) -> Duration {
        MIN.saturating_mul(1 << n).min(MAX)
    }

    /// `DRAWS` waits of attempt `n`, each from a new backoff that failed `n` times before.
    fn waits_of_attempt(n: u32) -> Vec<Duration> {
        (0..DRAWS)
            .map(|_| {
                let mut backoff = Backoff::new(MIN, MAX);
                for _ in 0..n {
                    backoff.next_delay();
                }
                backoff.next_delay()
            })
            .collect()
    }

    /// Asserts that `waits` lie in `[low, high]` and spread over it as uniform draws do: the
    /// lowest and highest near the ends, the mean near the middle.
    fn assert_uniform(what: &str, waits: &[Duration], low: Duration, high: Duration) {
        let secs: Vec<f64> = waits.iter().map(Duration::as_secs_f64).collect();
        let (low, high) = (low.as_secs_f64(), high.as_secs_f64());
        let least = secs.iter().copied().fold(f64::INFINITY, f64::min);
        let most = secs.iter().copied().fold(0.0, f64::max);
        let mean = secs.iter().sum::<f64>() / secs.len() as f64;
        let width = high - low;
        assert!(
            least >= low && most <= high,
            "{what}: waits from {least} s to {most} s, outside [{low}, {high}]"
        );
        // For n uniform draws, P(none in the lowest 1% of the range) = 0.99^4000 < 1e-17; the
        // standard deviation of the mean is width / sqrt(12 n) < width / 200, so 5% is 10 of them.
        assert!(
            least <= low + width / 100.0 && most >= high - width / 100.0,
            "{what}: waits from {least} s to {most} s do not cover [{low}, {high}]"
        );
        assert!(
            (mean - (low + high) / 2.0).abs() <= width / 20.0,
            "{what}: mean wait {mean} s, far from the middle of [{low}, {high}]"
        );
    }

    #[test]
    fn attempt_n_waits_uniformly_between_min_and_min_times_two_to_the_n_up_to_max() {
        // Attempt 0 has nothing to spread over: it waits the floor.
        assert!(waits_of_attempt(0).iter().all(|&wait| wait == MIN));
        for n in 1..=8 {
            let waits = waits_of_attempt(n);
            assert_uniform(&format!("attempt {n}"), &waits, MIN, cap(n));
            // The envelope grows until the cap: attempt n waits longer than attempt n-1 could.
            let longest = *waits.iter().max().unwrap();
            if cap(n) > cap(n - 1) {
                assert!(
                    longest > cap(n - 1),
                    "attempt {n}: the longest wait {longest:?} is within attempt {}'s bound",
                    n - 1
                );
            }
        }
        assert_eq!(
            cap(6),
            MAX,
            "the cap is reached within the attempts checked"
        );
    }

    #[test]
    fn the_attempt_count_saturates_without_overflow() {
        let mut backoff = Backoff::new(MIN, MAX);
        for _ in 0..100 {
            let wait = backoff.next_delay();
            assert!((MIN..=MAX).contains(&wait), "{wait:?}");
        }
    }

    #[test]
    fn reset_starts_again_at_the_floor() {
        let mut backoff = Backoff::new(MIN, MAX);
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.next_delay(), MIN);
    }

    #[test]
    fn an_authorization_refusal_waits_between_half_the_cap_and_the_cap() {
        // Whatever the attempt: the first refusal, and refusals after many failures.
        let first: Vec<Duration> = (0..DRAWS)
            .map(|_| Backoff::new(MIN, MAX).refused())
            .collect();
        assert_uniform("first refusal", &first, MAX / 2, MAX);
        let mut backoff = Backoff::new(MIN, MAX);
        let later: Vec<Duration> = (0..DRAWS).map(|_| backoff.refused()).collect();
        assert_uniform("later refusals", &later, MAX / 2, MAX);
    }

    #[test]
    fn a_cap_below_the_floor_is_raised_to_the_floor() {
        let mut backoff = Backoff::new(MIN, MIN / 2);
        for _ in 0..10 {
            assert_eq!(backoff.next_delay(), MIN);
        }
    }
}
