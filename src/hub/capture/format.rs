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

/// How a routing file's records are written: Avro (the default, and the only form Event Hubs
/// Capture has), or routing's JSON encoding (one JSON object a line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Avro,
    Json,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Avro => "avro",
            Encoding::Json => "json",
        }
    }
}

impl FromStr for Encoding {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "avro" => Ok(Encoding::Avro),
            "json" => Ok(Encoding::Json),
            _ => Err(ParseError {
                what: "capture encoding",
                given: s.into(),
                expected: "avro or json",
            }),
        }
    }
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

/// A file being written, a record at a time. In Avro, apache-avro keeps the records of the
/// current block (about 16 KB) and compresses each full block as it goes, so an open window
/// holds its file's bytes, not its messages, and closing it costs one last block. In routing's
/// JSON encoding, each record is one line.
pub enum FileWriter {
    Avro {
        format: Format,
        writer: Box<Writer<'static, Vec<u8>>>,
    },
    JsonLines(Vec<u8>),
}

impl FileWriter {
    /// The JSON encoding exists for routing only (`iothub`); for `eventhubs` it is Avro.
    pub fn new(
        format: Format,
        codec: Codec,
        encoding: Encoding,
    ) -> Result<FileWriter, EncodeError> {
        if encoding == Encoding::Json && format == Format::IotHub {
            return Ok(FileWriter::JsonLines(Vec::new()));
        }
        let schema: &'static Schema = match format {
            Format::EventHubs => &EVENTHUBS,
            Format::IotHub => &IOTHUB,
        };
        let codec = match codec {
            Codec::Deflate => apache_avro::Codec::Deflate(Default::default()),
            Codec::Null => apache_avro::Codec::Null,
        };
        let writer = Writer::with_codec(schema, Vec::new(), codec).map_err(EncodeError)?;
        Ok(FileWriter::Avro {
            format,
            writer: Box::new(writer),
        })
    }

    pub fn append(&mut self, message: &Captured) -> Result<(), EncodeError> {
        match self {
            FileWriter::Avro { format, writer } => {
                let record = match format {
                    Format::EventHubs => event_data(message),
                    Format::IotHub => routing_message(message),
                };
                writer.append_value(record).map_err(EncodeError)?;
            }
            FileWriter::JsonLines(lines) => {
                // A map of strings and JSON values cannot fail to serialise.
                let _ = serde_json::to_writer(&mut *lines, &routing_json(message));
                lines.push(b'\n');
            }
        }
        Ok(())
    }

    /// The whole file: in Avro, the header (schema, codec) and every record, the header alone
    /// when there is none (an "empty archive"); in JSON, the lines (nothing when empty).
    pub fn finish(self) -> Result<Vec<u8>, EncodeError> {
        match self {
            FileWriter::Avro { writer, .. } => writer.into_inner().map_err(EncodeError),
            FileWriter::JsonLines(lines) => Ok(lines),
        }
    }
}

/// One whole file of `messages`, in order.
pub fn encode(format: Format, codec: Codec, messages: &[Captured]) -> Result<Vec<u8>, EncodeError> {
    let mut file = FileWriter::new(format, codec, Encoding::Avro)?;
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

/// Name and value pairs of a string map.
type Pairs = Vec<(String, String)>;

/// Routing's enqueue time, application properties and system properties of a message.
fn routing_parts(message: &Captured) -> (String, Pairs, Pairs) {
    let event = &message.event;
    let enqueued = routing_time(event.enqueued_time);
    let mut system = vec![
        (
            "connectionDeviceId".to_string(),
            event.device_id.to_string(),
        ),
        ("connectionAuthMethod".to_string(), AUTH_METHOD.to_string()),
        (
            "connectionDeviceGenerationId".to_string(),
            message.generation_id.clone(),
        ),
        ("enqueuedTime".to_string(), enqueued.clone()),
    ];
    for (key, value) in event.properties.system_properties() {
        if let Some(name) = routing_name(key) {
            system.push((name.to_string(), value.unwrap_or_default().to_string()));
        }
    }
    let properties = event
        .properties
        .application_properties()
        .map(|(k, v)| (k.to_string(), v.unwrap_or_default().to_string()))
        .collect();
    (enqueued, properties, system)
}

fn routing_message(message: &Captured) -> Value {
    let (enqueued, properties, system) = routing_parts(message);
    let map = |pairs: Pairs| {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        )
    };
    Value::Record(vec![
        ("EnqueuedTimeUtc".into(), Value::String(enqueued)),
        ("Properties".into(), map(properties)),
        ("SystemProperties".into(), map(system)),
        ("Body".into(), body(message)),
    ])
}

/// One line of routing's JSON encoding: the Avro record's fields, with Body the message's
/// JSON itself when it says it is JSON in UTF-8 (`contentType` application/json,
/// `contentEncoding` utf-8, as routing requires to read a body) and parses, else its bytes
/// in base64.
fn routing_json(message: &Captured) -> serde_json::Value {
    use base64::Engine;
    let (enqueued, properties, system) = routing_parts(message);
    let get = |name: &str| {
        system
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let says_json = get("contentType").is_some_and(|t| t.starts_with("application/json"))
        && get("contentEncoding").is_some_and(|e| e == "utf-8");
    let body = says_json
        .then(|| serde_json::from_slice::<serde_json::Value>(&message.event.body).ok())
        .flatten()
        .unwrap_or_else(|| {
            serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(&message.event.body),
            )
        });
    let object = |pairs: Pairs| {
        serde_json::Value::Object(
            pairs
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect(),
        )
    };
    serde_json::json!({
        "EnqueuedTimeUtc": enqueued,
        "Properties": object(properties),
        "SystemProperties": object(system),
        "Body": body,
    })
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
    fn routing_json_lines_carry_json_bodies_as_json_and_others_in_base64() {
        let mut file = FileWriter::new(Format::IotHub, Codec::Deflate, Encoding::Json).unwrap();
        file.append(&sample(1, r#"{"t":21.5}"#)).unwrap();
        let mut binary = sample(2, "not json");
        binary.event.properties = PropertyBag::new();
        file.append(&binary).unwrap();
        let text = String::from_utf8(file.finish().unwrap()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["Body"], serde_json::json!({"t": 21.5}));
        assert_eq!(lines[0]["Properties"]["alert"], "high");
        assert_eq!(lines[0]["SystemProperties"]["connectionDeviceId"], "dev-1");
        assert_eq!(lines[0]["SystemProperties"]["messageId"], "m1");
        assert_eq!(
            lines[0]["EnqueuedTimeUtc"],
            lines[0]["SystemProperties"]["enqueuedTime"]
        );
        assert_eq!(lines[1]["Body"], "bm90IGpzb24=");
        let empty = FileWriter::new(Format::IotHub, Codec::Null, Encoding::Json).unwrap();
        assert!(empty.finish().unwrap().is_empty());
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
