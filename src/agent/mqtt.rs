//! The agent's MQTT 3.1.1 wire: one TLS connection to the hub and the packets on it, encoded
//! and decoded with rumqttc's codec (`rumqttc::mqttbytes::v4`), as the hub's side does.
//!
//! [`Wire::open`] dials (TCP_NODELAY), shakes hands (TLS, with the host as SNI), sends CONNECT
//! and reads the CONNACK; [`Wire::next_packet`] reads one packet; [`Wire::send`] encodes one
//! into the outgoing buffer and [`Wire::flush`] writes it. It keeps no MQTT state (packet ids,
//! subscriptions, keep-alive): `connection` does. It touches nothing but its socket.
//!
//! Memory, since a fleet holds thousands of these: nothing is sized in advance beyond two small
//! buffers. The read buffer grows to the packet being read (its size is known from the fixed
//! header, and checked against [`MAX_PACKET`] before anything is reserved), and after a large
//! packet it is replaced by a small one, so the large allocation lives only as long as the
//! packet's payload. The write buffer is shrunk back the same way after a large packet.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::Error as CodecError;
use rustls::pki_types::{InvalidDnsNameError, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Largest packet either way: a 256 KB message plus room for topic and headers.
pub const MAX_PACKET: usize = 256 * 1024 + 8 * 1024;
/// Capacity each buffer starts with and returns to: a PUBACK, a reading, a method call.
const BUFFER_START: usize = 512;
/// A buffer grown past this is replaced by a fresh small one once its packet is done.
const BUFFER_KEEP: usize = 4 * 1024;

/// Why the wire failed. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName {
        host: String,
        #[source]
        source: InvalidDnsNameError,
    },
    #[error("TLS handshake with {host} failed")]
    Handshake {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("CONNACK refused the connection ({0:?})")]
    Refused(ConnectReturnCode),
    #[error("the hub answered CONNECT with {0} instead of CONNACK")]
    NotConnAck(&'static str),
    #[error("closed by the hub")]
    Closed,
    #[error("read failed")]
    Read(#[source] io::Error),
    #[error("write failed")]
    Write(#[source] io::Error),
    #[error("the hub sent a packet of {size} bytes, over the {MAX_PACKET}-byte limit")]
    TooLarge { size: usize },
    #[error("the hub sent a malformed packet")]
    Malformed(#[source] CodecError),
    #[error("cannot send a packet")]
    Encode(#[source] CodecError),
}

/// One open MQTT connection over TLS.
pub struct Wire {
    stream: TlsStream<TcpStream>,
    inbuf: BytesMut,
    out: BytesMut,
}

impl Wire {
    /// Dials `host:port`, shakes hands with `host` as the server name, sends `connect` and
    /// waits for the CONNACK: the connection, and whether the hub kept a session. A CONNACK
    /// that refuses is [`WireError::Refused`]. No deadline of its own: the caller bounds it.
    pub async fn open(
        host: &str,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        connect: &Connect,
    ) -> Result<(Wire, bool), WireError> {
        let server_name =
            ServerName::try_from(host.to_string()).map_err(|source| WireError::ServerName {
                host: host.to_string(),
                source,
            })?;
        let tcp = TcpStream::connect((host, port))
            .await
            .and_then(|tcp| tcp.set_nodelay(true).map(|()| tcp))
            .map_err(|source| WireError::Connect {
                host: host.to_string(),
                port,
                source,
            })?;
        let stream = TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|source| WireError::Handshake {
                host: host.to_string(),
                source,
            })?;
        let mut wire = Wire {
            stream,
            inbuf: BytesMut::with_capacity(BUFFER_START),
            out: BytesMut::with_capacity(BUFFER_START),
        };
        connect.write(&mut wire.out).map_err(WireError::Encode)?;
        wire.flush().await?;
        match wire.next_packet().await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                session_present,
            }) => Ok((wire, session_present)),
            Packet::ConnAck(ack) => Err(WireError::Refused(ack.code)),
            other => Err(WireError::NotConnAck(packet_name(&other))),
        }
    }

    /// Reads until one whole packet is buffered, and returns it. Cancel-safe: bytes read
    /// before a cancellation stay buffered for the next call.
    pub async fn next_packet(&mut self) -> Result<Packet, WireError> {
        loop {
            let frame = match rumqttc::mqttbytes::check(self.inbuf.iter(), MAX_PACKET) {
                Ok(header) => header.frame_length(),
                Err(CodecError::InsufficientBytes(more)) => {
                    // Once the fixed header is in, `more` is exactly what the packet still
                    // needs (within MAX_PACKET, checked above): reserve it in one step.
                    self.inbuf.reserve(more);
                    match self.stream.read_buf(&mut self.inbuf).await {
                        Ok(0) => return Err(WireError::Closed),
                        Ok(_) => continue,
                        Err(error) => return Err(WireError::Read(error)),
                    }
                }
                Err(CodecError::PayloadSizeLimitExceeded(size)) => {
                    return Err(WireError::TooLarge { size })
                }
                Err(error) => return Err(WireError::Malformed(error)),
            };
            let packet = Packet::read(&mut self.inbuf, MAX_PACKET).map_err(WireError::Malformed);
            if frame > BUFFER_KEEP {
                // The packet's payload shares the large allocation; let it go with the payload.
                let rest = std::mem::take(&mut self.inbuf);
                self.inbuf = BytesMut::with_capacity(BUFFER_START.max(rest.len()));
                self.inbuf.extend_from_slice(&rest);
            }
            return packet;
        }
    }

    /// Encodes `packet` into the outgoing buffer; [`Wire::flush`] writes it.
    pub fn send(&mut self, packet: &Packet) -> Result<(), WireError> {
        packet
            .write(&mut self.out, MAX_PACKET)
            .map(|_| ())
            .map_err(WireError::Encode)
    }

    /// Whether packets wait to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes what [`Wire::send`] buffered. Not cancel-safe (part of a packet may be written):
    /// the caller bounds it with a deadline and drops the connection when it passes.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        self.stream
            .write_all(&self.out)
            .await
            .map_err(WireError::Write)?;
        self.stream.flush().await.map_err(WireError::Write)?;
        if self.out.capacity() > BUFFER_KEEP {
            self.out = BytesMut::with_capacity(BUFFER_START);
        } else {
            self.out.clear();
        }
        Ok(())
    }

    /// Sends DISCONNECT and closes the TLS session (close_notify, then FIN).
    pub async fn disconnect(mut self) -> Result<(), WireError> {
        self.send(&Packet::Disconnect)?;
        self.flush().await?;
        self.stream.shutdown().await.map_err(WireError::Write)
    }
}

/// The packet's name, for a reason or a log line.
pub fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}
