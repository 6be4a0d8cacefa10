//! The hub's state directory: private at rest (0700, the files with keys 0600, whatever the
//! umask; wider modes left by an older version are tightened with a warning), and owned by one
//! hub at a time (a second one is refused with the holder's pid until the first stops).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simdevice::common::lock::LockError;
use simdevice::hub::registry::DeviceSpec;
use simdevice::hub::{Hub, HubConfig, HubError};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn add_device(hub: &Hub, id: &str) {
    hub.state()
        .registry
        .create(DeviceSpec::enabled(id))
        .expect("device created");
}

/// The modes (octal) of everything in the state that holds a secret, by file name.
fn secret_modes(dir: &Path) -> Vec<(String, String)> {
    [
        "hub.db",
        "hub.db-wal",
        "hub.db-shm",
        "hub.json",
        "ca.key",
        "hub.lock",
    ]
    .iter()
    .map(|name| (name.to_string(), format!("{:04o}", mode(&dir.join(name)))))
    .collect()
}

fn all_private(dir: &Path) -> Vec<(String, String)> {
    secret_modes(dir)
        .into_iter()
        .map(|(name, _)| (name, "0600".to_string()))
        .collect()
}

#[tokio::test]
async fn a_fresh_state_directory_is_0700_and_its_secret_files_0600() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("state");
    let hub = Hub::start(HubConfig::ephemeral(&dir))
        .await
        .expect("hub starts");
    add_device(&hub, "d1");
    // While the hub runs, SQLite's -wal and -shm files exist and took hub.db's mode.
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(secret_modes(&dir), all_private(&dir));
    hub.shutdown().await;
}

/// A subscriber that writes into a buffer, to read the hub's warnings back.
fn captured_log() -> (Arc<Mutex<Vec<u8>>>, impl tracing::Subscriber) {
    #[derive(Clone)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let writer = Buffer(buffer.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    (buffer, subscriber)
}

// Current-thread runtime: the warnings are logged on this thread, under its default subscriber.
#[tokio::test]
async fn a_state_directory_left_wide_by_an_older_version_is_tightened_with_a_warning() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("state");
    // What an older version left: the directory 0755, hub.db 0644 (with its keys in it).
    let first = Hub::start(HubConfig::ephemeral(&dir))
        .await
        .expect("first start");
    add_device(&first, "kept");
    first.shutdown().await;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("hub.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o640)).unwrap();

    let (log, subscriber) = captured_log();
    let guard = tracing::subscriber::set_default(subscriber);
    let hub = Hub::start(HubConfig::ephemeral(&dir))
        .await
        .expect("restart");
    drop(guard);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(secret_modes(&dir), all_private(&dir));
    assert!(hub.state().registry.contains("kept"), "the state is kept");

    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    let tightened: Vec<&str> = log.lines().filter(|l| l.contains("tightened")).collect();
    assert_eq!(tightened.len(), 3, "one warning per path:\n{log}");
    for (path, old) in [
        (dir.clone(), "0755"),
        (dir.join("hub.db"), "0644"),
        (dir.join("ca.key"), "0640"),
    ] {
        let path = path.display().to_string();
        assert!(
            tightened
                .iter()
                .any(|l| l.contains(&format!("path={path} ")) && l.contains(old)),
            "no warning for {path} ({old}):\n{log}"
        );
    }
    hub.shutdown().await;
}

#[tokio::test]
async fn a_second_hub_on_the_same_state_is_refused_with_the_holders_pid_until_the_first_stops() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("state");
    let first = Hub::start(HubConfig::ephemeral(&dir))
        .await
        .expect("first hub");
    let info_before = std::fs::read_to_string(dir.join("hub.json")).unwrap();

    let error = match Hub::start(HubConfig::ephemeral(&dir)).await {
        Ok(_) => panic!("a second hub started on the same state"),
        Err(error) => error,
    };
    let pid = std::process::id();
    assert!(
        matches!(
            &error,
            HubError::Locked(LockError::Held { pid: Some(p), .. }) if *p == pid
        ),
        "{error:?}"
    );
    assert!(error.is_config(), "a held lock is a configuration problem");
    let message = error.to_string();
    assert!(message.contains(&format!("pid {pid}")), "{message}");
    assert!(message.contains(&dir.display().to_string()), "{message}");
    // Refused before touching anything: the first hub's hub.json (its ports) is intact.
    assert_eq!(
        std::fs::read_to_string(dir.join("hub.json")).unwrap(),
        info_before
    );

    first.shutdown().await;
    let again = Hub::start(HubConfig::ephemeral(&dir))
        .await
        .expect("the state is free once the first hub has stopped");
    again.shutdown().await;
}

/// Waits for `path` to exist, for at most 30 s (the binary may be built cold).
fn wait_for_file(path: &Path, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the hub exited early: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hub_command(dir: &Path, umask: &str) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "umask {umask} && exec \"$0\" hub --state-dir \"$1\" --mqtt-port 0 --api-port 0"
        ))
        .arg(env!("CARGO_BIN_EXE_simdevice"))
        .arg(dir)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

#[tokio::test]
async fn the_hub_binary_keeps_its_state_private_under_umask_000_and_refuses_a_second_one() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("state");
    let mut first = hub_command(&dir, "000")
        .stderr(Stdio::null())
        .spawn()
        .expect("hub binary starts");
    wait_for_file(&dir.join("hub.json"), &mut first);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(secret_modes(&dir), all_private(&dir));

    let second = hub_command(&dir, "022")
        .stderr(Stdio::piped())
        .output()
        .expect("second hub runs");
    assert_eq!(
        second.status.code(),
        Some(78),
        "the second hub exits 78 (EX_CONFIG, no restart loop under systemd)"
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("pid {}", first.id())),
        "the refusal names the first hub's pid: {stderr}"
    );

    // SIGKILL: the kernel drops the lock with the process; no stale lock blocks a restart.
    first.kill().unwrap();
    first.wait().unwrap();
    let hub = Hub::start(HubConfig::ephemeral(&dir))
        .await
        .expect("starts after the first hub was killed");
    hub.shutdown().await;
}

#[tokio::test]
async fn a_state_directory_that_cannot_be_used_is_a_configuration_error_with_its_cause() {
    let root = tempfile::tempdir().expect("tempdir");
    let not_a_dir = root.path().join("state");
    std::fs::write(&not_a_dir, "a file").unwrap();
    let error = match Hub::start(HubConfig::ephemeral(&not_a_dir)).await {
        Ok(_) => panic!("a hub started on a file"),
        Err(error) => error,
    };
    assert!(matches!(error, HubError::State { .. }), "{error:?}");
    assert!(error.is_config());
    assert!(error.to_string().contains(&not_a_dir.display().to_string()));
    assert!(
        std::error::Error::source(&error).is_some(),
        "the I/O error is kept as the source"
    );
}
