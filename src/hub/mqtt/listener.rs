//! Accepts device connections and hands each to its own connection task.
//!
//! A connection that has not finished its TLS handshake and CONNECT holds one permit of a
//! fixed pool; when the pool is empty, new sockets are closed at once, so a flood of silent
//! clients cannot exhaust the hub. The permit is returned when the connection is
//! authenticated or gives up (deadline in `connection`).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection;
use crate::hub::HubState;

/// Connections allowed to be between accept and CONNACK at the same time.
pub const MAX_UNAUTHENTICATED: usize = 1024;

pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                tracing::warn!(%error, "MQTT accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections in handshake; refusing one");
            continue;
        };
        let _ = socket.set_nodelay(true);
        tasks.spawn(connection::serve(
            socket,
            peer,
            acceptor.clone(),
            state.clone(),
            shutdown.clone(),
            permit,
        ));
    }
}
