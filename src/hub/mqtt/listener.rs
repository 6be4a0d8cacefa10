//! Accepts device connections and hands each to its own connection task, through the hub's
//! shared accept loop (`hub::accept`).
//!
//! A connection that has not finished its TLS handshake and CONNECT holds one permit of a
//! fixed pool of [`MAX_UNAUTHENTICATED`]; when the pool is empty, new sockets are closed at
//! once, so a flood of silent clients cannot exhaust the hub. The permit is returned when the
//! connection is authenticated or gives up (deadline in `connection`): authenticated devices
//! are the fleet and are not capped here.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection;
use crate::hub::accept::{AcceptLoop, Alive};
use crate::hub::faults::Listener;
use crate::hub::HubState;

/// Connections allowed to be between accept and CONNACK at the same time.
pub const MAX_UNAUTHENTICATED: usize = 1024;

pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
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
        .run(listener, move |socket, peer, permit| {
            connection::serve(
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
