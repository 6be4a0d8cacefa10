//! A back end reading everything: one receiver per partition of a running local hub's Event
//! Hubs-compatible endpoint (its plain AMQP port, SASL PLAIN as the `service` policy, from
//! `@latest`), with the links settled on send (no disposition per event), as the .NET Event
//! Hubs client's receiving links are, until SIGTERM or Ctrl-C; then it prints
//! `RESULT events=N` (what it received). scripts/bench-hub runs it beside the
//! hub to measure telemetry throughput while a consumer reads every message.
//!
//!     cargo run --release --example eventhub_drain -- --state-dir DIR [--partitions N] [--progress]
//!
//! `--progress` also prints `events=N` to stderr each second (how fast it reads a backlog);
//! SIGUSR1 prints `AT events=N` to stdout (what it had read when the generator stopped).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{Body, Source};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use simdevice::common::local_hub::HubInfo;

/// Receiver credit: what azure-eventhub's consumer asks for by default (`prefetch` 300).
const CREDIT: u32 = 300;

fn field<'a>(connection_string: &'a str, name: &str) -> Option<&'a str> {
    connection_string
        .split(';')
        .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

// One thread: the receivers share one connection, whose engine task would otherwise wake
// them across threads for every frame.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut state_dir, mut partitions, mut progress) = (None, 4u32, false);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--state-dir" => state_dir = args.next(),
            "--partitions" => partitions = args.next().ok_or("--partitions N")?.parse()?,
            "--progress" => progress = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let info = HubInfo::read(std::path::Path::new(
        &state_dir.ok_or("--state-dir DIR is needed")?,
    ))?;
    let port = info
        .amqp_plain_port
        .ok_or("the hub has no plain AMQP port")?;
    let connection_string = info
        .eventhub_emulator_connection_string
        .ok_or("hub.json has no eventhub_emulator_connection_string")?;
    let (policy, key, hub) = (
        field(&connection_string, "SharedAccessKeyName").ok_or("no SharedAccessKeyName")?,
        field(&connection_string, "SharedAccessKey").ok_or("no SharedAccessKey")?,
        field(&connection_string, "EntityPath").ok_or("no EntityPath")?,
    );
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut connection = Connection::builder()
        .container_id("eventhub-drain")
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: policy.into(),
            password: key.into(),
        })
        .open_with_stream(stream)
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for partition in 0..partitions {
        let mut session = Session::begin(&mut connection).await?;
        let latest = Value::Described(Box::new(Described {
            descriptor: Descriptor::Name(Symbol::from("apache.org:selector-filter:string")),
            value: Value::String("amqp.annotation.x-opt-offset > '@latest'".into()),
        }));
        let source = Source::builder()
            .address(format!(
                "{hub}/ConsumerGroups/$Default/Partitions/{partition}"
            ))
            .add_to_filter_using_legacy_format("apache.org:selector-filter:string", latest)
            .build();
        let mut receiver = Receiver::builder()
            .name(format!("drain-{partition}"))
            .source(source)
            .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual)
            .sender_settle_mode(fe2o3_amqp::types::definitions::SenderSettleMode::Settled)
            .attach(&mut session)
            .await?;
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            // Settled deliveries are not accepted, so fe2o3's automatic credit would not come
            // back: the credit is renewed by hand each half window.
            if receiver.set_credit(CREDIT).await.is_err() {
                return;
            }
            let mut since_credit = 0;
            while receiver.recv::<Body<Value>>().await.is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
                since_credit += 1;
                if since_credit == CREDIT / 2 {
                    since_credit = 0;
                    if receiver.set_credit(CREDIT).await.is_err() {
                        break;
                    }
                }
            }
            drop(session);
        }));
    }
    if progress {
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                eprintln!("events={}", received.load(Ordering::Relaxed));
            }
        }));
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut mark = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = mark.recv() => println!("AT events={}", received.load(Ordering::Relaxed)),
        }
    }
    println!("RESULT events={}", received.load(Ordering::Relaxed));
    for task in &tasks {
        task.abort();
    }
    Ok(())
}
