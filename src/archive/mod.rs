//! The archive reader behind `simdevice archive to-csv`: a directory of telemetry capture
//! files (Event Hubs Capture or IoT Hub routing to storage, Avro, codec null or deflate) into
//! one CSV file per device.
//!
//! Every `*.avro` file under SOURCE, in time order; empty files (Capture writes them for empty
//! windows) skipped; each record's Body parsed as a JSON object and grouped by its `id` field
//! (or by the device id of the system properties); each group appended to `OUT/<key>.csv`
//! (rooms: [`read`] the Avro side, [`csv`] the CSV side). A bad file or record is reported
//! (file, record index, reason) and skipped, and the run goes on; [`Summary`] counts them.
//! With `delete`, a source file is removed once its rows are on disk.
//!
//! Uses `protocol` and `common` at most (today `common`'s error chain); never the hub, whose capture writes
//! these files: the two meet only in the documented file formats.

pub mod csv;
pub mod read;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tracing::warn;

use crate::common::logging::error_chain;

use self::csv::{column_order, CsvError, CsvFile};
use self::read::ArchiveFile;

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
    /// A local directory, or (refused for now) a Blob Storage container.
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
    #[error(
        "{url}: Blob Storage is not built yet: give a local directory (for example one \
         synchronised with `azcopy sync`)"
    )]
    BlobStorageNotBuilt { url: String },
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
    #[error("cannot create the output directory {}", path.display())]
    OutDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the CSV file")]
    Csv(#[source] CsvError),
    #[error("cannot delete {} (its rows are written)", path.display())]
    Delete {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// A mistake in what was asked (exit 78), not a failure while doing it.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ArchiveError::BlobStorageNotBuilt { .. }
                | ArchiveError::Source { .. }
                | ArchiveError::NotADirectory { .. }
        )
    }
}

/// Converts the archive at `options.source` into CSV files under `options.out`.
pub fn to_csv(options: &ToCsv) -> Result<Summary, ArchiveError> {
    let source = local_source(&options.source)?;
    let files = avro_files(&source)?;
    std::fs::create_dir_all(&options.out).map_err(|source| ArchiveError::OutDir {
        path: options.out.clone(),
        source,
    })?;
    let mut summary = Summary::default();
    for path in files {
        let len = std::fs::metadata(&path)
            .map_err(|source| ArchiveError::Walk {
                path: path.clone(),
                source,
            })?
            .len();
        let read_to_end = if len == 0 {
            summary.empty_files += 1;
            true
        } else {
            convert_file(&path, options, &mut summary)?
        };
        // A file that could not be read to its end is kept, whatever `delete` says: what
        // could not be read is still in it.
        if options.delete && read_to_end {
            std::fs::remove_file(&path).map_err(|source| ArchiveError::Delete {
                path: path.clone(),
                source,
            })?;
            summary.files_deleted += 1;
        }
    }
    Ok(summary)
}

/// The local directory `source` names; a Blob Storage container is refused for now.
fn local_source(source: &str) -> Result<PathBuf, ArchiveError> {
    let lower = source.to_ascii_lowercase();
    if ["azure://", "https://", "http://"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
    {
        // The URL may carry a SAS: only its part before `?` is named.
        let url = source.split('?').next().unwrap_or(source).to_owned();
        return Err(ArchiveError::BlobStorageNotBuilt { url });
    }
    let path = PathBuf::from(source);
    let metadata = std::fs::metadata(&path).map_err(|error| ArchiveError::Source {
        path: path.clone(),
        source: error,
    })?;
    if !metadata.is_dir() {
        return Err(ArchiveError::NotADirectory { path });
    }
    Ok(path)
}

/// Every `*.avro` file under `root`, in time order ([`time_key`]).
fn avro_files(root: &Path) -> Result<Vec<PathBuf>, ArchiveError> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        let walk = |source| ArchiveError::Walk {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(walk)? {
            let entry = entry.map_err(walk)?;
            let kind = entry.file_type().map_err(walk)?;
            let path = entry.path();
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "avro") {
                let relative = path.strip_prefix(root).unwrap_or(&path).to_owned();
                found.push((time_key(&relative), path));
            }
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// The sort key of a file: its time, then its path. Both layouts end in zero-padded time
/// tokens (`{YYYY}/{MM}/{DD}/{HH}/{mm}[/{ss}].avro`) after a partition id, so the time is the
/// trailing run of all-digit path components from the first four-digit one (the year). Plain
/// path order would read partition 0 whole before partition 1; files without such a run sort
/// by path alone, after none and before none in particular (an empty time).
fn time_key(relative: &Path) -> (Vec<String>, PathBuf) {
    let parts: Vec<String> = relative
        .iter()
        .map(|part| {
            let part = part.to_string_lossy();
            part.strip_suffix(".avro").unwrap_or(&part).to_owned()
        })
        .collect();
    let digits = |p: &String| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let run_start = parts.iter().rposition(|p| !digits(p)).map_or(0, |i| i + 1);
    let time = match parts[run_start..].iter().position(|p| p.len() == 4) {
        Some(year) => parts[run_start + year..].to_vec(),
        None => Vec::new(),
    };
    (time, relative.to_owned())
}

/// Reads one file and appends its rows; returns whether it was read to its end.
fn convert_file(path: &Path, options: &ToCsv, summary: &mut Summary) -> Result<bool, ArchiveError> {
    let file = match ArchiveFile::open(path) {
        Ok(file) => file,
        Err(error) => {
            warn!(file = %path.display(), reason = %error_chain(&error), "file skipped");
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
            warn!(file = %path.display(), record = index, reason = %reason, "record skipped");
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
        let name = file_name(&key).expect("checked when grouped");
        let csv_path = options.out.join(name);
        let columns = column_order(readings.iter().flat_map(|r| r.keys().map(String::as_str)));
        let mut csv = CsvFile::open(&csv_path, &columns).map_err(ArchiveError::Csv)?;
        for reading in &readings {
            let dropped = csv.append(reading).map_err(ArchiveError::Csv)?;
            summary.rows_written += 1;
            if !dropped.is_empty() {
                warn!(
                    file = %path.display(),
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
    fn time_key_orders_partitions_by_time() {
        let mut paths = vec![
            "ns/hub/1/2024/01/01/00/05/00.avro",
            "ns/hub/0/2024/01/01/00/10/00.avro",
            "ns/hub/0/2024/01/01/00/00/00.avro",
            "hub/3/2024/01/01/00/07.avro",
        ];
        paths.sort_by_key(|p| time_key(Path::new(p)));
        assert_eq!(
            paths,
            [
                "ns/hub/0/2024/01/01/00/00/00.avro",
                "ns/hub/1/2024/01/01/00/05/00.avro",
                "hub/3/2024/01/01/00/07.avro",
                "ns/hub/0/2024/01/01/00/10/00.avro",
            ]
        );
        assert_eq!(time_key(Path::new("x/y.avro")).0, Vec::<String>::new());
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
    fn blob_storage_sources_are_refused_as_config() {
        for source in [
            "azure://capture",
            "https://acct.blob.core.windows.net/c?sv=secret",
        ] {
            let error = local_source(source).expect_err("refused");
            assert!(error.is_config());
            assert!(!error.to_string().contains("secret"), "{error}");
        }
        let missing = local_source("/nonexistent/archive").expect_err("missing");
        assert!(missing.is_config());
    }
}
