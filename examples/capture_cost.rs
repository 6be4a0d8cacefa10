//! What capture costs per message, one thread, release build: the write-ahead log's append
//! (what a connection does before its PUBACK) and the window's encoding (what the collector
//! does), for the codecs and encodings the hub offers. The figures are per message of the
//! benchmark's shape (150-byte JSON body, content type and encoding set, one property).
//!
//!     cargo run --release --example capture_cost [MESSAGES]
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use simdevice::hub::capture::format::{Captured, FileWriter};
use simdevice::hub::capture::wal::Wal;
use simdevice::hub::capture::{Codec, Encoding, Format};
use simdevice::hub::telemetry::Event;
use simdevice::protocol::property_bag::PropertyBag;

fn message(seq: u64) -> Captured {
    let mut properties = PropertyBag::new();
    properties.insert("$.ct", "application/json");
    properties.insert("$.ce", "utf-8");
    properties.insert("alert", "high");
    let body = format!(
        r#"{{"id":"bench-{:06}","seq":{seq},"temperature":21.5,"humidity":40.25,"uv":3,"pad":"{}"}}"#,
        seq % 1000,
        "x".repeat(60)
    );
    Captured {
        event: Event {
            sequence_number: seq,
            device_id: Arc::from(format!("bench-{:06}", seq % 1000).as_str()),
            enqueued_time: chrono::Utc::now(),
            properties,
            body: Bytes::from(body),
        },
        generation_id: "638000000000000000".into(),
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
    let (mut wal, _) = Wal::open(dir.path()).expect("the log opens");
    let start = Instant::now();
    for m in &messages {
        wal.append(m).expect("append");
    }
    println!("wal append:                  {:7.0} ns/message", per(start));
    // The part of it that is the write call alone: the same number of writes of that size.
    {
        use std::io::Write;
        let mut file = std::fs::File::create(dir.path().join("writes")).expect("a file");
        let line = vec![b'x'; 400];
        let start = Instant::now();
        for _ in 0..count {
            file.write_all(&line).expect("write");
        }
        println!(
            "  of which one write(2) of 400 B: {:5.0} ns/message",
            per(start)
        );
    }

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
        let mut file = FileWriter::new(format, codec, encoding).expect("a writer");
        let start = Instant::now();
        for m in &messages {
            file.append(m).expect("append");
        }
        let bytes = file.finish().expect("finish").len();
        println!(
            "encode {label}:     {:7.0} ns/message ({:.1} bytes/message in the file)",
            per(start),
            bytes as f64 / count as f64
        );
    }
}
