//! A fault-injecting TCP proxy on 127.0.0.1 between a device and the hub's MQTT port.
//!
//! Every accepted connection is relayed to the target by two pumps (one per direction). The
//! proxy can, on demand or driven by a seeded RNG at random moments:
//! - **cut** every open connection (both sides closed: FIN);
//! - **reset** every open connection (`SO_LINGER` 0, then closed: RST);
//! - **stall** for a while: nothing is forwarded either way (bytes wait in the proxy and in
//!   the kernel buffers), new connections included;
//! - **slow down** for a while: bytes are forwarded in small chunks with a delay after each.
//!
//! It counts what it injected and how many connections each cut or reset ended. Dropping the
//! proxy stops its accept task and every relay (the relays live in a `JoinSet` the accept task
//! owns). Every wait in a pump ends when the mode changes or a socket closes; the random run
//! is bounded by its fault count, and each fault by its drawn duration.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How bytes flow through the proxy at the moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Normal,
    Stalled,
    Slow { chunk: usize, delay: Duration },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    Cut,
    Reset,
}

/// One fault the proxy can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Cut,
    Reset,
    Stall(Duration),
    Slow {
        duration: Duration,
        chunk: usize,
        delay: Duration,
    },
}

/// What the proxy injected and saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub cuts: u64,
    pub resets: u64,
    pub stalls: u64,
    pub slows: u64,
    /// Connections the proxy accepted.
    pub connections: u64,
    /// Connections ended by a cut or a reset.
    pub connections_killed: u64,
}

impl FaultCounts {
    pub fn injected(&self) -> u64 {
        self.cuts + self.resets + self.stalls + self.slows
    }

    /// `cut:N,reset:N,...` for the FAULTS line.
    pub fn detail(&self) -> String {
        format!(
            "cut:{},reset:{},stall:{},slow:{},connections:{},killed:{}",
            self.cuts,
            self.resets,
            self.stalls,
            self.slows,
            self.connections,
            self.connections_killed
        )
    }
}

#[derive(Default)]
struct Counters {
    cuts: AtomicU64,
    resets: AtomicU64,
    stalls: AtomicU64,
    slows: AtomicU64,
    connections: AtomicU64,
    connections_killed: AtomicU64,
    live: AtomicU64,
}

struct Shared {
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    /// A generation number and what to do: each relay ends when the generation moves on.
    kill: watch::Sender<(u64, Kill)>,
    counters: Counters,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            mode: watch::channel(Mode::Normal).0,
            kill: watch::channel((0, Kill::Cut)).0,
            counters: Counters::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultProxy {
            addr,
            shared,
            accept,
        }
    }

    pub fn counts(&self) -> FaultCounts {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            cuts: get(&c.cuts),
            resets: get(&c.resets),
            stalls: get(&c.stalls),
            slows: get(&c.slows),
            connections: get(&c.connections),
            connections_killed: get(&c.connections_killed),
        }
    }

    /// Connections being relayed now.
    pub fn live(&self) -> u64 {
        self.shared.counters.live.load(Ordering::Relaxed)
    }

    fn kill(&self, kind: Kill) {
        let c = &self.shared.counters;
        c.connections_killed
            .fetch_add(c.live.load(Ordering::Relaxed), Ordering::Relaxed);
        self.shared
            .kill
            .send_modify(|(generation, k)| (*generation, *k) = (*generation + 1, kind));
    }

    /// Closes every open connection (FIN both ways).
    pub fn cut(&self) {
        self.shared.counters.cuts.fetch_add(1, Ordering::Relaxed);
        self.kill(Kill::Cut);
    }

    /// Resets every open connection (RST both ways).
    pub fn reset(&self) {
        self.shared.counters.resets.fetch_add(1, Ordering::Relaxed);
        self.kill(Kill::Reset);
    }

    /// Injects one fault; stalls and slow-downs last their duration, then traffic flows again.
    pub async fn inject(&self, fault: Fault) {
        let c = &self.shared.counters;
        match fault {
            Fault::Cut => self.cut(),
            Fault::Reset => self.reset(),
            Fault::Stall(duration) => {
                c.stalls.fetch_add(1, Ordering::Relaxed);
                self.shared.mode.send_replace(Mode::Stalled);
                tokio::time::sleep(duration).await;
                self.shared.mode.send_replace(Mode::Normal);
            }
            Fault::Slow {
                duration,
                chunk,
                delay,
            } => {
                c.slows.fetch_add(1, Ordering::Relaxed);
                self.shared.mode.send_replace(Mode::Slow { chunk, delay });
                tokio::time::sleep(duration).await;
                self.shared.mode.send_replace(Mode::Normal);
            }
        }
    }

    /// Injects `count` faults drawn from `seed` (kind, duration, and the 50-400 ms gap before
    /// each), one after the other; returns the counts.
    pub async fn run_random(&self, seed: u64, count: usize) -> FaultCounts {
        let mut rng = StdRng::seed_from_u64(seed);
        let ms = Duration::from_millis;
        for _ in 0..count {
            tokio::time::sleep(ms(rng.gen_range(50..400))).await;
            let fault = match rng.gen_range(0..4) {
                0 => Fault::Cut,
                1 => Fault::Reset,
                2 => Fault::Stall(ms(rng.gen_range(100..800))),
                _ => Fault::Slow {
                    duration: ms(rng.gen_range(200..800)),
                    chunk: rng.gen_range(1..=64),
                    delay: ms(rng.gen_range(1..=10)),
                },
            };
            self.inject(fault).await;
        }
        self.counts()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The relays live in the accept task's JoinSet: aborting it ends them all.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut relays = JoinSet::new();
    loop {
        while relays.try_join_next().is_some() {}
        let Ok((inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        relays.spawn(relay(inbound, shared.clone()));
    }
}

async fn relay(inbound: TcpStream, shared: Arc<Shared>) {
    let mut kill = shared.kill.subscribe();
    let Ok(Ok(outbound)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(shared.target)).await
    else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let counters = &shared.counters;
    counters.live.fetch_add(1, Ordering::Relaxed);
    let (mut from_device, mut to_device) = inbound.into_split();
    let (mut from_hub, mut to_hub) = outbound.into_split();
    let killed = tokio::select! {
        _ = pump(&mut from_device, &mut to_hub, shared.mode.subscribe()) => None,
        _ = pump(&mut from_hub, &mut to_device, shared.mode.subscribe()) => None,
        changed = kill.changed() => changed.ok().map(|_| kill.borrow().1),
    };
    counters.live.fetch_sub(1, Ordering::Relaxed);
    if killed == Some(Kill::Reset) {
        // Zero linger makes the close send RST; `forget` skips the FIN a dropped write half
        // would send first. The sockets close when the read halves drop below.
        let _ = to_device.as_ref().set_zero_linger();
        let _ = to_hub.as_ref().set_zero_linger();
        to_device.forget();
        to_hub.forget();
    }
}

/// Copies one direction until either side closes, obeying the current mode.
async fn pump(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Normal => {
                    if to.write_all(data).await.is_err() {
                        return;
                    }
                    data = &[];
                }
                Mode::Stalled => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                Mode::Slow { chunk, delay } => {
                    let k = chunk.clamp(1, data.len());
                    if to.write_all(&data[..k]).await.is_err() {
                        return;
                    }
                    data = &data[k..];
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
