//! `simdevice service ...`: the verbs of the service API client. Parses the arguments into calls
//! of [`ServiceClient`], prints each answer as pretty JSON on stdout, and turns failures into one
//! line on stderr (`error: DeviceNotFound (404001): ...`) and an exit code: 1 when the hub or
//! the network said no, 2 for a usage or configuration mistake.
//!
//! Which hub: `--connection-string` (or `IOTHUB_CONNECTION_STRING`) names any hub; `--local`
//! reads the local hub's `hub.json` from `--state-dir` and trusts the CA it names.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::protocol::connection_string::ServiceConnectionString;
use crate::service::client::{ServiceClient, ServiceError};

/// Exit code when the hub or the network refused the request.
const EXIT_SERVICE: u8 = 1;
/// Exit code for a usage or configuration mistake.
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Service connection string of a shared access policy
    /// (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...).
    #[arg(long, env = "IOTHUB_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// Use the local hub (`simdevice hub`): read hub.json from --state-dir and trust its CA.
    /// Takes precedence over --connection-string.
    #[arg(long)]
    pub local: bool,
    /// The local hub's state directory [default: the per-user data directory]
    #[arg(long, env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A PEM file of extra CA certificates to trust besides the public roots.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: ServiceCommand,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Device identities in the registry.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Device twins.
    #[command(subcommand)]
    Twin(TwinCommand),
    /// Call a direct method on a device and print {"status": .., "payload": ..}.
    Invoke {
        device: String,
        method: String,
        /// The method's payload as JSON [default: null]
        payload: Option<String>,
        /// Seconds to wait for the device's answer (5..=300).
        #[arg(long, default_value_t = crate::protocol::method::DEFAULT_RESPONSE_TIMEOUT_SECS,
              value_parser = clap::value_parser!(u64).range(5..=300))]
        timeout: u64,
        /// Seconds the hub waits for an offline device to connect (0..=300) [default: 0]
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=300))]
        connect_timeout: Option<u64>,
    },
    /// Run an IoT Hub query (all pages), e.g. "SELECT * FROM devices WHERE status = 'enabled'".
    Query { sql: String },
    /// The telemetry the local hub received recently (a simdevice extension; not on Azure).
    Events {
        /// Only this device's events.
        device: Option<String>,
        /// Only events with a sequence number above this one.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many events [hub default: 1000]
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device; the hub generates its keys.
    Create {
        id: String,
        /// Register it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List device identities.
    List {
        /// At most this many devices.
        #[arg(long, default_value_t = 1000)]
        top: usize,
    },
    /// Show one device identity (with its keys).
    Show { id: String },
    /// Remove a device.
    Delete {
        id: String,
        /// Only if its etag is still this one [default: any]
        #[arg(long)]
        etag: Option<String>,
    },
    /// Let a device connect again.
    Enable { id: String },
    /// Refuse a device's connections (a connected device is disconnected).
    Disable { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Show a device's twin.
    Show { device: String },
    /// Merge tags and desired properties into a twin (null removes a key).
    Update {
        device: String,
        /// Tags to merge, as a JSON object.
        #[arg(long)]
        tags: Option<String>,
        /// Desired properties to merge, as a JSON object.
        #[arg(long)]
        desired: Option<String>,
        /// Only if the twin's etag is still this one [default: any]
        #[arg(long)]
        etag: Option<String>,
    },
}

/// Runs one `simdevice service` verb: JSON on stdout, an error line on stderr, an exit code.
pub async fn run(args: ServiceArgs) -> ExitCode {
    let mut stdout = std::io::stdout();
    match execute(args, &mut stdout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(exit_code(&error))
        }
    }
}

/// The exit code for an error: 2 for usage and configuration mistakes, 1 otherwise.
pub fn exit_code(error: &ServiceError) -> u8 {
    if error.is_usage() {
        EXIT_USAGE
    } else {
        EXIT_SERVICE
    }
}

/// Runs one verb and writes its JSON answer (pretty, one trailing newline) to `out`.
pub async fn execute(args: ServiceArgs, out: &mut impl Write) -> Result<(), ServiceError> {
    let client = connect(&args)?;
    let answer = match args.command {
        ServiceCommand::Device(command) => device(&client, command).await?,
        ServiceCommand::Twin(command) => twin(&client, command).await?,
        ServiceCommand::Invoke {
            device,
            method,
            payload,
            timeout,
            connect_timeout,
        } => {
            let payload = match payload {
                None => Value::Null,
                Some(text) => parse_json("PAYLOAD", &text)?,
            };
            client
                .invoke_method(&device, &method, payload, Some(timeout), connect_timeout)
                .await?
        }
        ServiceCommand::Query { sql } => Value::Array(client.query(&sql).await?),
        ServiceCommand::Events {
            device,
            after,
            limit,
        } => {
            client
                .recent_events(device.as_deref(), after, limit)
                .await?
        }
    };
    write_json(out, &answer)
}

async fn device(client: &ServiceClient, command: DeviceCommand) -> Result<Value, ServiceError> {
    match command {
        DeviceCommand::Create { id, disabled } => client.create_device(&id, !disabled).await,
        DeviceCommand::List { top } => client.list_devices(top).await,
        DeviceCommand::Show { id } => client.get_device(&id).await,
        DeviceCommand::Delete { id, etag } => {
            client.delete_device(&id, etag.as_deref()).await?;
            Ok(json!({ "deviceId": id, "deleted": true }))
        }
        DeviceCommand::Enable { id } => client.set_device_status(&id, true).await,
        DeviceCommand::Disable { id } => client.set_device_status(&id, false).await,
    }
}

async fn twin(client: &ServiceClient, command: TwinCommand) -> Result<Value, ServiceError> {
    match command {
        TwinCommand::Show { device } => client.get_twin(&device).await,
        TwinCommand::Update {
            device,
            tags,
            desired,
            etag,
        } => {
            let patch = twin_patch(tags.as_deref(), desired.as_deref())?;
            client.update_twin(&device, &patch, etag.as_deref()).await
        }
    }
}

/// `{"tags": .., "properties": {"desired": ..}}` from the `--tags` and `--desired` JSON.
fn twin_patch(tags: Option<&str>, desired: Option<&str>) -> Result<Value, ServiceError> {
    if tags.is_none() && desired.is_none() {
        return Err(ServiceError::InvalidInput(
            "twin update needs --tags or --desired (or both)".to_string(),
        ));
    }
    let mut patch = Map::new();
    if let Some(text) = tags {
        patch.insert("tags".into(), parse_object("--tags", text)?);
    }
    if let Some(text) = desired {
        patch.insert(
            "properties".into(),
            json!({ "desired": parse_object("--desired", text)? }),
        );
    }
    Ok(Value::Object(patch))
}

fn parse_json(what: &str, text: &str) -> Result<Value, ServiceError> {
    serde_json::from_str(text)
        .map_err(|e| ServiceError::InvalidInput(format!("{what} is not valid JSON: {e}")))
}

fn parse_object(what: &str, text: &str) -> Result<Value, ServiceError> {
    let value = parse_json(what, text)?;
    if !value.is_object() {
        return Err(ServiceError::InvalidInput(format!(
            "{what} must be a JSON object, like '{{\"key\": \"value\"}}'"
        )));
    }
    Ok(value)
}

fn write_json(out: &mut impl Write, value: &Value) -> Result<(), ServiceError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ServiceError::Transport(format!("cannot format the answer: {e}")))?;
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| ServiceError::Transport(format!("cannot write the answer: {e}")))
}

/// The client for the hub the arguments name: the local hub's `hub.json` with `--local`, else
/// the connection string.
fn connect(args: &ServiceArgs) -> Result<ServiceClient, ServiceError> {
    let mut ca_pem = String::new();
    let connection_string = if args.local {
        let state_dir = args
            .state_dir
            .clone()
            .unwrap_or_else(crate::common::local_hub::default_state_dir);
        let info = crate::common::local_hub::HubInfo::read(&state_dir).map_err(|e| {
            ServiceError::Config(format!(
                "no usable local hub state in {} ({e}); start one with `simdevice hub`",
                state_dir.display()
            ))
        })?;
        ca_pem.push_str(&read_ca(&info.ca_file)?);
        info.service_connection_string
    } else {
        args.connection_string.clone().ok_or_else(|| {
            ServiceError::Config(
                "no hub given: pass --connection-string (or set IOTHUB_CONNECTION_STRING), \
                 or --local for the local hub"
                    .to_string(),
            )
        })?
    };
    let connection_string: ServiceConnectionString = connection_string
        .parse()
        .map_err(|e| ServiceError::Config(format!("service connection string: {e}")))?;
    if let Some(path) = &args.ca_file {
        ca_pem.push('\n');
        ca_pem.push_str(&read_ca(path)?);
    }
    let extra = (!ca_pem.trim().is_empty()).then_some(ca_pem.as_str());
    ServiceClient::new(&connection_string, extra)
}

fn read_ca(path: &std::path::Path) -> Result<String, ServiceError> {
    std::fs::read_to_string(path)
        .map_err(|e| ServiceError::Config(format!("CA file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_patch_shapes_and_refusals() {
        assert_eq!(
            twin_patch(Some(r#"{"plant":"Redmond43"}"#), Some(r#"{"x":2}"#)).unwrap(),
            json!({"tags": {"plant": "Redmond43"}, "properties": {"desired": {"x": 2}}})
        );
        assert_eq!(
            twin_patch(None, Some(r#"{"x":null}"#)).unwrap(),
            json!({"properties": {"desired": {"x": null}}})
        );
        assert!(twin_patch(None, None).unwrap_err().is_usage());
        let error = twin_patch(Some("{oops"), None).unwrap_err();
        assert!(
            error.to_string().starts_with("--tags is not valid JSON"),
            "{error}"
        );
        let error = twin_patch(None, Some("[1]")).unwrap_err();
        assert!(error
            .to_string()
            .contains("--desired must be a JSON object"));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(&ServiceError::Config("x".into())), 2);
        assert_eq!(exit_code(&ServiceError::InvalidInput("x".into())), 2);
        assert_eq!(exit_code(&ServiceError::Transport("x".into())), 1);
        assert_eq!(
            exit_code(&crate::service::client::parse_hub_error(404, None, "")),
            1
        );
    }
}
