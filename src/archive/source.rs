//! Where the archive's files are: a directory, or a Blob Storage container (`common::blob`).
//! Lists the files in time order, opens one, deletes one; knows nothing of Avro's contents.
//!
//! Which names are archive files: `*.avro` (Event Hubs Capture's default `archiveNameFormat`)
//! and names without an extension (IoT Hub routing's default `fileNameFormat`); names with any
//! other extension, and hidden names (a `.` first, such as the hub's temporaries), are not
//! archive files and are passed over.

use std::path::{Path, PathBuf};

use futures::TryStreamExt;

use super::read::{ArchiveFile, OpenError};
use super::ArchiveError;
use crate::common::blob::{self, Container, Location};

/// The archive being read.
pub enum Source {
    Directory(PathBuf),
    Container(Container),
}

/// One file of the archive.
#[derive(Debug, Clone)]
pub struct Entry {
    /// For messages: the path, or the container's name and the blob's.
    pub name: String,
    pub size: u64,
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    File(PathBuf),
    Blob(object_store::path::Path),
}

impl Source {
    /// The source `text` names (module notes of `common::blob`), checked: a directory must
    /// exist and be one.
    pub fn parse(text: &str) -> Result<Source, ArchiveError> {
        let env = std::env::var(blob::CONNECTION_STRING_ENV).ok();
        match blob::parse(text, env.as_deref()).map_err(ArchiveError::Container)? {
            Location::Container(container) => Ok(Source::Container(container)),
            Location::Directory(path) => {
                let metadata = std::fs::metadata(&path).map_err(|error| ArchiveError::Source {
                    path: path.clone(),
                    source: error,
                })?;
                if !metadata.is_dir() {
                    return Err(ArchiveError::NotADirectory { path });
                }
                Ok(Source::Directory(path))
            }
        }
    }

    /// Every archive file, in time order ([`time_key`]).
    pub async fn list(&self) -> Result<Vec<Entry>, ArchiveError> {
        let mut found: Vec<(Vec<String>, String, Entry)> = Vec::new();
        match self {
            Source::Directory(root) => {
                for (path, size) in files_under(root)? {
                    let relative = path.strip_prefix(root).unwrap_or(&path);
                    let relative = relative.to_string_lossy().replace('\\', "/");
                    if is_archive_name(&relative) {
                        let entry = Entry {
                            name: path.display().to_string(),
                            size,
                            place: Place::File(path.clone()),
                        };
                        found.push((time_key(&relative), relative, entry));
                    }
                }
            }
            Source::Container(container) => {
                let prefix = (!container.prefix.is_empty())
                    .then(|| object_store::path::Path::from(container.prefix.as_str()));
                let objects: Vec<object_store::ObjectMeta> = container
                    .store
                    .list(prefix.as_ref())
                    .try_collect()
                    .await
                    .map_err(|source| ArchiveError::List {
                        container: container.name.clone(),
                        source,
                    })?;
                for object in objects {
                    let full = object.location.to_string();
                    let relative = full
                        .strip_prefix(container.prefix.as_str())
                        .unwrap_or(&full)
                        .trim_start_matches('/')
                        .to_owned();
                    if is_archive_name(&relative) {
                        let entry = Entry {
                            name: format!("{}/{full}", container.name),
                            size: object.size,
                            place: Place::Blob(object.location),
                        };
                        found.push((time_key(&relative), relative, entry));
                    }
                }
            }
        }
        found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(found.into_iter().map(|(_, _, entry)| entry).collect())
    }

    /// Opens one file for reading.
    pub async fn open(&self, entry: &Entry) -> Result<ArchiveFile, OpenError> {
        match (&entry.place, self) {
            (Place::File(path), _) => ArchiveFile::open(path),
            (Place::Blob(path), Source::Container(container)) => {
                let bytes = async { container.store.get(path).await?.bytes().await }
                    .await
                    .map_err(OpenError::Blob)?;
                ArchiveFile::from_reader(Box::new(std::io::Cursor::new(bytes)))
            }
            (Place::Blob(_), Source::Directory(_)) => {
                unreachable!("entries come from their source")
            }
        }
    }

    /// Deletes one file, once its rows are written.
    pub async fn delete(&self, entry: &Entry) -> Result<(), ArchiveError> {
        match (&entry.place, self) {
            (Place::File(path), _) => {
                std::fs::remove_file(path).map_err(|source| ArchiveError::Delete {
                    name: entry.name.clone(),
                    source: Box::new(source),
                })
            }
            (Place::Blob(path), Source::Container(container)) => container
                .store
                .delete(path)
                .await
                .map_err(|source| ArchiveError::Delete {
                    name: entry.name.clone(),
                    source: Box::new(source),
                }),
            (Place::Blob(_), Source::Directory(_)) => {
                unreachable!("entries come from their source")
            }
        }
    }
}

/// Every regular file under `root`, with its size.
fn files_under(root: &Path) -> Result<Vec<(PathBuf, u64)>, ArchiveError> {
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
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                let size = entry.metadata().map_err(walk)?.len();
                found.push((entry.path(), size));
            }
        }
    }
    Ok(found)
}

/// Whether `relative` (`/`-separated) names an archive file (module notes).
fn is_archive_name(relative: &str) -> bool {
    if relative.split('/').any(|part| part.starts_with('.')) {
        return false;
    }
    let file = relative.rsplit('/').next().unwrap_or(relative);
    match file.rsplit_once('.') {
        Some((_, ext)) => ext == "avro",
        None => true,
    }
}

/// The sort key of a file: its time. Both layouts end in zero-padded time tokens
/// (`{YYYY}/{MM}/{DD}/{HH}/{mm}[/{ss}].avro`) after a partition id, so the time is the trailing
/// run of all-digit path components from the first four-digit one (the year); a `_N` suffix
/// (two files of one second) sorts after the plain name. Plain path order would read
/// partition 0 whole before partition 1; files without such a run have an empty time and sort
/// first, by path.
fn time_key(relative: &str) -> Vec<String> {
    let parts: Vec<String> = relative
        .split('/')
        .map(|part| part.strip_suffix(".avro").unwrap_or(part).to_owned())
        .collect();
    let digits = |p: &String| {
        let base = p.split_once('_').map_or(p.as_str(), |(base, _)| base);
        !base.is_empty() && base.bytes().all(|b| b.is_ascii_digit())
    };
    let run_start = parts.iter().rposition(|p| !digits(p)).map_or(0, |i| i + 1);
    match parts[run_start..].iter().position(|p| p.len() == 4) {
        Some(year) => parts[run_start + year..].to_vec(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_are_avro_files_and_routing_names_without_extension() {
        assert!(is_archive_name("ns/hub/0/2024/03/04/05/06/07.avro"));
        assert!(is_archive_name("hub/0/2024/03/04/05/06"));
        assert!(is_archive_name("hub/0/2024/03/04/05/06_1"));
        assert!(!is_archive_name("hub/0/2024/03/04/05/06.json"));
        assert!(!is_archive_name(".simdevice-tmp/abc.tmp"));
        assert!(!is_archive_name("hub/.x/06"));
    }

    #[test]
    fn time_key_orders_partitions_by_time() {
        let mut names = vec![
            "ns/hub/1/2024/03/04/05/06/00.avro",
            "ns/hub/0/2024/03/04/05/07/00.avro",
            "ns/hub/0/2024/03/04/05/06/30.avro",
            "ns/hub/0/2024/03/04/05/06/30_1.avro",
        ];
        names.sort_by_key(|n| (time_key(n), n.to_string()));
        assert_eq!(
            names,
            [
                "ns/hub/1/2024/03/04/05/06/00.avro",
                "ns/hub/0/2024/03/04/05/06/30.avro",
                "ns/hub/0/2024/03/04/05/06/30_1.avro",
                "ns/hub/0/2024/03/04/05/07/00.avro",
            ]
        );
        assert!(time_key("loose.avro").is_empty());
    }
}
