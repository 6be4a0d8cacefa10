//! One device connection, from the first MQTT byte to close, over any byte stream: TLS alone
//! (the MQTT port, [`serve_tls`]) or a WebSocket inside TLS (`websocket`). Both come through
//! [`tls_handshake`] first, then [`serve`]: one code path for both transports.
//!
//! The task owns the stream: it decodes packets from the device and acts on them, and it
//! writes what the rest of the hub sends through the session's channel. As IoT Hub does, it
//! answers most protocol violations by closing the connection (QoS 2 publish, undocumented or
//! foreign topics, oversize or malformed packets, a second CONNECT). It also closes when the
//! keep-alive (1.5 x the client's) or the SAS token runs out, when a newer connection takes
//! over the identity, and when the hub stops. Each close is logged once with its reason.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, Publish, QoS, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::hub::auth::{self, DeviceLogin};
use crate::hub::events::AuthMethod;
use crate::hub::metrics::HubCounters;
use crate::hub::registry::LiveStats;
use crate::hub::sessions::{Attached, Outbound};
use crate::hub::{twins, HubState};
use crate::protocol::property_bag::PropertyBag;
use crate::protocol::topic::{
    parse_device_publish, parse_subscription, twin_response_topic, DevicePublish, SubscriptionKind,
};

/// Time a new connection has for its TLS handshake (and WebSocket upgrade) and CONNECT.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Time a write to a device may take before the device counts as gone.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// Largest packet accepted: a 256 KB message plus topic and header room.
pub const MAX_PACKET_SIZE: usize = 256 * 1024 + 8 * 1024;
/// Largest telemetry message: body plus property names and values.
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024;
/// Reads after the first that one wake-up of a connection may take (`handle_read`).
const READ_AHEAD_ROUNDS: usize = 8;
/// Answers waiting to be written past which a connection stops reading ahead.
const READ_AHEAD_OUT: usize = 8 * 1024;
/// The hub's keep-alive cap: 1.5 x 1177 s.
const MAX_IDLE: Duration = Duration::from_secs(1767);

/// A device connection after the TLS handshake, before anything else.
pub type Tls = TlsStream<TcpStream>;

/// THE TLS STEP of every device connection, whatever comes after it (MQTT, or a WebSocket
/// upgrade). What the handshake tells of the client is read from the stream it returns.
pub async fn tls_handshake(acceptor: &TlsAcceptor, socket: TcpStream) -> Result<Tls, String> {
    acceptor
        .accept(socket)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

/// The chain a client presented in the handshake (its signature already checked by rustls):
/// what an X.509 device authenticates with. Empty when it sent none.
pub fn peer_certificates(stream: &Tls) -> Vec<CertificateDer<'static>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.to_vec())
        .unwrap_or_default()
}

/// A connection to the MQTT port: TLS, then MQTT, within [`CONNECT_DEADLINE`] to CONNECT.
pub async fn serve_tls(
    socket: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    handshake_permit: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let stream = match tokio::time::timeout_at(deadline, tls_handshake(&acceptor, socket)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(reason)) => {
            tracing::debug!(%peer, reason, "connection closed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within the deadline; closed");
            return;
        }
    };
    let certificates = peer_certificates(&stream);
    serve(
        stream,
        Link {
            peer,
            transport: "mqtt",
            deadline,
            certificates,
        },
        state,
        shutdown,
        handshake_permit,
    )
    .await;
}

/// Where a connection comes from and how, for [`serve`].
pub struct Link {
    pub peer: SocketAddr,
    /// `mqtt` or `websocket`, for the log.
    pub transport: &'static str,
    /// The CONNECT must be in by then (it started at accept).
    pub deadline: Instant,
    /// The client's certificate chain from the TLS handshake ([`peer_certificates`]).
    pub certificates: Vec<CertificateDer<'static>>,
}

/// Serves one device over `stream` (TLS done, and the WebSocket upgrade if any): its CONNECT
/// by `link.deadline`, authentication, then the session until it closes.
pub async fn serve<S>(
    mut stream: S,
    link: Link,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    handshake_permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Link {
        peer,
        transport,
        deadline,
        certificates,
    } = link;
    let mut inbuf = BytesMut::with_capacity(1024);
    let first = match tokio::time::timeout_at(
        deadline,
        read_packet(&mut stream, &mut inbuf, MAX_PACKET_SIZE),
    )
    .await
    {
        Ok(Ok(packet)) => packet,
        Ok(Err(reason)) => {
            tracing::debug!(%peer, transport, reason, "connection closed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, transport, "no CONNECT within the deadline; closed");
            return;
        }
    };
    let Packet::Connect(connect) = first else {
        tracing::debug!(%peer, transport, "first packet was not CONNECT; closed");
        return;
    };
    if state.faults.refuse_connect() {
        // The fault hook of `hub/faults.rs`: throttled, as IoT Hub refuses connects over quota.
        tracing::info!(%peer, client_id = %connect.client_id, "device refused: the hub is told to refuse connects (CONNACK 3)");
        let mut out = BytesMut::new();
        let _ = ConnAck::new(ConnectReturnCode::ServiceUnavailable, false).write(&mut out);
        let _ = tokio::time::timeout(WRITE_DEADLINE, stream.write_all(&out)).await;
        let _ = stream.shutdown().await;
        return;
    }
    let (username, password) = match &connect.login {
        Some(login) => (Some(login.username.as_str()), Some(login.password.as_str())),
        None => (None, None),
    };
    let login = match auth::authenticate_connect(
        &state,
        &connect.client_id,
        username,
        password,
        &certificates,
    ) {
        Ok(login) => login,
        Err(failure) => {
            let reason = crate::common::logging::error_chain(&failure);
            tracing::info!(%peer, client_id = %connect.client_id, reason, "device refused (CONNACK 5)");
            HubCounters::bump(&state.counters.connections_refused);
            let mut out = BytesMut::new();
            let _ = ConnAck::new(ConnectReturnCode::NotAuthorized, false).write(&mut out);
            let _ = tokio::time::timeout(WRITE_DEADLINE, stream.write_all(&out)).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    drop(handshake_permit);
    drop(certificates); // not kept for the life of the connection
    HubCounters::bump(&state.counters.connections_accepted);

    let Ok(live) = state.registry.get(&login.device_id, |d| d.live.clone()) else {
        return;
    };
    let attached = state
        .sessions
        .attach(&login.device_id, connect.clean_session);
    // Cloud-to-device messages not in the resumed session go out again (after the CONNACK:
    // they wait in the session's channel).
    crate::hub::c2d::on_attach(&state, &login.device_id, &attached.resend);
    live.connected.store(true, Ordering::Relaxed);
    live.touch();
    let keep_alive = match connect.keep_alive {
        0 => MAX_IDLE,
        secs => (Duration::from_secs(u64::from(secs)) * 3 / 2).min(MAX_IDLE),
    };
    tracing::info!(device = %login.device_id, %peer, transport, session_present = attached.session_present,
        keep_alive_s = connect.keep_alive, "device connected");

    let connection_id = attached.connection_id;
    let mut connection = Connection {
        device_id: Arc::from(login.device_id.as_str()),
        state: &state,
        live: &live,
        out: BytesMut::with_capacity(256),
        generation_id: None,
        partition: state.events.partition_of(&login.device_id),
        auth: login.auth,
        telemetry: Vec::new(),
    };
    let reason = connection
        .run(
            &mut stream,
            &mut inbuf,
            attached,
            &login,
            keep_alive,
            &shutdown,
        )
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    if state.sessions.detach(&login.device_id, connection_id) {
        live.connected.store(false, Ordering::Relaxed);
    }
    tracing::info!(device = %login.device_id, %peer, reason, "device disconnected");
}

/// Writes and flushes what `out` holds, within [`WRITE_DEADLINE`], then empties it; the reason
/// to close otherwise (the device listeners and the DPS endpoint).
pub async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    let write = async {
        stream.write_all(out).await?;
        stream.flush().await
    };
    match tokio::time::timeout(WRITE_DEADLINE, write).await {
        Ok(Ok(())) => {
            out.clear();
            Ok(())
        }
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err("the device stopped reading (write timed out)".into()),
    }
}

/// Reads until one whole packet of at most `max_size` bytes is buffered (the device listeners
/// and the DPS endpoint).
pub async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    inbuf: &mut BytesMut,
    max_size: usize,
) -> Result<Packet, String> {
    loop {
        match Packet::read(inbuf, max_size) {
            Ok(packet) => return Ok(packet),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed packet: {e}")),
        }
        match stream.read_buf(inbuf).await {
            Ok(0) => return Err("closed by the peer".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

struct Connection<'a> {
    device_id: Arc<str>,
    state: &'a HubState,
    live: &'a LiveStats,
    out: BytesMut,
    /// The device's generation id, looked up at its first message (it cannot change while the
    /// device is connected: a deleted device loses its connection).
    generation_id: Option<Arc<str>>,
    /// The device's partition in the event store.
    partition: u32,
    /// How the device authenticated, stamped on each message it sends.
    auth: AuthMethod,
    /// Telemetry read but not yet stored: the run of messages in what one read brought, stored
    /// in one append (one write) and acknowledged after it ([`Connection::store_telemetry`]).
    telemetry: Vec<PendingTelemetry>,
}

/// A telemetry message accepted for storing, with the packet id its PUBACK needs (none at
/// QoS 0).
struct PendingTelemetry {
    pkid: Option<u16>,
    properties: PropertyBag,
    body: Bytes,
    enqueued_time: chrono::DateTime<chrono::Utc>,
}

/// Why the loop ended; logged once.
type CloseReason = String;

impl Connection<'_> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        inbuf: &mut BytesMut,
        mut attached: Attached,
        login: &DeviceLogin,
        keep_alive: Duration,
        shutdown: &CancellationToken,
    ) -> CloseReason {
        let _ =
            ConnAck::new(ConnectReturnCode::Success, attached.session_present).write(&mut self.out);
        for publish in std::mem::take(&mut attached.resend) {
            let _ = publish.write(&mut self.out);
        }
        // A client may send packets right behind its CONNECT without waiting for the CONNACK
        // (MQTT 3.1.1, 3.1.4): whatever arrived with it is already buffered.
        if let Err(reason) = self.handle_read(stream, inbuf) {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&self.out)).await;
            return reason;
        }
        // On the hub's clock, which the fault hooks may move: a jump re-arms the timer.
        let mut clock = self.state.faults.watch_clock();
        // Both timers live for the whole connection and are moved, not re-created, so an
        // iteration of the loop costs no timer registration.
        let token_timer =
            tokio::time::sleep_until(self.state.faults.instant_of(login.token_expiry));
        let idle_timer = tokio::time::sleep_until(Instant::now() + keep_alive);
        tokio::pin!(token_timer, idle_timer);
        let mut idle_reset_at = Instant::now();
        loop {
            if let Err(reason) = write_out(stream, &mut self.out).await {
                return reason;
            }
            // Capture behind: read nothing more from the device until it has room (TCP then
            // slows the device), for at most ROOM_WAIT; see `capture`'s module notes.
            if let Some(capture) = &self.state.capture {
                if !capture.has_room(self.partition) {
                    tokio::select! {
                        _ = shutdown.cancelled() => return "the hub is stopping".into(),
                        _ = tokio::time::timeout(crate::hub::capture::ROOM_WAIT, capture.room(self.partition)) => {}
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return "the hub is stopping".into(),
                _ = &mut token_timer => return "the SAS token expired".into(),
                Ok(()) = clock.changed() => {
                    token_timer.as_mut().reset(self.state.faults.instant_of(login.token_expiry));
                }
                _ = &mut idle_timer => return "keep-alive timed out".into(),
                outbound = attached.rx.recv() => match outbound {
                    Some(Outbound::Publish(publish)) => {
                        let _ = publish.write(&mut self.out);
                    }
                    None => return "replaced by a newer connection, or the device was removed".into(),
                },
                read = stream.read_buf(inbuf) => match read {
                    Ok(0) => return "closed by the device".into(),
                    Err(e) => return format!("read failed: {e}"),
                    Ok(_) => {
                        // The deadline moves at most once a second (or a sixth of the
                        // allowance, for short keep-alives): it then lags the last packet by
                        // less than that, so a client still gets more than its keep-alive,
                        // and a stream of messages does not re-arm a timer per read.
                        let now = Instant::now();
                        let step = (keep_alive / 6).min(Duration::from_secs(1));
                        if now.duration_since(idle_reset_at) >= step {
                            idle_timer.as_mut().reset(now + keep_alive);
                            idle_reset_at = now;
                            self.live.touch();
                        }
                        if let Err(reason) = self.handle_read(stream, inbuf) {
                            // Flush what was answered before the violation, then close.
                            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&self.out)).await;
                            return reason;
                        }
                    }
                },
            }
        }
    }

    /// Handles what a read brought, and what the stream can give at once after it, then
    /// stores the telemetry among it. One socket read brings several TLS records, which the
    /// TLS layer hands out as far as the buffer has room: reading on while that needs no wait
    /// stores the messages of one socket read in one append and answers them in one write.
    /// Reading on stops at [`READ_AHEAD_ROUNDS`], once [`READ_AHEAD_OUT`] bytes of answers
    /// wait, and when capture has no room for more. On a violation, what came before it is
    /// still stored and acknowledged.
    fn handle_read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        inbuf: &mut BytesMut,
    ) -> Result<(), CloseReason> {
        let handled = self.read_ahead(stream, inbuf);
        let stored = self.store_telemetry();
        handled.and(stored)
    }

    fn read_ahead<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        inbuf: &mut BytesMut,
    ) -> Result<(), CloseReason> {
        for _ in 0..READ_AHEAD_ROUNDS {
            self.handle_buffered(inbuf)?;
            let capture_full = self
                .state
                .capture
                .as_ref()
                .is_some_and(|capture| !capture.has_room(self.partition));
            if self.out.len() >= READ_AHEAD_OUT || capture_full {
                return Ok(());
            }
            match stream.read_buf(inbuf).now_or_never() {
                Some(Ok(n)) if n > 0 => {}
                // The end of the stream (read again by the caller's loop, which then closes)
                // or nothing ready yet.
                Some(Ok(_)) | None => return Ok(()),
                Some(Err(e)) => return Err(format!("read failed: {e}")),
            }
        }
        self.handle_buffered(inbuf)
    }

    /// Handles every complete packet in the buffer. Telemetry is kept to be stored by the
    /// caller ([`Connection::store_telemetry`]), or before any other packet, so that events
    /// and answers keep the device's order.
    fn handle_buffered(&mut self, inbuf: &mut BytesMut) -> Result<(), CloseReason> {
        loop {
            match Packet::read(inbuf, MAX_PACKET_SIZE) {
                Ok(packet) => self.handle(packet)?,
                Err(rumqttc::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(format!("malformed packet: {e}")),
            }
        }
    }

    fn handle(&mut self, packet: Packet) -> Result<(), CloseReason> {
        // Telemetry waiting to be stored goes first (on_publish does the same for a publish
        // that is not telemetry).
        if !matches!(packet, Packet::Publish(_)) {
            self.store_telemetry()?;
        }
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubAck(ack) => {
                self.state.sessions.acknowledge(&self.device_id, ack.pkid);
                crate::hub::c2d::on_puback(self.state, &self.device_id, ack.pkid);
                Ok(())
            }
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    let kind = parse_subscription(&filter.path, &self.device_id)
                        .map_err(|e| format!("subscription refused: {e}"))?;
                    let granted = self
                        .state
                        .sessions
                        .subscribe(&self.device_id, kind, filter.qos);
                    codes.push(SubscribeReasonCode::Success(granted));
                }
                let _ = SubAck::new(subscribe.pkid, codes).write(&mut self.out);
                // What waits in the cloud-to-device queue follows the SUBACK.
                crate::hub::c2d::pump(self.state, &self.device_id);
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                for topic in &unsubscribe.topics {
                    let kind = parse_subscription(topic, &self.device_id)
                        .map_err(|e| format!("unsubscribe refused: {e}"))?;
                    self.state.sessions.unsubscribe(&self.device_id, kind);
                }
                let _ = UnsubAck::new(unsubscribe.pkid).write(&mut self.out);
                Ok(())
            }
            Packet::PingReq => {
                let _ = PingResp.write(&mut self.out);
                Ok(())
            }
            Packet::Disconnect => Err("the device disconnected".into()),
            Packet::Connect(_) => Err("a second CONNECT on one connection".into()),
            other => Err(format!("unexpected packet {:?}", packet_name(&other))),
        }
    }

    fn on_publish(&mut self, publish: Publish) -> Result<(), CloseReason> {
        if publish.qos == QoS::ExactlyOnce {
            return Err("QoS 2 is not supported".into());
        }
        let message = parse_device_publish(&publish.topic, &self.device_id)
            .map_err(|e| format!("publish refused: {e}"))?;
        // Telemetry waiting to be stored goes before anything else the device sends.
        if !matches!(message, DevicePublish::Telemetry { .. }) {
            self.store_telemetry()?;
        }
        match message {
            DevicePublish::Telemetry { properties } => {
                let size = publish.payload.len() + properties.size_for_limit();
                if size > MAX_MESSAGE_SIZE {
                    return Err(format!(
                        "message of {size} bytes is over the {MAX_MESSAGE_SIZE}-byte limit"
                    ));
                }
                // A message refused here (capture's buffer full, or the durable store's disk
                // failing in store_telemetry) is not acknowledged, and the connection closes so
                // that the device sends it again.
                if let Some(capture) = &self.state.capture {
                    capture
                        .check(self.partition, self.telemetry.len())
                        .map_err(|e| format!("telemetry not accepted: {e}"))?;
                }
                self.telemetry.push(PendingTelemetry {
                    pkid: (publish.qos == QoS::AtLeastOnce).then_some(publish.pkid),
                    properties,
                    body: publish.payload,
                    enqueued_time: chrono::Utc::now(),
                });
            }
            DevicePublish::TwinGet { rid } => {
                self.puback(&publish);
                let (status, body) = match twins::device_view(self.state, &self.device_id) {
                    Ok(view) => (200, serde_json::to_vec(&view).unwrap_or_default()),
                    Err(e) => (500, error_body(500, &e.message)),
                };
                self.twin_response(status, &rid, None, body);
            }
            DevicePublish::TwinReportedPatch { rid } => {
                self.puback(&publish);
                if self.state.faults.throttle_reported() {
                    tracing::info!(device = %self.device_id, rid, "reported patch throttled (429): the hub is told to");
                    let body = crate::hub::faults::Faults::throttled_body();
                    self.twin_response(429, &rid, None, body);
                    return Ok(());
                }
                match twins::patch_reported(self.state, &self.device_id, &publish.payload) {
                    Ok(version) => self.twin_response(204, &rid, Some(version), Vec::new()),
                    Err(e) => {
                        tracing::info!(device = %self.device_id, rid, error = %e.message, "reported patch refused");
                        self.twin_response(400, &rid, None, error_body(400, &e.message));
                    }
                }
            }
            DevicePublish::MethodResponse { status, rid } => {
                self.puback(&publish);
                if !self
                    .state
                    .methods
                    .complete(&self.device_id, &rid, status, &publish.payload)
                {
                    tracing::debug!(device = %self.device_id, rid, "method answer for no waiting call");
                }
            }
        }
        Ok(())
    }

    /// Stores the telemetry read so far in one append to the event store (read by the Event
    /// Hubs-compatible endpoint and by capture), then acknowledges each message stored. What
    /// the store refused (a durable store's disk failing) is not acknowledged: the connection
    /// closes, and the device sends it again.
    fn store_telemetry(&mut self) -> Result<(), CloseReason> {
        if self.telemetry.is_empty() {
            return Ok(());
        }
        let (registry, id) = (&self.state.registry, &self.device_id);
        let generation = self.generation_id.get_or_insert_with(|| {
            let generation = registry
                .get(id, |d| d.generation_id.clone())
                .unwrap_or_default();
            Arc::from(generation.as_str())
        });
        let pending = std::mem::take(&mut self.telemetry);
        let pkids: Vec<Option<u16>> = pending.iter().map(|m| m.pkid).collect();
        let appended = self.state.events.append_telemetry(
            &self.device_id,
            generation,
            self.auth,
            pending
                .into_iter()
                .map(|m| (m.properties, m.body, m.enqueued_time)),
        );
        // The stored ones are the first, in order: a PUBACK for each of those.
        for pkid in pkids.into_iter().take(appended.events.len()).flatten() {
            let _ = PubAck::new(pkid).write(&mut self.out);
        }
        self.live
            .telemetry_received
            .fetch_add(appended.events.len() as u64, Ordering::Relaxed);
        self.state
            .telemetry
            .keep(appended.partition, appended.events);
        match appended.refused {
            Some(error) => Err(format!(
                "telemetry not accepted: {}",
                crate::common::logging::error_chain(&error)
            )),
            None => Ok(()),
        }
    }

    fn puback(&mut self, publish: &Publish) {
        if publish.qos == QoS::AtLeastOnce {
            let _ = PubAck::new(publish.pkid).write(&mut self.out);
        }
    }

    /// Sends a twin response if the device subscribed to them (as MQTT requires).
    fn twin_response(&mut self, status: u16, rid: &str, version: Option<u64>, body: Vec<u8>) {
        let topic = twin_response_topic(status, rid, version);
        if let Err(reason) = self.state.sessions.deliver(
            &self.device_id,
            SubscriptionKind::TwinResponses,
            QoS::AtLeastOnce,
            topic,
            Bytes::from(body),
        ) {
            tracing::warn!(device = %self.device_id, rid, %reason, "twin response not delivered");
        }
    }
}

/// The error body of a twin response: some SDKs look only for `errorCode`.
fn error_body(status: u16, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "errorCode": status, "message": message }))
        .unwrap_or_default()
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::ConnAck(_) => "CONNACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "packet",
    }
}
