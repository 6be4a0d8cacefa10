//! The hub's listeners: its health follows its accept loops (a dead loop turns `Hub::health`
//! and `/healthz` bad), and the service API caps its connections as the MQTT side does.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::TestHub;
use simdevice::common::exposition;
use simdevice::hub::api::MAX_API_CONNECTIONS;
use simdevice::hub::faults::Listener;
use simdevice::hub::metrics::HubMetrics;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(5);

async fn healthz(addr: SocketAddr) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .expect("healthz answered");
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Polls `check` every 20 ms until it holds; fails after [`DEADLINE`].
async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until a TCP connect to `addr` is refused (the listener is gone).
async fn wait_until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {}
        }
        assert!(Instant::now() < deadline, "{addr} still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_bad_when_an_accept_loop_dies() {
    let hub = TestHub::start().await;
    let service = hub.service();
    let stop = CancellationToken::new();
    let metrics = exposition::serve(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(HubMetrics {
            state: hub.hub.state().clone(),
            stopping: stop.clone(),
        }),
        stop.clone(),
    )
    .await
    .expect("metrics server")
    .local_addr;
    let probe = hub.hub.health_probe();
    assert_eq!(hub.hub.health(), Ok(()));
    assert_eq!(probe(), Ok(()));
    assert_eq!(healthz(metrics).await, (200, "ok\n".to_string()));

    // The MQTT loop dies: health says so everywhere, its port is gone, the API still serves.
    hub.hub.state().faults.kill_accept_loop(Listener::Mqtt);
    wait_until("health to turn bad", || hub.hub.health().is_err()).await;
    assert_eq!(
        hub.hub.health(),
        Err("the MQTT accept loop has died".to_string())
    );
    assert_eq!(probe(), hub.hub.health());
    let (status, body) = healthz(metrics).await;
    assert_eq!(status, 503);
    assert!(body.contains("the MQTT accept loop has died"), "{body}");
    wait_until_refused(hub.hub.mqtt_addr()).await;
    assert_eq!(service.get("/statistics/devices").await.status, 200);

    // Then the API loop: both are named.
    hub.hub.state().faults.kill_accept_loop(Listener::Api);
    wait_until("the API loop to count as dead", || {
        hub.hub.health().is_err_and(|e| e.contains("API"))
    })
    .await;
    assert_eq!(
        hub.hub.health(),
        Err("the MQTT accept loop has died; the API accept loop has died".to_string())
    );
    wait_until_refused(hub.hub.api_addr()).await;
    let (status, body) = healthz(metrics).await;
    assert_eq!(status, 503);
    assert!(body.contains("the API accept loop has died"), "{body}");
    stop.cancel();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_caps_its_connections_and_closes_the_ones_over_the_cap_at_once() {
    const OVER: usize = 24;
    let hub = TestHub::start().await;
    let service = hub.service();
    let addr = hub.hub.api_addr();
    // Silent sockets that never send a TLS byte; each holds a permit until the hub's TLS
    // deadline (10 s), the ones over the cap are closed at once.
    let flood: Vec<std::net::TcpStream> =
        crate::common::open_tcp(addr, MAX_API_CONNECTIONS + OVER).await;
    let is_closed = |socket: &std::net::TcpStream| {
        let mut byte = [0u8; 1];
        match (&*socket).read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    let mut closed = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        closed = flood.iter().filter(|s| is_closed(s)).count();
        if closed >= OVER {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        closed, OVER,
        "the sockets over the cap of {MAX_API_CONNECTIONS} are closed at once, the others held"
    );

    // While full, a new client is turned away at once rather than left hanging.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(hub.ca_pem().as_bytes()).unwrap())
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let url = format!(
        "https://localhost:{}/statistics/devices?api-version=2021-04-12",
        addr.port()
    );
    let started = Instant::now();
    let refused = tokio::time::timeout(Duration::from_secs(3), client.get(&url).send())
        .await
        .expect("the newcomer is answered in time");
    assert!(refused.is_err(), "no request served while the pool is full");
    assert!(started.elapsed() < Duration::from_secs(2));

    // The flood goes away: the permits come back and the API serves again.
    drop(flood);
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(response) = client.get(&url).send().await {
            // Unauthenticated on purpose: any answer proves the connection was taken.
            assert_eq!(response.status(), 401);
            break;
        }
        assert!(Instant::now() < deadline, "the API never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(service.get("/statistics/devices").await.status, 200);
    hub.stop().await;
}
