//! Fault injection through the real network path: the device agent, in-process, against the
//! in-process hub, with faults between or inside them. Each test checks that every reading the
//! agent produced reached the hub exactly once after de-duplication by `$.mid`, with no gap in
//! `seq`, and prints one line for `scripts/fault-report` (run with `--nocapture`):
//!
//! `FAULTS: test=NAME injected=N produced=N received=N duplicated=N lost=N detail=...`
//!
//! - random faults from a TCP proxy (`common/proxy.rs`): cut, reset, stall, slow down;
//! - the hub restarted under the agent, several times in a row;
//! - the hub's clock jumping forward (`hub/faults.rs` clock offset);
//! - two-second tokens renewed many times: no loss, no duplicate, no reconnect beyond renewals;
//! - throttling: connects refused with CONNACK 3, reported patches answered with 429.
//!
//! Before counting, production is paused (telemetry interval set to an hour) and the test waits
//! until the agent has every reading acknowledged, so "produced" is final and readings still
//! queued at shutdown cannot blur "lost". `FAULT_SEED` picks the random fault sequence.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::common::agent::{eventually, RunningAgent};
use crate::common::proxy::FaultProxy;
use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};

use simdevice::config::Config;
use simdevice::hub::{Hub, HubConfig, HubState};
use tokio::time::Instant;

fn agent_config(hub: &TestHub, id: &str, key: &str, mqtt: SocketAddr) -> Config {
    let mut config = crate::common::agent::agent_config(hub, id, key, mqtt);
    config.telemetry.interval = Duration::from_millis(30);
    config.connection.backoff_min = Duration::from_millis(50);
    config.connection.connect_timeout = Duration::from_secs(5);
    // A safety net: a connection that silently stops carrying bytes is noticed in seconds.
    config.connection.keep_alive = Duration::from_secs(10);
    config
}

/// What the fault tests need beyond `crate::common::agent::RunningAgent`.
trait FaultCounters {
    fn connects(&self) -> u64;
    fn produced(&self) -> u64;
    async fn quiesce(&self, limit: Duration) -> u64;
}

impl FaultCounters for RunningAgent {
    fn connects(&self) -> u64 {
        self.counter(|c| &c.connects)
    }

    fn produced(&self) -> u64 {
        self.counter(|c| &c.readings_produced)
    }

    /// Stops producing, then waits until every reading produced is acknowledged by the hub.
    /// Returns how many were produced.
    async fn quiesce(&self, limit: Duration) -> u64 {
        self.handle
            .ctx
            .set_telemetry_interval(Duration::from_secs(3600));
        // A reading already due when the interval changed may still be produced.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let counters = self.handle.ctx.counters();
        eventually(limit, || async {
            let produced = counters.readings_produced.load(Ordering::Relaxed);
            let acked = counters.readings_acknowledged.load(Ordering::Relaxed);
            (acked == produced).then_some(produced)
        })
        .await
    }
}

/// Every event of `id` the hub still holds, read page by page with `after`.
async fn all_events(service: &Service, id: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    for _ in 0..100 {
        let page = service
            .get(&format!(
                "/simdevice/events?deviceId={id}&after={after}&limit=1000"
            ))
            .await
            .body
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(last) = page.last() else { break };
        after = last["sequenceNumber"].as_u64().unwrap();
        let full = page.len() == 1000;
        all.extend(page);
        if !full {
            break;
        }
    }
    all
}

/// The events a (stopped or running) hub holds, read from its state.
fn events_of(state: &HubState, id: &str) -> Vec<Value> {
    assert_eq!(
        state.telemetry.dropped(),
        0,
        "the hub's event buffer overflowed"
    );
    state
        .telemetry
        .recent(Some(id), 0, usize::MAX)
        .iter()
        .map(|e| e.to_json())
        .collect()
}

/// What arrived, against what was produced.
#[derive(Debug)]
struct Tally {
    produced: u64,
    received: u64,
    duplicated: u64,
    lost: u64,
}

fn tally(events: &[Value], produced: u64) -> Tally {
    let mut seq_of_mid = BTreeMap::new();
    let mut mid_of_seq = BTreeMap::new();
    for event in events {
        let mid = event["systemProperties"]["message-id"]
            .as_str()
            .expect("every reading has a message id")
            .to_string();
        let seq = event["body"]["seq"]
            .as_u64()
            .expect("every reading has a seq");
        let earlier = seq_of_mid.insert(mid.clone(), seq);
        assert!(
            earlier.is_none_or(|s| s == seq),
            "message id {mid} came with two seqs"
        );
        let earlier = mid_of_seq.insert(seq, mid.clone());
        assert!(
            earlier.is_none_or(|m| m == mid),
            "seq {seq} came under two message ids"
        );
    }
    let seqs: BTreeSet<u64> = seq_of_mid.values().copied().collect();
    assert!(
        seqs.iter().all(|&s| (1..=produced).contains(&s)),
        "a seq beyond the {produced} produced arrived"
    );
    Tally {
        produced,
        received: seqs.len() as u64,
        duplicated: (events.len() - seq_of_mid.len()) as u64,
        lost: (1..=produced).filter(|s| !seqs.contains(s)).count() as u64,
    }
}

/// Prints the FAULTS line, then asserts nothing was lost.
fn report(test: &str, injected: u64, detail: &str, tally: &Tally) {
    println!(
        "FAULTS: test={test} injected={injected} produced={} received={} duplicated={} lost={} detail={detail}",
        tally.produced, tally.received, tally.duplicated, tally.lost
    );
    assert!(tally.produced > 0, "the agent produced readings");
    assert_eq!(tally.lost, 0, "readings lost: {tally:?}");
    assert_eq!(tally.received, tally.produced, "{tally:?}");
}

/// A service client whose token outlives any clock jump of these tests.
fn long_lived_service(hub: &TestHub) -> Service {
    let key = hub
        .hub
        .state()
        .policies
        .get("iothubowner")
        .expect("policy")
        .primary_key
        .clone();
    Service::with_key(hub, "iothubowner", &key, now() + 6 * 3600)
}

async fn set_faults(service: &Service, settings: Value) -> Value {
    let reply = service
        .call(Method::POST, "/simdevice/faults", Some(settings), &[])
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body
}

async fn get_faults(service: &Service) -> Value {
    let reply = service.get("/simdevice/faults").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body
}

#[tokio::test]
async fn at_least_100_random_proxy_faults_lose_no_reading() {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_404_u64);
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let proxy = FaultProxy::start(hub.hub.mqtt_addr()).await;
    let agent = RunningAgent::start(agent_config(&hub, "d1", &key, proxy.addr));
    eventually(Duration::from_secs(10), || async {
        (agent
            .handle
            .ctx
            .counters()
            .readings_acknowledged
            .load(Ordering::Relaxed)
            > 0)
        .then_some(())
    })
    .await;

    let started = Instant::now();
    let counts = tokio::time::timeout(Duration::from_secs(120), proxy.run_random(seed, 100))
        .await
        .expect("100 faults within two minutes");
    let chaos = started.elapsed();
    let produced = agent.quiesce(Duration::from_secs(30)).await;
    let connects = agent.connects();
    let dropped = agent.counter(|c| &c.readings_dropped);
    agent.stop().await;
    let events = all_events(&service, "d1").await;
    assert_eq!(hub.hub.state().telemetry.dropped(), 0);
    let tally = tally(&events, produced);
    report(
        "random_proxy_faults",
        counts.injected(),
        &format!(
            "seed:{seed},{},agent_connects:{connects},seconds:{:.1}",
            counts.detail(),
            chaos.as_secs_f64()
        ),
        &tally,
    );
    assert!(counts.injected() >= 100);
    assert_eq!(dropped, 0, "the agent's queue overflowed");
    // The faults hit: connections were killed and the agent came back many times.
    assert!(counts.connections_killed >= 20, "{counts:?}");
    assert!(connects >= 20, "only {connects} connects");
    hub.stop().await;
}

#[tokio::test]
async fn the_hub_restarted_three_times_under_the_agent_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = HubConfig::ephemeral(dir.path());
    let first = TestHub {
        hub: Hub::start(config.clone()).await.unwrap(),
        dir,
    };
    let key = first.add_device("d1");
    config.mqtt_port = first.hub.mqtt_addr().port();
    config.api_port = first.hub.api_addr().port();
    let mut agent_cfg = agent_config(&first, "d1", &key, first.hub.mqtt_addr());
    agent_cfg.telemetry.interval = Duration::from_millis(50);
    let agent = RunningAgent::start(agent_cfg);

    let mut received = Vec::new();
    let mut current = first;
    let restarts = 3;
    for outage_ms in [300, 1000, 100] {
        let state: Arc<HubState> = current.hub.state().clone();
        eventually(Duration::from_secs(15), || async {
            (state.telemetry.recent(Some("d1"), 0, usize::MAX).len() >= 10).then_some(())
        })
        .await;
        let TestHub { hub, dir } = current;
        hub.shutdown().await;
        // Everything this hub accepted, read after it stopped accepting.
        received.extend(events_of(&state, "d1"));
        tokio::time::sleep(Duration::from_millis(outage_ms)).await;
        let mut hub = None;
        for _ in 0..20 {
            match Hub::start(config.clone()).await {
                Ok(started) => {
                    hub = Some(started);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        current = TestHub {
            hub: hub.expect("the hub restarts on its ports"),
            dir,
        };
    }
    let state = current.hub.state().clone();
    eventually(Duration::from_secs(15), || async {
        (state.telemetry.recent(Some("d1"), 0, usize::MAX).len() >= 10).then_some(())
    })
    .await;
    let produced = agent.quiesce(Duration::from_secs(30)).await;
    let connects = agent.connects();
    agent.stop().await;
    received.extend(all_events(&current.service(), "d1").await);
    let tally = tally(&received, produced);
    report(
        "hub_restarts",
        restarts,
        &format!("agent_connects:{connects}"),
        &tally,
    );
    assert!(
        connects > restarts,
        "the agent reconnected after each restart"
    );
    current.stop().await;
}

/// "Copes" with the hub's clock jumping forward by `d`, for tokens of lifetime `L` signed by
/// the device's own clock: the hub sees every token with `L - d` left.
/// - `d < L`: the hub closes the open connection as soon as its clock passes the token's
///   expiry; the agent reconnects at once with a fresh token, which the hub accepts (and closes
///   again after `L - d`). No reading is lost.
/// - `d >= L`: no token the device can sign is valid for the hub; every connect is refused
///   (CONNACK 5), the agent backs off as for refused credentials and keeps its readings, and
///   once the hub's clock is set right it reconnects and delivers them all.
#[tokio::test]
async fn a_clock_jump_forward_closes_connections_and_loses_nothing() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = long_lived_service(&hub);
    let mut config = agent_config(&hub, "d1", &key, hub.hub.mqtt_addr());
    // One hour and three seconds: an hour's jump leaves each token three seconds.
    config.connection.sas_lifetime = Duration::from_secs(3603);
    let agent = RunningAgent::start(config);
    eventually(Duration::from_secs(10), || async {
        (agent.connects() == 1 && agent.produced() > 5).then_some(())
    })
    .await;

    // d < L: the hub closes for token expiry within three seconds; the agent reconnects.
    let status = set_faults(&service, json!({"clockOffsetSecs": 3600})).await;
    assert_eq!(status["clockOffsetSecs"], 3600);
    let reconnects = eventually(Duration::from_secs(15), || async {
        (agent.connects() >= 3).then_some(agent.connects() - 1)
    })
    .await;
    // Readings flow while the hub's clock is ahead.
    let before = all_events(&service, "d1").await.len();
    eventually(Duration::from_secs(10), || async {
        (all_events(&service, "d1").await.len() > before).then_some(())
    })
    .await;

    // d >= L: refused; nothing gets through until the clock is set right.
    set_faults(&service, json!({"clockOffsetSecs": 7200})).await;
    // The hub closes the open connection; from then on every attempt is refused.
    service
        .wait_connection_state("d1", "Disconnected", Duration::from_secs(10))
        .await;
    let connects_refused_from = agent.connects();
    let held = all_events(&service, "d1").await.len();
    // Two more attempts refused by the hub show the agent kept trying meanwhile.
    let refused = || {
        hub.hub
            .state()
            .counters
            .connections_refused
            .load(Ordering::Relaxed)
    };
    let refused_before = refused();
    eventually(Duration::from_secs(10), || async {
        (refused() >= refused_before + 2).then_some(())
    })
    .await;
    assert_eq!(
        all_events(&service, "d1").await.len(),
        held,
        "no reading accepted with expired tokens"
    );
    assert_eq!(
        agent.connects(),
        connects_refused_from,
        "every connect refused"
    );
    set_faults(&service, json!({"clockOffsetSecs": 0})).await;
    eventually(Duration::from_secs(10), || async {
        (agent.connects() > connects_refused_from).then_some(())
    })
    .await;

    let produced = agent.quiesce(Duration::from_secs(30)).await;
    agent.stop().await;
    let tally = tally(&all_events(&service, "d1").await, produced);
    report(
        "clock_jump_forward",
        2,
        &format!("offsets:+3600s/+7200s,lifetime:3603s,reconnects_while_ahead:{reconnects}"),
        &tally,
    );
    hub.stop().await;
}

#[tokio::test]
async fn two_second_tokens_renewed_many_times_lose_nothing_and_add_no_reconnects() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let mut config = agent_config(&hub, "d1", &key, hub.hub.mqtt_addr());
    config.connection.sas_lifetime = Duration::from_secs(2);
    config.connection.renew_at = 0.5;
    let agent = RunningAgent::start(config);
    let handle = agent.handle.clone();
    let counters = handle.ctx.counters();
    let renewals = || counters.token_renewals.load(Ordering::Relaxed);
    eventually(Duration::from_secs(45), || async {
        (renewals() >= 15).then_some(())
    })
    .await;
    let produced = agent.quiesce(Duration::from_secs(30)).await;
    agent.stop().await;
    let (renewed, connects) = (renewals(), counters.connects.load(Ordering::Relaxed));
    let tally = tally(&all_events(&service, "d1").await, produced);
    report(
        "short_token_renewals",
        renewed,
        &format!("lifetime:2s,renewals:{renewed},connects:{connects}"),
        &tally,
    );
    // Every connect after the first was a renewal: none was forced by a failure.
    assert_eq!(connects, renewed + 1, "reconnects beyond the renewals");
    // A renewal drains in-flight readings before disconnecting, so nothing goes twice.
    assert_eq!(tally.duplicated, 0);
    hub.stop().await;
}

#[tokio::test]
async fn refused_connects_are_backed_off_and_recovered_from() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let proxy = FaultProxy::start(hub.hub.mqtt_addr()).await;
    let agent = RunningAgent::start(agent_config(&hub, "d1", &key, proxy.addr));
    eventually(Duration::from_secs(10), || async {
        (agent.connects() == 1 && agent.produced() > 5).then_some(())
    })
    .await;

    // Taken before the hub's own deadline, so "after ours" implies "after the hub's".
    let refusing_until = Instant::now() + Duration::from_secs(3);
    let status = set_faults(&service, json!({"refuseConnectsSecs": 3})).await;
    assert!(status["refuseConnectsSecs"].as_f64().unwrap() > 2.5);
    proxy.cut();
    eventually(Duration::from_secs(15), || async {
        (agent.connects() >= 2).then_some(())
    })
    .await;
    assert!(
        Instant::now() >= refusing_until,
        "the agent got in while connects were refused"
    );
    let refused = get_faults(&service).await["connectsRefused"]
        .as_u64()
        .unwrap();

    let produced = agent.quiesce(Duration::from_secs(30)).await;
    agent.stop().await;
    let tally = tally(&all_events(&service, "d1").await, produced);
    report(
        "refused_connects",
        refused,
        &format!("window:3s,connack3:{refused},backoff:50-500ms"),
        &tally,
    );
    // It retried, and it backed off: 3 s at no less than 50 ms per attempt.
    assert!(refused >= 2, "only {refused} connects refused");
    assert!(refused <= 3000 / 50 + 1, "{refused} connects in 3 s");
    hub.stop().await;
}

#[tokio::test]
async fn throttled_reported_patches_land_after_the_throttling() {
    let hub = TestHub::start().await;
    let key = hub.add_device("d1");
    let service = hub.service();
    let agent = RunningAgent::start(agent_config(&hub, "d1", &key, hub.hub.mqtt_addr()));
    // The connect-time report landed: the agent is connected and its twin task idle.
    eventually(Duration::from_secs(10), || async {
        let twin = service.get("/twins/d1").await.body;
        twin["properties"]["reported"]["connectivity"]
            .is_object()
            .then_some(())
    })
    .await;

    let throttled_until = Instant::now() + Duration::from_secs(3);
    set_faults(&service, json!({"throttleReportedSecs": 3})).await;
    let patch = json!({"properties": {"desired": {"floor": 9}}});
    let updated = service
        .call(Method::PATCH, "/twins/d1", Some(patch), &[])
        .await;
    let version = updated.body["properties"]["desired"]["$version"].clone();
    let events_before = all_events(&service, "d1").await.len();
    // The agent's patch was answered 429 twice (tried, then retried): still not applied.
    eventually(Duration::from_secs(10), || async {
        let throttled = get_faults(&service).await["reportedThrottled"].as_u64();
        (throttled >= Some(2)).then_some(())
    })
    .await;
    let twin = service.get("/twins/d1").await.body;
    assert!(
        Instant::now() < throttled_until,
        "the retries were seen within the throttling window"
    );
    assert!(
        twin["properties"]["reported"]["floor"].is_null(),
        "a reported patch landed while throttled: {twin}"
    );
    eventually(Duration::from_secs(10), || async {
        (all_events(&service, "d1").await.len() > events_before).then_some(())
    })
    .await;
    let ack = eventually(Duration::from_secs(10), || async {
        let reported = service.get("/twins/d1").await.body["properties"]["reported"].clone();
        (reported["floor"]["av"] == version).then_some(reported["floor"].clone())
    })
    .await;
    assert!(Instant::now() >= throttled_until);
    assert_eq!(ack["value"], 9);
    assert_eq!(ack["ac"], 200);
    let throttled = get_faults(&service).await["reportedThrottled"]
        .as_u64()
        .unwrap();
    let connects = agent.connects();

    let produced = agent.quiesce(Duration::from_secs(30)).await;
    agent.stop().await;
    let tally = tally(&all_events(&service, "d1").await, produced);
    report(
        "throttled_reported_patches",
        throttled,
        &format!("window:3s,http429:{throttled},agent_connects:{connects}"),
        &tally,
    );
    assert!(
        throttled >= 2,
        "the agent retried: {throttled} answered 429"
    );
    assert!(throttled <= 3000 / 50 + 1, "{throttled} patches in 3 s");
    assert_eq!(connects, 1, "a 429 is no reason to reconnect");
    hub.stop().await;
}

#[tokio::test]
async fn the_fault_hooks_refuse_bad_settings_and_need_registry_write() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let reply = service
        .call(
            Method::POST,
            "/simdevice/faults",
            Some(json!({"refuseConnectsSecs": -1})),
            &[],
        )
        .await;
    assert_eq!(reply.status, 400);
    let reply = service
        .call(
            Method::POST,
            "/simdevice/faults",
            Some(json!({"throttle": 1})),
            &[],
        )
        .await;
    assert_eq!(reply.status, 400);
    let read_only = Service::new(&hub, "service");
    let reply = read_only
        .call(
            Method::POST,
            "/simdevice/faults",
            Some(json!({"refuseConnectsSecs": 1})),
            &[],
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(get_faults(&service).await["refuseConnectsSecs"], 0.0);

    // A refused CONNECT gets CONNACK 3 (server unavailable) on the wire.
    let key = hub.add_device("d1");
    set_faults(&service, json!({"refuseConnectsSecs": 30})).await;
    let (_device, ack) = RawDevice::connect_with(
        &hub,
        connect_packet("d1", &device_token("d1", &key), true, 30),
    )
    .await;
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::ServiceUnavailable);
    set_faults(&service, json!({"refuseConnectsSecs": 0})).await;
    let mut device = RawDevice::connect(&hub, "d1", &key).await;
    device
        .subscribe("$iothub/twin/res/#", rumqttc::QoS::AtLeastOnce)
        .await;

    // A throttled reported patch gets 429 with ThrottlingException's code, and is not applied.
    set_faults(&service, json!({"throttleReportedSecs": 30})).await;
    let (status, _, body) = device.twin_patch("1", r#"{"floor": 1}"#).await;
    assert_eq!(status, 429);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["errorCode"], 429001);
    let twin = service.get("/twins/d1").await.body;
    assert!(twin["properties"]["reported"]["floor"].is_null(), "{twin}");
    set_faults(&service, json!({"throttleReportedSecs": 0})).await;
    let (status, _, _) = device.twin_patch("2", r#"{"floor": 2}"#).await;
    assert_eq!(status, 204);
    let twin = service.get("/twins/d1").await.body;
    assert_eq!(twin["properties"]["reported"]["floor"], 2);

    // A jump of the hub's clock past the token's expiry closes the connection at once.
    set_faults(&service, json!({"clockOffsetSecs": 7200})).await;
    tokio::time::timeout(Duration::from_secs(3), device.expect_closed())
        .await
        .expect("closed within 3 s of the jump");
    hub.stop().await;
}

/// The proxy itself: each fault does what it says on a plain TCP echo, so the runs above
/// really inject what they count.
#[tokio::test]
async fn the_proxy_cuts_resets_stalls_and_slows_as_told() {
    use crate::common::proxy::Fault;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let proxy = FaultProxy::start(target).await;
    async fn roundtrip(client: &mut TcpStream, data: &[u8]) -> Duration {
        let started = Instant::now();
        client.write_all(data).await.unwrap();
        let mut back = vec![0; data.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back))
            .await
            .expect("echoed in time")
            .unwrap();
        assert_eq!(back, data);
        started.elapsed()
    }

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(roundtrip(&mut client, b"ping").await < Duration::from_millis(500));
    assert_eq!(proxy.live(), 1);

    // Stall: nothing passes for its duration, then everything does.
    let (_, took) = tokio::join!(
        proxy.inject(Fault::Stall(Duration::from_millis(600))),
        async {
            // join! polls the injection first, which sets the mode before it sleeps; this
            // yield lets it do so before a byte is written.
            tokio::task::yield_now().await;
            roundtrip(&mut client, b"stalled").await
        }
    );
    assert!(took >= Duration::from_millis(500), "{took:?}");

    // Slow: 2-byte chunks 20 ms apart (the echo overlaps both ways): 20 bytes take 9 x 20 ms.
    let slow = Fault::Slow {
        duration: Duration::from_secs(2),
        chunk: 2,
        delay: Duration::from_millis(20),
    };
    let (_, took) = tokio::join!(proxy.inject(slow), async {
        tokio::task::yield_now().await;
        roundtrip(&mut client, b"twenty bytes, slowly").await
    });
    assert!(took >= Duration::from_millis(180), "{took:?}");

    // Cut: the client reads end of stream.
    proxy.inject(Fault::Cut).await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await;
    assert_eq!(read.expect("closed in time").unwrap(), 0, "a cut is a FIN");

    // Reset: the client's read fails with ECONNRESET, not end of stream.
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    roundtrip(&mut client, b"again").await;
    proxy.inject(Fault::Reset).await;
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte)).await;
    let error = read
        .expect("reset in time")
        .expect_err("a reset is an error");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);

    let counts = proxy.counts();
    assert_eq!(
        (counts.stalls, counts.slows, counts.cuts, counts.resets),
        (1, 1, 1, 1)
    );
    assert_eq!(counts.connections, 2);
    assert_eq!(counts.connections_killed, 2);
    drop(proxy);
    echo.abort();
}
