//! What a running fleet says about itself: on a terminal, one live line redrawn in place each
//! second; otherwise (a log file, a pod's stdout), one plain log line every 10 s.

use std::io::Write;
use std::time::{Duration, Instant};

use super::run::{FleetView, Snapshot};

/// Between two log lines when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    terminal: bool,
    last: Option<(Instant, u64)>,
    last_log: Option<Instant>,
    drawn: bool,
}

impl Progress {
    pub fn new(terminal: bool) -> Progress {
        Progress {
            terminal,
            last: None,
            last_log: None,
            drawn: false,
        }
    }

    /// Called once a second by the fleet.
    pub fn tick(&mut self, view: &FleetView) {
        let now = Instant::now();
        let snapshot = view.snapshot();
        let rate = match self.last {
            Some((at, sent)) => {
                let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                snapshot.readings_sent.saturating_sub(sent) as f64 / secs
            }
            None => 0.0,
        };
        self.last = Some((now, snapshot.readings_sent));
        let p99 = view.latency_percentile_ms(99.0);
        let line = line(&snapshot, rate, p99);
        if self.terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K{line}");
            let _ = err.flush();
            self.drawn = true;
        } else if self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            self.last_log = Some(now);
            tracing::info!(target: "simdevice::fleet", "{line}");
        }
    }

    /// Ends the live line so that what follows starts on its own line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// `connected 9800/10000, 980.0 readings/s, 120345 acknowledged, 3 errors, p99 ack 4.1 ms`
/// (`p99 ack -` before the first acknowledgement).
pub fn line(s: &Snapshot, readings_per_s: f64, p99_ms: Option<f64>) -> String {
    let p99 = p99_ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms"));
    format!(
        "connected {}/{}, {:.1} readings/s, {} acknowledged, {} errors, p99 ack {p99}",
        s.connected_now,
        s.target,
        readings_per_s,
        s.readings_acknowledged,
        s.error_total(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_what_the_issue_asks() {
        let mut s = Snapshot {
            target: 10,
            connected_now: 9,
            readings_acknowledged: 42,
            ..Snapshot::default()
        };
        s.errors.insert("connect_refused".into(), 2);
        assert_eq!(
            line(&s, 12.34, Some(4.06)),
            "connected 9/10, 12.3 readings/s, 42 acknowledged, 2 errors, p99 ack 4.1 ms"
        );
    }
}
