//! The on-disk form of one partition: append-only segment files of length-prefixed records.
//!
//! A partition's directory holds files named by the offset of their first record
//! (`00000000000000000000.log`); a record's offset is its byte position in the partition's
//! whole log (the segment's base plus the position in the file), as Event Hubs offsets are.
//! A record is `u32 length`, `u32 checksum` (FNV-1a of the payload), then the payload; every
//! integer little-endian. Reading stops at the first record that is cut short or whose checksum
//! does not match (a write torn by a crash), and the file is truncated there, so appending goes
//! on after the last whole record.
//!
//! No fsync: a record is in the kernel's page cache when `append` returns, so it survives the
//! hub's crash or restart but not a power cut.
//! A payload is the record's fields in order, each string or byte field as `u32 length` + bytes,
//! then one byte: the event's source ([`Source`]) in its low four bits, how the device
//! authenticated ([`AuthMethod`]) in its high four. A payload written before that byte existed
//! ends after the body and decodes as telemetry from a SAS device; one written before the
//! authentication bits existed has them zero, which is SAS, what every device was then.
//!
//! This module knows files and bytes only: no locks, no clocks, no hub state.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::property_bag::PropertyBag;

/// Header bytes before a record's payload: length and checksum.
pub const HEADER: u64 = 8;
/// A record's payload may not be larger (a message is at most 256 KB plus its properties).
const MAX_PAYLOAD: u32 = 4 * 1024 * 1024;

/// Where an event comes from: IoT Hub's `iothub-message-source` annotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Source {
    /// A device-to-cloud message.
    #[default]
    Telemetry,
    /// A change of a twin's reported or desired properties or tags (`twinChangeEvents`).
    TwinChange,
    /// A device created or deleted (`deviceLifecycleEvents`).
    DeviceLifecycle,
}

impl Source {
    /// The value of `iothub-message-source`, as IoT Hub writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Telemetry => "Telemetry",
            Source::TwinChange => "twinChangeEvents",
            Source::DeviceLifecycle => "deviceLifecycleEvents",
        }
    }

    fn code(self) -> u8 {
        match self {
            Source::Telemetry => 0,
            Source::TwinChange => 1,
            Source::DeviceLifecycle => 2,
        }
    }

    fn from_code(code: u8) -> Option<Source> {
        match code {
            0 => Some(Source::Telemetry),
            1 => Some(Source::TwinChange),
            2 => Some(Source::DeviceLifecycle),
            _ => None,
        }
    }
}

/// How the device that sent an event authenticated its connection: what IoT Hub's
/// `iothub-connection-auth-method` says. Hub-made events (twin changes) keep the default; no
/// reader shows it for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// A SAS token signed with the device's own key.
    #[default]
    Sas,
    /// An X.509 certificate matched by its thumbprint (a `selfSigned` device).
    SelfSigned,
    /// An X.509 certificate that chains to a CA the hub holds (a `certificateAuthority`
    /// device).
    CertificateAuthority,
}

impl AuthMethod {
    /// The value of `iothub-connection-auth-method` (capture's `connectionAuthMethod`), as IoT
    /// Hub writes it. A real hub stamps a CA-signed device's messages
    /// `"type":"x509Certificate","issuer":"external"` (seen from Azure Sphere devices, which
    /// register through a CA enrollment group); no capture of a thumbprint device's message was
    /// found, so it gets the same X.509 stamp. Microsoft's page on message properties gives
    /// only the outline (`"type": "{ symkey | sas | x509 }"`).
    pub fn as_json(self) -> &'static str {
        match self {
            AuthMethod::Sas => {
                r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
            }
            AuthMethod::SelfSigned | AuthMethod::CertificateAuthority => {
                r#"{"scope":"device","type":"x509Certificate","issuer":"external","acceptingIpFilterRule":null}"#
            }
        }
    }

    fn code(self) -> u8 {
        match self {
            AuthMethod::Sas => 0,
            AuthMethod::SelfSigned => 1,
            AuthMethod::CertificateAuthority => 2,
        }
    }

    fn from_code(code: u8) -> Option<AuthMethod> {
        match code {
            0 => Some(AuthMethod::Sas),
            1 => Some(AuthMethod::SelfSigned),
            2 => Some(AuthMethod::CertificateAuthority),
            _ => None,
        }
    }
}

/// One event as stored: what the hub accepted and the stamps it gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub source: Source,
    /// How the sending device authenticated (telemetry only).
    pub auth: AuthMethod,
    pub sequence_number: i64,
    /// Milliseconds since the Unix epoch.
    pub enqueued_ms: i64,
    pub device_id: Arc<str>,
    pub generation_id: Arc<str>,
    pub properties: PropertyBag,
    pub body: Bytes,
}

impl Record {
    /// A record not yet numbered: its sequence number is given when it is appended.
    pub fn new(
        source: Source,
        auth: AuthMethod,
        device_id: Arc<str>,
        generation_id: Arc<str>,
        properties: PropertyBag,
        body: Bytes,
        enqueued_time: chrono::DateTime<chrono::Utc>,
    ) -> Record {
        Record {
            source,
            auth,
            sequence_number: 0,
            enqueued_ms: enqueued_time.timestamp_millis(),
            device_id,
            generation_id,
            properties,
            body,
        }
    }

    /// The payload bytes (without the header).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// The record as the log stores it, header (length, checksum) and payload in one buffer.
    #[cfg(test)]
    pub fn framed(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.frame_into(&mut out);
        out
    }

    /// Appends the record as the log stores it to `out`: the records of one append share a
    /// buffer, so that the append is one `write`.
    pub fn frame_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER as usize]);
        self.encode_into(out);
        let payload = start + HEADER as usize;
        let payload_len = out.len() - payload;
        let checksum = fnv1a(&out[payload..]);
        out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        out[start + 4..payload].copy_from_slice(&checksum.to_le_bytes());
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let props = self.properties.format();
        out.reserve(
            33 + self.device_id.len() + self.generation_id.len() + props.len() + self.body.len(),
        );
        out.extend_from_slice(&self.sequence_number.to_le_bytes());
        out.extend_from_slice(&self.enqueued_ms.to_le_bytes());
        put_bytes(out, self.device_id.as_bytes());
        put_bytes(out, self.generation_id.as_bytes());
        put_bytes(out, props.as_bytes());
        put_bytes(out, &self.body);
        out.push(self.source.code() | (self.auth.code() << 4));
    }

    /// The record of `payload`, or `None` when it is not one this module wrote.
    pub fn decode(payload: &[u8]) -> Option<Record> {
        let mut cursor = payload;
        let sequence_number = i64::from_le_bytes(take(&mut cursor, 8)?.try_into().ok()?);
        let enqueued_ms = i64::from_le_bytes(take(&mut cursor, 8)?.try_into().ok()?);
        let device_id = std::str::from_utf8(take_bytes(&mut cursor)?).ok()?;
        let generation_id = std::str::from_utf8(take_bytes(&mut cursor)?).ok()?;
        let props = std::str::from_utf8(take_bytes(&mut cursor)?).ok()?;
        let body = take_bytes(&mut cursor)?;
        // No trailing byte: a record from before it existed, telemetry from a SAS device.
        let (source, auth) = match cursor {
            [] => (Source::Telemetry, AuthMethod::Sas),
            [byte] => (
                Source::from_code(byte & 0x0f)?,
                AuthMethod::from_code(byte >> 4)?,
            ),
            _ => return None,
        };
        Some(Record {
            source,
            auth,
            sequence_number,
            enqueued_ms,
            device_id: Arc::from(device_id),
            generation_id: Arc::from(generation_id),
            properties: PropertyBag::parse(props).ok()?,
            body: Bytes::copy_from_slice(body),
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(cursor: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if cursor.len() < n {
        return None;
    }
    let (head, rest) = cursor.split_at(n);
    *cursor = rest;
    Some(head)
}

fn take_bytes<'a>(cursor: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_le_bytes(take(cursor, 4)?.try_into().ok()?) as usize;
    take(cursor, len)
}

/// FNV-1a, 32 bits: enough to tell a torn write from a whole record.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The file name of the segment whose first record is at `base_offset`.
pub fn file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

/// The segments of a partition directory, oldest first, as (base offset, path).
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(base) = base {
            segments.push((base, path));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Reads every whole record of one segment, with its offset; truncates a torn tail. Returns
/// the records and the file's length after that.
pub fn read(path: &Path, base_offset: u64) -> io::Result<(Records, u64)> {
    let (records, position, len) = read_records(path, base_offset)?;
    if position < len {
        tracing::warn!(
            file = %path.display(),
            kept = position,
            cut = len - position,
            "event segment ends in a partial record (a torn write); truncating it"
        );
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(position)?;
    }
    Ok((records, position))
}

/// Every whole record of one segment, with its offset, leaving the file as it is (it may be
/// the one being appended to: a record being written is not read yet).
pub fn read_only(path: &Path, base_offset: u64) -> io::Result<Records> {
    Ok(read_records(path, base_offset)?.0)
}

/// A segment's whole records with their offsets.
type Records = Vec<(u64, Record)>;

/// The whole records, the position after the last one, and the file's length.
fn read_records(path: &Path, base_offset: u64) -> io::Result<(Records, u64, u64)> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut position = 0usize;
    while let Some((record, next)) = read_one(&bytes, position) {
        records.push((base_offset + position as u64, record));
        position = next;
    }
    Ok((records, position as u64, bytes.len() as u64))
}

fn read_one(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let header = bytes.get(at..at + HEADER as usize)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?);
    let checksum = u32::from_le_bytes(header[4..8].try_into().ok()?);
    if len > MAX_PAYLOAD {
        return None;
    }
    let start = at + HEADER as usize;
    let payload = bytes.get(start..start + len as usize)?;
    if fnv1a(payload) != checksum {
        return None;
    }
    Some((Record::decode(payload)?, start + len as usize))
}

/// The segment being appended to.
pub struct Writer {
    file: File,
    pub base_offset: u64,
    /// Bytes in the file: the next record's position.
    pub len: u64,
}

impl Writer {
    /// Opens (creating) the segment at `base_offset` for appending after `len` bytes.
    pub fn open(dir: &Path, base_offset: u64, len: u64) -> io::Result<Writer> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(file_name(base_offset)))?;
        Ok(Writer {
            file,
            base_offset,
            len,
        })
    }

    /// Begins a new segment at `base_offset` ([`Writer::open`] goes on with the last one at
    /// start). A file of that name can only be what a failed first write left of a segment
    /// begun at the same offset (a torn record, nothing whole): it is emptied, so that the
    /// records written now are not read back behind it.
    pub fn create(dir: &Path, base_offset: u64) -> io::Result<Writer> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dir.join(file_name(base_offset)))?;
        Ok(Writer {
            file,
            base_offset,
            len: 0,
        })
    }

    /// A writer over a file already open (tests: a disk that refuses writes).
    #[cfg(test)]
    pub fn over(file: File, base_offset: u64, len: u64) -> Writer {
        Writer {
            file,
            base_offset,
            len,
        }
    }

    /// Appends records framed by [`Record::frame_into`] in one `write` (more only when the
    /// kernel takes part of it). Returns how many bytes the file took, and the error that
    /// stopped it before the end: the records wholly in those bytes are on disk, a record cut
    /// by the error is a torn tail that [`read`] cuts.
    pub fn append_frames(&mut self, frames: &[u8]) -> (u64, Option<io::Error>) {
        let mut written = 0;
        let error = loop {
            if written == frames.len() {
                break None;
            }
            match self.file.write(&frames[written..]) {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        self.len += written as u64;
        (written as u64, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64) -> Record {
        let mut properties = PropertyBag::new();
        properties.insert("$.mid", "m&1");
        properties.insert("unit", "°C");
        Record {
            source: Source::Telemetry,
            auth: AuthMethod::Sas,
            sequence_number: seq,
            enqueued_ms: 1_700_000_000_000 + seq,
            device_id: Arc::from("dev-1"),
            generation_id: Arc::from("638"),
            properties,
            body: Bytes::from_static(b"{\"t\":21.5}"),
        }
    }

    #[test]
    fn records_round_trip_through_a_segment_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer::open(dir.path(), 100, 0).unwrap();
        let mut frames = record(0).framed();
        let first_len = frames.len() as u64;
        record(1).frame_into(&mut frames);
        let (written, error) = writer.append_frames(&frames);
        assert!(error.is_none());
        assert_eq!(written, frames.len() as u64);
        let whole = writer.len;
        // A crash in the middle of a third write.
        let torn = record(2).framed();
        writer.file.write_all(&torn[..torn.len() / 2]).unwrap();

        let path = dir.path().join(file_name(100));
        let (records, len) = read(&path, 100).unwrap();
        assert_eq!(len, whole);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        assert_eq!(
            records,
            vec![(100, record(0)), (100 + first_len, record(1))]
        );
        assert_eq!(list(dir.path()).unwrap(), vec![(100, path)]);
    }

    #[test]
    fn the_source_round_trips_and_a_record_without_it_is_telemetry() {
        let mut twin = record(3);
        twin.source = Source::TwinChange;
        assert_eq!(Record::decode(&twin.encode()), Some(twin.clone()));
        // The payload as written before the source byte: everything up to the body.
        let mut old = record(4).encode();
        old.pop();
        assert_eq!(Record::decode(&old), Some(record(4)));
        let mut unknown = twin.encode();
        *unknown.last_mut().unwrap() = 9;
        assert_eq!(Record::decode(&unknown), None, "an unknown source code");
        let mut longer = twin.encode();
        longer.push(0);
        assert_eq!(Record::decode(&longer), None, "trailing bytes");
    }

    #[test]
    fn the_auth_method_round_trips_and_an_older_record_is_sas() {
        for auth in [
            AuthMethod::Sas,
            AuthMethod::SelfSigned,
            AuthMethod::CertificateAuthority,
        ] {
            let mut x509 = record(5);
            x509.auth = auth;
            assert_eq!(
                Record::decode(&x509.encode()),
                Some(x509.clone()),
                "{auth:?}"
            );
            let mut twin = x509.clone();
            twin.source = Source::TwinChange;
            assert_eq!(Record::decode(&twin.encode()), Some(twin), "{auth:?}");
        }
        // The trailing byte as builds before the auth method wrote it: the source alone.
        let mut old = record(6);
        old.auth = AuthMethod::CertificateAuthority;
        let mut payload = old.encode();
        *payload.last_mut().unwrap() = Source::Telemetry.code();
        assert_eq!(
            Record::decode(&payload).map(|r| r.auth),
            Some(AuthMethod::Sas)
        );
        *payload.last_mut().unwrap() = Source::TwinChange.code();
        let twin = Record::decode(&payload).unwrap();
        assert_eq!(
            (twin.source, twin.auth),
            (Source::TwinChange, AuthMethod::Sas)
        );
        // The byte as this build writes it for a CA-signed device's telemetry.
        assert_eq!(*old.encode().last().unwrap(), 0x20);
        *payload.last_mut().unwrap() = 0x30;
        assert_eq!(
            Record::decode(&payload),
            None,
            "an unknown auth method code"
        );
    }

    #[test]
    fn each_auth_method_has_its_iot_hub_stamp() {
        let type_of = |auth: AuthMethod| {
            let json: serde_json::Value = serde_json::from_str(auth.as_json()).unwrap();
            (
                json["scope"].clone(),
                json["type"].clone(),
                json["issuer"].clone(),
            )
        };
        assert_eq!(
            type_of(AuthMethod::Sas),
            ("device".into(), "sas".into(), "iothub".into())
        );
        for auth in [AuthMethod::SelfSigned, AuthMethod::CertificateAuthority] {
            assert_eq!(
                type_of(auth),
                ("device".into(), "x509Certificate".into(), "external".into())
            );
        }
    }

    #[test]
    fn a_damaged_record_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer::open(dir.path(), 0, 0).unwrap();
        assert!(writer.append_frames(&record(0).framed()).1.is_none());
        let path = dir.path().join(file_name(0));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (records, len) = read(&path, 0).unwrap();
        assert!(records.is_empty());
        assert_eq!(len, 0);
    }
}
