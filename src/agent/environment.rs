//! The simulated environment sensor: temperature, humidity and UV as a slow random walk
//! around a daily cycle, always within the configured bounds, reproducible from a seed.
//!
//! Each quantity is `centre + daily swing + drift`: the swing follows the hour of the day
//! (warmest and brightest mid-afternoon), the drift is a mean-reverting random walk. Pure: the
//! caller passes the time, so tests need no clock.

use chrono::{DateTime, Timelike, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One quantity's bounds and state.
#[derive(Clone, Debug)]
struct Walk {
    min: f64,
    max: f64,
    drift: f64,
}

impl Walk {
    fn new(range: (f64, f64)) -> Walk {
        Walk {
            min: range.0,
            max: range.1,
            drift: 0.0,
        }
    }

    /// The next value: `phase` in -1..=1 is where the day puts it.
    fn step(&mut self, rng: &mut StdRng, phase: f64) -> f64 {
        let span = self.max - self.min;
        // Mean-reverting: each step forgets 5 % of the drift and adds noise of 2 % of the span.
        self.drift = self.drift * 0.95 + rng.gen_range(-0.02..=0.02) * span;
        self.drift = self.drift.clamp(-0.25 * span, 0.25 * span);
        let centre = self.min + span / 2.0;
        (centre + phase * 0.25 * span + self.drift).clamp(self.min, self.max)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnvironmentReading {
    pub temperature: i64,
    pub humidity: i64,
    pub uv: f64,
}

pub struct Environment {
    rng: StdRng,
    temperature: Walk,
    humidity: Walk,
    uv: Walk,
}

impl Environment {
    pub fn new(
        seed: Option<u64>,
        temperature: (f64, f64),
        humidity: (f64, f64),
        uv: (f64, f64),
    ) -> Environment {
        Environment {
            rng: match seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_entropy(),
            },
            temperature: Walk::new(temperature),
            humidity: Walk::new(humidity),
            uv: Walk::new(uv),
        }
    }

    pub fn read(&mut self, now: DateTime<Utc>) -> EnvironmentReading {
        let hour = f64::from(now.hour()) + f64::from(now.minute()) / 60.0;
        // Peaks at 15:00, lowest at 03:00.
        let day = ((hour - 9.0) / 24.0 * std::f64::consts::TAU).sin();
        let temperature = self.temperature.step(&mut self.rng, day);
        // Air is dampest when it is coolest.
        let humidity = self.humidity.step(&mut self.rng, -day);
        let uv = self.uv.step(&mut self.rng, day);
        EnvironmentReading {
            temperature: temperature.round() as i64,
            humidity: humidity.round() as i64,
            uv: (uv * 1000.0).round() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(seed: u64) -> Environment {
        Environment::new(Some(seed), (70.0, 100.0), (70.0, 100.0), (0.0, 1.0))
    }

    #[test]
    fn readings_stay_in_bounds_and_repeat_with_a_seed() {
        let mut a = env(7);
        let mut b = env(7);
        let start = Utc::now();
        for i in 0..5000 {
            let now = start + chrono::Duration::minutes(i);
            let reading = a.read(now);
            assert_eq!(reading, b.read(now));
            assert!((70..=100).contains(&reading.temperature), "{reading:?}");
            assert!((70..=100).contains(&reading.humidity), "{reading:?}");
            assert!((0.0..=1.0).contains(&reading.uv), "{reading:?}");
        }
    }

    #[test]
    fn it_is_warmer_in_the_afternoon_than_at_night() {
        let mut e = env(1);
        let day = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
        let at = |h| day.and_hms_opt(h, 0, 0).unwrap().and_utc();
        let mut afternoon = 0;
        let mut night = 0;
        for _ in 0..200 {
            afternoon += e.read(at(15)).temperature;
            night += e.read(at(3)).temperature;
        }
        assert!(afternoon > night + 200 * 5, "{afternoon} vs {night}");
    }

    #[test]
    fn consecutive_readings_move_slowly() {
        let mut e = env(3);
        let now = Utc::now();
        let mut last = e.read(now).temperature;
        for _ in 0..1000 {
            let next = e.read(now).temperature;
            assert!((next - last).abs() <= 3, "{last} -> {next}");
            last = next;
        }
    }
}
