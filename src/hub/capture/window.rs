//! The capture window: messages gathered until the window closes on time or on size, whichever
//! comes first ("first wins", as on Azure). Pure: the caller passes the clock in.

use std::time::Duration;

use tokio::time::Instant;

use super::format::Captured;

/// When a window closes, and whether an empty one is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowRules {
    pub max_age: Duration,
    pub max_bytes: u64,
    pub skip_empty: bool,
}

#[derive(Debug)]
pub struct Window {
    opened: Instant,
    messages: Vec<Captured>,
    bytes: u64,
}

impl Window {
    pub fn open(now: Instant) -> Window {
        Window {
            opened: now,
            messages: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds a message; true when the window is now at its size limit and must close.
    pub fn push(&mut self, message: Captured, rules: &WindowRules) -> bool {
        self.bytes += message.size() as u64;
        self.messages.push(message);
        self.bytes >= rules.max_bytes
    }

    /// When the window closes on time.
    pub fn deadline(&self, rules: &WindowRules) -> Instant {
        self.opened + rules.max_age
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Whether closing this window writes a file: always when it has messages; an empty one
    /// only when empty archives are not skipped.
    pub fn writes_file(&self, rules: &WindowRules) -> bool {
        !self.messages.is_empty() || !rules.skip_empty
    }

    pub fn messages(&self) -> &[Captured] {
        &self.messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::capture::format::tests::sample;

    const RULES: WindowRules = WindowRules {
        max_age: Duration::from_secs(300),
        max_bytes: 100,
        skip_empty: false,
    };

    #[test]
    fn a_window_closes_on_size_when_that_comes_first() {
        let mut window = Window::open(Instant::now());
        let small = sample(1, "x");
        let size = small.size() as u64;
        let mut full = false;
        let mut n = 0;
        while !full {
            n += 1;
            full = window.push(sample(n, "x"), &RULES);
        }
        assert_eq!(n, RULES.max_bytes.div_ceil(size));
        assert_eq!(window.len(), n as usize);
    }

    #[test]
    fn a_window_closes_on_time_from_when_it_opened() {
        let now = Instant::now();
        let window = Window::open(now);
        assert_eq!(window.deadline(&RULES), now + Duration::from_secs(300));
    }

    #[test]
    fn empty_windows_are_written_unless_skipped() {
        let window = Window::open(Instant::now());
        assert!(window.writes_file(&RULES));
        let skip = WindowRules {
            skip_empty: true,
            ..RULES
        };
        assert!(!window.writes_file(&skip));
        let mut full = Window::open(Instant::now());
        full.push(sample(1, "x"), &skip);
        assert!(full.writes_file(&skip));
    }
}
