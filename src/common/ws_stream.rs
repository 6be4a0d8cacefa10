//! MQTT over WebSocket as a byte stream: [`WsStream`] wraps an open WebSocket (after its
//! handshake) in `AsyncRead + AsyncWrite`, so that the MQTT code above it (the hub's
//! connection, the agent's wire) reads and writes bytes as it does over TLS alone.
//!
//! MQTT goes in binary frames (MQTT 3.1.1, section 6): a frame may hold part of a packet or
//! several packets, so reads hand out the bytes of the frames in order and know nothing of
//! packets. Each write is one binary frame of at most [`WRITE_FRAME_MAX`] bytes. Pings are answered by tungstenite; a close frame
//! reads as the end of the stream; a text frame is a protocol violation (an error). Both sides
//! configure the socket with [`config`]: frames and messages larger than the largest MQTT
//! packet are refused, and the buffers start small (a fleet holds thousands of these).
//!
//! Used by the hub (`hub::mqtt::websocket`) and the agent (`agent::transport`); it does no
//! handshake and knows no MQTT.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The URL path of IoT Hub's MQTT over WebSocket endpoint.
pub const PATH: &str = "/$iothub/websocket";
/// The WebSocket subprotocol of MQTT 3.1.1 (the `Sec-WebSocket-Protocol` both sides name).
pub const SUBPROTOCOL: &str = "mqtt";
/// The largest frame a write makes: a turn's packets written at once (many readings, or a
/// large one with others) go in frames of at most this, so that none is over what the other
/// side accepts (the largest packet).
pub const WRITE_FRAME_MAX: usize = 64 * 1024;

/// The socket settings both sides use: frames and messages up to `max_frame` bytes (the
/// largest MQTT packet the side accepts), a read buffer that starts at a frame header's size
/// and grows to the frame being read, and writes that go out at once (the MQTT code above
/// buffers and flushes a turn's packets itself).
pub fn config(max_frame: usize) -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 64;
    config.write_buffer_size = 0;
    // A frame written waits here while the socket is blocked: room for two of ours.
    config.max_write_buffer_size = 2 * (WRITE_FRAME_MAX + 16);
    config.max_frame_size = Some(max_frame);
    config.max_message_size = Some(max_frame);
    config
}

/// An open WebSocket as a byte stream (see the module notes).
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary frame read.
    pending: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    pub fn new(ws: WebSocketStream<S>) -> WsStream<S> {
        WsStream {
            ws,
            pending: Bytes::new(),
        }
    }

    /// The stream under the WebSocket (for a TLS stream: its peer's certificates).
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }
}

fn to_io(error: WsError) -> io::Error {
    match error {
        WsError::Io(error) => error,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            // An empty frame, a ping or a pong: read on. The end of the stream (a close
            // frame, or the connection closed) reads as zero bytes.
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text frame: MQTT goes in binary frames",
                    )))
                }
                Some(Err(error)) => return Poll::Ready(Err(to_io(error))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.get_mut().ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(to_io)?;
        let frame = &buf[..buf.len().min(WRITE_FRAME_MAX)];
        Pin::new(&mut *ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(frame)))
            .map_err(to_io)?;
        Poll::Ready(Ok(frame.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(to_io)
    }

    /// Sends the close frame, then shuts the stream under it down (for TLS: close_notify and
    /// FIN), which the WebSocket close alone does not do.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let ws = &mut self.get_mut().ws;
        // A close that fails (the peer is gone) still lets the stream under it be shut.
        let _ = ready!(Pin::new(&mut *ws).poll_close(cx));
        Pin::new(ws.get_mut()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// Our stream (frames up to `max_frame`) and a peer with tungstenite's defaults.
    async fn pair(
        max_frame: usize,
    ) -> (
        WsStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let client =
            WebSocketStream::from_raw_socket(a, Role::Client, Some(config(max_frame))).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (WsStream::new(client), server)
    }

    #[tokio::test]
    async fn packets_may_span_frames_and_frames_may_hold_several() {
        use futures_util::{SinkExt, StreamExt};
        let (mut stream, mut peer) = pair(1024).await;
        // Two 4-byte "packets" split 3 + 5 over two frames, then an empty frame and a ping.
        peer.send(Message::Binary(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        peer.send(Message::Binary(Bytes::new())).await.unwrap();
        peer.send(Message::Ping(Bytes::new())).await.unwrap();
        peer.send(Message::Binary(Bytes::from_static(b"defgh")))
            .await
            .unwrap();
        let mut got = [0u8; 8];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdefgh");
        // Each write is one binary frame.
        stream.write_all(b"xyz").await.unwrap();
        stream.flush().await.unwrap();
        let frame = loop {
            match peer.next().await.unwrap().unwrap() {
                Message::Binary(data) => break data,
                Message::Pong(_) => continue,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(&frame[..], b"xyz");
        // A long write goes in frames of at most WRITE_FRAME_MAX.
        stream
            .write_all(&vec![7u8; WRITE_FRAME_MAX + 10])
            .await
            .unwrap();
        stream.flush().await.unwrap();
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < WRITE_FRAME_MAX + 10 {
            if let Message::Binary(data) = peer.next().await.unwrap().unwrap() {
                sizes.push(data.len());
            }
        }
        assert_eq!(sizes, [WRITE_FRAME_MAX, 10]);
        // A close reads as the end of the stream.
        peer.close(None).await.unwrap();
        assert_eq!(stream.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_text_frame_and_an_oversize_frame_are_errors() {
        use futures_util::SinkExt;
        let (mut stream, mut peer) = pair(1024).await;
        peer.send(Message::text("hello")).await.unwrap();
        let mut got = [0u8; 8];
        let error = stream.read(&mut got).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");

        let (mut stream, mut peer) = pair(1024).await;
        peer.send(Message::Binary(Bytes::from(vec![0u8; 2048])))
            .await
            .unwrap();
        let error = stream.read(&mut got).await.unwrap_err();
        assert!(error.to_string().contains("too long"), "{error}");
    }
}
