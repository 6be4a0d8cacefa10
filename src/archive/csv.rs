//! One device's CSV file: rows appended under a header that is written once, when the file is
//! created, and never changed after.
//!
//! Columns: `id`, `timestamp`, `uv`, `temperature`, `humidity` (those of them the readings
//! have), then every other column alphabetically. An existing file keeps its header: a
//! reading's values go under the header's columns, a column the header lacks gets an empty
//! cell, and a value whose column the header lacks is dropped and reported to the caller
//! (rewriting a file that may be large, or shifting its columns under a reader, would be worse;
//! the report says which column, so the user can start a new output directory).
//!
//! Quoting is RFC 4180's: a field with a comma, a double quote, CR or LF is wrapped in double
//! quotes, with its quotes doubled; lines end in LF. A cell is a JSON string's text, a number
//! or a boolean as JSON writes it, empty for null, and nested objects and arrays as compact
//! JSON. No knowledge of Avro or directories here.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The columns that come first, in this order, when a reading has them.
pub const LEADING_COLUMNS: [&str; 5] = ["id", "timestamp", "uv", "temperature", "humidity"];

#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
pub struct CsvError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// `names` in the stable column order, each once.
pub fn column_order<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut rest: Vec<&str> = Vec::new();
    let mut leading = [false; LEADING_COLUMNS.len()];
    for name in names {
        match LEADING_COLUMNS.iter().position(|c| *c == name) {
            Some(i) => leading[i] = true,
            None => rest.push(name),
        }
    }
    rest.sort_unstable();
    rest.dedup();
    LEADING_COLUMNS
        .iter()
        .zip(leading)
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .chain(rest)
        .map(str::to_owned)
        .collect()
}

/// The text of one cell.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Appends `field` to `line`, quoted when it must be.
fn push_field(line: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        line.push('"');
        line.push_str(&field.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(field);
    }
}

fn line_of<'a>(fields: impl IntoIterator<Item = &'a str>) -> String {
    let mut line = String::new();
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        push_field(&mut line, field);
    }
    line.push('\n');
    line
}

/// The fields of the first record of `text` (a header: it may span lines inside quotes).
pub fn parse_first_record(text: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (false, '\n') => break,
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, c) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// One CSV file open for appending.
#[derive(Debug)]
pub struct CsvFile {
    path: PathBuf,
    header: Vec<String>,
    writer: BufWriter<File>,
}

impl CsvFile {
    /// Opens `path` for appending, creating it with the header `columns` when it does not
    /// exist or is empty; an existing file's header is read back and kept.
    pub fn open(path: &Path, columns: &[String]) -> Result<CsvFile, CsvError> {
        let error = |source| CsvError {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(error)?;
        let len = file.metadata().map_err(error)?.len();
        let mut writer;
        let header;
        if len == 0 {
            header = columns.to_vec();
            writer = BufWriter::new(file);
            writer
                .write_all(line_of(header.iter().map(String::as_str)).as_bytes())
                .map_err(error)?;
        } else {
            // A crash can leave a last row without its newline: end it, so the next row
            // does not run into it.
            file.seek(SeekFrom::End(-1)).map_err(error)?;
            let mut last = [0u8];
            file.read_exact(&mut last).map_err(error)?;
            file.seek(SeekFrom::Start(0)).map_err(error)?;
            header = read_header(&mut file).map_err(error)?;
            writer = BufWriter::new(file);
            if last[0] != b'\n' {
                writer.write_all(b"\n").map_err(error)?;
            }
        }
        Ok(CsvFile {
            path: path.to_owned(),
            header,
            writer,
        })
    }

    pub fn header(&self) -> &[String] {
        &self.header
    }

    /// Appends one reading under the header; returns the reading's columns the header lacks
    /// (their values are not written).
    pub fn append(&mut self, reading: &Map<String, Value>) -> Result<Vec<String>, CsvError> {
        let cells: Vec<String> = self
            .header
            .iter()
            .map(|column| reading.get(column).map(cell).unwrap_or_default())
            .collect();
        let dropped = reading
            .keys()
            .filter(|key| !self.header.contains(key))
            .cloned()
            .collect();
        self.writer
            .write_all(line_of(cells.iter().map(String::as_str)).as_bytes())
            .map_err(|source| CsvError {
                path: self.path.clone(),
                source,
            })?;
        Ok(dropped)
    }

    /// Writes out what is buffered and waits until it is on disk (before a source file may
    /// be deleted).
    pub fn finish(self) -> Result<(), CsvError> {
        let path = self.path;
        let file = self.writer.into_inner().map_err(|error| CsvError {
            path: path.clone(),
            source: error.into_error(),
        })?;
        file.sync_data().map_err(|source| CsvError { path, source })
    }
}

/// The header of an existing file: its first record (read line by line until its quotes
/// close).
fn read_header(file: &mut File) -> std::io::Result<Vec<String>> {
    let mut reader = BufReader::new(file);
    let mut text = String::new();
    loop {
        let read = reader.read_line(&mut text)?;
        if read == 0 || text.matches('"').count().is_multiple_of(2) {
            break;
        }
    }
    Ok(parse_first_record(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reading(value: Value) -> Map<String, Value> {
        value.as_object().expect("object").clone()
    }

    #[test]
    fn columns_leading_first_then_alphabetical() {
        assert_eq!(
            column_order([
                "zeta",
                "humidity",
                "alpha",
                "id",
                "uv",
                "alpha",
                "timestamp"
            ]),
            ["id", "timestamp", "uv", "humidity", "alpha", "zeta"]
        );
        assert_eq!(
            column_order(["temperature", "b", "a"]),
            ["temperature", "a", "b"]
        );
    }

    #[test]
    fn cells_and_quoting() {
        assert_eq!(cell(&json!(null)), "");
        assert_eq!(cell(&json!(21.5)), "21.5");
        assert_eq!(cell(&json!(true)), "true");
        assert_eq!(cell(&json!("plain")), "plain");
        assert_eq!(cell(&json!({"a": [1, 2]})), r#"{"a":[1,2]}"#);
        assert_eq!(
            line_of(["a,b", "say \"hi\"", "two\nlines", "ok"]),
            "\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",ok\n"
        );
    }

    #[test]
    fn parse_first_record_reverses_quoting() {
        let fields = ["a,b", "say \"hi\"", "two\nlines", "", "ok"];
        let text = line_of(fields) + "next,row\n";
        assert_eq!(parse_first_record(&text), fields);
        assert_eq!(parse_first_record("a,b\r\nc"), ["a", "b"]);
    }

    #[test]
    fn new_file_gets_header_existing_file_keeps_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("d.csv");
        let columns = column_order(["id", "uv", "note"]);
        let mut csv = CsvFile::open(&path, &columns).expect("open");
        let dropped = csv
            .append(&reading(json!({"id": "d", "uv": 3, "note": "x, y"})))
            .expect("append");
        assert!(dropped.is_empty());
        csv.finish().expect("finish");

        // Reopened with other columns: the header stays, the extra column is reported.
        let mut csv = CsvFile::open(&path, &column_order(["id", "extra"])).expect("reopen");
        assert_eq!(csv.header(), ["id", "uv", "note"]);
        let dropped = csv
            .append(&reading(json!({"id": "d", "extra": 1})))
            .expect("append");
        assert_eq!(dropped, ["extra"]);
        csv.finish().expect("finish");

        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "id,uv,note\nd,3,\"x, y\"\nd,,\n"
        );
    }

    #[test]
    fn a_last_row_without_newline_is_ended_before_appending() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("d.csv");
        std::fs::write(&path, "id,uv\nd,1").expect("write");
        let mut csv = CsvFile::open(&path, &[]).expect("open");
        csv.append(&reading(json!({"id": "d", "uv": 2})))
            .expect("append");
        csv.finish().expect("finish");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "id,uv\nd,1\nd,2\n"
        );
    }
}
