//! The capture window: messages gathered until the window closes on time or on size, whichever
//! comes first ("first wins", as on Azure), encoded into its file as they come. Pure: the
//! caller passes the clock in.

use std::time::Duration;

use tokio::time::Instant;

use super::format::{self, Captured, Codec, Encoding, FileWriter, Format};

/// When a window closes, and whether an empty one is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowRules {
    pub max_age: Duration,
    pub max_bytes: u64,
    pub skip_empty: bool,
}

/// The open window: its file being written ([`FileWriter`]), and what closing it needs.
pub struct Window {
    opened: Instant,
    file: FileWriter,
    messages: u64,
    bytes: u64,
    /// The last message's sequence number in its partition.
    last_sequence: Option<i64>,
}

/// A closed window, ready to publish.
pub struct Closed {
    /// The whole file; `None` when the window was empty and empty archives are skipped.
    pub file: Option<Vec<u8>>,
    pub messages: u64,
    /// The last message's sequence number (`None` when empty).
    pub last_sequence: Option<i64>,
}

impl Window {
    pub fn open(now: Instant, format: Format, codec: Codec, encoding: Encoding) -> Window {
        Window {
            opened: now,
            file: FileWriter::new(format, codec, encoding),
            messages: 0,
            bytes: 0,
            last_sequence: None,
        }
    }

    /// Adds a message; true when the window is now at its size limit and must close.
    pub fn push(&mut self, message: &Captured, rules: &WindowRules) -> bool {
        self.file.append(message);
        self.messages += 1;
        self.bytes += format::size(message) as u64;
        self.last_sequence = Some(message.record.sequence_number);
        self.bytes >= rules.max_bytes
    }

    /// When the window closes on time.
    pub fn deadline(&self, rules: &WindowRules) -> Instant {
        self.opened + rules.max_age
    }

    pub fn len(&self) -> u64 {
        self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Closes the window: its file, unless it is empty and empty archives are skipped (an
    /// empty JSON file has no bytes at all, so it is never written).
    pub fn close(self, rules: &WindowRules) -> Closed {
        let file = if self.messages > 0 || !rules.skip_empty {
            Some(self.file.finish()).filter(|bytes| !bytes.is_empty())
        } else {
            None
        };
        Closed {
            file,
            messages: self.messages,
            last_sequence: self.last_sequence,
        }
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

    fn open() -> Window {
        Window::open(
            Instant::now(),
            Format::EventHubs,
            Codec::Null,
            Encoding::Avro,
        )
    }

    #[test]
    fn a_window_closes_on_size_when_that_comes_first() {
        let mut window = open();
        let size = format::size(&sample(1, "x")) as u64;
        let mut full = false;
        let mut n = 0;
        while !full {
            n += 1;
            full = window.push(&sample(n, "x"), &RULES);
        }
        assert_eq!(n, RULES.max_bytes.div_ceil(size));
        assert_eq!(window.len(), n);
        let closed = window.close(&RULES);
        assert_eq!(closed.messages, n);
        assert_eq!(closed.last_sequence, Some(n as i64));
        let records = apache_avro::Reader::new(&closed.file.unwrap()[..])
            .unwrap()
            .count();
        assert_eq!(records as u64, n);
    }

    #[test]
    fn a_window_closes_on_time_from_when_it_opened() {
        let now = Instant::now();
        let window = Window::open(now, Format::IotHub, Codec::Deflate, Encoding::Avro);
        assert_eq!(window.deadline(&RULES), now + Duration::from_secs(300));
    }

    #[test]
    fn empty_windows_are_written_unless_skipped() {
        let written = open().close(&RULES);
        assert_eq!(written.messages, 0);
        assert!(
            written.file.is_some_and(|f| !f.is_empty()),
            "a header-only file"
        );
        let skip = WindowRules {
            skip_empty: true,
            ..RULES
        };
        assert!(open().close(&skip).file.is_none());
        let mut one = open();
        one.push(&sample(1, "x"), &skip);
        assert!(one.close(&skip).file.is_some());
    }
}
