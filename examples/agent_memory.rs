//! Resident memory per connected agent: one process runs N full agents (`Agent::with_tls`, one
//! shared TLS configuration, readings in memory) against a running `simdevice hub
//! --auto-register`, and prints (RSS(N) - RSS(1)) / (N - 1) once they are all connected and idle.
//!
//! ```text
//! simdevice hub --state-dir DIR --auto-register &
//! cargo run --release --example agent_memory -- DIR 1000
//! cargo run --release --example agent_memory -- DIR 1000 websocket   # MQTT over WebSocket
//! ```

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use simdevice::agent::{client_tls, Agent, AgentHandle};
use simdevice::common::local_hub::HubInfo;
use simdevice::config::{Config, Identity, Secret, Transport};
use simdevice::protocol::sas::derive_device_key;
use tokio_util::sync::CancellationToken;

fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Waits until every agent is connected and has reported its connectivity (the twin task's
/// work after a connect), then a little longer for the last replies to settle.
async fn settle(handles: &[AgentHandle]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let ready = handles
            .iter()
            .filter(|h| {
                let c = h.ctx.counters();
                c.connected.load(Ordering::Relaxed)
                    && c.reported_patches.load(Ordering::Relaxed) > 0
            })
            .count();
        if ready == handles.len() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {ready} of {} agents ready", handles.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let state_dir = std::path::PathBuf::from(args.next().context("usage: STATE_DIR [N]")?);
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let transport = match args.next().as_deref() {
        None | Some("mqtt") => Transport::Mqtt,
        Some("websocket") => Transport::WebSocket,
        Some(other) => bail!("{other}: the transport is mqtt or websocket"),
    };
    let info = HubInfo::read(&state_dir)?;
    let group_key = info.group_key.clone().context("the hub has no group key")?;
    let tls = client_tls(Some(&info.ca_file))?;
    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    let mut start = |i: usize| -> Result<AgentHandle> {
        let id = format!("probe-{i:04}");
        let key = derive_device_key(&group_key, &id)?;
        let mut config = Config::for_identity(Identity {
            host_name: info.hostname.clone(),
            device_id: id,
            key: Secret::new(key),
            gateway_host_name: Some(format!(
                "{}:{}",
                info.hostname,
                match transport {
                    Transport::Mqtt => info.mqtt_port,
                    Transport::WebSocket => info.ws_port,
                }
            )),
            ca_file: Some(info.ca_file.clone()),
            x509: None,
        });
        // Idle: one reading at start, the next in an hour.
        config.telemetry.interval = Duration::from_secs(3600);
        config.connection.transport = transport;
        let agent = Agent::with_tls(config, tls.clone())?;
        let handle = agent.handle();
        tasks.push(tokio::spawn(agent.run(stop.clone())));
        Ok(handle)
    };
    handles.push(start(1)?);
    settle(&handles).await?;
    let one = rss_kib()?;
    for i in 2..=count {
        handles.push(start(i)?);
        if i % 50 == 0 {
            // About 500 connects a second: the hub's handshake queue never overflows.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    settle(&handles).await?;
    let all = rss_kib()?;
    let per = (all - one) as f64 / (count - 1) as f64;
    println!("{transport}: RSS(1) = {one} KiB, RSS({count}) = {all} KiB, per agent = {per:.1} KiB");
    if std::env::var_os("AGENT_MEMORY_EXIT").is_some() {
        // For a heap profiler: what is live now is reported as leaked, a snapshot of the idle
        // fleet.
        std::process::exit(0);
    }
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}
