//! MQTT over WebSocket, as IoT Hub serves it on port 443: TLS (the same certificate and the
//! same [`connection::tls_handshake`] as the MQTT port), an HTTP upgrade to a WebSocket at
//! [`ws_stream::PATH`] with the subprotocol `mqtt`, then the very same MQTT handling
//! ([`connection::serve`]) over the frames, through [`WsStream`].
//!
//! Refused, each with the connection closed and a debug log: another path (404), an upgrade
//! that does not offer the `mqtt` subprotocol (400), a request that is not a WebSocket
//! upgrade (plain HTTP: closed without an answer, as tungstenite does), and later a frame or
//! message over the largest MQTT packet. The handshakes and the CONNECT share one deadline
//! ([`connection::CONNECT_DEADLINE`]) and one permit of the unauthenticated pool (`listener`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_util::sync::CancellationToken;

use super::connection::{self, Link, CONNECT_DEADLINE, MAX_PACKET_SIZE};
use crate::common::ws_stream::{self, WsStream};
use crate::hub::HubState;

/// A connection to the WebSocket port: TLS, the upgrade, then MQTT.
pub async fn serve(
    socket: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    handshake_permit: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let opened = tokio::time::timeout_at(deadline, async {
        let tls = connection::tls_handshake(&acceptor, socket).await?;
        let certificates = connection::peer_certificates(&tls);
        let ws = upgrade(tls, MAX_PACKET_SIZE).await?;
        Ok::<_, String>((ws, certificates))
    })
    .await;
    let (ws, certificates) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(reason)) => {
            tracing::debug!(%peer, transport = "websocket", reason, "connection closed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, transport = "websocket", "no WebSocket upgrade within the deadline; closed");
            return;
        }
    };
    let link = Link {
        peer,
        transport: "websocket",
        deadline,
        certificates,
    };
    connection::serve(ws, link, state, shutdown, handshake_permit).await;
}

/// The server side of the upgrade over an accepted TLS stream: IoT Hub's path and subprotocol
/// ([`check_upgrade`]), frames up to `max_frame` bytes; the reason for the debug log when it is
/// refused. Shared with the DPS endpoint's WebSocket port (`hub::dps::mqtt`), which real DPS
/// serves with the same path and subprotocol on its own host.
pub async fn upgrade<S>(stream: S, max_frame: usize) -> Result<WsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        check_upgrade,
        Some(ws_stream::config(max_frame)),
    )
    .await
    .map(WsStream::new)
    .map_err(upgrade_refused)
}

/// Accepts the upgrade only at IoT Hub's path (the query, which SDKs may add, aside) and with
/// the `mqtt` subprotocol, which the answer names.
#[allow(clippy::result_large_err)] // the shape tungstenite's callback asks for
fn check_upgrade(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() != ws_stream::PATH {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            format!(
                "no WebSocket endpoint at {}: MQTT over WebSocket is at {}",
                request.uri().path(),
                ws_stream::PATH
            ),
        ));
    }
    let offers_mqtt = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == ws_stream::SUBPROTOCOL);
    if !offers_mqtt {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "the upgrade must offer the WebSocket subprotocol {:?}",
                ws_stream::SUBPROTOCOL
            ),
        ));
    }
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(ws_stream::SUBPROTOCOL),
    );
    Ok(response)
}

fn refusal(status: StatusCode, message: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(message));
    *response.status_mut() = status;
    response
}

/// Why the upgrade did not happen, for the debug log: our refusal with its status and reason,
/// or tungstenite's (not a WebSocket upgrade at all, a broken request).
fn upgrade_refused(error: WsError) -> String {
    match error {
        WsError::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            format!("WebSocket upgrade refused ({}): {body}", response.status())
        }
        other => format!("not a WebSocket upgrade: {other}"),
    }
}
