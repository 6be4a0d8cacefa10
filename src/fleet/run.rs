//! Running a fleet: one full [`Agent`] per device on the current runtime, started at a
//! connect rate, watched once a second, stopped by the end of its work, its duration or the
//! caller, then drained.
//!
//! Each device is the same agent `simdevice run` is (telemetry, twin, methods through the
//! handler registry, cloud-to-device), memory-only (no outbox file: a fleet is a load
//! generator, not a durable device) and sharing one TLS configuration. What varies per device
//! comes from one seed: the first reading's phase in the interval, the sensors' baselines, the
//! cellular operator and technology; the same seed gives the same readings.
//!
//! The fleet reads what it reports from each agent's counters (`agent::context::Counters`),
//! and the acknowledgement latencies from one shared histogram every agent records into.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::devices::FleetDevice;
use super::report::LatencyHistogram;
use crate::agent::context::HandlerContext;
use crate::agent::{client_tls, Agent, AgentError};
use crate::config::Config;

/// How often the fleet looks at its devices (the end of `--messages`, the live line).
pub const TICK: Duration = Duration::from_secs(1);
/// Connects in progress at once (TCP connect to CONNACK), whatever the connect rate: the
/// unlimited ramp goes as fast as handshakes complete without overrunning the hub (the local
/// hub closes connections beyond 1,024 waiting for their CONNACK; a real hub throttles).
pub const CONNECTS_IN_PROGRESS: usize = 256;

/// Cellular profiles a device is given, by its seed.
const OPERATORS: [&str; 4] = [
    "Contoso Mobile",
    "Fabrikam Telecom",
    "Northwind Cellular",
    "Woodgrove Wireless",
];
const TECHNOLOGIES: [&str; 4] = ["LTE-M", "NB-IoT", "LTE Cat-1", "5G"];

/// What the fleet runs; the command line fills it in.
pub struct FleetSettings {
    pub devices: Vec<FleetDevice>,
    pub ca_file: Option<PathBuf>,
    /// Between two readings of one device; zero: as fast as the hub acknowledges.
    pub interval: Duration,
    /// Readings per device, then the run ends once every one is acknowledged or dropped.
    pub messages: Option<u64>,
    /// Run this long, then stop (with `messages`: whichever comes first).
    pub duration: Option<Duration>,
    /// Devices started per second; `None`: all at once.
    pub connect_rate: Option<f64>,
    pub seed: u64,
    /// The telemetry template every device renders, if any.
    pub template: Option<Arc<crate::common::template::Template>>,
    /// `--transport` and `--proxy`: how every device dials (`[connection]` of `simdevice run`).
    pub transport: crate::config::Transport,
    pub proxy: Option<crate::config::Proxy>,
}

/// Why a fleet cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("device {device_id} cannot start")]
    Agent {
        device_id: String,
        #[source]
        source: AgentError,
    },
    /// The TLS configuration or the built-in handlers cannot be set up.
    #[error(transparent)]
    Setup(AgentError),
}

impl FleetError {
    pub fn is_config(&self) -> bool {
        match self {
            FleetError::Agent { source, .. } | FleetError::Setup(source) => source.is_config(),
        }
    }
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every device sent its `--messages` and each was acknowledged or dropped.
    Done,
    /// `--duration` passed.
    Duration,
    /// The caller stopped it (SIGTERM/SIGINT).
    Stopped,
}

/// The fleet's state at one moment, summed over its devices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub target: u64,
    pub started: u64,
    /// Connected now.
    pub connected_now: u64,
    /// Devices that connected at least once.
    pub connected: u64,
    /// Devices that received their full twin at least once.
    pub twins_fetched: u64,
    /// Devices whose reported properties (connectivity) were accepted at least once.
    pub connectivity_reported: u64,
    pub readings_produced: u64,
    pub readings_sent: u64,
    pub readings_acknowledged: u64,
    pub readings_dropped: u64,
    pub method_calls: u64,
    pub methods_answered: u64,
    pub desired_applied: u64,
    pub cloud_to_device: u64,
    /// Sessions that ended (any reason) or attempts that failed.
    pub reconnects: u64,
    /// Errors by kind: `connect_refused`, `connect_failed`, `connection_lost`,
    /// `readings_dropped`, `method_errors` (answers 4xx/5xx).
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl Snapshot {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A fleet ready to run: its agents built (every configuration checked), none started.
pub struct Fleet {
    agents: Vec<Agent>,
    view: FleetView,
    messages: Option<u64>,
    duration: Option<Duration>,
    connect_rate: Option<f64>,
    seed: u64,
}

/// What a fleet shows while it runs (the live line, `/metrics`): cheap to clone.
#[derive(Clone)]
pub struct FleetView {
    contexts: Arc<Vec<HandlerContext>>,
    latency: Arc<Mutex<LatencyHistogram>>,
    started: Arc<std::sync::atomic::AtomicU64>,
}

impl FleetView {
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            target: self.contexts.len() as u64,
            started: self.started.load(Ordering::Relaxed),
            ..Snapshot::default()
        };
        let mut errors = std::collections::BTreeMap::<String, u64>::new();
        let mut add_error = |kind: &str, n: u64| {
            if n > 0 {
                *errors.entry(kind.to_string()).or_insert(0) += n;
            }
        };
        for ctx in self.contexts.iter() {
            let c = ctx.counters();
            let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
            s.connected_now += c.connected.load(Ordering::Relaxed) as u64;
            s.connected += (get(&c.connects) > 0) as u64;
            s.twins_fetched += (get(&c.twins_fetched) > 0) as u64;
            s.connectivity_reported += (get(&c.reported_patches) > 0) as u64;
            s.readings_produced += get(&c.readings_produced);
            s.readings_sent += get(&c.readings_published);
            s.readings_acknowledged += get(&c.readings_acknowledged);
            s.readings_dropped += get(&c.readings_dropped);
            s.method_calls += get(&c.method_calls);
            s.desired_applied += get(&c.desired_applied);
            s.cloud_to_device += get(&c.cloud_to_device);
            for (labels, n) in c.reconnects.snapshot() {
                s.reconnects += n;
                match labels.first().map(String::as_str) {
                    Some("refused") => add_error("connect_refused", n),
                    Some("failed") => add_error("connect_failed", n),
                    Some("lost") => add_error("connection_lost", n),
                    _ => {}
                }
            }
            for (labels, n) in c.methods.snapshot() {
                s.methods_answered += n;
                let status: i32 = labels.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                if status >= 400 {
                    add_error("method_errors", n);
                }
            }
        }
        add_error("readings_dropped", s.readings_dropped);
        s.errors = errors;
        s
    }

    /// A percentile of the acknowledgement latencies so far, in ms (`None` before the first),
    /// read in place: the live line and `/metrics` need no copy of the histogram.
    pub fn latency_percentile_ms(&self, percentile: f64) -> Option<f64> {
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .percentile_ms(percentile)
    }

    /// The acknowledgement latencies so far (for the report).
    pub fn latency(&self) -> LatencyHistogram {
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether every device has produced its `messages` and each reading was acknowledged or
    /// dropped.
    fn all_done(&self, messages: u64) -> bool {
        self.contexts.iter().all(|ctx| {
            let c = ctx.counters();
            let produced = c.readings_produced.load(Ordering::Relaxed);
            produced >= messages
                && c.readings_acknowledged.load(Ordering::Relaxed)
                    + c.readings_dropped.load(Ordering::Relaxed)
                    >= produced
        })
    }
}

/// A per-device seed from the fleet's seed and the device id: the same device gets the same
/// readings in a sharded run as in one run over the whole range.
pub fn device_seed(seed: u64, device_id: &str) -> u64 {
    // FNV-1a over the id, then splitmix64 to spread the bits.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in device_id.bytes() {
        hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ hash;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One device's configuration: the defaults of `simdevice run`, with what varies per device
/// drawn from its seed.
fn device_config(settings: &FleetSettings, device: &FleetDevice) -> Config {
    let seed = device_seed(settings.seed, &device.device_id);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut config = Config::for_identity(device.identity(settings.ca_file.as_deref()));
    let telemetry = &mut config.telemetry;
    telemetry.interval = settings.interval;
    telemetry.seed = Some(seed);
    telemetry.messages = settings.messages;
    telemetry.template = settings.template.clone();
    telemetry.start_phase = settings.interval.mul_f64(rng.gen_range(0.0..1.0));
    // Baselines: each device's ranges shifted by up to a sixth of their span.
    let shift = |(min, max): (f64, f64), rng: &mut StdRng| {
        let offset = (max - min) / 6.0 * rng.gen_range(-1.0..=1.0);
        (min + offset, max + offset)
    };
    telemetry.temperature = shift(telemetry.temperature, &mut rng);
    telemetry.humidity = shift(telemetry.humidity, &mut rng);
    config.connectivity.operator = OPERATORS[rng.gen_range(0..OPERATORS.len())].to_string();
    config.connectivity.technology = TECHNOLOGIES[rng.gen_range(0..TECHNOLOGIES.len())].to_string();
    config.outbox.path = None;
    config.connection.transport = settings.transport;
    config.connection.proxy = settings.proxy.clone();
    config
}

impl Fleet {
    /// Builds every device's agent (each configuration is checked before anything connects).
    pub fn new(settings: FleetSettings) -> Result<Fleet, FleetError> {
        let tls = {
            let shared = client_tls(settings.ca_file.as_deref()).map_err(FleetError::Setup)?;
            // No TLS session resumption: the client's session cache belongs to the shared
            // configuration, so devices would resume each other's sessions, which distinct
            // devices never do. Every connect is a full handshake, as a fleet of real devices
            // makes its first connects.
            let mut config = (*shared).clone();
            config.resumption = rustls::client::Resumption::disabled();
            Arc::new(config)
        };
        let latency = Arc::new(Mutex::new(LatencyHistogram::new()));
        let observer: crate::agent::context::AckObserver = {
            let latency = latency.clone();
            Arc::new(move |elapsed| {
                latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(elapsed)
            })
        };
        // Every device has the built-in methods: one registry for all.
        let registry = Arc::new(
            crate::agent::handlers::builtin::register_all(&[])
                .map_err(|source| FleetError::Setup(AgentError::Handlers(source)))?,
        );
        let gate = Arc::new(tokio::sync::Semaphore::new(CONNECTS_IN_PROGRESS));
        let mut agents = Vec::with_capacity(settings.devices.len());
        let mut contexts = Vec::with_capacity(settings.devices.len());
        for device in &settings.devices {
            let config = device_config(&settings, device);
            // An X.509 device: the shared configuration, presenting its own certificate.
            let tls = match &device.certificate {
                Some(certificate) => super::x509::with_certificate(&tls, certificate.clone()),
                None => tls.clone(),
            };
            let mut agent =
                Agent::with_shared(config, tls, registry.clone()).map_err(|source| {
                    FleetError::Agent {
                        device_id: device.device_id.clone(),
                        source,
                    }
                })?;
            agent.limit_connects(gate.clone());
            let ctx = agent.handle().ctx;
            ctx.observe_acks(observer.clone());
            contexts.push(ctx);
            agents.push(agent);
        }
        Ok(Fleet {
            agents,
            view: FleetView {
                contexts: Arc::new(contexts),
                latency,
                started: Arc::default(),
            },
            messages: settings.messages,
            duration: settings.duration,
            connect_rate: settings.connect_rate,
            seed: settings.seed,
        })
    }

    /// What the fleet shows while it runs (before it runs too: all zero).
    pub fn view(&self) -> FleetView {
        self.view.clone()
    }

    /// Starts the devices at the connect rate and runs until the work is done, the duration
    /// has passed or `stop` is cancelled; then stops every agent (each drains within
    /// `agent::SHUTDOWN_GRACE`). `on_tick` sees the fleet once a second.
    pub async fn run(
        self,
        stop: CancellationToken,
        mut on_tick: impl FnMut(&FleetView),
    ) -> (Ending, FleetView) {
        let Fleet {
            agents,
            view,
            messages,
            duration,
            connect_rate,
            seed,
        } = self;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let ramp = tokio::spawn(start_agents(
            agents,
            connect_rate,
            seed,
            tasks.clone(),
            view.started.clone(),
            shutdown.clone(),
        ));
        let began = Instant::now();
        let deadline = duration.map(|d| began + d);
        let mut tick = tokio::time::interval_at(began + TICK, TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ending = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ending::Stopped,
                _ = tokio::time::sleep_until(deadline.unwrap_or(began)), if deadline.is_some() => {
                    break Ending::Duration
                }
                _ = tick.tick() => {
                    on_tick(&view);
                    if messages.is_some_and(|m| view.all_done(m)) {
                        break Ending::Done;
                    }
                }
            }
        };
        shutdown.cancel();
        let _ = ramp.await;
        tasks.close();
        tasks.wait().await;
        on_tick(&view);
        (ending, view)
    }
}

/// Spawns the agents `rate` per second, each at its slot plus a jitter within the slot
/// (spread, not bursts of a timer's granularity).
async fn start_agents(
    agents: Vec<Agent>,
    rate: Option<f64>,
    seed: u64,
    tasks: TaskTracker,
    started: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0ca7_7a7e);
    let slot = rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let begin = Instant::now();
    for (index, agent) in agents.into_iter().enumerate() {
        if let Some(slot) = slot {
            let at = begin + slot.mul_f64(index as f64 + rng.gen_range(0.0..1.0));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {}
            }
        } else if shutdown.is_cancelled() {
            return;
        }
        tasks.spawn(agent.run(shutdown.clone()));
        started.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_seeds_differ_per_device_and_repeat_per_seed() {
        assert_eq!(device_seed(7, "door-1"), device_seed(7, "door-1"));
        assert_ne!(device_seed(7, "door-1"), device_seed(7, "door-2"));
        assert_ne!(device_seed(7, "door-1"), device_seed(8, "door-1"));
    }
}
