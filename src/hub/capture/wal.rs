//! The capture write-ahead log: each message is appended (one `write`, no fsync: it must
//! survive a kill of the process, not a power cut) before the device gets its PUBACK, in
//! numbered segment files under `STATE/capture/`. A segment is deleted once every message in it
//! is in a published file; what is left at start is read back. Touches only that directory.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::format::Captured;
use crate::hub::telemetry::Event;
use crate::protocol::property_bag::PropertyBag;

#[derive(Debug, thiserror::Error)]
#[error("cannot use the capture write-ahead log in {path}")]
pub struct WalError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub struct Wal {
    dir: PathBuf,
    segment: u64,
    file: File,
}

/// One line of a segment.
#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    device: String,
    /// RFC 3339 with nanoseconds.
    time: String,
    /// The property bag in its topic form.
    props: String,
    gen: String,
    /// Base64.
    body: String,
}

/// In the log's directory: the highest sequence number in a published file, so that a
/// restarted hub numbers on from there (Event Hubs sequence numbers only grow in a partition).
const LAST_SEQUENCE: &str = "last-sequence";

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("wal-{n:020}.log"))
}

fn segment_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

impl Wal {
    /// Opens the log in `dir` (created if needed): returns it, writing to a new segment, and the
    /// messages of the segments already there, oldest first.
    pub fn open(dir: &Path) -> Result<(Wal, Vec<Captured>), WalError> {
        let err = |source| WalError {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(err)?
            .filter_map(|e| e.ok())
            .filter_map(|e| segment_number(&e.path()).map(|n| (n, e.path())))
            .collect();
        segments.sort();
        let mut recovered = Vec::new();
        for (_, path) in &segments {
            read_segment(path, &mut recovered).map_err(|source| WalError {
                path: path.clone(),
                source,
            })?;
        }
        let next = segments.last().map_or(0, |(n, _)| n + 1);
        let file = create_segment(dir, next)?;
        Ok((
            Wal {
                dir: dir.to_owned(),
                segment: next,
                file,
            },
            recovered,
        ))
    }

    /// The highest sequence number published so far (0 when none).
    pub fn last_published(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(LAST_SEQUENCE))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records `sequence` as the highest published one: a temporary file, then a rename.
    pub fn mark_published(&self, sequence: u64) -> std::io::Result<()> {
        let temp = self.dir.join(format!(".{LAST_SEQUENCE}.tmp"));
        std::fs::write(&temp, format!("{sequence}\n"))?;
        std::fs::rename(&temp, self.dir.join(LAST_SEQUENCE))
    }

    /// Appends one message; returns the segment it is in.
    pub fn append(&mut self, message: &Captured) -> std::io::Result<u64> {
        let event = &message.event;
        let line = Line {
            seq: event.sequence_number,
            device: event.device_id.to_string(),
            time: event
                .enqueued_time
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            props: event.properties.format(),
            gen: message.generation_id.clone(),
            body: base64::engine::general_purpose::STANDARD.encode(&event.body),
        };
        let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        // One write call: a killed process leaves the line whole or absent.
        self.file.write_all(&text)?;
        Ok(self.segment)
    }

    /// Starts the next segment; returns its number.
    pub fn rotate(&mut self) -> Result<u64, WalError> {
        let next = self.segment + 1;
        self.file = create_segment(&self.dir, next)?;
        self.segment = next;
        Ok(next)
    }

    /// Deletes every segment numbered below `segment`.
    pub fn remove_before(&self, segment: u64) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if segment_number(&path).is_some_and(|n| n < segment) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

fn create_segment(dir: &Path, n: u64) -> Result<File, WalError> {
    let path = segment_path(dir, n);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| WalError { path, source })
}

fn read_segment(path: &Path, out: &mut Vec<Captured>) -> std::io::Result<()> {
    let reader = std::io::BufReader::new(File::open(path)?);
    for (index, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match decode(&line) {
            Some(message) => out.push(message),
            // Only a power cut leaves a partial line; it was never acknowledged whole.
            None => {
                tracing::warn!(path = %path.display(), line = index + 1, "unreadable capture log line skipped")
            }
        }
    }
    Ok(())
}

fn decode(line: &[u8]) -> Option<Captured> {
    let line: Line = serde_json::from_slice(line).ok()?;
    let time = chrono::DateTime::parse_from_rfc3339(&line.time).ok()?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(&line.body)
        .ok()?;
    Some(Captured {
        event: Event {
            sequence_number: line.seq,
            device_id: Arc::from(line.device),
            enqueued_time: time.with_timezone(&chrono::Utc),
            properties: PropertyBag::parse(&line.props).ok()?,
            body: body.into(),
        },
        generation_id: line.gen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::capture::format::tests::sample;

    #[test]
    fn what_was_appended_and_not_removed_is_read_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, recovered) = Wal::open(dir.path()).unwrap();
        assert!(recovered.is_empty());
        assert_eq!(wal.append(&sample(1, "a")).unwrap(), 0);
        let next = wal.rotate().unwrap();
        assert_eq!(wal.append(&sample(2, "b")).unwrap(), next);
        wal.remove_before(next).unwrap();
        drop(wal);
        let (mut wal, recovered) = Wal::open(dir.path()).unwrap();
        assert_eq!(recovered.len(), 1);
        let back = &recovered[0].event;
        let want = sample(2, "b");
        assert_eq!(back.sequence_number, 2);
        assert_eq!(back.body, want.event.body);
        assert_eq!(back.enqueued_time, want.event.enqueued_time);
        assert_eq!(back.properties.format(), want.event.properties.format());
        assert_eq!(recovered[0].generation_id, want.generation_id);
        // The recovered segment goes once its window is published.
        let next = wal.rotate().unwrap();
        wal.remove_before(next).unwrap();
        drop(wal);
        assert!(Wal::open(dir.path()).unwrap().1.is_empty());
    }

    #[test]
    fn a_partial_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.append(&sample(1, "a")).unwrap();
        wal.file.write_all(b"{\"seq\":2,\"dev").unwrap();
        drop(wal);
        assert_eq!(Wal::open(dir.path()).unwrap().1.len(), 1);
    }
}
