//! The two capture file formats, as Azure writes them: Event Hubs Capture (`EventData`) and IoT
//! Hub message routing to storage (`Message`), each an Avro object container file with codec
//! `deflate` or `null`. Pure: events in, bytes out; no files, no clock, no tasks.

use std::str::FromStr;

use super::avro::{put_bytes, put_long, ContainerWriter};
use crate::hub::events::StoredEvent;

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

/// One accepted message as capture writes it: the event as the store keeps it (sequence
/// number and offset in its partition, enqueue time, device, generation id, properties, body).
pub type Captured = StoredEvent;

/// What a message weighs towards the window's size limit: body and properties.
pub fn size(message: &Captured) -> usize {
    message.record.body.len() + message.record.properties.size_for_limit()
}

/// A file being written, a record at a time. In Avro, the writer keeps the records of the
/// current block (64 KiB) and compresses each full block as it goes, so an open window holds
/// its file's bytes, not its messages, and closing it costs one last block. In routing's JSON
/// encoding, each record is one line.
pub enum FileWriter {
    Avro {
        format: Format,
        writer: Box<ContainerWriter>,
        /// The last enqueue second's text form: messages of one second share it.
        times: TimeText,
    },
    JsonLines(Vec<u8>),
}

/// The enqueue time's text, formatted once per second (a window holds thousands a second).
#[derive(Default)]
pub struct TimeText {
    second: Option<i64>,
    text: String,
}

impl TimeText {
    fn of(&mut self, format: Format, ms: i64) -> &str {
        let second = ms.div_euclid(1000);
        // Routing's form has the milliseconds: formatted for each message.
        if format == Format::IotHub {
            self.text = routing_time(time_of(ms));
            self.second = None;
        } else if self.second != Some(second) {
            self.text = capture_time(time_of(ms));
            self.second = Some(second);
        }
        &self.text
    }
}

impl FileWriter {
    /// The JSON encoding exists for routing only (`iothub`); for `eventhubs` it is Avro.
    pub fn new(format: Format, codec: Codec, encoding: Encoding) -> FileWriter {
        if encoding == Encoding::Json && format == Format::IotHub {
            return FileWriter::JsonLines(Vec::new());
        }
        let schema = match format {
            Format::EventHubs => EVENTHUBS_SCHEMA,
            Format::IotHub => IOTHUB_SCHEMA,
        };
        FileWriter::Avro {
            format,
            writer: Box::new(ContainerWriter::new(schema, codec)),
            times: TimeText::default(),
        }
    }

    pub fn append(&mut self, message: &Captured) {
        match self {
            FileWriter::Avro {
                format,
                writer,
                times,
            } => {
                let enqueued = times.of(*format, message.record.enqueued_ms);
                match format {
                    Format::EventHubs => put_event_data(writer.block(), message, enqueued),
                    Format::IotHub => put_routing_message(writer.block(), message, enqueued),
                }
                writer.record_done();
            }
            FileWriter::JsonLines(lines) => {
                // A map of strings and JSON values cannot fail to serialise.
                let _ = serde_json::to_writer(&mut *lines, &routing_json(message));
                lines.push(b'\n');
            }
        }
    }

    /// The whole file: in Avro, the header (schema, codec) and every record, the header alone
    /// when there is none (an "empty archive"); in JSON, the lines (nothing when empty).
    pub fn finish(self) -> Vec<u8> {
        match self {
            FileWriter::Avro { writer, .. } => writer.finish(),
            FileWriter::JsonLines(lines) => lines,
        }
    }
}

/// One whole file of `messages`, in order.
pub fn encode(format: Format, codec: Codec, messages: &[Captured]) -> Vec<u8> {
    let mut file = FileWriter::new(format, codec, Encoding::Avro);
    for message in messages {
        file.append(message);
    }
    file.finish()
}

fn time_of(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
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

/// Branches of Event Hubs Capture's map value union, `["long","double","string","bytes"]`.
const UNION_LONG: i64 = 0;
const UNION_STRING: i64 = 2;
/// `Body`'s branch of `["null","bytes"]`.
const UNION_BYTES: i64 = 1;

/// A map entry whose value is the union's `long`.
fn put_long_entry(out: &mut Vec<u8>, key: &str, value: i64) {
    put_bytes(out, key.as_bytes());
    put_long(out, UNION_LONG);
    put_long(out, value);
}

/// A map entry whose value is the union's `string`.
fn put_string_entry(out: &mut Vec<u8>, key: &str, value: &str) {
    put_bytes(out, key.as_bytes());
    put_long(out, UNION_STRING);
    put_bytes(out, value.as_bytes());
}

/// Event Hubs Capture's `EventData`: the annotations IoT Hub's built-in endpoint sets, then
/// the device's system properties under their Event Hubs names; its application properties
/// as strings; the body.
fn put_event_data(out: &mut Vec<u8>, message: &Captured, enqueued: &str) {
    let record = &message.record;
    let offset = message.offset.to_string();
    put_long(out, record.sequence_number);
    put_bytes(out, offset.as_bytes());
    put_bytes(out, enqueued.as_bytes());
    let system: Vec<(&str, &str)> = record
        .properties
        .system_properties()
        .filter_map(|(key, value)| Some((eventhubs_name(key)?, value.unwrap_or_default())))
        .collect();
    // One map block: its count, the entries, then the empty block that ends the map.
    put_long(out, 8 + system.len() as i64);
    put_long_entry(out, "x-opt-sequence-number", record.sequence_number);
    put_string_entry(out, "x-opt-offset", &offset);
    put_long_entry(out, "x-opt-enqueued-time", record.enqueued_ms);
    put_string_entry(out, "iothub-connection-device-id", &record.device_id);
    put_string_entry(out, "iothub-connection-auth-method", record.auth.as_json());
    put_string_entry(
        out,
        "iothub-connection-auth-generation-id",
        &record.generation_id,
    );
    put_long_entry(out, "iothub-enqueuedtime", record.enqueued_ms);
    put_string_entry(out, "iothub-message-source", "Telemetry");
    for (name, value) in system {
        put_string_entry(out, name, value);
    }
    put_long(out, 0);
    put_map(out, record.properties.application_properties(), |out, v| {
        put_long(out, UNION_STRING);
        put_bytes(out, v.as_bytes());
    });
    put_long(out, UNION_BYTES);
    put_bytes(out, &record.body);
}

/// A map of the device's properties (name, optional value) in one block, each value
/// written by `put_value`.
fn put_map<'a>(
    out: &mut Vec<u8>,
    entries: impl Iterator<Item = (&'a str, Option<&'a str>)>,
    put_value: impl Fn(&mut Vec<u8>, &str),
) {
    let entries: Vec<(&str, &str)> = entries.map(|(k, v)| (k, v.unwrap_or_default())).collect();
    if !entries.is_empty() {
        put_long(out, entries.len() as i64);
        for (key, value) in entries {
            put_bytes(out, key.as_bytes());
            put_value(out, value);
        }
    }
    put_long(out, 0);
}

/// IoT Hub routing's `Message`: enqueue time, application properties, system properties (all
/// strings), body.
fn put_routing_message(out: &mut Vec<u8>, message: &Captured, enqueued: &str) {
    let routing = RoutingRecord::of(message, enqueued);
    put_bytes(out, routing.enqueued.as_bytes());
    for pairs in [&routing.properties, &routing.system] {
        put_map(
            out,
            pairs.iter().map(|(k, v)| (*k, Some(v.as_ref()))),
            |out, v| put_bytes(out, v.as_bytes()),
        );
    }
    put_long(out, UNION_BYTES);
    put_bytes(out, routing.body);
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
type Pairs<'a> = Vec<(&'a str, std::borrow::Cow<'a, str>)>;

/// IoT Hub routing's `Message` (and its JSON line), borrowed from the stored event.
struct RoutingRecord<'a> {
    enqueued: String,
    properties: Pairs<'a>,
    system: Pairs<'a>,
    body: &'a [u8],
}

impl<'a> RoutingRecord<'a> {
    fn of(message: &'a Captured, enqueued: &str) -> RoutingRecord<'a> {
        let record = &message.record;
        let enqueued = enqueued.to_string();
        let mut system: Pairs<'a> = vec![
            ("connectionDeviceId", record.device_id.as_ref().into()),
            ("connectionAuthMethod", record.auth.as_json().into()),
            (
                "connectionDeviceGenerationId",
                record.generation_id.as_ref().into(),
            ),
            ("enqueuedTime", enqueued.clone().into()),
        ];
        for (key, value) in record.properties.system_properties() {
            if let Some(name) = routing_name(key) {
                system.push((name, value.unwrap_or_default().into()));
            }
        }
        let properties = record
            .properties
            .application_properties()
            .map(|(k, v)| (k, v.unwrap_or_default().into()))
            .collect();
        RoutingRecord {
            enqueued,
            properties,
            system,
            body: &record.body,
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.system
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    }
}

/// One line of routing's JSON encoding: the Avro record's fields, with Body the message's
/// JSON itself when it says it is JSON in UTF-8 (`contentType` application/json,
/// `contentEncoding` utf-8, as routing requires to read a body) and parses, else its bytes
/// in base64.
fn routing_json(message: &Captured) -> serde_json::Value {
    use base64::Engine;
    let routing = RoutingRecord::of(message, &routing_time(time_of(message.record.enqueued_ms)));
    let says_json = routing
        .get("contentType")
        .is_some_and(|t| t.starts_with("application/json"))
        && routing.get("contentEncoding").is_some_and(|e| e == "utf-8");
    let body = says_json
        .then(|| serde_json::from_slice::<serde_json::Value>(routing.body).ok())
        .flatten()
        .unwrap_or_else(|| {
            serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(routing.body),
            )
        });
    let object = |pairs: &Pairs| {
        serde_json::Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                .collect(),
        )
    };
    serde_json::json!({
        "EnqueuedTimeUtc": routing.enqueued,
        "Properties": object(&routing.properties),
        "SystemProperties": object(&routing.system),
        "Body": body,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use apache_avro::types::Value;
    use apache_avro::{Reader, Schema};
    use bytes::Bytes;
    use chrono::TimeZone;

    use super::*;
    use crate::hub::events::segment::Record;
    use crate::hub::events::AuthMethod;
    use crate::protocol::property_bag::PropertyBag;

    fn schema(format: Format) -> Schema {
        let text = match format {
            Format::EventHubs => EVENTHUBS_SCHEMA,
            Format::IotHub => IOTHUB_SCHEMA,
        };
        Schema::parse_str(text).expect("the built-in schemas parse")
    }

    pub(crate) fn sample(seq: u64, body: &str) -> Captured {
        let mut properties = PropertyBag::new();
        properties.insert("$.ct", "application/json");
        properties.insert("$.ce", "utf-8");
        properties.insert("$.mid", format!("m{seq}"));
        properties.insert("alert", "high");
        let enqueued = chrono::Utc
            .with_ymd_and_hms(2021, 12, 2, 14, 58, 24)
            .unwrap()
            + chrono::Duration::milliseconds(225);
        StoredEvent {
            offset: seq * 1000,
            record: Record {
                source: crate::hub::events::Source::Telemetry,
                auth: crate::hub::events::AuthMethod::Sas,
                sequence_number: seq as i64,
                enqueued_ms: enqueued.timestamp_millis(),
                device_id: Arc::from("dev-1"),
                generation_id: Arc::from("638000000000000000"),
                properties,
                body: Bytes::from(body.to_string()),
            },
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
        let mut file = FileWriter::new(Format::IotHub, Codec::Deflate, Encoding::Json);
        file.append(&sample(1, r#"{"t":21.5}"#));
        let mut binary = sample(2, "not json");
        binary.record.properties = PropertyBag::new();
        file.append(&binary);
        let text = String::from_utf8(file.finish()).unwrap();
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
        let empty = FileWriter::new(Format::IotHub, Codec::Null, Encoding::Json);
        assert!(empty.finish().is_empty());
    }

    #[test]
    fn the_times_are_in_azure_text_forms() {
        let t = time_of(sample(1, "{}").record.enqueued_ms);
        assert_eq!(capture_time(t), "12/2/2021 2:58:24 PM");
        assert_eq!(routing_time(t), "2021-12-02T14:58:24.2250000Z");
        let morning = chrono::Utc.with_ymd_and_hms(2021, 1, 5, 0, 7, 9).unwrap();
        assert_eq!(capture_time(morning), "1/5/2021 12:07:09 AM");
    }

    #[test]
    fn eventhubs_files_read_back_with_every_field_both_codecs() {
        for codec in [Codec::Deflate, Codec::Null] {
            let bytes = encode(Format::EventHubs, codec, &[sample(7, r#"{"t":1}"#)]);
            let reader = Reader::new(&bytes[..]).unwrap();
            assert_eq!(reader.writer_schema(), &schema(Format::EventHubs));
            let records: Vec<Value> = reader.map(|r| r.unwrap()).collect();
            assert_eq!(records.len(), 1);
            let r = &records[0];
            assert_eq!(field(r, "SequenceNumber"), &Value::Long(7));
            assert_eq!(field(r, "Offset"), &Value::String("7000".into()));
            assert_eq!(
                map_get(field(r, "SystemProperties"), "x-opt-offset"),
                &Value::String("7000".into())
            );
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
                map_get(system, "iothub-connection-auth-method"),
                &Value::String(AuthMethod::Sas.as_json().into())
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
        let deflated = encode(Format::EventHubs, Codec::Deflate, &[]);
        assert!(Reader::new(&deflated[..]).unwrap().next().is_none());
    }

    #[test]
    fn both_formats_stamp_the_auth_method_of_the_sending_device() {
        let mut x509 = sample(2, "{}");
        x509.record.auth = AuthMethod::CertificateAuthority;
        let messages = [sample(1, "{}"), x509];
        let want = [
            AuthMethod::Sas.as_json(),
            AuthMethod::CertificateAuthority.as_json(),
        ];
        assert_ne!(want[0], want[1]);
        for (format, key) in [
            (Format::EventHubs, "iothub-connection-auth-method"),
            (Format::IotHub, "connectionAuthMethod"),
        ] {
            let bytes = encode(format, Codec::Null, &messages);
            let records: Vec<Value> = Reader::new(&bytes[..])
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            let got: Vec<&Value> = records
                .iter()
                .map(|r| map_get(field(r, "SystemProperties"), key))
                .collect();
            assert_eq!(
                got,
                [
                    &Value::String(want[0].into()),
                    &Value::String(want[1].into())
                ],
                "{format:?}"
            );
        }
    }

    #[test]
    fn iothub_files_read_back_with_every_field() {
        let bytes = encode(Format::IotHub, Codec::Deflate, &[sample(1, "x")]);
        let reader = Reader::new(&bytes[..]).unwrap();
        assert_eq!(reader.writer_schema(), &schema(Format::IotHub));
        let records: Vec<Value> = reader.map(|r| r.unwrap()).collect();
        let r = &records[0];
        assert_eq!(
            field(r, "EnqueuedTimeUtc"),
            &Value::String("2021-12-02T14:58:24.2250000Z".into())
        );
        let system = field(r, "SystemProperties");
        for (key, want) in [
            ("connectionDeviceId", "dev-1"),
            ("connectionAuthMethod", AuthMethod::Sas.as_json()),
            ("connectionDeviceGenerationId", "638000000000000000"),
            ("enqueuedTime", "2021-12-02T14:58:24.2250000Z"),
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
