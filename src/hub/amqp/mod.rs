//! The built-in Event Hubs-compatible endpoint: AMQP 1.0 over TLS (`--amqp-port`, 5671) and,
//! for clients in emulator mode (`UseDevelopmentEmulator=true`), plain AMQP
//! (`--amqp-plain-port`, 5672). Back ends read the telemetry of the event store (`hub::events`)
//! with the official Event Hubs SDKs.
//!
//! The plain port carries SAS tokens and keys in clear, so it listens on loopback whatever the
//! hub's `--bind`; `--amqp-plain-bind ADDR` widens it, deliberately. The event hub's name is
//! the hub's (the first label of its host name), its partitions the store's.
//!
//! The protocol engine is fe2o3-amqp's acceptor side. Its encoder leaves out trailing fields
//! that are null or default (legal AMQP), and azure-eventhub's pure-Python client reads frames
//! by position (`open` up to `properties`, `begin` up to `properties`, `attach` up to
//! `properties`, `transfer` up to `batchable`), so the hub always sets the last field of each:
//! connection, session and link properties, a max frame size and handle-max that are not the
//! defaults, and every transfer is sent `batchable`.
//!
//! Rooms: `authz` (SASL logins, `$cbs` tokens, what a connection may do), `sasl` (the SASL
//! exchange), `address` (source addresses and selector filters, pure), `epoch` (exclusive
//! receivers), `connection` (one connection: sessions, links, `$cbs` and `$management`),
//! `receiver` (a partition's events to one receiver), `devicebound` (cloud-to-device messages
//! from services into `hub::c2d`), `feedback` (their feedback to services), `header` (SASL
//! or none, as the client's protocol header asks), `coalesce` (the socket's writes gathered,
//! since the engine flushes every frame), `thread` (the endpoint's own runtime thread, beside
//! the hub's pool). May not touch MQTT or the REST API.

pub mod address;
pub mod authz;
pub mod coalesce;
pub mod connection;
pub mod devicebound;
pub mod epoch;
pub mod feedback;
pub mod header;
pub mod receiver;
pub mod sasl;
pub mod thread;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::accept::{AcceptLoop, Alive};
use crate::hub::HubState;

/// The standard AMQPS port, which azure-eventhub always dials outside emulator mode.
pub const AMQPS_PORT: u16 = 5671;
/// The standard plain AMQP port, what emulator-mode connection strings name.
pub const AMQP_PLAIN_PORT: u16 = 5672;
/// Connections between accept and the end of their AMQP open (TLS, SASL, open frames) at the
/// same time; beyond, new sockets are closed at once (see `hub::accept`).
pub const MAX_UNAUTHENTICATED: usize = 256;
/// The consumer group every event hub has.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";

/// `simdevice hub`'s AMQP options.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// The TLS port (`Chosen(0)`: any free port).
    pub port: crate::hub::Port,
    /// The plain port; `None`: no plain listener.
    pub plain_port: Option<crate::hub::Port>,
    /// Where the plain port listens (module notes): loopback unless widened.
    pub plain_bind: IpAddr,
    /// Consumer groups besides `$Default`.
    pub consumer_groups: Vec<String>,
}

impl AmqpSettings {
    /// Both listeners on free loopback ports: what tests use.
    pub fn ephemeral() -> AmqpSettings {
        AmqpSettings {
            port: crate::hub::Port::Chosen(0),
            plain_port: Some(crate::hub::Port::Chosen(0)),
            plain_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            consumer_groups: Vec::new(),
        }
    }
}

/// What every AMQP connection shares.
pub struct Endpoint {
    /// The event hub's name: the hub's.
    pub hub_name: String,
    pub consumer_groups: Vec<String>,
    pub epochs: epoch::Epochs,
}

impl Endpoint {
    pub fn new(hub_name: String, extra_groups: &[String]) -> Endpoint {
        let mut consumer_groups = vec![DEFAULT_CONSUMER_GROUP.to_string()];
        for group in extra_groups {
            if !consumer_groups
                .iter()
                .any(|g| g.eq_ignore_ascii_case(group))
            {
                consumer_groups.push(group.clone());
            }
        }
        Endpoint {
            hub_name,
            consumer_groups,
            epochs: epoch::Epochs::default(),
        }
    }

    /// The configured consumer group named `name` (case-insensitive, as Event Hubs).
    pub fn consumer_group(&self, name: &str) -> Option<&str> {
        self.consumer_groups
            .iter()
            .find(|g| g.eq_ignore_ascii_case(name))
            .map(String::as_str)
    }
}

/// The Event Hubs-compatible connection string, as the portal shows it.
pub fn connection_string(host: &str, policy: &str, key: &str, hub_name: &str) -> String {
    format!("Endpoint=sb://{host}/;SharedAccessKeyName={policy};SharedAccessKey={key};EntityPath={hub_name}")
}

/// The emulator-mode connection string for the plain port.
pub fn emulator_connection_string(
    host: &str,
    port: u16,
    policy: &str,
    key: &str,
    hub_name: &str,
) -> String {
    format!(
        "Endpoint=sb://{host}:{port};SharedAccessKeyName={policy};SharedAccessKey={key};EntityPath={hub_name};UseDevelopmentEmulator=true"
    )
}

/// One AMQP listener's accept loop: TLS when `tls` is given, plain otherwise.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<HubState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    alive: Alive,
) {
    let name = if tls.is_some() { "AMQPS" } else { "AMQP" };
    let accept = AcceptLoop {
        name,
        max_pending: MAX_UNAUTHENTICATED,
        shutdown: shutdown.clone(),
        tasks,
        alive,
        // No fault hook for these listeners yet: a token nobody cancels.
        kill: CancellationToken::new(),
    };
    accept
        .run(listener, move |socket, peer, permit| {
            connection::serve(
                socket,
                peer,
                tls.clone(),
                state.clone(),
                shutdown.clone(),
                permit,
            )
        })
        .await;
}
