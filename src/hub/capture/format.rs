//! The two capture file formats, as Azure writes them: Event Hubs Capture (`EventData`) and IoT
//! Hub message routing to storage (`Message`), each an Avro object container file with codec
//! `deflate` or `null`. Pure: events in, bytes out; no files, no clock, no tasks.

use std::str::FromStr;
use std::sync::LazyLock;

use apache_avro::types::Value;
use apache_avro::{Schema, Writer};

use crate::hub::telemetry::Event;

/// Event Hubs Capture's schema (Microsoft's "Explore captured Avro files", avro-tools getschema).
pub const EVENTHUBS_SCHEMA: &str = r#"{
  "type": "record", "name": "EventData", "namespace": "Microsoft.ServiceBus.Messaging",
  "fields": [
    {"name": "SequenceNumber", "type": "long"},
    {"name": "Offset", "type": "string"},
    {"name": "EnqueuedTimeUtc", "type": "string"},
    {"name": "SystemProperties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
    {"name": "Properties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
    {"name": "Body", "type": ["null", "bytes"]}
  ]
}"#;

/// IoT Hub message routing's storage endpoint schema.
pub const IOTHUB_SCHEMA: &str = r#"{
  "type": "record", "name": "Message", "namespace": "Microsoft.Azure.Devices",
  "fields": [
    {"name": "EnqueuedTimeUtc", "type": "string"},
    {"name": "Properties", "type": {"type": "map", "values": "string"}},
    {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
    {"name": "Body", "type": ["null", "bytes"]}
  ]
}"#;

/// What the hub stamps as the authentication of a device: SAS keys are all it has.
pub const AUTH_METHOD: &str =
    r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Event Hubs Capture (the default, as in the Capture walkthrough).
    EventHubs,
    /// IoT Hub message routing to a storage endpoint.
    IotHub,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Deflate,
    Null,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown {what} {given:?} (expected {expected})")]
pub struct ParseError {
    what: &'static str,
    given: String,
    expected: &'static str,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::EventHubs => "eventhubs",
            Format::IotHub => "iothub",
        }
    }
}

impl Codec {
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Deflate => "deflate",
            Codec::Null => "null",
        }
    }
}

impl FromStr for Format {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "eventhubs" => Ok(Format::EventHubs),
            "iothub" => Ok(Format::IotHub),
            _ => Err(ParseError {
                what: "capture format",
                given: s.into(),
                expected: "eventhubs or iothub",
            }),
        }
    }
}

impl FromStr for Codec {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deflate" => Ok(Codec::Deflate),
            "null" => Ok(Codec::Null),
            _ => Err(ParseError {
                what: "capture codec",
                given: s.into(),
                expected: "deflate or null",
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot encode a capture file")]
pub struct EncodeError(#[source] pub apache_avro::Error);

/// One accepted message as capture keeps it: the hub's event and the device's generation id
/// (which routing's `connectionDeviceGenerationId` carries).
#[derive(Clone, Debug)]
pub struct Captured {
    pub event: Event,
    pub generation_id: String,
}

impl Captured {
    /// What the message weighs towards the window's size limit: body and properties.
    pub fn size(&self) -> usize {
        self.event.body.len() + self.event.properties.size_for_limit()
    }
}

pub fn schema(format: Format) -> Schema {
    let text = match format {
        Format::EventHubs => EVENTHUBS_SCHEMA,
        Format::IotHub => IOTHUB_SCHEMA,
    };
    Schema::parse_str(text).expect("the built-in schemas parse")
}

/// The schemas, parsed once: a [`FileWriter`] borrows its schema for as long as it lives.
static EVENTHUBS: LazyLock<Schema> = LazyLock::new(|| schema(Format::EventHubs));
static IOTHUB: LazyLock<Schema> = LazyLock::new(|| schema(Format::IotHub));

/// A file being written, a record at a time: apache-avro keeps the records of the current
/// block (about 16 KB) and compresses each full block as it goes, so an open window holds its
/// file's bytes, not its messages, and closing it costs one last block.
pub struct FileWriter {
    format: Format,
    writer: Writer<'static, Vec<u8>>,
}

impl FileWriter {
    pub fn new(format: Format, codec: Codec) -> Result<FileWriter, EncodeError> {
        let schema: &'static Schema = match format {
            Format::EventHubs => &EVENTHUBS,
            Format::IotHub => &IOTHUB,
        };
        let codec = match codec {
            Codec::Deflate => apache_avro::Codec::Deflate(Default::default()),
            Codec::Null => apache_avro::Codec::Null,
        };
        let writer = Writer::with_codec(schema, Vec::new(), codec).map_err(EncodeError)?;
        Ok(FileWriter { format, writer })
    }

    pub fn append(&mut self, message: &Captured) -> Result<(), EncodeError> {
        let record = match self.format {
            Format::EventHubs => event_data(message),
            Format::IotHub => routing_message(message),
        };
        self.writer.append_value(record).map_err(EncodeError)?;
        Ok(())
    }

    /// The whole file: the header (schema, codec) and every record; with no record, the header
    /// alone (an "empty archive").
    pub fn finish(self) -> Result<Vec<u8>, EncodeError> {
        self.writer.into_inner().map_err(EncodeError)
    }
}

/// One whole file of `messages`, in order.
pub fn encode(format: Format, codec: Codec, messages: &[Captured]) -> Result<Vec<u8>, EncodeError> {
    let mut file = FileWriter::new(format, codec)?;
    for message in messages {
        file.append(message)?;
    }
    file.finish()
}

/// Capture's own text form of the enqueue time: `M/d/yyyy h:mm:ss tt`, e.g. `12/2/2021 2:58:24 PM`.
pub fn capture_time(time: chrono::DateTime<chrono::Utc>) -> String {
    time.format("%-m/%-d/%Y %-I:%M:%S %p").to_string()
}

/// Routing's ISO 8601 form, with seven fractional digits: `2018-06-11T00:00:08.2250000Z`.
pub fn routing_time(time: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::Timelike;
    format!(
        "{}.{:07}Z",
        time.format("%Y-%m-%dT%H:%M:%S"),
        time.nanosecond() % 1_000_000_000 / 100
    )
}

fn long(v: i64) -> Value {
    Value::Union(0, Box::new(Value::Long(v)))
}

fn string(v: impl Into<String>) -> Value {
    Value::Union(2, Box::new(Value::String(v.into())))
}

fn body(message: &Captured) -> Value {
    Value::Union(1, Box::new(Value::Bytes(message.event.body.to_vec())))
}

/// The Event Hubs names of the device's `$.` system properties.
fn eventhubs_name(short: &str) -> Option<&'static str> {
    Some(match short {
        "mid" => "message-id",
        "cid" => "correlation-id",
        "ct" => "content-type",
        "ce" => "content-encoding",
        "uid" => "user-id",
        "sub" => "dt-subject",
        _ => return None,
    })
}

fn event_data(message: &Captured) -> Value {
    let event = &message.event;
    let sequence = event.sequence_number as i64;
    let mut system = std::collections::HashMap::new();
    system.insert("x-opt-sequence-number".to_string(), long(sequence));
    system.insert("x-opt-offset".to_string(), string(sequence.to_string()));
    system.insert(
        "x-opt-enqueued-time".to_string(),
        long(event.enqueued_time.timestamp_millis()),
    );
    system.insert(
        "iothub-connection-device-id".to_string(),
        string(&*event.device_id),
    );
    system.insert(
        "iothub-connection-auth-method".to_string(),
        string(AUTH_METHOD),
    );
    system.insert(
        "iothub-connection-auth-generation-id".to_string(),
        string(&message.generation_id),
    );
    system.insert(
        "iothub-enqueuedtime".to_string(),
        long(event.enqueued_time.timestamp_millis()),
    );
    system.insert("iothub-message-source".to_string(), string("Telemetry"));
    for (key, value) in event.properties.system_properties() {
        if let Some(name) = eventhubs_name(key) {
            system.insert(name.to_string(), string(value.unwrap_or_default()));
        }
    }
    let properties = event
        .properties
        .application_properties()
        .map(|(k, v)| (k.to_string(), string(v.unwrap_or_default())))
        .collect();
    Value::Record(vec![
        ("SequenceNumber".into(), Value::Long(sequence)),
        ("Offset".into(), Value::String(sequence.to_string())),
        (
            "EnqueuedTimeUtc".into(),
            Value::String(capture_time(event.enqueued_time)),
        ),
        ("SystemProperties".into(), Value::Map(system)),
        ("Properties".into(), Value::Map(properties)),
        ("Body".into(), body(message)),
    ])
}

/// Routing's names of the device's `$.` system properties.
fn routing_name(short: &str) -> Option<&'static str> {
    Some(match short {
        "mid" => "messageId",
        "cid" => "correlationId",
        "ct" => "contentType",
        "ce" => "contentEncoding",
        "uid" => "userId",
        _ => return None,
    })
}

fn routing_message(message: &Captured) -> Value {
    let event = &message.event;
    let enqueued = routing_time(event.enqueued_time);
    let text = |v: &str| Value::String(v.to_string());
    let mut system = std::collections::HashMap::new();
    system.insert("connectionDeviceId".to_string(), text(&event.device_id));
    system.insert("connectionAuthMethod".to_string(), text(AUTH_METHOD));
    system.insert(
        "connectionDeviceGenerationId".to_string(),
        text(&message.generation_id),
    );
    system.insert("enqueuedTime".to_string(), text(&enqueued));
    for (key, value) in event.properties.system_properties() {
        if let Some(name) = routing_name(key) {
            system.insert(name.to_string(), text(value.unwrap_or_default()));
        }
    }
    let properties = event
        .properties
        .application_properties()
        .map(|(k, v)| (k.to_string(), text(v.unwrap_or_default())))
        .collect();
    Value::Record(vec![
        ("EnqueuedTimeUtc".into(), Value::String(enqueued)),
        ("Properties".into(), Value::Map(properties)),
        ("SystemProperties".into(), Value::Map(system)),
        ("Body".into(), body(message)),
    ])
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use apache_avro::Reader;
    use bytes::Bytes;
    use chrono::TimeZone;

    use super::*;
    use crate::protocol::property_bag::PropertyBag;

    pub(crate) fn sample(seq: u64, body: &str) -> Captured {
        let mut properties = PropertyBag::new();
        properties.insert("$.ct", "application/json");
        properties.insert("$.ce", "utf-8");
        properties.insert("$.mid", format!("m{seq}"));
        properties.insert("alert", "high");
        Captured {
            event: Event {
                sequence_number: seq,
                device_id: Arc::from("dev-1"),
                enqueued_time: chrono::Utc
                    .with_ymd_and_hms(2021, 12, 2, 14, 58, 24)
                    .unwrap()
                    + chrono::Duration::nanoseconds(225_000_123),
                properties,
                body: Bytes::from(body.to_string()),
            },
            generation_id: "638000000000000000".into(),
        }
    }

    fn field<'a>(record: &'a Value, name: &str) -> &'a Value {
        let Value::Record(fields) = record else {
            panic!("not a record: {record:?}")
        };
        &fields.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn map_get<'a>(map: &'a Value, key: &str) -> &'a Value {
        let Value::Map(map) = map else {
            panic!("not a map")
        };
        match &map[key] {
            Value::Union(_, inner) => inner,
            other => other,
        }
    }

    #[test]
    fn the_times_are_in_azure_text_forms() {
        let t = sample(1, "{}").event.enqueued_time;
        assert_eq!(capture_time(t), "12/2/2021 2:58:24 PM");
        assert_eq!(routing_time(t), "2021-12-02T14:58:24.2250001Z");
        let morning = chrono::Utc.with_ymd_and_hms(2021, 1, 5, 0, 7, 9).unwrap();
        assert_eq!(capture_time(morning), "1/5/2021 12:07:09 AM");
    }

    #[test]
    fn eventhubs_files_read_back_with_every_field_both_codecs() {
        for codec in [Codec::Deflate, Codec::Null] {
            let bytes = encode(Format::EventHubs, codec, &[sample(7, r#"{"t":1}"#)]).unwrap();
            let reader = Reader::new(&bytes[..]).unwrap();
            assert_eq!(reader.writer_schema(), &schema(Format::EventHubs));
            let records: Vec<Value> = reader.map(|r| r.unwrap()).collect();
            assert_eq!(records.len(), 1);
            let r = &records[0];
            assert_eq!(field(r, "SequenceNumber"), &Value::Long(7));
            assert_eq!(field(r, "Offset"), &Value::String("7".into()));
            assert_eq!(
                field(r, "EnqueuedTimeUtc"),
                &Value::String("12/2/2021 2:58:24 PM".into())
            );
            let system = field(r, "SystemProperties");
            assert_eq!(
                map_get(system, "iothub-connection-device-id"),
                &Value::String("dev-1".into())
            );
            assert_eq!(
                map_get(system, "content-type"),
                &Value::String("application/json".into())
            );
            assert_eq!(
                map_get(system, "x-opt-enqueued-time"),
                &Value::Long(1638457104225)
            );
            assert_eq!(
                map_get(field(r, "Properties"), "alert"),
                &Value::String("high".into())
            );
            assert_eq!(
                field(r, "Body"),
                &Value::Union(1, Box::new(Value::Bytes(br#"{"t":1}"#.to_vec())))
            );
        }
        let deflated = encode(Format::EventHubs, Codec::Deflate, &[]).unwrap();
        assert!(Reader::new(&deflated[..]).unwrap().next().is_none());
    }

    #[test]
    fn iothub_files_read_back_with_every_field() {
        let bytes = encode(Format::IotHub, Codec::Deflate, &[sample(1, "x")]).unwrap();
        let reader = Reader::new(&bytes[..]).unwrap();
        assert_eq!(reader.writer_schema(), &schema(Format::IotHub));
        let records: Vec<Value> = reader.map(|r| r.unwrap()).collect();
        let r = &records[0];
        assert_eq!(
            field(r, "EnqueuedTimeUtc"),
            &Value::String("2021-12-02T14:58:24.2250001Z".into())
        );
        let system = field(r, "SystemProperties");
        for (key, want) in [
            ("connectionDeviceId", "dev-1"),
            ("connectionAuthMethod", AUTH_METHOD),
            ("connectionDeviceGenerationId", "638000000000000000"),
            ("enqueuedTime", "2021-12-02T14:58:24.2250001Z"),
            ("contentType", "application/json"),
            ("contentEncoding", "utf-8"),
            ("messageId", "m1"),
        ] {
            assert_eq!(map_get(system, key), &Value::String(want.into()), "{key}");
        }
        assert_eq!(
            map_get(field(r, "Properties"), "alert"),
            &Value::String("high".into())
        );
    }
}
