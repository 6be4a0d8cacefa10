//! Test support for device agents run in-process: a configuration pointed at a test hub,
//! start/stop with a bounded grace period, and polling with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use simdevice::agent::context::Counters;
use simdevice::agent::{Agent, AgentHandle};
use simdevice::config::{Config, Identity, Secret};
use tokio_util::sync::CancellationToken;

/// A device `id` with `key` dialling `mqtt` (a hub, a relay or a proxy) and trusting `ca_file`:
/// readings every 200 ms, a fixed seed, and reconnects within half a second.
pub fn agent_config_with_ca(id: &str, key: &str, ca_file: PathBuf, mqtt: SocketAddr) -> Config {
    let mut config = Config::for_identity(Identity {
        host_name: "localhost".into(),
        device_id: id.into(),
        key: Secret::new(key.to_string()),
        gateway_host_name: Some(format!("localhost:{}", mqtt.port())),
        ca_file: Some(ca_file),
        x509: None,
    });
    config.telemetry.interval = Duration::from_millis(200);
    config.telemetry.seed = Some(42);
    config.connection.backoff_min = Duration::from_millis(100);
    config.connection.backoff_max = Duration::from_millis(500);
    config
}

/// The `[identity]` section of an agent's configuration file for device `id` with `key`,
/// dialling `localhost:{mqtt_port}` and trusting `ca_file`.
pub fn identity_toml(id: &str, key: &str, mqtt_port: u16, ca_file: &Path) -> String {
    format!(
        "[identity]\nconnection_string = \"HostName=localhost;DeviceId={id};SharedAccessKey={key};\
         GatewayHostName=localhost:{mqtt_port}\"\nca_file = \"{}\"\n",
        ca_file.display()
    )
}

/// The same for a device of the test hub.
pub fn agent_config(hub: &super::TestHub, id: &str, key: &str, mqtt: SocketAddr) -> Config {
    agent_config_with_ca(id, key, hub.hub.info().ca_file.clone(), mqtt)
}

pub struct RunningAgent {
    pub handle: AgentHandle,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    pub fn start(config: Config) -> RunningAgent {
        let agent = Agent::new(config).expect("agent starts");
        let handle = agent.handle();
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent.run(stop.clone()));
        RunningAgent { handle, stop, task }
    }

    /// Whether the agent's task is still running (it ends only at stop or by a panic).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// One of the agent's counters, now.
    pub fn counter(&self, pick: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        pick(self.handle.ctx.counters()).load(Ordering::Relaxed)
    }

    /// How many connection attempts or connections ended with `reason` (`refused`, `failed`,
    /// `lost`, `renewal`), as the agent's `reconnects` metric counts them.
    pub fn reconnects(&self, reason: &str) -> u64 {
        self.handle.ctx.counters().reconnects.get(&[reason])
    }

    /// Stops the agent; it must finish within its grace period and must not have panicked.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the agent stops within its grace period")
            .expect("the agent did not panic");
    }
}

/// Polls `check` until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
