//! The endpoint's own thread: a single-threaded tokio runtime beside the hub's worker pool, on
//! which the AMQP listeners, their connections and fe2o3-amqp's engine tasks run.
//!
//! Why a thread of its own: on a busy hub the pool's run queue holds a task per device
//! connection. An event on its way to a back end crosses several tasks (the receiver,
//! fe2o3-amqp's link, session and connection engines, the write pump), and the credit coming
//! back crosses them again; in the pool each hop waits its turn behind every device, so with
//! 1,000 devices a credit round trip took tens of milliseconds and a reader at 300 credits fell
//! behind with CPU to spare. Here the AMQP tasks queue only behind each other, and the kernel
//! shares the cores between this thread and the pool's.
//!
//! The thread ends when the value is dropped: `Hub::shutdown` drops it after every task of the
//! hub, these included, has ended.

use std::io;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// The running thread and a handle to spawn on it.
pub struct EndpointThread {
    handle: Handle,
    /// Cancelled on drop: the thread's runtime then stops (and drops whatever still runs).
    release: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl EndpointThread {
    pub fn start() -> io::Result<EndpointThread> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let release = CancellationToken::new();
        let until = release.clone();
        let thread = std::thread::Builder::new()
            .name("hub-amqp".into())
            .spawn(move || runtime.block_on(until.cancelled_owned()))?;
        Ok(EndpointThread {
            handle,
            release,
            thread: Some(thread),
        })
    }

    /// Where the endpoint's tasks are spawned.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// A listener bound elsewhere, registered with this thread's reactor instead, so that its
    /// connections are driven here and not by the pool.
    pub fn adopt(&self, listener: TcpListener) -> io::Result<TcpListener> {
        let listener = listener.into_std()?;
        let _inside = self.handle.enter();
        TcpListener::from_std(listener)
    }
}

impl Drop for EndpointThread {
    fn drop(&mut self) {
        self.release.cancel();
        // Not joined: a drop may run on one of the pool's threads, which must not block. The
        // thread ends by itself once its runtime has dropped what is left.
        drop(self.thread.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_adopted_listener_accepts_on_the_endpoint_thread() {
        let thread = EndpointThread::start().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = thread.adopt(listener).unwrap();
        let accepted = thread.handle().spawn(async move {
            let (_socket, _) = listener.accept().await.unwrap();
            std::thread::current().name().map(str::to_string)
        });
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = tokio::time::timeout(std::time::Duration::from_secs(10), accepted)
            .await
            .expect("accepted within 10 s")
            .unwrap();
        assert_eq!(name.as_deref(), Some("hub-amqp"));
    }

    #[tokio::test]
    async fn dropping_it_ends_the_thread() {
        let mut thread = EndpointThread::start().unwrap();
        let joined = thread.thread.take().unwrap();
        drop(thread);
        let ended = tokio::task::spawn_blocking(move || joined.join());
        tokio::time::timeout(std::time::Duration::from_secs(10), ended)
            .await
            .expect("the thread ended within 10 s")
            .unwrap()
            .unwrap();
    }
}
