//! Load generator for the hub benchmark (`scripts/bench-hub`), usable against `simdevice hub`
//! and against Mosquitto with the same code, so that the two can be compared in one run.
//!
//! ```text
//! cargo run --release --example loadgen -- --mode connect   --target hub --state-dir DIR --clients 1000 --server-pid PID
//! cargo run --release --example loadgen -- --mode telemetry --target mosquitto --port 8884 --ca ca.pem --clients 1000
//! cargo run --release --example loadgen -- --mode methods   --target hub --state-dir DIR --devices 100 --callers 100
//! ```
//!
//! Modes:
//! - `connect`: opens `--clients` MQTT-over-TLS connections (at most `--concurrency` handshakes
//!   at a time; full TLS handshakes, session resumption off unless `--resume`), reports
//!   connections/s, then holds them idle and reports the server's resident memory per
//!   connection (VmRSS of `--server-pid` before and after).
//! - `telemetry`: connects `--clients` clients, then each publishes QoS 1 readings of
//!   `--payload` bytes with at most `--window` unacknowledged; counts PUBACKs over `--duration`
//!   seconds after `--warmup` seconds and reports messages/s.
//! - `methods` (hub only): connects `--devices` devices that subscribe to direct methods and
//!   answer at once; `--callers` concurrent callers invoke them over the service REST API
//!   (keep-alive HTTPS connections) and the round trip is reported as p50/p99/max and calls/s.
//! - `subscribe` (Mosquitto only: IoT Hub lets no client subscribe to devices' telemetry): the
//!   MQTT counterpart of `examples/eventhub_drain.rs`, a back end reading everything. One
//!   client subscribes to every device's telemetry at QoS 1 and counts what it receives until
//!   SIGTERM, then prints `RESULT events=N`; SIGUSR1 prints `AT events=N` (its count at that
//!   moment). scripts/bench-hub runs it beside the generator as the anchor's consumer.
//!
//! The other modes end with one `RESULT key=value ...` line for scripts, and report the CPU time
//! the generator and the server used during the measured interval (they share the machine's
//! cores).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use simdevice::common::local_hub::HubInfo;
use simdevice::protocol::connection_string::ServiceConnectionString;
use simdevice::protocol::sas;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Connect,
    Telemetry,
    Methods,
    Subscribe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Hub,
    Mosquitto,
}

#[derive(Parser, Debug)]
#[command(about = "MQTT/TLS load generator for simdevice hub and Mosquitto")]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, value_enum, default_value = "hub")]
    target: Target,
    /// Hub state directory (reads hub.json): --target hub.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// MQTT port: --target mosquitto.
    #[arg(long)]
    port: Option<u16>,
    /// CA certificate (PEM) that signed the broker's certificate: --target mosquitto.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Host name to connect to and to check the certificate against (SNI).
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Connections (connect, telemetry).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds (telemetry, methods).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured seconds before the measurement (telemetry, methods).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// QoS 1 messages in flight per client (telemetry).
    #[arg(long, default_value_t = 10)]
    window: u16,
    /// Telemetry body size in bytes.
    #[arg(long, default_value_t = 150)]
    payload: usize,
    /// Messages per second offered by all clients together (telemetry); unset: as fast as the
    /// window allows. Each client paces its own share.
    #[arg(long)]
    rate: Option<f64>,
    /// Server process whose VmRSS and CPU time to report.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Server VmRSS (KiB) before any device ever connected, for a second per-connection figure.
    #[arg(long)]
    rss_baseline_kib: Option<u64>,
    /// Seconds to wait with all connections open before reading VmRSS (connect).
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Device ids are `{prefix}-{n}`.
    #[arg(long, default_value = "bench")]
    id_prefix: String,
    /// Devices answering direct methods (methods).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Concurrent method callers (methods).
    #[arg(long, default_value_t = 100)]
    callers: usize,
    /// Allow TLS session resumption (off: every connection is a full handshake).
    #[arg(long)]
    resume: bool,
    /// MQTT clean session flag (IoT SDKs connect with 0).
    #[arg(long)]
    clean_session: bool,
}

/// Where and how to connect, and how each device authenticates.
struct Setup {
    target: Target,
    host: String,
    mqtt_port: u16,
    tls: Arc<rustls::ClientConfig>,
    ca_pem: Vec<u8>,
    /// Hub only.
    info: Option<HubInfo>,
    clean_session: bool,
    window: u16,
}

impl Setup {
    fn new(args: &Args) -> Result<Setup> {
        let (info, port, ca_file) = match args.target {
            Target::Hub => {
                let dir = args
                    .state_dir
                    .as_ref()
                    .ok_or_else(|| anyhow!("--target hub needs --state-dir"))?;
                let info = HubInfo::read(dir)?;
                let port = args.port.unwrap_or(info.mqtt_port);
                let ca = args.ca.clone().unwrap_or_else(|| info.ca_file.clone());
                (Some(info), port, ca)
            }
            Target::Mosquitto => (
                None,
                args.port
                    .ok_or_else(|| anyhow!("--target mosquitto needs --port"))?,
                args.ca
                    .clone()
                    .ok_or_else(|| anyhow!("--target mosquitto needs --ca"))?,
            ),
        };
        let ca_pem =
            std::fs::read(&ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
            roots.add(cert?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        if !args.resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Setup {
            target: args.target,
            host: args.host.clone(),
            mqtt_port: port,
            tls: Arc::new(config),
            ca_pem,
            info,
            clean_session: args.clean_session,
            window: args.window,
        })
    }

    fn options(&self, id: &str) -> Result<MqttOptions> {
        let mut options = MqttOptions::new(id, &self.host, self.mqtt_port);
        options
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls.clone(),
            )))
            .set_keep_alive(Duration::from_secs(600))
            .set_clean_session(self.clean_session)
            .set_inflight(self.window.max(1))
            .set_max_packet_size(64 * 1024, 64 * 1024);
        if let Some(info) = &self.info {
            let group_key = info.group_key.as_deref().ok_or_else(|| {
                anyhow!("hub.json has no group_key: start the hub with --auto-register")
            })?;
            let key = sas::derive_device_key(group_key, id)?;
            let expiry = chrono::Utc::now().timestamp() as u64 + 4 * 3600;
            let token = sas::generate_token(
                &sas::device_resource("localhost", id, None),
                &key,
                None,
                expiry,
            )?;
            options.set_credentials(format!("localhost/{id}/?api-version=2021-04-12"), token);
        }
        Ok(options)
    }

    fn telemetry_topic(id: &str) -> String {
        format!("devices/{id}/messages/events/")
    }
}

fn network_options() -> NetworkOptions {
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(30);
    network
}

/// Polls until CONNACK. Returns the event loop, connected.
async fn connect(setup: &Setup, id: &str, capacity: usize) -> Result<(AsyncClient, EventLoop)> {
    let (client, mut eventloop) = AsyncClient::new(setup.options(id)?, capacity);
    eventloop.set_network_options(network_options());
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    bail!("{id}: CONNACK {:?}", ack.code);
                }
                return Ok((client, eventloop));
            }
            Ok(_) => {}
            Err(e) => bail!("{id}: {e}"),
        }
    }
}

/// Resident memory (KiB) and CPU seconds (user + system) of a process.
fn proc_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Busy and total CPU ticks of the whole machine (all cores), from /proc/stat.
fn machine_ticks() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).unwrap_or(&0.0);
    Some((total - idle, total))
}

/// CPU time of the generator, the server and the whole machine over an interval.
struct CpuMeter {
    server: Option<String>,
    start: Instant,
    own: f64,
    server_cpu: Option<f64>,
    machine: Option<(f64, f64)>,
}

impl CpuMeter {
    fn start(server_pid: Option<u32>) -> CpuMeter {
        let server = server_pid.map(|p| p.to_string());
        CpuMeter {
            own: proc_cpu_secs("self").unwrap_or(0.0),
            server_cpu: server.as_deref().and_then(proc_cpu_secs),
            server,
            machine: machine_ticks(),
            start: Instant::now(),
        }
    }

    /// "gen_cpu_pct=.. server_cpu_pct=.. machine_cpu_pct=.." in % of one core (the machine's
    /// figure covers every process, so what the others used is the difference).
    fn report(&self) -> String {
        let wall = self.start.elapsed().as_secs_f64();
        let own = proc_cpu_secs("self").unwrap_or(0.0) - self.own;
        let mut out = format!("gen_cpu_pct={:.0}", 100.0 * own / wall);
        if let (Some(pid), Some(before)) = (&self.server, self.server_cpu) {
            if let Some(after) = proc_cpu_secs(pid) {
                out.push_str(&format!(
                    " server_cpu_pct={:.0}",
                    100.0 * (after - before) / wall
                ));
            }
        }
        if let (Some((busy0, total0)), Some((busy1, total1))) = (self.machine, machine_ticks()) {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            if total1 > total0 {
                out.push_str(&format!(
                    " machine_cpu_pct={:.0}",
                    100.0 * cores * (busy1 - busy0) / (total1 - total0)
                ));
            }
        }
        out
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Opens `count` connections with bounded concurrency; each is then handed to `serve`, which
/// runs until `stop`. Returns (connect times in ms, failures, wall time to open them all).
async fn open_all<F, Fut>(
    setup: Arc<Setup>,
    prefix: &str,
    count: usize,
    concurrency: usize,
    capacity: usize,
    stop: CancellationToken,
    serve: F,
) -> (Vec<f64>, Vec<String>, Duration)
where
    F: Fn(usize, String, AsyncClient, EventLoop, CancellationToken) -> Fut,
    F: Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Result<f64, String>>();
    let started = Instant::now();
    for n in 0..count {
        let permit = limit.clone().acquire_owned().await.expect("semaphore open");
        let setup = setup.clone();
        let id = format!("{prefix}-{n:06}");
        let done_tx = done_tx.clone();
        let stop = stop.clone();
        let serve = serve.clone();
        tokio::spawn(async move {
            let begun = Instant::now();
            let opened = connect(&setup, &id, capacity).await;
            drop(permit);
            match opened {
                Ok((client, eventloop)) => {
                    let _ = done_tx.send(Ok(begun.elapsed().as_secs_f64() * 1000.0));
                    serve(n, id, client, eventloop, stop).await;
                }
                Err(e) => {
                    let _ = done_tx.send(Err(e.to_string()));
                }
            }
        });
    }
    drop(done_tx);
    let mut times = Vec::with_capacity(count);
    let mut failures = Vec::new();
    while times.len() + failures.len() < count {
        match done_rx.recv().await {
            Some(Ok(ms)) => times.push(ms),
            Some(Err(e)) => failures.push(e),
            None => break,
        }
    }
    (times, failures, started.elapsed())
}

/// Keeps a connection serviced (pings, acks) until `stop`; counts unexpected closes.
async fn hold(mut eventloop: EventLoop, stop: CancellationToken, dropped: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            polled = eventloop.poll() => if polled.is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

fn report_failures(failures: &[String]) {
    if !failures.is_empty() {
        eprintln!(
            "{} connections failed; first: {}",
            failures.len(),
            failures[0]
        );
    }
}

async fn run_connect(args: &Args, setup: Arc<Setup>) -> Result<()> {
    let pid = args.server_pid.map(|p| p.to_string());
    let rss_before = pid.as_deref().and_then(proc_rss_kib);
    let own_before = proc_rss_kib("self");
    let cpu = CpuMeter::start(args.server_pid);
    let stop = CancellationToken::new();
    let dropped = Arc::new(AtomicUsize::new(0));
    let held = dropped.clone();
    let (mut times, failures, wall) = open_all(
        setup.clone(),
        &args.id_prefix,
        args.clients,
        args.concurrency,
        4,
        stop.clone(),
        move |_, _, _client, eventloop, stop| {
            let dropped = held.clone();
            async move {
                // The client handle is dropped: the event loop still answers pings.
                hold(eventloop, stop, dropped).await
            }
        },
    )
    .await;
    let cpu_report = cpu.report();
    report_failures(&failures);
    times.sort_by(|a, b| a.total_cmp(b));
    let rate = times.len() as f64 / wall.as_secs_f64();
    println!(
        "connect: {} of {} connected in {:.2} s = {:.0} connections/s (concurrency {}); connect time p50 {:.1} ms p99 {:.1} ms",
        times.len(),
        args.clients,
        wall.as_secs_f64(),
        rate,
        args.concurrency,
        percentile(&times, 50.0),
        percentile(&times, 99.0),
    );
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let connected = times.len() - dropped.load(Ordering::Relaxed);
    let mut result = format!(
        "RESULT mode=connect target={:?} clients={} connected={} failed={} conn_per_s={:.1} connect_p50_ms={:.2} connect_p99_ms={:.2} {}",
        setup.target,
        args.clients,
        connected,
        failures.len(),
        rate,
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        cpu_report,
    );
    if let (Some(pid), Some(before)) = (&pid, rss_before) {
        if let Some(after) = proc_rss_kib(pid) {
            let per = (after as f64 - before as f64) / connected.max(1) as f64;
            println!(
                "server VmRSS {before} KiB -> {after} KiB with {connected} idle connections: {per:.1} KiB per connection"
            );
            result.push_str(&format!(
                " server_rss_before_kib={before} server_rss_after_kib={after} kib_per_conn={per:.2}"
            ));
            if let Some(base) = args.rss_baseline_kib {
                let per_total = (after as f64 - base as f64) / connected.max(1) as f64;
                println!(
                    "  counted from the fresh server's {base} KiB (device registry and sessions included): {per_total:.1} KiB per device"
                );
                result.push_str(&format!(" kib_per_device_from_fresh={per_total:.2}"));
            }
        }
    }
    if let (Some(before), Some(after)) = (own_before, proc_rss_kib("self")) {
        let per = (after as f64 - before as f64) / connected.max(1) as f64;
        println!("generator VmRSS {before} KiB -> {after} KiB: {per:.1} KiB per client");
        result.push_str(&format!(" gen_kib_per_conn={per:.2}"));
    }
    println!("{result}");
    stop.cancel();
    Ok(())
}

fn reading(size: usize, id: &str) -> Bytes {
    let mut body = format!(
        "{{\"deviceId\":\"{id}\",\"temperature\":21.57,\"humidity\":48.2,\"pressure\":1013.25,\"ts\":\"2024-05-01T12:00:00.000Z\",\"pad\":\""
    );
    while body.len() + 2 < size {
        body.push('x');
    }
    body.push_str("\"}");
    Bytes::from(body)
}

async fn run_telemetry(args: &Args, setup: Arc<Setup>) -> Result<()> {
    let acks = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let go = CancellationToken::new();
    let stop = CancellationToken::new();
    let payload_size = args.payload;
    let (acks2, dropped2, go2) = (acks.clone(), dropped.clone(), go.clone());
    let window = args.window as usize;
    // A client's time between two messages when paced.
    let pace = args
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(args.clients as f64 / r));
    let (_, failures, wall) = open_all(
        setup.clone(),
        &args.id_prefix,
        args.clients,
        args.concurrency,
        window,
        stop.clone(),
        move |_, id, client, mut eventloop, stop| {
            let (acks, dropped, go) = (acks2.clone(), dropped2.clone(), go2.clone());
            async move {
                let topic = Setup::telemetry_topic(&id);
                let body = reading(payload_size, &id);
                let publisher_stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = publisher_stop.cancelled() => return,
                        _ = go.cancelled() => {}
                    }
                    let mut ticks = pace.map(tokio::time::interval);
                    loop {
                        if let Some(ticks) = ticks.as_mut() {
                            tokio::select! {
                                _ = publisher_stop.cancelled() => return,
                                _ = ticks.tick() => {}
                            }
                        }
                        let sent = tokio::select! {
                            _ = publisher_stop.cancelled() => return,
                            sent = client.publish_bytes(topic.clone(), QoS::AtLeastOnce, false, body.clone()) => sent,
                        };
                        if sent.is_err() {
                            return;
                        }
                    }
                });
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        polled = eventloop.poll() => match polled {
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                acks.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                if dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                                    eprintln!("{id}: connection lost: {e}");
                                }
                                return;
                            }
                        }
                    }
                }
            }
        },
    )
    .await;
    report_failures(&failures);
    let connected = args.clients - failures.len();
    println!(
        "telemetry: {connected} clients connected in {:.2} s; publishing QoS 1, {} bytes, window {}",
        wall.as_secs_f64(),
        payload_size,
        args.window
    );
    go.cancel();
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let cpu = CpuMeter::start(args.server_pid);
    let start_count = acks.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let count = acks.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_report = cpu.report();
    stop.cancel();
    let rate = count as f64 / elapsed;
    let lost = dropped.load(Ordering::Relaxed);
    println!(
        "telemetry: {count} PUBACKs in {elapsed:.2} s = {rate:.0} msg/s from {connected} clients ({lost} connections lost)"
    );
    // Every PUBACK since the first message, warm-up included: what a consumer of the whole
    // run should have received.
    let acked_total = acks.load(Ordering::Relaxed);
    println!(
        "RESULT mode=telemetry target={:?} clients={} connected={} lost={} window={} payload={} msg_per_s={:.1} acked_total={} {}",
        setup.target, args.clients, connected, lost, args.window, payload_size, rate, acked_total, cpu_report
    );
    Ok(())
}

async fn run_methods(args: &Args, setup: Arc<Setup>) -> Result<()> {
    let info = setup
        .info
        .clone()
        .ok_or_else(|| anyhow!("--mode methods needs --target hub"))?;
    let stop = CancellationToken::new();
    let subscribed = Arc::new(AtomicUsize::new(0));
    let subscribed2 = subscribed.clone();
    let answered = Arc::new(AtomicU64::new(0));
    let answered2 = answered.clone();
    let (_, failures, _) = open_all(
        setup.clone(),
        &args.id_prefix,
        args.devices,
        args.concurrency,
        64,
        stop.clone(),
        move |_, id, client, mut eventloop, stop| {
            let (subscribed, answered) = (subscribed2.clone(), answered2.clone());
            async move {
                if client
                    .try_subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
                    .is_err()
                {
                    return;
                }
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        polled = eventloop.poll() => match polled {
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                subscribed.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Event::Incoming(Packet::Publish(publish))) => {
                                let topic = &publish.topic;
                                if let Some(rid) = topic.split("$rid=").nth(1) {
                                    let rid = rid.split('&').next().unwrap_or(rid);
                                    let _ = client.try_publish(
                                        format!("$iothub/methods/res/200/?$rid={rid}"),
                                        QoS::AtMostOnce,
                                        false,
                                        &b"{\"ok\":true}"[..],
                                    );
                                    answered.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                eprintln!("{id}: connection lost: {e}");
                                return;
                            }
                        }
                    }
                }
            }
        },
    )
    .await;
    report_failures(&failures);
    let devices = args.devices - failures.len();
    let wait_until = Instant::now() + Duration::from_secs(30);
    while subscribed.load(Ordering::Relaxed) < devices {
        if Instant::now() > wait_until {
            bail!(
                "only {} of {devices} devices subscribed",
                subscribed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let service: ServiceConnectionString = info
        .service_connection_string
        .parse()
        .map_err(|e| anyhow!("service connection string: {e}"))?;
    let expiry = chrono::Utc::now().timestamp() as u64 + 4 * 3600;
    let token = sas::generate_token(
        &service.host_name,
        &service.shared_access_key,
        Some(&service.shared_access_key_name),
        expiry,
    )?;
    let api_addr: std::net::SocketAddr = ([127, 0, 0, 1], info.api_port).into();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&setup.ca_pem)?)
        .resolve("localhost", api_addr)
        .pool_max_idle_per_host(args.callers * 2)
        .tcp_nodelay(true)
        .http1_only()
        .build()?;
    let base = format!("https://localhost:{}", info.api_port);
    let body = serde_json::json!({
        "methodName": "ping",
        "payload": {"n": 1},
        "responseTimeoutInSeconds": 10,
        "connectTimeoutInSeconds": 0,
    })
    .to_string();

    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let call_stop = CancellationToken::new();
    let errors = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for c in 0..args.callers {
        let (http, token, body) = (http.clone(), token.clone(), body.clone());
        let url = format!(
            "{base}/twins/{}-{:06}/methods?api-version=2021-04-12",
            args.id_prefix,
            c % devices.max(1)
        );
        let (measuring, call_stop, errors) = (measuring.clone(), call_stop.clone(), errors.clone());
        callers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(64 * 1024);
            while !call_stop.is_cancelled() {
                let begun = Instant::now();
                let response = http
                    .post(&url)
                    .header("Authorization", &token)
                    .header("Content-Type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let ok = match response {
                    Ok(r) => {
                        let status = r.status();
                        let text = r.bytes().await.unwrap_or_default();
                        if status.as_u16() == 200 {
                            true
                        } else {
                            if errors.load(Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "method call: HTTP {status}: {}",
                                    String::from_utf8_lossy(&text)
                                );
                            }
                            false
                        }
                    }
                    Err(e) => {
                        if errors.load(Ordering::Relaxed) == 0 {
                            eprintln!("method call failed: {e}");
                        }
                        false
                    }
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        latencies.push(begun.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let cpu = CpuMeter::start(args.server_pid);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_report = cpu.report();
    call_stop.cancel();
    let mut all = Vec::new();
    for caller in callers {
        all.extend(caller.await?);
    }
    stop.cancel();
    all.sort_by(|a, b| a.total_cmp(b));
    let rate = all.len() as f64 / elapsed;
    let (p50, p99, max) = (
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN),
    );
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "methods: {} calls in {elapsed:.2} s = {rate:.0} calls/s from {} callers to {devices} devices; round trip p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms; {errors} errors",
        all.len(),
        args.callers
    );
    println!(
        "RESULT mode=methods target={:?} devices={devices} callers={} calls={} errors={errors} calls_per_s={rate:.1} p50_ms={p50:.3} p99_ms={p99:.3} max_ms={max:.3} {cpu_report}",
        setup.target,
        args.callers,
        all.len()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let setup = Arc::new(Setup::new(&args)?);
    println!(
        "loadgen {:?} against {:?} at {}:{} ({})",
        args.mode,
        args.target,
        setup.host,
        setup.mqtt_port,
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    match args.mode {
        Mode::Connect => run_connect(&args, setup).await,
        Mode::Telemetry => run_telemetry(&args, setup).await,
        Mode::Methods => run_methods(&args, setup).await,
        Mode::Subscribe => run_subscribe(&setup).await,
    }
}

/// The anchor's back end: every device's telemetry through one QoS 1 subscription, counted
/// (module notes, `subscribe`).
async fn run_subscribe(setup: &Setup) -> Result<()> {
    if setup.target != Target::Mosquitto {
        bail!("--mode subscribe is for --target mosquitto: IoT Hub lets no client subscribe to devices' telemetry (its back ends read the Event Hubs-compatible endpoint: examples/eventhub_drain.rs)");
    }
    // A clean session: a session kept from an earlier run would hand this one the messages
    // published while no subscriber was there.
    let mut options = setup.options("bench-subscriber")?;
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    eventloop.set_network_options(network_options());
    client
        .subscribe("devices/+/messages/events/#", QoS::AtLeastOnce)
        .await?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut mark = signal(SignalKind::user_defined1())?;
    let mut events = 0u64;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = mark.recv() => println!("AT events={events}"),
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::Publish(_))) => events += 1,
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        bail!("the broker refused the subscription");
                    }
                }
                Ok(_) => {}
                Err(e) => bail!("the subscriber's connection failed after {events} messages: {e}"),
            },
        }
    }
    println!("RESULT events={events}");
    Ok(())
}
