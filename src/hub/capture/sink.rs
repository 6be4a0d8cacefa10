//! Where closed windows go: a directory or a Blob Storage container ([`Destination`]), in
//! Azure's path layout. In a directory, a file is written under a temporary name in
//! [`TEMP_DIR`] (on the same file system), synced, then renamed into place, so a reader sees the
//! whole file or none of it; temporaries a crash left are swept at start. In a container, a
//! file is one Put Blob, which commits the blob whole, made with `If-None-Match: *` so that a
//! published blob is never replaced. Touches only the destination.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chrono::{DateTime, Datelike, Timelike, Utc};
use object_store::{PutMode, PutOptions, PutPayload};

use super::format::Format;
use crate::common::blob::Container;

/// Where the temporaries of a capture directory are written, under its root. Hidden, and
/// outside Azure's layouts, so readers that follow them never enter it.
pub const TEMP_DIR: &str = ".simdevice-tmp";

/// The names in the path: Event Hubs' namespace and hub, IoT Hub's hub, and the partition.
#[derive(Clone, Debug)]
pub struct Naming {
    pub namespace: String,
    pub hub: String,
    pub partition: String,
}

/// A capture destination (`--capture DEST`).
#[derive(Clone, Debug)]
pub enum Destination {
    Directory(PathBuf),
    Container(Container),
}

impl Destination {
    /// For logs and `hub.json`: the directory's absolute path, or the container's name (never
    /// its SAS).
    pub fn describe(&self) -> String {
        match self {
            Destination::Directory(dir) => std::path::absolute(dir)
                .unwrap_or(dir.clone())
                .display()
                .to_string(),
            Destination::Container(container) => container.name.clone(),
        }
    }

    /// Makes the directory (and removes the temporaries a crashed hub left in it); a container
    /// is taken as it is (it is checked by the first file).
    pub fn prepare(&self) -> std::io::Result<()> {
        let Destination::Directory(dir) = self else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let temp = dir.join(TEMP_DIR);
        match std::fs::remove_dir_all(&temp) {
            Ok(()) => {
                tracing::info!(dir = %temp.display(), "capture: temporaries of an interrupted write removed")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write the capture file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the capture blob {path} in {container}")]
    Blob {
        container: String,
        path: String,
        #[source]
        source: object_store::Error,
    },
}

/// The path of a window's file under the capture root, for the time the window closed:
/// `{namespace}/{hub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}/{ss}.avro` (Event Hubs Capture's
/// default `archiveNameFormat`), or `{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}` (routing's
/// default `fileNameFormat`, which names no extension).
pub fn relative_path(format: Format, naming: &Naming, time: DateTime<Utc>) -> String {
    let date = format!(
        "{:04}/{:02}/{:02}/{:02}/{:02}",
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute()
    );
    match format {
        Format::EventHubs => format!(
            "{}/{}/{}/{date}/{:02}.avro",
            naming.namespace,
            naming.hub,
            naming.partition,
            time.second()
        ),
        Format::IotHub => format!("{}/{}/{date}", naming.hub, naming.partition),
    }
}

/// Writes `bytes` at `relative` in `destination`, whole or not at all. When that name is taken
/// (two windows closed in the same second, or the same minute for `iothub`), the new one gets
/// `_1`, `_2`... before its extension: a published file is never replaced. Returns where it is.
pub async fn publish(
    destination: &Destination,
    relative: &str,
    bytes: Bytes,
) -> Result<String, SinkError> {
    match destination {
        Destination::Directory(root) => {
            let (root, relative) = (root.clone(), PathBuf::from(relative));
            let written =
                tokio::task::spawn_blocking(move || publish_file(&root, &relative, &bytes))
                    .await
                    .map_err(|join| SinkError::File {
                        path: PathBuf::from("(capture writer)"),
                        source: std::io::Error::other(join),
                    })??;
            Ok(written.display().to_string())
        }
        Destination::Container(container) => publish_blob(container, relative, bytes).await,
    }
}

async fn publish_blob(
    container: &Container,
    relative: &str,
    bytes: Bytes,
) -> Result<String, SinkError> {
    let payload = PutPayload::from(bytes);
    for name in candidate_names(relative) {
        let path = container.path(&name);
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match container
            .store
            .put_opts(&path, payload.clone(), options)
            .await
        {
            Ok(_) => return Ok(format!("{}/{path}", container.name)),
            Err(object_store::Error::AlreadyExists { .. }) => continue,
            Err(source) => {
                return Err(SinkError::Blob {
                    container: container.name.clone(),
                    path: path.to_string(),
                    source,
                })
            }
        }
    }
    unreachable!("candidate_names never ends")
}

/// `relative`, then `stem_1.ext`, `stem_2.ext`... (no extension for `iothub` names).
fn candidate_names(relative: &str) -> impl Iterator<Item = String> + '_ {
    let (dir, file) = relative.rsplit_once('/').unwrap_or(("", relative));
    let (stem, ext) = match file.rsplit_once('.') {
        Some((stem, ext)) => (stem, format!(".{ext}")),
        None => (file, String::new()),
    };
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    std::iter::once(relative.to_owned())
        .chain((1u64..).map(move |n| format!("{prefix}{stem}_{n}{ext}")))
}

/// The directory case: temporary in [`TEMP_DIR`], fsync, rename, fsync of the directory.
fn publish_file(root: &Path, relative: &Path, bytes: &[u8]) -> Result<PathBuf, SinkError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| SinkError::File { path, source }
    };
    let wanted = root.join(relative);
    let dir = wanted.parent().unwrap_or(root).to_owned();
    std::fs::create_dir_all(&dir).map_err(err(&dir))?;
    let temp_dir = root.join(TEMP_DIR);
    std::fs::create_dir_all(&temp_dir).map_err(err(&temp_dir))?;
    let target = free_name(&wanted);
    let temp = temp_dir.join(format!("{}.tmp", uuid::Uuid::new_v4()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, &target)?;
        // The rename is durable once the directory is synced.
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        SinkError::File {
            path: target.clone(),
            source,
        }
    })?;
    Ok(target)
}

fn free_name(wanted: &Path) -> PathBuf {
    let relative = wanted.to_string_lossy().into_owned();
    let free = candidate_names(&relative)
        .map(PathBuf::from)
        .find(|p| !p.exists())
        .expect("some suffix is free");
    free
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn naming() -> Naming {
        Naming {
            namespace: "simdevice".into(),
            hub: "localhost".into(),
            partition: "0".into(),
        }
    }

    #[test]
    fn paths_follow_azure_layouts_zero_padded() {
        let t = Utc.with_ymd_and_hms(2024, 3, 4, 5, 6, 7).unwrap();
        assert_eq!(
            relative_path(Format::EventHubs, &naming(), t),
            "simdevice/localhost/0/2024/03/04/05/06/07.avro"
        );
        assert_eq!(
            relative_path(Format::IotHub, &naming(), t),
            "localhost/0/2024/03/04/05/06"
        );
    }

    #[test]
    fn taken_names_get_a_numbered_suffix_before_the_extension() {
        let names: Vec<String> = candidate_names("a/b/07.avro").take(3).collect();
        assert_eq!(names, ["a/b/07.avro", "a/b/07_1.avro", "a/b/07_2.avro"]);
        let names: Vec<String> = candidate_names("h/0/2024/03/04/05/06").take(2).collect();
        assert_eq!(names, ["h/0/2024/03/04/05/06", "h/0/2024/03/04/05/06_1"]);
    }

    #[tokio::test]
    async fn publish_leaves_the_whole_file_and_no_temporary_and_never_replaces() {
        let root = tempfile::tempdir().unwrap();
        let dest = Destination::Directory(root.path().to_owned());
        let first = publish(&dest, "a/b/07.avro", Bytes::from_static(b"one"))
            .await
            .unwrap();
        assert_eq!(PathBuf::from(&first), root.path().join("a/b/07.avro"));
        let second = publish(&dest, "a/b/07.avro", Bytes::from_static(b"two"))
            .await
            .unwrap();
        assert_eq!(PathBuf::from(&second), root.path().join("a/b/07_1.avro"));
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        assert_eq!(std::fs::read(&second).unwrap(), b"two");
        let temporaries = std::fs::read_dir(root.path().join(TEMP_DIR))
            .unwrap()
            .count();
        assert_eq!(temporaries, 0, "every temporary was renamed");
        let third = publish(&dest, "a/b/00", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(third.ends_with("a/b/00"));
        let fourth = publish(&dest, "a/b/00", Bytes::from_static(b"y"))
            .await
            .unwrap();
        assert!(fourth.ends_with("a/b/00_1"));
    }

    #[test]
    fn prepare_sweeps_what_an_interrupted_write_left() {
        let root = tempfile::tempdir().unwrap();
        let temp = root.path().join(TEMP_DIR);
        std::fs::create_dir_all(&temp).unwrap();
        std::fs::write(temp.join("half.tmp"), b"ha").unwrap();
        std::fs::write(root.path().join("kept.avro"), b"k").unwrap();
        Destination::Directory(root.path().to_owned())
            .prepare()
            .unwrap();
        assert!(!temp.exists());
        assert!(root.path().join("kept.avro").exists());
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("file"), b"").unwrap();
        let error = publish_file(root.path(), Path::new("file/x.avro"), b"x").unwrap_err();
        let SinkError::File { path, .. } = error else {
            panic!("a file error")
        };
        assert!(path.starts_with(root.path()));
    }
}
