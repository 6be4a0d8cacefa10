//! TEMPORARY until the report and template branches merge.
use std::time::Duration;
#[derive(Clone, Default)]
pub struct LatencyHistogram(Vec<u64>);
impl LatencyHistogram {
    pub fn new() -> Self { Self::default() }
    pub fn record(&mut self, d: Duration) { self.0.push(d.as_micros() as u64) }
    pub fn percentile_ms(&self, q: f64) -> f64 { let mut v = self.0.clone(); v.sort(); if v.is_empty() {0.0} else { v[((v.len()-1) as f64 * q / 100.0) as usize] as f64 / 1000.0 } }
}
pub struct Template;
