//! The DPS device endpoint: MQTT 3.1.1 over TLS on its own port, through the hub's shared
//! accept loop (`hub::accept`) and TLS acceptor.
//!
//! One task per connection: TLS, CONNECT (the registration's SAS token, or with no token its
//! client certificate, checked against the enrollments: CONNACK 5 for anything wrong, as DPS
//! and the hub answer), then SUBSCRIBE to
//! `$dps/registrations/res/#`, register and operation-status requests, each answered at QoS 0
//! on the response topic. A connection holds a permit of [`MAX_UNAUTHENTICATED`] until its
//! CONNACK, as the hub's MQTT listener does. Anything else a device publishes, a QoS 2
//! publish or a malformed packet closes the connection.
//!
//! The same endpoint over WebSocket ([`Transport::WebSocket`], `--dps-ws-port`): real DPS
//! serves MQTT over WebSocket on its own host's port 443, path `/$iothub/websocket`,
//! subprotocol `mqtt`, as IoT Hub does; locally the hub's 443 is the hub's, so DPS's WebSocket
//! gets a port of its own (a host of its own, as on Azure, stands in for by a port, as
//! `--dps-port` does for DPS's 8883). After TLS and the upgrade (`hub::mqtt::websocket`'s,
//! the same checks) the session is this module's, over the frames. Each port has its own
//! pool of unauthenticated connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, Publish, QoS, SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{DpsError, Matched};
use crate::hub::accept::{AcceptLoop, Alive};
use crate::hub::mqtt::connection::{read_packet, write_out};
use crate::hub::HubState;
use crate::protocol::dps::{
    error_code, parse_request_topic, response_topic, DpsRequest, RegisterRequest, RESPONSE_FILTER,
};

/// Connections allowed to be between accept and CONNACK at the same time.
pub const MAX_UNAUTHENTICATED: usize = 1024;
/// Time a new connection has for its TLS handshake and CONNECT.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Time a write may take before the device counts as gone.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// Largest packet accepted: a register request carries a small JSON payload.
const MAX_PACKET_SIZE: usize = 64 * 1024;
/// The keep-alive cap, as the hub's.
const MAX_IDLE: Duration = Duration::from_secs(1767);

/// How devices reach a DPS port: MQTT over TLS, or MQTT over WebSocket over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Mqtt,
    WebSocket,
}

pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    alive: Alive,
    transport: Transport,
) {
    let accept = AcceptLoop {
        name: match transport {
            Transport::Mqtt => "DPS",
            Transport::WebSocket => "DPS WebSocket",
        },
        max_pending: MAX_UNAUTHENTICATED,
        shutdown: shutdown.clone(),
        tasks,
        alive,
        // No fault hook for this listener: a token nobody cancels.
        kill: CancellationToken::new(),
    };
    accept
        .run(listener, move |socket, peer, permit| {
            serve_connection(
                socket,
                peer,
                acceptor.clone(),
                state.clone(),
                shutdown.clone(),
                permit,
                transport,
            )
        })
        .await;
}

/// TLS, and for the WebSocket port the upgrade, within the connection's deadline; then the
/// session over whichever stream that made.
async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    handshake_permit: OwnedSemaphorePermit,
    transport: Transport,
) {
    // One deadline for TLS, the upgrade and the CONNECT, as on the hub's ports.
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(socket)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, reason = %format!("TLS: {e}"), "DPS: connection closed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "DPS: no TLS handshake within the deadline; closed");
            return;
        }
    };
    // The client's certificate chain (an X.509 registration), read before the upgrade hides
    // the TLS stream.
    let chain = crate::hub::mqtt::connection::peer_certificates(&tls);
    match transport {
        Transport::Mqtt => {
            serve_stream(
                tls,
                peer,
                deadline,
                chain,
                state,
                shutdown,
                handshake_permit,
            )
            .await;
        }
        Transport::WebSocket => {
            let upgraded = tokio::time::timeout_at(
                deadline,
                crate::hub::mqtt::websocket::upgrade(tls, MAX_PACKET_SIZE),
            )
            .await;
            match upgraded {
                Ok(Ok(ws)) => {
                    serve_stream(ws, peer, deadline, chain, state, shutdown, handshake_permit)
                        .await;
                }
                Ok(Err(reason)) => {
                    tracing::debug!(%peer, transport = "websocket", reason, "DPS: connection closed before CONNECT");
                }
                Err(_) => {
                    tracing::debug!(%peer, transport = "websocket", "DPS: no WebSocket upgrade within the deadline; closed");
                }
            }
        }
    }
}

/// One DPS connection once its stream is open: CONNECT (by `deadline`), then the session.
/// `chain` is the certificate chain the client presented in TLS (empty when none).
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    deadline: Instant,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    handshake_permit: OwnedSemaphorePermit,
) {
    let mut inbuf = BytesMut::with_capacity(1024);
    let opened = tokio::time::timeout_at(deadline, async {
        let packet = read_packet(&mut stream, &mut inbuf, MAX_PACKET_SIZE).await?;
        Ok::<_, String>(packet)
    })
    .await;
    let connect = match opened {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(_)) => {
            tracing::debug!(%peer, "DPS: first packet was not CONNECT; closed");
            return;
        }
        Ok(Err(reason)) => {
            tracing::debug!(%peer, reason, "DPS: connection closed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "DPS: no CONNECT within the deadline; closed");
            return;
        }
    };
    let (username, password) = match &connect.login {
        Some(login) => (Some(login.username.as_str()), Some(login.password.as_str())),
        None => (None, None),
    };
    let now = state.faults.now_unix();
    // No SAS token but a client certificate: an X.509 registration (the TLS acceptor asks
    // every client for one, as the hub's MQTT listener does).
    let authenticated = if password.is_none_or(str::is_empty) && !chain.is_empty() {
        state
            .dps
            .authenticate_x509(&state.x509, now, &connect.client_id, username, &chain)
    } else {
        state
            .dps
            .authenticate(now, &connect.client_id, username, password)
    };
    drop(chain);
    let (registration_id, matched) = match authenticated {
        Ok(pair) => pair,
        Err(failure) => {
            tracing::info!(%peer, client_id = %connect.client_id, reason = %failure,
                "DPS registration refused (CONNACK 5)");
            let mut out = BytesMut::new();
            let _ = ConnAck::new(ConnectReturnCode::NotAuthorized, false).write(&mut out);
            let _ = tokio::time::timeout(WRITE_DEADLINE, stream.write_all(&out)).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    drop(handshake_permit);
    let keep_alive = match connect.keep_alive {
        0 => MAX_IDLE,
        secs => (Duration::from_secs(u64::from(secs)) * 3 / 2).min(MAX_IDLE),
    };
    tracing::debug!(registration = %registration_id, %peer, "DPS client connected");
    let mut session = Session {
        state: &state,
        registration_id,
        matched,
        out: BytesMut::with_capacity(512),
    };
    let _ = ConnAck::new(ConnectReturnCode::Success, false).write(&mut session.out);
    let reason = session
        .run(&mut stream, &mut inbuf, keep_alive, &shutdown)
        .await;
    tracing::debug!(registration = %session.registration_id, %peer, reason, "DPS connection closed");
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

struct Session<'a> {
    state: &'a HubState,
    registration_id: String,
    matched: Matched,
    out: BytesMut,
}

impl Session<'_> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        inbuf: &mut BytesMut,
        keep_alive: Duration,
        shutdown: &CancellationToken,
    ) -> String {
        loop {
            // Packets that came with (or behind) the last read, then whatever they produced.
            loop {
                match Packet::read(inbuf, MAX_PACKET_SIZE) {
                    Ok(packet) => {
                        if let Err(reason) = self.handle(packet) {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                stream.write_all(&self.out),
                            )
                            .await;
                            return reason;
                        }
                    }
                    Err(rumqttc::Error::InsufficientBytes(_)) => break,
                    Err(e) => return format!("malformed packet: {e}"),
                }
            }
            if let Err(reason) = write_out(stream, &mut self.out).await {
                return reason;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return "the hub is stopping".into(),
                read = tokio::time::timeout(keep_alive, stream.read_buf(inbuf)) => match read {
                    Err(_) => return "keep-alive timed out".into(),
                    Ok(Ok(0)) => return "closed by the device".into(),
                    Ok(Err(e)) => return format!("read failed: {e}"),
                    Ok(Ok(_)) => {}
                },
            }
        }
    }

    fn handle(&mut self, packet: Packet) -> Result<(), String> {
        match packet {
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    if filter.path != RESPONSE_FILTER {
                        return Err(format!("subscription to {:?} refused", filter.path));
                    }
                    let granted = match filter.qos {
                        QoS::AtMostOnce => QoS::AtMostOnce,
                        _ => QoS::AtLeastOnce,
                    };
                    codes.push(SubscribeReasonCode::Success(granted));
                }
                let _ = SubAck::new(subscribe.pkid, codes).write(&mut self.out);
                Ok(())
            }
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PingReq => {
                let _ = PingResp.write(&mut self.out);
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                let _ = rumqttc::UnsubAck::new(unsubscribe.pkid).write(&mut self.out);
                Ok(())
            }
            Packet::PubAck(_) => Ok(()),
            Packet::Disconnect => Err("the device disconnected".into()),
            Packet::Connect(_) => Err("a second CONNECT on one connection".into()),
            _ => Err("unexpected packet".into()),
        }
    }

    fn on_publish(&mut self, publish: Publish) -> Result<(), String> {
        match publish.qos {
            QoS::ExactlyOnce => return Err("QoS 2 is not supported".into()),
            QoS::AtLeastOnce => {
                let _ = PubAck::new(publish.pkid).write(&mut self.out);
            }
            QoS::AtMostOnce => {}
        }
        let request =
            parse_request_topic(&publish.topic).map_err(|e| format!("publish refused: {e}"))?;
        let (rid, answer) = match request {
            DpsRequest::Register { rid } => (rid, self.register(&publish.payload)),
            DpsRequest::Status { rid, operation_id } => (
                rid,
                self.state
                    .dps
                    .operation(&self.registration_id, &operation_id)
                    .map(|status| (200, status)),
            ),
        };
        let (status, retry_after, body) = match answer {
            Ok((status, operation)) => {
                let retry = (status == 202).then_some(super::RETRY_AFTER_S);
                let body = serde_json::to_vec(&operation)
                    .map_err(|e| format!("cannot encode an answer: {e}"))?;
                (status, retry, body)
            }
            Err(error) => {
                tracing::info!(registration = %self.registration_id, code = error.code,
                    message = %error.message, "DPS request refused");
                let retry = (error.status() == 429).then_some(super::RETRY_AFTER_S);
                (error.status(), retry, error.body().to_string().into_bytes())
            }
        };
        let answer = Publish::new(
            response_topic(status, &rid, retry_after),
            QoS::AtMostOnce,
            Bytes::from(body),
        );
        let _ = answer.write(&mut self.out);
        Ok(())
    }

    fn register(
        &self,
        payload: &[u8],
    ) -> Result<(u16, crate::protocol::dps::OperationStatus), DpsError> {
        let request: RegisterRequest = serde_json::from_slice(payload).map_err(|e| {
            DpsError::new(
                error_code::BAD_REQUEST,
                format!("the register body is not {{\"registrationId\":...}}: {e}"),
            )
        })?;
        if request.registration_id != self.registration_id {
            return Err(DpsError::new(
                error_code::BAD_REQUEST,
                format!(
                    "registrationId {:?} is not the connection's {:?}",
                    request.registration_id, self.registration_id
                ),
            ));
        }
        super::register(
            self.state,
            &self.registration_id,
            &self.matched,
            request.payload,
        )
        .map(|status| (202, status))
    }
}
