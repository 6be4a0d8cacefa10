//! Where closed windows go: a directory, in Azure's path layout. A file is written under a
//! temporary name in its final directory, synced, then renamed, so a reader sees the whole file
//! or none of it. Touches only the capture directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, Timelike, Utc};

use super::format::Format;

/// The names in the path: Event Hubs' namespace and hub, IoT Hub's hub, and the partition.
#[derive(Clone, Debug)]
pub struct Naming {
    pub namespace: String,
    pub hub: String,
    pub partition: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the capture file {path}")]
pub struct SinkError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The path of a window's file under the capture root, for the time the window closed:
/// `{namespace}/{hub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}/{ss}.avro` (Event Hubs Capture's
/// default `archiveNameFormat`), or `{iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}` (routing's
/// default `fileNameFormat`, which names no extension).
pub fn relative_path(format: Format, naming: &Naming, time: DateTime<Utc>) -> PathBuf {
    let date = format!(
        "{:04}/{:02}/{:02}/{:02}/{:02}",
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute()
    );
    match format {
        Format::EventHubs => PathBuf::from(format!(
            "{}/{}/{}/{date}/{:02}.avro",
            naming.namespace,
            naming.hub,
            naming.partition,
            time.second()
        )),
        Format::IotHub => PathBuf::from(format!("{}/{}/{date}", naming.hub, naming.partition)),
    }
}

/// Writes `bytes` at `root/relative` atomically and durably. When a file of that name exists
/// (two windows closed in the same second, or the same minute for `iothub`), the new one gets
/// `_1`, `_2`... before its extension: a published file is never replaced. Returns the path.
pub fn publish(root: &Path, relative: &Path, bytes: &[u8]) -> Result<PathBuf, SinkError> {
    let wanted = root.join(relative);
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| SinkError { path, source }
    };
    let dir = wanted.parent().unwrap_or(root).to_owned();
    std::fs::create_dir_all(&dir).map_err(err(&dir))?;
    let target = free_name(&wanted);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp"));
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
        SinkError {
            path: target.clone(),
            source,
        }
    })?;
    Ok(target)
}

fn free_name(wanted: &Path) -> PathBuf {
    if !wanted.exists() {
        return wanted.to_owned();
    }
    let stem = wanted
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = wanted
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (1..)
        .map(|n| wanted.with_file_name(format!("{stem}_{n}{ext}")))
        .find(|p| !p.exists())
        .expect("some suffix is free")
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
            PathBuf::from("simdevice/localhost/0/2024/03/04/05/06/07.avro")
        );
        assert_eq!(
            relative_path(Format::IotHub, &naming(), t),
            PathBuf::from("localhost/0/2024/03/04/05/06")
        );
    }

    #[test]
    fn publish_leaves_the_whole_file_and_no_temporary_and_never_replaces() {
        let root = tempfile::tempdir().unwrap();
        let rel = Path::new("a/b/07.avro");
        let first = publish(root.path(), rel, b"one").unwrap();
        assert_eq!(first, root.path().join(rel));
        let second = publish(root.path(), rel, b"two").unwrap();
        assert_eq!(second, root.path().join("a/b/07_1.avro"));
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        assert_eq!(std::fs::read(&second).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(root.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        let third = publish(root.path(), Path::new("a/b/00"), b"x").unwrap();
        assert!(third.ends_with("a/b/00"));
        assert!(publish(root.path(), Path::new("a/b/00"), b"y")
            .unwrap()
            .ends_with("a/b/00_1"));
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_an_error_naming_it() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("file"), b"").unwrap();
        let error = publish(root.path(), Path::new("file/x.avro"), b"x").unwrap_err();
        assert!(error.path.starts_with(root.path()));
    }
}
