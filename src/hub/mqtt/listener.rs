//! Accepts device connections, on the MQTT port and on the WebSocket port, and hands each to
//! its own connection task, through the hub's shared accept loop (`hub::accept`).
//!
//! A connection that has not finished its handshakes and CONNECT holds one permit of a fixed
//! pool of [`MAX_UNAUTHENTICATED`], ONE pool for both listeners (a flood on one port cannot
//! double the budget); when it is empty, new sockets are closed at once, so a flood of silent
//! clients cannot exhaust the hub. The permit is returned when the connection is
//! authenticated or gives up (deadline in `connection`): authenticated devices are the fleet
//! and are not capped here.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{connection, websocket};
use crate::hub::accept::{AcceptLoop, Alive};
use crate::hub::faults::Listener;
use crate::hub::HubState;

/// Connections allowed to be between accept and CONNACK at the same time (both listeners).
pub const MAX_UNAUTHENTICATED: usize = 1024;

/// The pool both device listeners take their permits from.
pub fn unauthenticated_pool() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_UNAUTHENTICATED))
}

/// The MQTT over TLS listener.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    pool: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    alive: Alive,
) {
    let accept = AcceptLoop {
        name: "MQTT",
        max_pending: MAX_UNAUTHENTICATED,
        shutdown: shutdown.clone(),
        tasks,
        alive,
        kill: state.faults.accept_loop_kill(Listener::Mqtt),
    };
    accept
        .run_with_pool(listener, pool, move |socket, peer, permit| {
            connection::serve_tls(
                socket,
                peer,
                acceptor.clone(),
                state.clone(),
                shutdown.clone(),
                permit,
            )
        })
        .await;
}

/// The MQTT over WebSocket listener (TLS, the upgrade, then the same MQTT handling).
pub async fn serve_websocket(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    pool: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    alive: Alive,
) {
    let accept = AcceptLoop {
        name: "WebSocket",
        max_pending: MAX_UNAUTHENTICATED,
        shutdown: shutdown.clone(),
        tasks,
        alive,
        // The fault hook kills the MQTT and API loops only; nothing kills this one.
        kill: CancellationToken::new(),
    };
    accept
        .run_with_pool(listener, pool, move |socket, peer, permit| {
            websocket::serve(
                socket,
                peer,
                acceptor.clone(),
                state.clone(),
                shutdown.clone(),
                permit,
            )
        })
        .await;
}
