//! The simulated cellular link reported in `properties.reported.connectivity`: signal
//! strength drifting over time, the radio technology and the operator.
//!
//! It is reported on every connect and again only when it changes meaningfully: the signal
//! moves by 6 dBm or more from the last reported value, or its quality band changes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const WEAKEST_DBM: i32 = -115;
const STRONGEST_DBM: i32 = -55;
/// A change smaller than this is not worth a reported-properties update.
const MEANINGFUL_DBM: i32 = 6;

pub struct Cellular {
    rng: StdRng,
    operator: String,
    technology: String,
    signal_dbm: i32,
    last_reported: Option<i32>,
}

fn quality(dbm: i32) -> &'static str {
    match dbm {
        d if d >= -75 => "excellent",
        d if d >= -90 => "good",
        d if d >= -105 => "fair",
        _ => "poor",
    }
}

impl Cellular {
    pub fn new(seed: Option<u64>, operator: &str, technology: &str) -> Cellular {
        let mut rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ 0x5eed_ce11),
            None => StdRng::from_entropy(),
        };
        Cellular {
            signal_dbm: rng.gen_range(-95..=-70),
            rng,
            operator: operator.to_string(),
            technology: technology.to_string(),
            last_reported: None,
        }
    }

    /// Moves the signal by a few dBm.
    pub fn drift(&mut self) {
        self.signal_dbm =
            (self.signal_dbm + self.rng.gen_range(-3..=3)).clamp(WEAKEST_DBM, STRONGEST_DBM);
    }

    /// The reported-properties patch, now, and remembers it as reported.
    pub fn report(&mut self) -> Value {
        self.last_reported = Some(self.signal_dbm);
        json!({"connectivity": {
            "type": "cellular",
            "operator": self.operator,
            "technology": self.technology,
            "signalStrengthDbm": self.signal_dbm,
            "signalQuality": quality(self.signal_dbm),
        }})
    }

    /// The patch if the link changed meaningfully since it was last reported.
    pub fn report_if_changed(&mut self) -> Option<Value> {
        match self.last_reported {
            Some(last)
                if (self.signal_dbm - last).abs() < MEANINGFUL_DBM
                    && quality(last) == quality(self.signal_dbm) =>
            {
                None
            }
            _ => Some(self.report()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_meaningful_changes() {
        let mut link = Cellular::new(Some(1), "Contoso Mobile", "LTE-M");
        let first = link.report();
        assert_eq!(first["connectivity"]["type"], "cellular");
        assert_eq!(link.report_if_changed(), None, "nothing moved yet");
        let mut reports = 0;
        for _ in 0..500 {
            link.drift();
            if let Some(report) = link.report_if_changed() {
                reports += 1;
                let dbm = report["connectivity"]["signalStrengthDbm"]
                    .as_i64()
                    .unwrap();
                assert!((-115..=-55).contains(&dbm));
            }
        }
        assert!(reports > 0 && reports < 500, "{reports}");
    }
}
