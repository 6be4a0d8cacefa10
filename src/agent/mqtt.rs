//! The agent's MQTT 3.1.1 wire: one connection to the hub and the packets on it, encoded
//! and decoded with rumqttc's codec (`rumqttc::mqttbytes::v4`), as the hub's side does.
//!
//! [`Wire::open`] has `transport` dial (TCP or a proxy's tunnel, TLS with the host as SNI, and
//! for WebSocket the upgrade), sends CONNECT and reads the CONNACK; [`Wire::next_packet`]
//! reads one packet; [`Wire::send`] encodes one into the outgoing buffer and [`Wire::flush`]
//! writes it. The bytes are the same over TLS and over WebSocket: it does not know which. It
//! keeps no MQTT state (packet ids, subscriptions, keep-alive): `connection` does. It touches
//! nothing but its stream.
//!
//! Memory, since a fleet holds thousands of these: nothing is sized in advance, and an idle
//! connection holds only the [`READ_CHUNK`] bytes its pending read waits with. The read buffer
//! grows to the packet being read (its size is known from the fixed header, and checked against
//! [`MAX_PACKET`] before anything is reserved); a packet's payload keeps that allocation (no
//! copy), and the buffer lets it go once nothing more is buffered, or after a large packet. The
//! write buffer is reserved to the packets sent in one turn and released once they are written.
//!
//! rustls keeps its own per connection (0.23): the deframer's buffer, which stays at 4 KiB
//! after the first read whatever the reads ask for (it grows for a large record and shrinks back
//! to 4 KiB once empty), the handshake deframer, the peer's certificates, the record keys; its
//! send buffer holds a record only until it is written. Nothing here keeps those larger.

use std::io;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::mqttbytes::Error as CodecError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::transport::{Dial, DialError, Stream};

/// Largest packet either way: a 256 KB message plus room for topic and headers.
pub const MAX_PACKET: usize = 256 * 1024 + 8 * 1024;
/// Room a read asks for when the next packet's size is not known yet: a fixed header and
/// any small packet (PUBACK, PINGRESP, SUBACK) in one go.
const READ_CHUNK: usize = 64;
/// A read buffer that held a packet larger than this is replaced once the packet is taken.
const BUFFER_KEEP: usize = 4 * 1024;

/// Why the wire failed. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A step before MQTT: TCP, the proxy, TLS, the WebSocket upgrade.
    #[error(transparent)]
    Dial(#[from] DialError),
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

/// One open MQTT connection (over TLS, or WebSocket over TLS).
pub struct Wire {
    stream: Stream,
    inbuf: BytesMut,
    out: BytesMut,
}

impl Wire {
    /// Dials as `dial` says, sends `connect` and waits for the CONNACK: the connection, and
    /// whether the hub kept a session. A CONNACK that refuses is [`WireError::Refused`]. No
    /// deadline of its own: the caller bounds it.
    pub async fn open(dial: &Dial<'_>, connect: &Connect) -> Result<(Wire, bool), WireError> {
        let stream = dial.open().await?;
        let mut wire = Wire {
            stream,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
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
            if let Some(packet) = take_packet(&mut self.inbuf)? {
                return Ok(packet);
            }
            match self.stream.read_buf(&mut self.inbuf).await {
                Ok(0) => return Err(WireError::Closed),
                Ok(_) => {}
                Err(error) => return Err(WireError::Read(error)),
            }
        }
    }

    /// Encodes `packet` into the outgoing buffer; [`Wire::flush`] writes it.
    pub fn send(&mut self, packet: &Packet) -> Result<(), WireError> {
        if packet.size() <= MAX_PACKET {
            self.out.reserve(packet.size());
        }
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
        self.out = BytesMut::new();
        Ok(())
    }

    /// Sends DISCONNECT and closes the stream (a WebSocket close frame; TLS close_notify, then
    /// FIN).
    pub async fn disconnect(&mut self) -> Result<(), WireError> {
        self.send(&Packet::Disconnect)?;
        self.flush().await?;
        self.stream.shutdown().await.map_err(WireError::Write)
    }
}

/// Takes the next whole packet out of `inbuf`; `None` when more bytes must be read first, for
/// which it has reserved room: exactly what the packet still needs once its fixed header is in
/// (after checking it against [`MAX_PACKET`]), else [`READ_CHUNK`].
fn take_packet(inbuf: &mut BytesMut) -> Result<Option<Packet>, WireError> {
    let frame = match rumqttc::mqttbytes::check(inbuf.iter(), MAX_PACKET) {
        Ok(header) => header.frame_length(),
        Err(CodecError::InsufficientBytes(more)) => {
            inbuf.reserve(more.max(READ_CHUNK));
            return Ok(None);
        }
        Err(CodecError::PayloadSizeLimitExceeded(size)) => {
            return Err(WireError::TooLarge { size })
        }
        Err(error) => return Err(WireError::Malformed(error)),
    };
    let packet = Packet::read(inbuf, MAX_PACKET).map_err(WireError::Malformed)?;
    if inbuf.is_empty() {
        // Nothing more buffered: the allocation stays with the packet's payload alone.
        *inbuf = BytesMut::new();
    } else if frame > BUFFER_KEEP {
        // The rest of a large allocation would otherwise be kept for small packets.
        let rest = std::mem::take(inbuf);
        *inbuf = BytesMut::from(&rest[..]);
    }
    Ok(Some(packet))
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

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{PubAck, Publish};
    use rumqttc::mqttbytes::QoS;

    fn encode(packet: &Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        out.to_vec()
    }

    #[test]
    fn an_oversize_packet_is_refused_from_its_fixed_header_before_any_room_is_made() {
        // PUBLISH with a remaining length of 300 KiB, and not one byte of it.
        let mut inbuf = BytesMut::from(&[0x30, 0x80, 0xe0, 0x12][..]);
        match take_packet(&mut inbuf) {
            Err(WireError::TooLarge { size }) => assert_eq!(size, 300 * 1024),
            other => panic!("{other:?}"),
        }
        assert!(inbuf.capacity() < 1024, "{}", inbuf.capacity());
    }

    #[test]
    fn a_large_packet_gets_room_for_itself_only_and_takes_it_along() {
        let publish = Packet::Publish(Publish::new("t", QoS::AtMostOnce, vec![7; 200 * 1024]));
        let bytes = encode(&publish);
        let mut inbuf = BytesMut::new();
        assert!(take_packet(&mut inbuf).unwrap().is_none());
        assert_eq!(
            inbuf.capacity(),
            READ_CHUNK,
            "nothing known yet: a small read"
        );
        inbuf.extend_from_slice(&bytes[..READ_CHUNK]);
        assert!(take_packet(&mut inbuf).unwrap().is_none());
        assert!(inbuf.capacity() >= bytes.len() && inbuf.capacity() < bytes.len() * 2);
        inbuf.extend_from_slice(&bytes[READ_CHUNK..]);
        inbuf.extend_from_slice(&encode(&Packet::PubAck(PubAck::new(9)))[..2]);
        assert_eq!(take_packet(&mut inbuf).unwrap(), Some(publish));
        // The start of the next packet moved to a buffer of its own size.
        assert_eq!(inbuf.len(), 2);
        assert!(inbuf.capacity() < 1024, "{}", inbuf.capacity());
    }

    #[test]
    fn small_packets_leave_no_buffer_behind() {
        let mut inbuf = BytesMut::new();
        inbuf.extend_from_slice(&encode(&Packet::PubAck(PubAck::new(1))));
        inbuf.extend_from_slice(&encode(&Packet::PingResp));
        assert_eq!(
            take_packet(&mut inbuf).unwrap(),
            Some(Packet::PubAck(PubAck::new(1)))
        );
        assert_eq!(take_packet(&mut inbuf).unwrap(), Some(Packet::PingResp));
        assert_eq!(inbuf.capacity(), 0);
    }

    #[test]
    fn garbage_is_malformed() {
        let mut inbuf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            take_packet(&mut inbuf),
            Err(WireError::Malformed(_))
        ));
    }
}
