//! Leaves that several sides share, just above `protocol`: nothing here imports the agent, the
//! hub, the service client or the commands.
//!
//! - [`pem`]: certificates out of PEM text.
//! - [`der`]: what a certificate says (names, dates) and its thumbprints, without checking it.
//! - [`local_hub`]: `hub.json`, the local hub's default state directory and API port.
//! - [`exposition`]: the generic `/healthz` and `/metrics` server (Prometheus text).
//! - [`sdnotify`]: systemd readiness, watchdog and stopping notifications.
//! - [`logging`]: tracing set-up, text or JSON.
//! - [`file_mode`]: the permission bits of key files and commands (private, writable by others).
//! - [`lock`]: the exclusive lock that gives a state directory or an outbox file one owner.
//! - [`template`]: telemetry templates (parsed by the configuration, rendered by the agent).
//! - [`blob`]: where an archive lives, a directory or a Blob Storage container (the hub's capture
//!   and the archive reader).
//! - [`ws_stream`]: MQTT over WebSocket as a byte stream (the hub's listener, the agent's dial).

#[cfg(any(feature = "hub", feature = "archive"))]
pub mod blob;
pub mod der;
pub mod exposition;
pub mod file_mode;
pub mod local_hub;
pub mod lock;
pub mod logging;
pub mod pem;
pub mod sdnotify;
pub mod template;
pub mod ws_stream;
