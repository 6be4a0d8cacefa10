//! What capture costs per message, one thread, release build: the event store's durable
//! append (what a connection does before its PUBACK, with or without capture: capture keeps no
//! record of its own) and the window's encoding (what capture's collector does), for the codecs
//! and encodings the hub offers. The figures are per message of the benchmark's shape
//! (150-byte JSON body, content type and encoding set, one property).
//!
//!     cargo run --release --example capture_cost [MESSAGES]
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use simdevice::hub::capture::format::{Captured, FileWriter};
use simdevice::hub::capture::{Codec, Encoding, Format};
use simdevice::hub::events::segment::Record;
use simdevice::hub::events::{Clock, EventStore, StoreSettings, StoredEvent};
use simdevice::protocol::property_bag::PropertyBag;

fn properties() -> PropertyBag {
    let mut properties = PropertyBag::new();
    properties.insert("$.ct", "application/json");
    properties.insert("$.ce", "utf-8");
    properties.insert("alert", "high");
    properties
}

fn device(seq: u64) -> Arc<str> {
    Arc::from(format!("bench-{:06}", seq % 1000).as_str())
}

fn body(seq: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"bench-{:06}","seq":{seq},"temperature":21.5,"humidity":40.25,"uv":3,"pad":"{}"}}"#,
        seq % 1000,
        "x".repeat(60)
    ))
}

fn message(seq: u64) -> Captured {
    StoredEvent {
        offset: seq * 400,
        record: Record {
            source: simdevice::hub::events::Source::Telemetry,
            auth: simdevice::hub::events::AuthMethod::Sas,
            sequence_number: seq as i64,
            enqueued_ms: chrono::Utc::now().timestamp_millis(),
            device_id: device(seq),
            generation_id: Arc::from("638000000000000000"),
            properties: properties(),
            body: body(seq),
        },
    }
}

fn main() {
    let count: u64 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let messages: Vec<Captured> = (1..=count).map(message).collect();
    let per = |start: Instant| start.elapsed().as_secs_f64() * 1e9 / count as f64;

    let dir = tempfile::tempdir().expect("a temporary directory");
    let settings = StoreSettings {
        durable: true,
        ..StoreSettings::default()
    };
    let store = EventStore::open(dir.path(), settings, Clock::System).expect("the store opens");
    let generation: Arc<str> = Arc::from("638000000000000000");
    let inputs: Vec<(Arc<str>, PropertyBag, Bytes)> = (1..=count)
        .map(|n| (device(n), properties(), body(n)))
        .collect();
    let start = Instant::now();
    for (device, properties, body) in inputs {
        store
            .append(
                device,
                generation.clone(),
                simdevice::hub::events::AuthMethod::Sas,
                properties,
                body,
                chrono::Utc::now(),
            )
            .expect("append");
    }
    println!(
        "event store append (durable): {:7.0} ns/message",
        per(start)
    );

    for (label, format, codec, encoding) in [
        (
            "eventhubs avro deflate",
            Format::EventHubs,
            Codec::Deflate,
            Encoding::Avro,
        ),
        (
            "eventhubs avro null   ",
            Format::EventHubs,
            Codec::Null,
            Encoding::Avro,
        ),
        (
            "iothub avro deflate   ",
            Format::IotHub,
            Codec::Deflate,
            Encoding::Avro,
        ),
        (
            "iothub json           ",
            Format::IotHub,
            Codec::Null,
            Encoding::Json,
        ),
    ] {
        let mut file = FileWriter::new(format, codec, encoding);
        let start = Instant::now();
        for m in &messages {
            file.append(m);
        }
        let bytes = file.finish().len();
        println!(
            "encode {label}:     {:7.0} ns/message ({:.1} bytes/message in the file)",
            per(start),
            bytes as f64 / count as f64
        );
    }
}
