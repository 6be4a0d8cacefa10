//! systemd's service notification protocol (`sd_notify(3)`) without libsystemd: one datagram
//! per message (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, `STATUS=...`) to the unix socket named by
//! `$NOTIFY_SOCKET`, a path or, when it starts with `@`, a name in the abstract namespace.
//!
//! Outside systemd (no `$NOTIFY_SOCKET`) every call does nothing, so a daemon runs the same in
//! a terminal, a container or a `Type=notify` unit. Failures to notify are logged, never fatal:
//! systemd then sees a start timeout or a watchdog timeout, which is the right outcome.
//!
//! This module knows nothing of the agent or the hub: the caller says when it is ready and
//! what "healthy" means for the watchdog.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={value:?}: {reason}")]
    Socket { value: String, reason: String },
    #[error("cannot send {message:?} to systemd: {source}")]
    Send { message: String, source: io::Error },
}

/// A socket to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, or `None` when it is not set (not under systemd,
    /// or not `Type=notify`).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(value) if value.is_empty() => Ok(None),
            Some(value) => Notifier::connect(&value.to_string_lossy()).map(Some),
        }
    }

    /// A notifier for a `$NOTIFY_SOCKET` value: an absolute path, or `@name` (abstract).
    pub fn connect(value: &str) -> Result<Notifier, NotifyError> {
        let fail = |reason: String| NotifyError::Socket {
            value: value.to_string(),
            reason,
        };
        let addr = if let Some(name) = value.strip_prefix('@') {
            abstract_addr(name).map_err(|e| fail(e.to_string()))?
        } else if value.starts_with('/') {
            SocketAddr::from_pathname(value).map_err(|e| fail(e.to_string()))?
        } else {
            return Err(fail(
                "not a socket path or an abstract socket name (@...)".to_string(),
            ));
        };
        let socket = UnixDatagram::unbound().map_err(|e| fail(e.to_string()))?;
        // Never block the runtime: a full socket buffer is reported as an error instead.
        socket
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Notifier { socket, addr })
    }

    /// Sends one message, e.g. `READY=1` or `STATUS=connected\nREADY=1`.
    pub fn notify(&self, message: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                message: message.to_string(),
                source,
            })
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &str) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &str) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

/// The watchdog timeout systemd expects pings within (`$WATCHDOG_USEC`), when it is meant for
/// this process (`$WATCHDOG_PID` unset or equal to our pid).
pub fn watchdog_timeout_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    match usec?.trim().parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(usec) => Some(Duration::from_micros(usec)),
    }
}

/// Pings the watchdog every half of `timeout`, but only while `healthy()` says so: when the
/// daemon's loops stop moving, the pings stop and systemd restarts the service once `timeout`
/// has passed. Returns at `shutdown`.
pub async fn run_watchdog(
    notifier: Arc<Notifier>,
    timeout: Duration,
    healthy: impl Fn() -> bool,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval((timeout / 2).max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now_healthy = healthy();
        if now_healthy {
            if let Err(error) = notifier.notify("WATCHDOG=1") {
                tracing::warn!(%error, "watchdog ping failed");
            }
            if !was_healthy {
                tracing::info!("the main loops are moving again: watchdog pings resumed");
            }
        } else if was_healthy {
            tracing::error!(
                timeout_s = timeout.as_secs_f64(),
                "the main loops stopped moving: no more watchdog pings, systemd will restart the service"
            );
        }
        was_healthy = now_healthy;
    }
}

/// What a daemon tells systemd, as one value: READY=1 once started (with the watchdog task
/// from then on), STOPPING=1 at shutdown. Does nothing outside systemd.
#[derive(Debug, Default)]
pub struct Daemon {
    notifier: Option<Arc<Notifier>>,
}

impl Daemon {
    /// From `$NOTIFY_SOCKET`; a value that cannot be used is logged and ignored.
    pub fn from_env() -> Daemon {
        match Notifier::from_env() {
            Ok(notifier) => Daemon {
                notifier: notifier.map(Arc::new),
            },
            Err(error) => {
                tracing::warn!(%error, "cannot notify systemd");
                Daemon::default()
            }
        }
    }

    /// Whether there is a systemd to notify.
    pub fn is_supervised(&self) -> bool {
        self.notifier.is_some()
    }

    /// Sends `READY=1` with a status line, and starts the watchdog task when systemd asked
    /// for one (`$WATCHDOG_USEC`): it pings while `healthy()` holds, until `shutdown`.
    pub fn ready(
        &self,
        status: &str,
        healthy: impl Fn() -> bool + Send + 'static,
        shutdown: &CancellationToken,
    ) {
        let Some(notifier) = &self.notifier else {
            return;
        };
        let status = status.replace('\n', " ");
        self.send(&format!("READY=1\nSTATUS={status}"));
        if let Some(timeout) = watchdog_timeout_from_env() {
            tracing::info!(
                timeout_s = timeout.as_secs_f64(),
                "systemd watchdog enabled"
            );
            tokio::spawn(run_watchdog(
                notifier.clone(),
                timeout,
                healthy,
                shutdown.clone(),
            ));
        }
    }

    /// Sends `STOPPING=1`: the daemon has begun its graceful shutdown.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    fn send(&self, message: &str) {
        if let Some(notifier) = &self.notifier {
            if let Err(error) = notifier.notify(message) {
                tracing::warn!(%error, "cannot notify systemd");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A bound datagram socket standing in for systemd, and the `$NOTIFY_SOCKET` value naming it.
    fn systemd_socket(dir: &tempfile::TempDir) -> (UnixDatagram, String) {
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the test socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set a read timeout");
        (socket, path.display().to_string())
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a datagram in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_datagrams_to_a_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let (systemd, value) = systemd_socket(&dir);
        let notifier = Notifier::connect(&value).unwrap();
        notifier.notify("READY=1").unwrap();
        notifier.notify("STOPPING=1").unwrap();
        assert_eq!(receive(&systemd), "READY=1");
        assert_eq!(receive(&systemd), "STOPPING=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("simdevice-test-{}-{}", std::process::id(), line!());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier::connect(&format!("@{name}")).unwrap();
        notifier.notify("WATCHDOG=1").unwrap();
        assert_eq!(receive(&systemd), "WATCHDOG=1");
    }

    #[test]
    fn refuses_a_value_that_names_no_socket() {
        let error = Notifier::connect("relative/path").unwrap_err();
        assert!(error.to_string().contains("NOTIFY_SOCKET"), "{error}");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let value = dir.path().join("gone.sock").display().to_string();
        let notifier = Notifier::connect(&value).unwrap();
        assert!(notifier.notify("READY=1").is_err());
    }

    #[test]
    fn the_watchdog_timeout_is_for_this_process_only() {
        assert_eq!(
            watchdog_timeout(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_timeout(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_timeout(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_timeout(Some("0"), None, 7), None);
        assert_eq!(watchdog_timeout(Some("soon"), None, 7), None);
        assert_eq!(watchdog_timeout(None, Some("7"), 7), None);
    }

    #[tokio::test]
    async fn the_watchdog_pings_only_while_healthy_and_stops_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (systemd, value) = systemd_socket(&dir);
        systemd.set_nonblocking(true).unwrap();
        let notifier = Arc::new(Notifier::connect(&value).unwrap());
        let healthy = Arc::new(AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_watchdog(
            notifier,
            Duration::from_millis(40),
            {
                let healthy = healthy.clone();
                move || healthy.load(Ordering::SeqCst)
            },
            shutdown.clone(),
        ));
        let drain = |systemd: &UnixDatagram| {
            let mut pings = 0;
            let mut buf = [0u8; 64];
            while let Ok(n) = systemd.recv(&mut buf) {
                assert_eq!(&buf[..n], b"WATCHDOG=1");
                pings += 1;
            }
            pings
        };

        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(drain(&systemd) >= 3, "pings every 20 ms while healthy");

        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain(&systemd);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(drain(&systemd), 0, "no ping while unhealthy");

        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(drain(&systemd) >= 3, "pings resume once healthy again");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watchdog ends at shutdown")
            .unwrap();
    }

    #[test]
    fn outside_systemd_nothing_is_sent() {
        let daemon = Daemon::default();
        assert!(!daemon.is_supervised());
        daemon.stopping();
    }
}
