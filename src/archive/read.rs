//! One Avro object container file of a telemetry archive, opened and read record by record.
//!
//! Two writers' schemas are known, told apart by the record's full name in the file's own
//! (writer) schema:
//! - Event Hubs Capture: `Microsoft.ServiceBus.Messaging.EventData`, whose `SystemProperties`
//!   and `Properties` are maps of `["long","double","string","bytes"]` and whose `Body` is
//!   `["null","bytes"]`; the device id is `iothub-connection-device-id`.
//! - IoT Hub message routing to storage: `Microsoft.Azure.Devices.Message`, string maps; the
//!   device id is `connectionDeviceId`. Its `Body` is read as plain `bytes` or as the union
//!   `["null","bytes"]`, whichever the file declares.
//!
//! Both codecs (`null`, `deflate`) are apache-avro's. Nothing here knows about JSON, CSV,
//! directories or containers: it reads bytes (`source` finds them) and yields each record's
//! device id and body bytes, or why it could not.

use std::io::Read;

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use apache_avro::Reader;

/// Which of the two known schemas a file was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Event Hubs Capture (`Microsoft.ServiceBus.Messaging.EventData`).
    EventHubs,
    /// IoT Hub message routing to a storage endpoint (`Microsoft.Azure.Devices.Message`).
    IotHub,
}

impl Format {
    /// The system property that carries the sending device's id.
    pub fn device_id_property(self) -> &'static str {
        match self {
            Format::EventHubs => "iothub-connection-device-id",
            Format::IotHub => "connectionDeviceId",
        }
    }

    fn from_schema(schema: &Schema) -> Option<Format> {
        let Schema::Record(record) = schema else {
            return None;
        };
        match (record.name.namespace(), record.name.name()) {
            (Some("Microsoft.ServiceBus.Messaging"), "EventData") => Some(Format::EventHubs),
            (Some("Microsoft.Azure.Devices"), "Message") => Some(Format::IotHub),
            _ => None,
        }
    }
}

/// A file that could not be opened as an archive file: nothing of it was read.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the file")]
    Io(#[source] std::io::Error),
    #[error("cannot fetch the blob")]
    Blob(#[source] object_store::Error),
    /// Wrong magic, a broken header, an unknown codec.
    #[error("not an Avro object container file")]
    NotAvro(#[source] Box<apache_avro::Error>),
    #[error(
        "schema {name} is neither Event Hubs Capture's Microsoft.ServiceBus.Messaging.EventData \
         nor IoT Hub routing's Microsoft.Azure.Devices.Message"
    )]
    UnknownSchema { name: String },
}

/// Why one record yields no reading. [`RecordError::Decode`] ends the file (the bytes after
/// it cannot be trusted: a truncated or corrupt block); the others skip that record only.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot decode the rest of the file")]
    Decode(#[source] Box<apache_avro::Error>),
    #[error("the record has no Body field")]
    NoBody,
    #[error("Body is neither null nor bytes")]
    BodyType,
}

impl RecordError {
    /// Whether reading the file stops here.
    pub fn ends_file(&self) -> bool {
        matches!(self, RecordError::Decode(_))
    }
}

/// One record of an archive file: what the reader needs of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The sending device's id from the system properties, when there.
    pub device_id: Option<String>,
    /// The message body; `None` when Body is null.
    pub body: Option<Vec<u8>>,
}

/// An open archive file, an iterator of its records in file order.
pub struct ArchiveFile {
    format: Format,
    reader: Reader<'static, Box<dyn Read + Send>>,
}

impl std::fmt::Debug for ArchiveFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveFile")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl ArchiveFile {
    /// Opens the file at `path` (see [`ArchiveFile::from_reader`]).
    pub fn open(path: &std::path::Path) -> Result<ArchiveFile, OpenError> {
        let file = std::fs::File::open(path).map_err(OpenError::Io)?;
        ArchiveFile::from_reader(Box::new(std::io::BufReader::new(file)))
    }

    /// Reads the header (magic, schema, codec, sync marker) of the file `bytes` reads.
    pub fn from_reader(bytes: Box<dyn Read + Send>) -> Result<ArchiveFile, OpenError> {
        let reader = Reader::new(bytes).map_err(|source| OpenError::NotAvro(Box::new(source)))?;
        let format = Format::from_schema(reader.writer_schema()).ok_or_else(|| {
            OpenError::UnknownSchema {
                name: schema_name(reader.writer_schema()),
            }
        })?;
        Ok(ArchiveFile { format, reader })
    }

    pub fn format(&self) -> Format {
        self.format
    }
}

impl Iterator for ArchiveFile {
    type Item = Result<Record, RecordError>;

    /// The next record; after a [`RecordError::Decode`] the iterator ends (apache-avro's
    /// reader stops at its first error).
    fn next(&mut self) -> Option<Self::Item> {
        let value = match self.reader.next()? {
            Ok(value) => value,
            Err(error) => return Some(Err(RecordError::Decode(Box::new(error)))),
        };
        Some(record(self.format, &value))
    }
}

fn record(format: Format, value: &Value) -> Result<Record, RecordError> {
    let Value::Record(fields) = value else {
        // The writer schema is a record (checked at open), so the decoder cannot yield
        // anything else; kept as a reported skip rather than a panic.
        return Err(RecordError::NoBody);
    };
    let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let body = match field("Body").map(unwrap_union) {
        None => return Err(RecordError::NoBody),
        Some(Value::Null) => None,
        Some(Value::Bytes(bytes)) => Some(bytes.clone()),
        Some(_) => return Err(RecordError::BodyType),
    };
    let device_id =
        field("SystemProperties").and_then(|props| map_string(props, format.device_id_property()));
    Ok(Record { device_id, body })
}

/// A map entry as text: a string, or UTF-8 bytes (Capture's union allows either).
fn map_string(map: &Value, key: &str) -> Option<String> {
    let Value::Map(entries) = unwrap_union(map) else {
        return None;
    };
    match unwrap_union(entries.get(key)?) {
        Value::String(text) => Some(text.clone()),
        Value::Bytes(bytes) => String::from_utf8(bytes.clone()).ok(),
        _ => None,
    }
}

fn unwrap_union(value: &Value) -> &Value {
    match value {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

fn schema_name(schema: &Schema) -> String {
    match schema {
        Schema::Record(record) => record.name.fullname(None),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::{Codec, DeflateSettings, Writer};
    use std::collections::HashMap;

    const CAPTURE_SCHEMA: &str = r#"{"type":"record","name":"EventData","namespace":"Microsoft.ServiceBus.Messaging","fields":[
        {"name":"SequenceNumber","type":"long"},{"name":"Offset","type":"string"},
        {"name":"EnqueuedTimeUtc","type":"string"},
        {"name":"SystemProperties","type":{"type":"map","values":["long","double","string","bytes"]}},
        {"name":"Properties","type":{"type":"map","values":["long","double","string","bytes"]}},
        {"name":"Body","type":["null","bytes"]}]}"#;

    const ROUTING_SCHEMA: &str = r#"{"type":"record","name":"Message","namespace":"Microsoft.Azure.Devices","fields":[
        {"name":"EnqueuedTimeUtc","type":"string"},
        {"name":"Properties","type":{"type":"map","values":"string"}},
        {"name":"SystemProperties","type":{"type":"map","values":"string"}},
        {"name":"Body","type":"bytes"}]}"#;

    fn capture_record(seq: i64, device: Value, body: Option<&[u8]>) -> Value {
        let mut system = HashMap::new();
        system.insert("iothub-connection-device-id".to_owned(), device);
        system.insert(
            "x-opt-enqueued-time".to_owned(),
            Value::Union(0, Box::new(Value::Long(1))),
        );
        Value::Record(vec![
            ("SequenceNumber".into(), Value::Long(seq)),
            ("Offset".into(), Value::String("8589956720".into())),
            (
                "EnqueuedTimeUtc".into(),
                Value::String("12/2/2021 2:58:24 PM".into()),
            ),
            ("SystemProperties".into(), Value::Map(system)),
            ("Properties".into(), Value::Map(HashMap::new())),
            (
                "Body".into(),
                match body {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(b) => Value::Union(1, Box::new(Value::Bytes(b.to_vec()))),
                },
            ),
        ])
    }

    fn write(schema: &str, codec: Codec, records: Vec<Value>) -> tempfile::NamedTempFile {
        let schema = Schema::parse_str(schema).expect("schema");
        let mut writer = Writer::with_codec(&schema, Vec::new(), codec).expect("writer");
        for r in records {
            writer.append_value(r).expect("append");
        }
        let bytes = writer.into_inner().expect("bytes");
        let file = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(file.path(), bytes).expect("write");
        file
    }

    #[test]
    fn capture_file_both_codecs_union_values_and_null_body() {
        for codec in [Codec::Null, Codec::Deflate(DeflateSettings::default())] {
            let file = write(
                CAPTURE_SCHEMA,
                codec,
                vec![
                    capture_record(
                        1,
                        Value::Union(2, Box::new(Value::String("dev-1".into()))),
                        Some(b"{}"),
                    ),
                    capture_record(
                        2,
                        Value::Union(3, Box::new(Value::Bytes(b"dev-2".to_vec()))),
                        None,
                    ),
                ],
            );
            let archive = ArchiveFile::open(file.path()).expect("open");
            assert_eq!(archive.format(), Format::EventHubs);
            let records: Vec<_> = archive.map(|r| r.expect("record")).collect();
            assert_eq!(
                records,
                vec![
                    Record {
                        device_id: Some("dev-1".into()),
                        body: Some(b"{}".to_vec())
                    },
                    Record {
                        device_id: Some("dev-2".into()),
                        body: None
                    },
                ]
            );
        }
    }

    #[test]
    fn routing_file_with_plain_bytes_body() {
        let mut system = HashMap::new();
        system.insert(
            "connectionDeviceId".to_owned(),
            Value::String("dev-9".into()),
        );
        let record = Value::Record(vec![
            (
                "EnqueuedTimeUtc".into(),
                Value::String("2018-06-11T00:00:08.2250000Z".into()),
            ),
            ("Properties".into(), Value::Map(HashMap::new())),
            ("SystemProperties".into(), Value::Map(system)),
            ("Body".into(), Value::Bytes(b"{\"id\":\"x\"}".to_vec())),
        ]);
        let file = write(
            ROUTING_SCHEMA,
            Codec::Deflate(DeflateSettings::default()),
            vec![record],
        );
        let archive = ArchiveFile::open(file.path()).expect("open");
        assert_eq!(archive.format(), Format::IotHub);
        let records: Vec<_> = archive.map(|r| r.expect("record")).collect();
        assert_eq!(records[0].device_id.as_deref(), Some("dev-9"));
        assert_eq!(records[0].body.as_deref(), Some(&b"{\"id\":\"x\"}"[..]));
    }

    #[test]
    fn wrong_magic_and_unknown_schema_are_open_errors() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(file.path(), b"PK\x03\x04 not avro at all").expect("write");
        assert!(matches!(
            ArchiveFile::open(file.path()),
            Err(OpenError::NotAvro(_))
        ));

        let other = write(
            r#"{"type":"record","name":"Other","fields":[{"name":"a","type":"long"}]}"#,
            Codec::Null,
            vec![],
        );
        match ArchiveFile::open(other.path()) {
            Err(OpenError::UnknownSchema { name }) => assert_eq!(name, "Other"),
            other => panic!("expected UnknownSchema, got {other:?}"),
        }
    }

    #[test]
    fn truncated_file_yields_its_first_records_then_a_decode_error() {
        // Two blocks (one record each: flushed between), then cut inside the second.
        let schema = Schema::parse_str(CAPTURE_SCHEMA).expect("schema");
        let mut writer = Writer::with_codec(&schema, Vec::new(), Codec::Null).expect("writer");
        let body = br#"{"id":"a","padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
        let device = || Value::Union(2, Box::new(Value::String("d".into())));
        writer
            .append_value(capture_record(1, device(), Some(body)))
            .expect("append");
        writer.flush().expect("flush");
        writer
            .append_value(capture_record(2, device(), Some(body)))
            .expect("append");
        let bytes = writer.into_inner().expect("bytes");
        let file = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(file.path(), &bytes[..bytes.len() - 30]).expect("write");

        let results: Vec<_> = ArchiveFile::open(file.path()).expect("open").collect();
        assert_eq!(results.len(), 2, "{results:?}");
        assert!(results[0].is_ok());
        assert!(matches!(&results[1], Err(e) if e.ends_file()));
    }
}
