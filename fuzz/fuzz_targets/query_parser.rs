//! The IoT Hub query language: `POST /devices/query` bodies and jobs' `queryCondition`.
//!
//! The input is parsed both as a full query (`query::parse`) and as a bare condition
//! (`query::parse_condition`); whatever parses is run over a few fixed twin and job documents.
//! No panic, no hang (nesting is capped), and these must hold:
//! - a query returns at most `TOP n` rows, and at most one row per document (or one aggregate
//!   row when there are no documents);
//! - `SELECT *` returns exactly the matching documents, in order;
//! - a condition matches the same documents as `SELECT * FROM devices WHERE <condition>`.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use simdevice::hub::query::{self, ItemType, Source};

fn twins() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| {
        vec![
            json!({
                "deviceId": "door-01", "etag": "AAAA", "version": 3, "status": "enabled",
                "connectionState": "Connected", "lastActivityTime": "2026-01-02T03:04:05Z",
                "tags": {"location": {"plant": "Redmond43", "floor": 2}, "list": [1, "a", null]},
                "properties": {
                    "desired": {"a": 1, "$metadata": {"$lastUpdated": "2026-01-01T00:00:00Z"}, "$version": 2},
                    "reported": {"connectivity": {"type": "cellular"}, "temp": 20, "ok": true, "$version": 4}
                }
            }),
            json!({
                "deviceId": "door-02", "version": 5, "status": "enabled",
                "connectionState": "Disconnected",
                "tags": {"location": {"plant": "Redmond43"}},
                "properties": {
                    "desired": {"$version": 1},
                    "reported": {"connectivity": {"type": "wifi"}, "temp": 25.5, "big": 4503599627370495_i64, "$version": 7}
                }
            }),
            json!({
                "deviceId": "door-03", "moduleId": "m1", "version": 1, "status": "disabled",
                "connectionState": "Disconnected",
                "tags": {"location": {"plant": "Dublin"}},
                "properties": {
                    "desired": {"$version": 1},
                    "reported": {"connectivity": {"type": "cellular"}, "temp": -30, "s": "", "$version": 2}
                }
            }),
            json!({
                "deviceId": "door-04", "version": 1, "status": "enabled",
                "connectionState": "Connected",
                "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}
            }),
        ]
    })
}

fn jobs() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| {
        vec![
            json!({"deviceId": "door-01", "jobId": "j1", "jobType": "scheduleDeviceMethod", "status": "completed",
                   "createdDateTimeUtc": "2026-01-01T00:00:00Z", "outcome": {"deviceMethodResponse": {"status": 200, "payload": {"ok": true}}}}),
            json!({"deviceId": "door-02", "jobId": "j1", "jobType": "scheduleDeviceMethod", "status": "failed",
                   "error": {"code": "404103", "description": "timeout"}}),
            json!({"deviceId": "door-01", "jobId": "j2", "jobType": "scheduleUpdateTwin", "status": "completed"}),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();

    if let Ok(q) = query::parse(s) {
        let docs = match q.source() {
            Source::DevicesJobs => jobs(),
            Source::Devices | Source::DevicesModules => twins(),
        };
        let result = q.execute(docs).expect("evaluation cannot fail");
        assert_eq!(result.item_type, q.item_type());
        if let Some(top) = q.top() {
            assert!(result.items.len() <= top);
        }
        assert!(result.items.len() <= docs.len().max(1));
        if matches!(result.item_type, ItemType::Twin | ItemType::DeviceJob) {
            let expected: Vec<&Value> = docs
                .iter()
                .filter(|d| q.matches(d))
                .take(q.top().unwrap_or(usize::MAX))
                .collect();
            let got: Vec<&Value> = result.items.iter().collect();
            assert_eq!(got, expected, "SELECT * must return the matching documents");
        }
    }

    if let Ok(condition) = query::parse_condition(s) {
        let matched: Vec<bool> = twins().iter().map(|d| condition.matches(d)).collect();
        if let Ok(q) = query::parse(&format!("SELECT * FROM devices WHERE {s}")) {
            let same: Vec<bool> = twins().iter().map(|d| q.matches(d)).collect();
            assert_eq!(matched, same, "condition and WHERE disagree on {s:?}");
        }
    }
});
