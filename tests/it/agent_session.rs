//! The agent's own MQTT session against the in-process hub: its PINGREQs hold an idle
//! connection open, a connection that goes silent is found dead by the keep-alive, and every
//! acknowledged reading tells its acknowledgement latency once.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simdevice::agent::Agent;
use tokio_util::sync::CancellationToken;

use crate::common::agent::{agent_config, eventually, RunningAgent};
use crate::common::proxy::{Fault, FaultProxy};
use crate::common::TestHub;

fn reconnects_of_any_kind(agent: &RunningAgent) -> u64 {
    ["renewal", "lost", "failed", "refused"]
        .iter()
        .map(|reason| agent.reconnects(reason))
        .sum()
}

#[tokio::test]
async fn an_idle_agent_pings_and_keeps_its_connection() {
    let hub = TestHub::start().await;
    let key = hub.add_device("idle");
    let mut config = agent_config(&hub, "idle", &key, hub.hub.mqtt_addr());
    // The hub closes a connection that says nothing for 1.5 x the keep-alive: 3 s here.
    config.connection.keep_alive = Duration::from_secs(2);
    config.telemetry.interval = Duration::from_secs(3600);
    let agent = RunningAgent::start(config);
    eventually(Duration::from_secs(10), || async {
        (agent.counter(|c| &c.reported_patches) >= 1).then_some(())
    })
    .await;
    let live = hub
        .hub
        .state()
        .registry
        .get("idle", |d| d.live.clone())
        .expect("the device exists");
    let idle_since = chrono::Utc::now().timestamp_millis();

    // Nothing but PINGREQs moves the hub's last activity now; 5 s is past its 3 s allowance.
    eventually(Duration::from_secs(15), || async {
        (live.last_activity_ms.load(Ordering::Relaxed) >= idle_since + 5_000).then_some(())
    })
    .await;
    assert_eq!(agent.counter(|c| &c.connects), 1, "the connection was kept");
    assert_eq!(reconnects_of_any_kind(&agent), 0);
    assert!(live.connected.load(Ordering::Relaxed));
    agent.stop().await;
}

#[tokio::test]
async fn a_connection_that_goes_silent_is_found_dead_by_the_keep_alive() {
    let hub = TestHub::start().await;
    let key = hub.add_device("quiet");
    let proxy = Arc::new(FaultProxy::start(hub.hub.mqtt_addr()).await);
    let mut config = agent_config(&hub, "quiet", &key, proxy.addr);
    config.connection.keep_alive = Duration::from_secs(2);
    config.connection.connect_timeout = Duration::from_secs(3);
    let agent = RunningAgent::start(config);
    eventually(Duration::from_secs(10), || async {
        (agent.counter(|c| &c.readings_acknowledged) >= 1).then_some(())
    })
    .await;

    // Nothing crosses the proxy either way: no error, no close, only silence.
    let stalled = tokio::time::Instant::now();
    let stall = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.inject(Fault::Stall(Duration::from_secs(12))).await }
    });
    // The window fills (10 readings, 2 s), then nothing is written: a PINGREQ 2 s later, and
    // the connection is dead 1 s after it.
    let reason = eventually(Duration::from_secs(10), || async {
        (agent.reconnects("lost") >= 1).then(|| agent.handle.ctx.counters().last_disconnect())
    })
    .await
    .unwrap_or_default();
    assert!(reason.contains("PINGREQ"), "{reason}");
    assert!(stalled.elapsed() < Duration::from_secs(10));

    // Once bytes flow again, the agent reconnects and its readings are acknowledged again.
    stall.await.expect("the stall ends");
    let acknowledged = agent.counter(|c| &c.readings_acknowledged);
    eventually(Duration::from_secs(20), || async {
        (agent.counter(|c| &c.connects) >= 2
            && agent.counter(|c| &c.readings_acknowledged) > acknowledged)
            .then_some(())
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn each_acknowledged_reading_tells_its_latency_once() {
    let hub = TestHub::start().await;
    let key = hub.add_device("timed");
    let agent =
        Agent::new(agent_config(&hub, "timed", &key, hub.hub.mqtt_addr())).expect("agent starts");
    let handle = agent.handle();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    handle.ctx.observe_acks({
        let latencies = latencies.clone();
        Arc::new(move |latency| latencies.lock().unwrap().push(latency))
    });
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    let counters = handle.ctx.counters();
    eventually(Duration::from_secs(10), || async {
        (counters.readings_acknowledged.load(Ordering::Relaxed) >= 5).then_some(())
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the agent stops")
        .expect("no panic");

    let latencies = latencies.lock().unwrap().clone();
    assert_eq!(
        latencies.len() as u64,
        counters.readings_acknowledged.load(Ordering::Relaxed),
        "one latency per acknowledged reading"
    );
    // A PUBACK from a hub on loopback: well under a second, and never nothing at all.
    assert!(
        latencies
            .iter()
            .all(|l| *l > Duration::ZERO && *l < Duration::from_secs(1)),
        "{latencies:?}"
    );
}
