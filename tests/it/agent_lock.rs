//! One outbox, one owner: an agent takes `<outbox.path>.lock` before it opens the file and
//! holds it for its life. A second agent given the same outbox is refused at start-up with
//! `AgentError::OutboxLocked`, a configuration error naming the holder's pid, and never falls
//! back to memory; the `simdevice run` daemon exits 78 (EX_CONFIG) on it.

use std::time::Duration;

use crate::common::agent::{agent_config, eventually, RunningAgent};
use crate::common::*;
use simdevice::agent::{outbox_lock_path, Agent, AgentError};
use simdevice::common::lock::LockError;

#[tokio::test]
async fn a_second_agent_with_the_same_outbox_is_refused_until_the_first_has_stopped() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("state/outbox.db");
    let mut config = agent_config(&hub, "d1", &key, hub.hub.mqtt_addr());
    config.outbox.path = Some(outbox.clone());

    let first = RunningAgent::start(config.clone());
    eventually(Duration::from_secs(20), || async {
        (first.counter(|c| &c.readings_acknowledged) >= 2).then_some(())
    })
    .await;

    let refused = Agent::new(config.clone()).err().expect("refused");
    assert!(refused.is_config(), "a configuration error: {refused:?}");
    match &refused {
        AgentError::OutboxLocked(LockError::Held { pid, path, .. }) => {
            assert_eq!(*pid, Some(std::process::id()), "the holder is named");
            assert_eq!(path, &outbox_lock_path(&outbox));
        }
        other => panic!("expected OutboxLocked, got {other:?}"),
    }
    let message = refused.to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert!(message.contains(&outbox.display().to_string()), "{message}");

    // The first agent is not disturbed by the refused one.
    let acknowledged = first.counter(|c| &c.readings_acknowledged);
    eventually(Duration::from_secs(20), || async {
        (first.counter(|c| &c.readings_acknowledged) > acknowledged).then_some(())
    })
    .await;
    assert!(first.handle.ctx.is_durable());

    first.stop().await;
    // Stopped: the file is free for the next owner, which finds the same state.
    let next = RunningAgent::start(config);
    eventually(Duration::from_secs(20), || async {
        next.handle.ctx.is_durable().then_some(())
    })
    .await;
    next.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn the_daemon_refuses_an_outbox_owned_by_another_process_with_exit_78() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.db");
    let mut config = agent_config(&hub, "d1", &key, hub.hub.mqtt_addr());
    config.outbox.path = Some(outbox.clone());
    // This test process owns the outbox.
    let owner = Agent::new(config).expect("the first owner");

    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "[identity]\nconnection_string = \"HostName=localhost;DeviceId=d1;SharedAccessKey={key};GatewayHostName=localhost:{port}\"\nca_file = \"{ca}\"\n\n[outbox]\npath = \"{outbox}\"\n",
            port = hub.hub.mqtt_addr().port(),
            ca = hub.hub.info().ca_file.display(),
            outbox = outbox.display(),
        ),
    )
    .unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(["run", "--config"])
        .arg(&file)
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the daemon exits at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
    drop(owner);
    hub.stop().await;
}
