//! The hub's accept loop, shared by the MQTT listener and the HTTPS API: accept a TCP
//! connection, take a permit of a fixed pool, hand the socket to its own task, until shutdown.
//! It also keeps the liveness flags ([`Liveness`]) that the hub's health is made of.
//!
//! The pool bounds the connections a listener holds that have not proven themselves: when it
//! is empty, a new socket is closed at once (a warning is logged), never queued, so a flood of
//! silent clients cannot exhaust the hub and a newcomer learns at once that it must retry.
//! When a permit goes back is the connection's decision: the MQTT side returns it at CONNACK,
//! the API at the end of the connection (see their `MAX_*` constants).
//!
//! This module knows sockets and tasks only: no TLS, no protocol, no hub state.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a failed `accept` (out of file descriptors and the like) pauses the loop, rather
/// than spinning on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// One listener's accept loop.
pub struct AcceptLoop {
    /// For the log: "MQTT", "API".
    pub name: &'static str,
    /// Permits in the pool (see the module notes).
    pub max_pending: usize,
    /// Ends the loop cleanly; connections watch it themselves.
    pub shutdown: CancellationToken,
    /// Where the connection tasks are spawned, so that shutdown waits for them.
    pub tasks: TaskTracker,
    /// Marks the loop alive while it runs; held by the loop until it ends.
    pub alive: Alive,
    /// Fault hook (`Faults::kill_accept_loop`): ends the loop as if it had died.
    pub kill: CancellationToken,
}

impl AcceptLoop {
    /// Accepts until shutdown (or the kill hook), spawning `serve(socket, peer, permit)` per
    /// connection. Dropping the listener on return closes the port.
    pub async fn run<S, F>(self, listener: TcpListener, serve: S)
    where
        S: FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let pending = Arc::new(Semaphore::new(self.max_pending));
        self.run_with_pool(listener, pending, serve).await;
    }

    /// [`AcceptLoop::run`] with a pool of permits given by the caller, for listeners that
    /// share one (MQTT over TLS and over WebSocket: one budget of unauthenticated devices).
    /// `max_pending` is then only what the log says the cap is.
    pub async fn run_with_pool<S, F>(
        self,
        listener: TcpListener,
        pending: Arc<Semaphore>,
        mut serve: S,
    ) where
        S: FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let name = self.name;
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.kill.cancelled() => {
                    tracing::error!(listener = name, "accept loop killed by the fault hook");
                    // `alive` is dropped without `stopped`: the loop counts as dead.
                    return;
                }
                accepted = listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(
                    listener = name,
                    %peer,
                    max = self.max_pending,
                    "too many pending connections; closing a new one"
                );
                continue;
            };
            let _ = socket.set_nodelay(true);
            self.tasks.spawn(serve(socket, peer, permit));
        }
        self.alive.stopped();
    }
}

const RUNNING: u8 = 0;
const STOPPED: u8 = 1;
const DIED: u8 = 2;

/// The liveness of one long-lived task of the hub, as health checks see it.
#[derive(Debug)]
struct Flag {
    name: &'static str,
    state: AtomicU8,
}

/// Held by a long-lived task for its whole life: dropping it without [`Alive::stopped`] (a
/// panic unwinding, an early return, the task dropped unpolled) marks the task dead.
#[derive(Debug)]
pub struct Alive(Arc<Flag>);

impl Alive {
    /// The task ended as it should, on shutdown.
    pub fn stopped(self) {
        self.0.state.store(STOPPED, Ordering::Relaxed);
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        let _ = self
            .0
            .state
            .compare_exchange(RUNNING, DIED, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The hub's long-lived tasks (the accept loops, the job scheduler) and whether each still runs.
#[derive(Debug, Default)]
pub struct Liveness {
    flags: Vec<Arc<Flag>>,
}

impl Liveness {
    /// Registers a task, alive from now on; the task holds the returned guard.
    pub fn watch(&mut self, name: &'static str) -> Alive {
        let flag = Arc::new(Flag {
            name,
            state: AtomicU8::new(RUNNING),
        });
        self.flags.push(flag.clone());
        Alive(flag)
    }

    /// `Ok` while every task runs; else which ones do not.
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for flag in &self.flags {
            match flag.state.load(Ordering::Relaxed) {
                RUNNING => {}
                STOPPED => problems.push(format!("the {} has stopped", flag.name)),
                _ => problems.push(format!("the {} has died", flag.name)),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_dropped_without_stopping_marks_its_task_dead() {
        let mut liveness = Liveness::default();
        let a = liveness.watch("MQTT accept loop");
        let b = liveness.watch("job scheduler");
        assert_eq!(liveness.check(), Ok(()));
        b.stopped();
        assert_eq!(
            liveness.check(),
            Err("the job scheduler has stopped".to_string())
        );
        drop(a);
        assert_eq!(
            liveness.check(),
            Err("the MQTT accept loop has died; the job scheduler has stopped".to_string())
        );
    }

    #[test]
    fn a_panicking_task_is_dead() {
        let mut liveness = Liveness::default();
        let alive = liveness.watch("API accept loop");
        let result = std::thread::spawn(move || {
            let _alive = alive;
            panic!("the loop panics");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(
            liveness.check(),
            Err("the API accept loop has died".to_string())
        );
    }
}
