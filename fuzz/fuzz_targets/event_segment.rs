//! The event store's segment files as the hub reads them back at start (`hub::events::segment`):
//! length-prefixed, checksummed records, each a payload `Record::decode` takes apart.
//!
//! The input is tried two ways. As one record's payload: decoding must never panic, and a
//! record that decodes encodes to a payload that decodes to the same record. As a whole segment
//! file: `segment::read` must never panic, keeps only whole records at increasing offsets
//! within the file, and truncates the file to the end of the last whole one (a torn tail).

#![no_main]

use libfuzzer_sys::fuzz_target;
use simdevice::hub::events::segment::{self, Record};

fuzz_target!(|data: &[u8]| {
    if let Some(record) = Record::decode(data) {
        let again = Record::decode(&record.encode()).expect("an encoded record decodes");
        assert_eq!(again, record);
    }

    // One file per fuzzing process: libFuzzer runs inputs one after another.
    let path = std::env::temp_dir().join(format!(
        "simdevice-fuzz-segment-{}.log",
        std::process::id()
    ));
    std::fs::write(&path, data).expect("the temporary segment is written");
    let base = 4096;
    let (records, len) = segment::read(&path, base).expect("the segment is read");
    assert!(len <= data.len() as u64);
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(len),
        "truncated to its whole records"
    );
    let mut last = None;
    for (offset, _) in &records {
        assert!(*offset >= base && *offset < base + len);
        assert!(last.is_none_or(|l| l < *offset), "offsets increase");
        last = Some(*offset);
    }
    assert_eq!(records.is_empty(), len == 0);
});
