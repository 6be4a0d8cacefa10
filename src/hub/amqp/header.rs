//! The protocol header a client opens with, read before the connection is handed to
//! fe2o3-amqp: the SASL header (`AMQP 3 1 0 0`) goes through the SASL exchange (`sasl`); the
//! plain AMQP header (`AMQP 0 1 0 0`) opens without SASL, what Node's azure-iothub (rhea)
//! sends over TLS: as on IoT Hub, such a connection has no grant until it puts a token on
//! `$cbs`. fe2o3-amqp's acceptor serves one or the other, so the header read here is put
//! back in front of the stream ([`Prefixed`]). Pure plumbing: may not look past the header.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use fe2o3_amqp::acceptor::{ConnectionAcceptor, ListenerConnectionHandle};
use fe2o3_amqp::connection::OpenError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::sasl::Sasl;

/// `AMQP 0 1 0 0`: AMQP without a security layer.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: [u8; 8],
    taken: usize,
    inner: S,
}

impl<S> std::fmt::Debug for Prefixed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prefixed")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.taken < self.prefix.len() {
            let rest = &self.prefix[self.taken..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.taken += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens the connection with SASL or without, as the client's header asks.
pub async fn open<Io>(
    mut stream: Io,
    acceptor: &ConnectionAcceptor<(), Sasl>,
) -> Result<ListenerConnectionHandle, OpenError>
where
    Io: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut prefix = [0u8; 8];
    stream.read_exact(&mut prefix).await?;
    let stream = Prefixed {
        prefix,
        taken: 0,
        inner: stream,
    };
    if prefix == AMQP_HEADER {
        let plain = ConnectionAcceptor {
            local_open: acceptor.local_open.clone(),
            tls_acceptor: (),
            sasl_acceptor: (),
            buffer_size: acceptor.buffer_size,
        };
        plain.accept(stream).await
    } else {
        acceptor.accept(stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_header_read_comes_back_first() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"tail")
            .await
            .unwrap();
        drop(client);
        let mut stream = Prefixed {
            prefix: AMQP_HEADER,
            taken: 0,
            inner: server,
        };
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"AMQP\x00\x01\x00\x00tail");
    }
}
