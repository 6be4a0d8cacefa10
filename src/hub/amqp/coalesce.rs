//! Write coalescing for an AMQP connection's socket.
//!
//! fe2o3-amqp's connection engine sends each frame with `SinkExt::send`, which flushes: one
//! `write(2)` (and one TLS record) per transfer, so a receiver reading a busy partition cost the
//! hub a system call per event, and the client a read and a wake-up per event. Here the engine
//! writes into an in-memory pipe instead, and one task per connection moves whatever has
//! gathered in the pipe to the socket in one write and one flush. Under load the writes carry
//! many frames each; when idle a frame goes out at once, as before: nothing waits on a timer.
//!
//! Reads go straight to the socket. When the socket fails, the pump stops and the engine's
//! next write fails with it; when the engine drops its end, the pump writes what is left and
//! shuts the socket's write side down.

use tokio::io::{duplex, ReadHalf};
use tokio::io::{split, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, Join};

/// What the engine may have written and the pump not yet taken: past this, the engine's
/// writes wait (the socket's back-pressure reaches the engine, and through it the links).
const PIPE_BYTES: usize = 256 * 1024;
/// The most one socket write carries.
const WRITE_BYTES: usize = 64 * 1024;

/// The stream handed to fe2o3-amqp: the socket's read half joined to the pipe's engine end
/// (only written: a duplex pipe, because dropping either end of one fails the other's writes
/// and ends its reads, which a split simplex pipe does not).
pub type Coalesced<Io> = Join<ReadHalf<Io>, DuplexStream>;

/// Wraps `io` so that its writes are coalesced by a task of its own (spawned here, ending
/// with the connection).
pub fn writes<Io>(io: Io) -> Coalesced<Io>
where
    Io: AsyncRead + AsyncWrite + Send + 'static,
{
    let (socket_read, socket_write) = split(io);
    let (engine_end, pump_end) = duplex(PIPE_BYTES);
    tokio::spawn(pump(pump_end, socket_write));
    tokio::io::join(socket_read, engine_end)
}

/// Moves the pipe's bytes to the socket, as many as have gathered per write.
async fn pump<W>(mut pipe: DuplexStream, mut socket: W)
where
    W: AsyncWrite + Unpin,
{
    let mut buffer = Vec::with_capacity(WRITE_BYTES);
    loop {
        buffer.clear();
        match pipe.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if socket.write_all(&buffer).await.is_err() || socket.flush().await.is_err() {
            // Dropping the pipe's read end fails the engine's next write: the connection ends.
            return;
        }
    }
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_written_separately_arrive_whole_and_in_order_and_reads_pass_through() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let mut stream = writes(ours);
        let mut sent = Vec::new();
        for i in 0..10_000u32 {
            let frame = format!("frame {i};");
            stream.write_all(frame.as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
            sent.extend_from_slice(frame.as_bytes());
        }
        theirs.write_all(b"from the peer").await.unwrap();
        let mut read = [0u8; 13];
        stream.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"from the peer");
        drop(stream);
        let mut received = Vec::new();
        theirs.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, sent);
    }

    #[tokio::test]
    async fn a_failed_socket_fails_the_engines_writes() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut stream = writes(ours);
        drop(theirs);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if stream.write_all(&[0u8; 1024]).await.is_err() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "writes kept succeeding"
            );
        }
    }
}
