//! The archive reader behind `simdevice archive to-csv`: telemetry capture files (Event Hubs
//! Capture or IoT Hub routing to storage, Avro, codec null or deflate), in a directory or a Blob
//! Storage container, into one CSV file per device.
//!
//! Every archive file under SOURCE (`*.avro`, and routing's extensionless names), in time
//! order; empty files (Capture writes them for empty windows) skipped; each record's Body
//! parsed as a JSON object and grouped by its `id` field (or by the device id of the system
//! properties); each group appended to `OUT/<key>.csv` (rooms: [`source`] where the files are,
//! [`read`] the Avro side, [`csv`] the CSV side). A bad file or record is reported (file,
//! record index, reason) and skipped, and the run goes on; [`Summary`] counts them. With
//! `delete`, a source file is removed once its rows are on disk.
//!
//! Uses `protocol` and `common` at most (the error chain, `common::blob`); never the hub, whose
//! capture writes these files: the two meet only in the documented file formats.

pub mod csv;
pub mod read;
pub mod source;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Map, Value};
use tracing::warn;

use crate::common::logging::error_chain;

use self::csv::{column_order, CsvError, CsvFile};
use self::read::{ArchiveFile, OpenError};
use self::source::Source;

/// How readings are grouped into files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// The reading's own `id` field (the walkthrough's key).
    Id,
    /// The sending device's id from the record's system properties.
    Device,
}

#[derive(Debug, Clone)]
pub struct ToCsv {
    /// A local directory, or a Blob Storage container (`common::blob`).
    pub source: String,
    pub out: PathBuf,
    pub delete: bool,
    pub by: GroupBy,
}

/// What a run did. `skipped_records` counts records that gave no row (and the unreadable rest
/// of a file counts one); `dropped_values` values whose column an existing header lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub files_read: u64,
    pub empty_files: u64,
    pub bad_files: u64,
    pub rows_written: u64,
    pub skipped_records: u64,
    pub dropped_values: u64,
    pub files_deleted: u64,
}

impl Summary {
    /// Whether everything in the source went into the CSV files in full.
    pub fn is_clean(&self) -> bool {
        self.bad_files == 0 && self.skipped_records == 0 && self.dropped_values == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A container named in a way that cannot be used (no connection string, no SAS...).
    #[error("source")]
    Container(#[source] crate::common::blob::BlobError),
    #[error("source {}", path.display())]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("source {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot list {}", path.display())]
    Walk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list the container {container}")]
    List {
        container: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot create the output directory {}", path.display())]
    OutDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the CSV file")]
    Csv(#[source] CsvError),
    #[error("cannot delete {name} (its rows are written)")]
    Delete {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ArchiveError {
    /// A mistake in what was asked (exit 78), not a failure while doing it.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ArchiveError::Container(_)
                | ArchiveError::Source { .. }
                | ArchiveError::NotADirectory { .. }
        )
    }
}

/// Converts the archive at `options.source` into CSV files under `options.out`.
pub async fn to_csv(options: &ToCsv) -> Result<Summary, ArchiveError> {
    let source = Source::parse(&options.source)?;
    let files = source.list().await?;
    std::fs::create_dir_all(&options.out).map_err(|source| ArchiveError::OutDir {
        path: options.out.clone(),
        source,
    })?;
    let mut summary = Summary::default();
    for entry in files {
        let read_to_end = if entry.size == 0 {
            summary.empty_files += 1;
            true
        } else {
            let file = source.open(&entry).await;
            convert_file(&entry.name, file, options, &mut summary)?
        };
        // A file that could not be read to its end is kept, whatever `delete` says: what
        // could not be read is still in it.
        if options.delete && read_to_end {
            source.delete(&entry).await?;
            summary.files_deleted += 1;
        }
    }
    Ok(summary)
}

/// Reads one file and appends its rows; returns whether it was read to its end.
fn convert_file(
    name: &str,
    file: Result<ArchiveFile, OpenError>,
    options: &ToCsv,
    summary: &mut Summary,
) -> Result<bool, ArchiveError> {
    let file = match file {
        Ok(file) => file,
        Err(error) => {
            warn!(file = %name, reason = %error_chain(&error), "file skipped");
            summary.bad_files += 1;
            return Ok(false);
        }
    };
    summary.files_read += 1;
    let mut read_to_end = true;
    // Key -> readings in record order; BTreeMap so the files are written in a stable order.
    let mut groups: BTreeMap<String, Vec<Map<String, Value>>> = BTreeMap::new();
    for (index, record) in file.enumerate() {
        let skip = |reason: &dyn std::fmt::Display| {
            warn!(file = %name, record = index, reason = %reason, "record skipped");
        };
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                skip(&error_chain(&error));
                summary.skipped_records += 1;
                if error.ends_file() {
                    read_to_end = false;
                }
                continue;
            }
        };
        match reading(record.body.as_deref()) {
            Err(reason) => {
                skip(&reason);
                summary.skipped_records += 1;
            }
            Ok(reading) => {
                let key = match options.by {
                    GroupBy::Id => id_key(&reading),
                    GroupBy::Device => record
                        .device_id
                        .filter(|id| !id.is_empty())
                        .ok_or(Skip::NoDeviceId),
                };
                match key.and_then(|key| file_name(&key).map(|_| key)) {
                    Ok(key) => groups.entry(key).or_default().push(reading),
                    Err(reason) => {
                        skip(&reason);
                        summary.skipped_records += 1;
                    }
                }
            }
        }
    }
    for (key, readings) in groups {
        let csv_name = file_name(&key).expect("checked when grouped");
        let csv_path = options.out.join(csv_name);
        let columns = column_order(readings.iter().flat_map(|r| r.keys().map(String::as_str)));
        let mut csv = CsvFile::open(&csv_path, &columns).map_err(ArchiveError::Csv)?;
        for reading in &readings {
            let dropped = csv.append(reading).map_err(ArchiveError::Csv)?;
            summary.rows_written += 1;
            if !dropped.is_empty() {
                warn!(
                    file = %name,
                    csv = %csv_path.display(),
                    columns = %dropped.join(","),
                    "values dropped: the CSV file's header has no such column"
                );
                summary.dropped_values += dropped.len() as u64;
            }
        }
        csv.finish().map_err(ArchiveError::Csv)?;
    }
    Ok(read_to_end)
}

/// Why a record that decoded gives no row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Skip {
    #[error("Body is null")]
    NullBody,
    #[error("Body is not JSON: {0}")]
    NotJson(String),
    #[error("Body is not a JSON object")]
    NotAnObject,
    #[error("the reading has no id")]
    NoId,
    #[error("the reading's id is neither a string nor a number")]
    IdType,
    #[error("the record has no device id in its system properties")]
    NoDeviceId,
    #[error("the key is too long for a file name ({0} bytes encoded)")]
    KeyTooLong(usize),
}

fn reading(body: Option<&[u8]>) -> Result<Map<String, Value>, Skip> {
    let body = body.ok_or(Skip::NullBody)?;
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Skip::NotAnObject),
        Err(error) => Err(Skip::NotJson(error.to_string())),
    }
}

fn id_key(reading: &Map<String, Value>) -> Result<String, Skip> {
    match reading.get("id") {
        None | Some(Value::Null) => Err(Skip::NoId),
        Some(Value::String(id)) if id.is_empty() => Err(Skip::NoId),
        Some(Value::String(id)) => Ok(id.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(Skip::IdType),
    }
}

/// The longest file name written (most file systems allow 255 bytes).
const MAX_FILE_NAME: usize = 250;

/// `<key>.csv` with every byte outside `[A-Za-z0-9_-]`, and a `.` anywhere, written as `%XX`
/// (upper-case hex of the UTF-8 byte): distinct keys give distinct names, no name is hidden,
/// `.`, `..` or a path, and the key can be read back from the name.
fn file_name(key: &str) -> Result<String, Skip> {
    let mut name = String::with_capacity(key.len() + 4);
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    name.push_str(".csv");
    if name.len() > MAX_FILE_NAME {
        return Err(Skip::KeyTooLong(name.len()));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_eq!(file_name("sensor-01_a").as_deref(), Ok("sensor-01_a.csv"));
        assert_eq!(file_name("..").as_deref(), Ok("%2E%2E.csv"));
        assert_eq!(file_name("a/b").as_deref(), Ok("a%2Fb.csv"));
        assert_eq!(file_name("a%2Fb").as_deref(), Ok("a%252Fb.csv"));
        assert_eq!(file_name("é").as_deref(), Ok("%C3%A9.csv"));
        assert_eq!(file_name(&"x".repeat(300)), Err(Skip::KeyTooLong(304)));
    }

    #[test]
    fn readings_and_keys() {
        assert_eq!(reading(None), Err(Skip::NullBody));
        assert!(matches!(reading(Some(b"not json")), Err(Skip::NotJson(_))));
        assert_eq!(reading(Some(b"[1]")), Err(Skip::NotAnObject));
        let map = reading(Some(br#"{"id": 7, "uv": 1}"#)).expect("object");
        assert_eq!(id_key(&map).as_deref(), Ok("7"));
        let map = reading(Some(br#"{"uv": 1}"#)).expect("object");
        assert_eq!(id_key(&map), Err(Skip::NoId));
        let map = reading(Some(br#"{"id": ["a"]}"#)).expect("object");
        assert_eq!(id_key(&map), Err(Skip::IdType));
    }

    #[test]
    fn bad_sources_are_config_errors_that_keep_the_sas_out() {
        for source in [
            "azure://Bad_Container",
            "https://acct.blob.core.windows.net/c",
            "http://acct.blob.core.windows.net/c?sv=secret",
            "/nonexistent/archive",
        ] {
            let error = Source::parse(source).err().expect("refused");
            assert!(error.is_config(), "{source}");
            assert!(!error_chain(&error).contains("secret"), "{error}");
        }
    }
}
