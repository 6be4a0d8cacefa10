//! `simdevice run` and `simdevice hub` under a stand-in for systemd: a unix datagram socket
//! named by `$NOTIFY_SOCKET` (set for the child process only) receives READY=1, then
//! WATCHDOG=1 pings (`$WATCHDOG_USEC`), then STOPPING=1 after SIGTERM, and the process exits 0.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Receives datagrams until one contains `line` as a whole line; returns what came before.
fn wait_for(socket: &UnixDatagram, line: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {line} within {within:?}; got {seen:?}");
        socket.set_read_timeout(Some(left)).unwrap();
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(error) => panic!("no {line} within {within:?} ({error}); got {seen:?}"),
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.lines().any(|l| l == line) {
            return seen;
        }
        seen.push(message);
    }
}

fn check_lifecycle(args: &[&str], state: &tempfile::TempDir) {
    let socket_path = state.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(args)
        .arg("--state-dir")
        .arg(state.path().join("hub"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env_remove("SIMDEVICE_HUB_STATE_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let before = wait_for(&systemd, "READY=1", Duration::from_secs(60));
    assert!(before.is_empty(), "READY=1 comes first: {before:?}");
    // Pings every WATCHDOG_USEC / 2 = 0.5 s: two of them within 3 s.
    for _ in 0..2 {
        let between = wait_for(&systemd, "WATCHDOG=1", Duration::from_secs(3));
        assert!(between.is_empty(), "only pings while running: {between:?}");
    }

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let before = wait_for(&systemd, "STOPPING=1", Duration::from_secs(10));
    assert!(
        before.iter().all(|m| m == "WATCHDOG=1"),
        "nothing but pings before STOPPING=1: {before:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}");
}

#[test]
fn the_agent_notifies_ready_feeds_the_watchdog_and_notifies_stopping() {
    let state = tempfile::tempdir().unwrap();
    check_lifecycle(&["run", "--local"], &state);
}

#[test]
fn the_hub_notifies_ready_feeds_the_watchdog_and_notifies_stopping() {
    let state = tempfile::tempdir().unwrap();
    check_lifecycle(&["hub", "--mqtt-port", "0", "--api-port", "0"], &state);
}
