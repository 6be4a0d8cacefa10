//! `simdevice service ...`: the verbs of the service API client. Parses the arguments into calls
//! of [`ServiceClient`] and prints each answer as pretty JSON on stdout. Failures go back to
//! `main` as a [`ServiceCommandError`] with their causes as its source chain; `main` prints them
//! and picks the exit code from [`ServiceCommandError::is_usage`] (2 for a usage or
//! configuration mistake, 1 when the hub or the network said no). Nothing here writes to stderr.
//!
//! Which hub: `--connection-string` (or `IOTHUB_CONNECTION_STRING`) names any hub; `--local`
//! reads the local hub's `hub.json` from `--state-dir` and trusts the CA it names. These
//! connection options are global to `service`: they may come before or after the verb, as with
//! `az iot hub ... --login`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::common::local_hub::{HubInfo, HubInfoError};
use crate::protocol::connection_string::{ConnectionStringError, ServiceConnectionString};
use crate::service::client::{ServiceClient, ServiceError};

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Service connection string of a shared access policy
    /// (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...).
    #[arg(
        long,
        global = true,
        env = "IOTHUB_CONNECTION_STRING",
        hide_env_values = true
    )]
    pub connection_string: Option<String>,
    /// Use the local hub (`simdevice hub`): read hub.json from --state-dir and trust its CA.
    /// Takes precedence over --connection-string.
    #[arg(long, global = true)]
    pub local: bool,
    /// The local hub's state directory [default: the per-user data directory]
    #[arg(long, global = true, env = "SIMDEVICE_HUB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A PEM file of extra CA certificates to trust besides the public roots.
    #[arg(long, global = true)]
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
    /// Enrollments of a Device Provisioning Service (the local hub's with --local, which reads
    /// dps_service_connection_string from hub.json; else --connection-string is the DPS's).
    #[command(subcommand)]
    Dps(DpsCommand),
    /// Run an IoT Hub query (all pages), e.g. "SELECT * FROM devices WHERE status = 'enabled'".
    Query { sql: String },
    /// X.509 certificates of the local hub (a simdevice extension; Azure manages CA
    /// certificates through its management API): the CAs `certificateAuthority` devices chain
    /// to, and device certificates for tests and demos.
    #[command(subcommand)]
    Certificate(CertificateCommand),
    /// Stream the events of the hub's built-in endpoint as they arrive, one JSON line each, like
    /// `az iot hub monitor-events`: over AMQP, following IoT Hub's redirect to its Event
    /// Hubs-compatible endpoint, from every partition. Takes the service connection string (a
    /// policy with ServiceConnect), or an Event Hubs connection string (Endpoint=sb://...).
    /// Ctrl-C ends it.
    Monitor {
        /// Only this device's events.
        device: Option<String>,
        /// The consumer group to read as.
        #[arg(long, default_value = "$Default")]
        consumer_group: String,
        /// Where to start: `start` (the oldest retained event), `now`, or a time (RFC 3339, or
        /// milliseconds since the epoch).
        #[arg(long, default_value = "now")]
        from: String,
        /// Show the system and application properties and the annotations too.
        #[arg(long)]
        properties: bool,
        /// The hub's AMQPS port [default: 5671; with --local, the local hub's]
        #[arg(long)]
        amqp_port: Option<u16>,
    },
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
pub enum CertificateCommand {
    /// Trust a CA certificate (PEM) for devices registered as `certificateAuthority`; kept in
    /// the hub's state. The hub does not get its key, so it cannot issue with it.
    Add { name: String, file: PathBuf },
    /// Have the hub create a CA (ECDSA P-256, CN = NAME) and keep its private key in its state
    /// (hub.db, private to the hub's user), so that `issue --ca NAME` can sign with it.
    CreateCa { name: String },
    /// List the CA certificates the hub trusts.
    List,
    /// Show one CA certificate.
    Show { name: String },
    /// Stop trusting a CA certificate (one given with `hub --x509-ca` cannot be removed).
    Delete { name: String },
    /// Have the hub issue a device certificate, CN = DEVICE, with a new key: signed by the CA
    /// NAME (one made with `create-ca`: the CA's key never leaves the hub) or self-signed. Writes
    /// DIR/DEVICE.pem and DIR/DEVICE.key (mode 0600) and prints both thumbprints (for a
    /// `selfSigned` device). The key travels once, in the answer over HTTPS.
    #[command(group(clap::ArgGroup::new("signer").required(true).args(["ca", "self_signed"])))]
    Issue {
        device: String,
        /// Sign with this CA of the hub.
        #[arg(long, value_name = "NAME")]
        ca: Option<String>,
        /// Self-signed (for a `selfSigned` device).
        #[arg(long)]
        self_signed: bool,
        /// Where to write DEVICE.pem and DEVICE.key.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days of validity from today; negative gives a certificate that has already expired
        /// (to test refusals).
        #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
        days: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device (the hub generates its keys), or a numbered range of devices whose
    /// keys derive from a group key (--prefix, --count, --group-key), 100 per bulk call.
    Create {
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        id: Option<String>,
        /// Register it (them) disabled.
        #[arg(long)]
        disabled: bool,
        /// The ids' prefix: PREFIX + the number, zero-padded to the width of the last
        /// (door-00001 ... door-10000).
        #[arg(long, requires_all = ["count", "group_key"])]
        prefix: Option<String>,
        /// How many devices.
        #[arg(long, requires = "prefix", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// The first number.
        #[arg(long, requires = "prefix", default_value_t = 1)]
        first: u64,
        /// The group key (base64): each device's key is derived from it with the DPS
        /// group-enrollment derivation, so no per-device key needs to be handed out.
        #[arg(
            long,
            requires = "prefix",
            env = "SIMDEVICE_GROUP_KEY",
            hide_env_values = true
        )]
        group_key: Option<String>,
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
pub enum DpsCommand {
    /// Enrollment groups (symmetric key: each device's key derives from the group's; or X.509
    /// with --x509-ca NAME | --certificate FILE: each device's certificate chains to that CA).
    #[command(subcommand)]
    EnrollmentGroup(EnrollmentCommand),
    /// Individual enrollments (symmetric key, or X.509 with --certificate FILE: the device's
    /// own certificate, whose CN is the registration id), by registration id.
    #[command(subcommand)]
    Enrollment(EnrollmentCommand),
}

#[derive(Debug, Subcommand)]
pub enum EnrollmentCommand {
    /// Create (or replace) one; DPS generates the keys unless --key is given.
    Create {
        id: String,
        /// The primary key (base64; also the secondary) [default: generated]
        #[arg(long, hide_env_values = true, conflicts_with_all = ["x509_ca", "certificate"])]
        key: Option<String>,
        /// Enrollment groups: X.509 attestation by a CA certificate the hub has, by name
        /// (`service certificate add|create-ca`): `x509.caReferences`.
        #[arg(long, value_name = "NAME", conflicts_with = "certificate")]
        x509_ca: Option<String>,
        /// X.509 attestation by a certificate (PEM): an enrollment group's signing CA
        /// (`x509.signingCertificates`), or an individual enrollment's device certificate
        /// (`x509.clientCertificates`).
        #[arg(long, value_name = "FILE")]
        certificate: Option<PathBuf>,
        /// The initial twin of devices it creates, as JSON: {"tags":{..},"properties":{"desired":{..}}}
        #[arg(long)]
        initial_twin: Option<String>,
        /// Individual enrollments: the device id to create [default: the registration id]
        #[arg(long)]
        device_id: Option<String>,
        /// Create it disabled (registrations are refused).
        #[arg(long)]
        disabled: bool,
        /// Only if its etag is still this one (a replace) [default: any]
        #[arg(long)]
        etag: Option<String>,
    },
    /// Show one (with its keys).
    Show { id: String },
    /// List them all.
    List,
    /// Remove one.
    Delete {
        id: String,
        /// Only if its etag is still this one [default: any]
        #[arg(long)]
        etag: Option<String>,
    },
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

/// Why a `simdevice service` verb failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceCommandError {
    /// The service call failed: the hub's error, the network, or the client refused the input.
    /// Its own message is the whole story, so it is shown as it is.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// Neither `--connection-string` (nor its environment variable) nor `--local`.
    #[error(
        "no hub given: pass --connection-string (or set IOTHUB_CONNECTION_STRING), \
         or --local for the local hub"
    )]
    NoHub,
    /// `--local`, but the state directory has no usable `hub.json`.
    #[error("no usable local hub state in {} (start one with `simdevice hub`)", .state_dir.display())]
    LocalHub {
        state_dir: PathBuf,
        #[source]
        source: HubInfoError,
    },
    /// The CA file (`--ca-file`, or the one `hub.json` names) cannot be read.
    #[error("cannot read the CA file {}", .path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The service connection string does not parse. Its text (which holds the key) is not shown.
    #[error("the service connection string is not usable")]
    ConnectionString(#[source] ConnectionStringError),
    /// A JSON argument does not parse.
    #[error("{what} is not valid JSON")]
    NotJson {
        /// The argument: `PAYLOAD`, `--tags`, `--desired`.
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A JSON argument that must be an object is something else.
    #[error("{what} must be a JSON object, like '{{\"key\": \"value\"}}'")]
    NotObject { what: &'static str },
    /// `twin update` with nothing to update.
    #[error("twin update needs --tags or --desired (or both)")]
    EmptyTwinUpdate,
    /// `device create` without an id, or without all of --prefix, --count and --group-key.
    #[error("device create needs an ID, or --prefix with --count and --group-key")]
    RangeIncomplete,
    /// The numbered range does not fit (`--first` + `--count` past 2^64).
    #[error("--first {first} with --count {count} goes past the largest number")]
    RangeTooLarge { first: u64, count: u64 },
    /// An id of the range is not a valid device id (a bad --prefix).
    #[error("--prefix {prefix:?} makes an invalid device id")]
    BadPrefix {
        prefix: String,
        #[source]
        source: crate::protocol::identity::DeviceIdError,
    },
    /// The group key is not base64.
    #[error("--group-key is not a usable key")]
    GroupKey(#[source] crate::protocol::sas::SasError),
    /// The answer cannot be written to stdout (a closed pipe, a full disk).
    #[error("cannot write the answer to stdout")]
    Output(#[source] std::io::Error),
    /// `dps enrollment create --x509-ca`: CA references are for enrollment groups.
    #[error("--x509-ca is for enrollment groups; an individual enrollment takes --certificate (the device's own)")]
    X509CaForIndividual,
    /// `certificate add`: the file cannot be read.
    #[error("cannot read the certificate file {path}")]
    CertificateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `certificate issue`: a file cannot be written.
    #[error("cannot write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `certificate issue`: the hub's answer lacks a field.
    #[error("the hub's answer to the certificate request lacks {0:?}")]
    IssueAnswer(&'static str),
    /// `monitor` failed: the connection, the login, the redirect or a receiver.
    #[error(transparent)]
    Monitor(#[from] crate::service::monitor::MonitorError),
}

impl ServiceCommandError {
    /// True for a mistake in the command line or the configuration (`main` exits 2); false when
    /// the hub or the network said no, or the answer could not be written (`main` exits 1).
    pub fn is_usage(&self) -> bool {
        match self {
            ServiceCommandError::Service(error) => error.is_usage(),
            ServiceCommandError::Monitor(error) => error.is_usage(),
            ServiceCommandError::NoHub
            | ServiceCommandError::LocalHub { .. }
            | ServiceCommandError::CaFile { .. }
            | ServiceCommandError::ConnectionString(_)
            | ServiceCommandError::NotJson { .. }
            | ServiceCommandError::NotObject { .. }
            | ServiceCommandError::EmptyTwinUpdate
            | ServiceCommandError::RangeIncomplete
            | ServiceCommandError::RangeTooLarge { .. }
            | ServiceCommandError::BadPrefix { .. }
            | ServiceCommandError::GroupKey(_)
            | ServiceCommandError::X509CaForIndividual
            | ServiceCommandError::CertificateFile { .. } => true,
            ServiceCommandError::Output(_)
            | ServiceCommandError::WriteFile { .. }
            | ServiceCommandError::IssueAnswer(_) => false,
        }
    }

    /// The hub's six-digit IoT Hub error code, when the hub answered with one.
    pub fn code(&self) -> Option<u32> {
        match self {
            ServiceCommandError::Service(error) => error.code(),
            _ => None,
        }
    }

    /// The HTTP status, when the hub answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ServiceCommandError::Service(error) => error.status(),
            _ => None,
        }
    }
}

/// Runs one `simdevice service` verb and prints its answer as pretty JSON on stdout.
pub async fn run(args: ServiceArgs) -> Result<(), ServiceCommandError> {
    execute(args, &mut std::io::stdout().lock()).await
}

/// Runs one verb and writes its JSON answer (pretty, one trailing newline) to `out`.
pub async fn execute(args: ServiceArgs, out: &mut impl Write) -> Result<(), ServiceCommandError> {
    if matches!(args.command, ServiceCommand::Monitor { .. }) {
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        let signals = tokio::spawn(async move {
            wait_for_signal().await;
            on_signal.cancel();
        });
        let result = monitor(&args, out, stop).await;
        signals.abort();
        return result;
    }
    let client = connect(&args)?;
    let answer = match args.command {
        ServiceCommand::Dps(command) => dps(&client, command).await?,
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
        // Served above, before any REST client is made.
        ServiceCommand::Monitor { .. } => return Ok(()),
        ServiceCommand::Query { sql } => Value::Array(client.query(&sql).await?),
        ServiceCommand::Certificate(command) => certificate(&client, command).await?,
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

async fn dps(client: &ServiceClient, command: DpsCommand) -> Result<Value, ServiceCommandError> {
    let (collection, id_field, command) = match command {
        DpsCommand::EnrollmentGroup(c) => ("enrollmentGroups", "enrollmentGroupId", c),
        DpsCommand::Enrollment(c) => ("enrollments", "registrationId", c),
    };
    match command {
        EnrollmentCommand::Create {
            id,
            key,
            x509_ca,
            certificate,
            initial_twin,
            device_id,
            disabled,
            etag,
        } => {
            let group = collection == "enrollmentGroups";
            let attestation = match (x509_ca, certificate) {
                (Some(_), _) if !group => return Err(ServiceCommandError::X509CaForIndividual),
                (Some(name), _) => json!({"type": "x509", "x509": {
                    "caReferences": {"primary": name}}}),
                (None, Some(path)) => {
                    let pem = std::fs::read_to_string(&path)
                        .map_err(|source| ServiceCommandError::CertificateFile { path, source })?;
                    let field = if group {
                        "signingCertificates"
                    } else {
                        "clientCertificates"
                    };
                    json!({"type": "x509", "x509": {
                        field: {"primary": {"certificate": pem}}}})
                }
                (None, None) => json!({"type": "symmetricKey", "symmetricKey": {
                    "primaryKey": key.clone().unwrap_or_default(),
                    "secondaryKey": key.unwrap_or_default()}}),
            };
            let mut body = json!({
                id_field: id,
                "attestation": attestation,
                "provisioningStatus": if disabled { "disabled" } else { "enabled" },
            });
            if let Some(text) = initial_twin {
                let twin = parse_json("--initial-twin", &text)?;
                if !twin.is_object() {
                    return Err(ServiceCommandError::NotObject {
                        what: "--initial-twin",
                    });
                }
                body["initialTwin"] = twin;
            }
            if let Some(device_id) = device_id {
                body["deviceId"] = json!(device_id);
            }
            Ok(client
                .dps_put(collection, &id, &body, etag.as_deref())
                .await?)
        }
        EnrollmentCommand::Show { id } => Ok(client.dps_get(collection, &id).await?),
        EnrollmentCommand::List => Ok(client.dps_list(collection).await?),
        EnrollmentCommand::Delete { id, etag } => {
            client.dps_delete(collection, &id, etag.as_deref()).await?;
            Ok(json!({ id_field: id, "deleted": true }))
        }
    }
}

async fn device(
    client: &ServiceClient,
    command: DeviceCommand,
) -> Result<Value, ServiceCommandError> {
    match command {
        DeviceCommand::Create {
            id: Some(id),
            disabled,
            ..
        } => Ok(client.create_device(&id, !disabled).await?),
        DeviceCommand::Create {
            id: None,
            disabled,
            prefix,
            count,
            first,
            group_key,
        } => {
            let (Some(prefix), Some(count), Some(group_key)) = (prefix, count, group_key) else {
                // clap's `requires` makes this unreachable; say so rather than panic.
                return Err(ServiceCommandError::RangeIncomplete);
            };
            create_range(client, &prefix, first, count, &group_key, !disabled).await
        }
        DeviceCommand::List { top } => Ok(client.list_devices(top).await?),
        DeviceCommand::Show { id } => Ok(client.get_device(&id).await?),
        DeviceCommand::Delete { id, etag } => {
            client.delete_device(&id, etag.as_deref()).await?;
            Ok(json!({ "deviceId": id, "deleted": true }))
        }
        DeviceCommand::Enable { id } => Ok(client.set_device_status(&id, true).await?),
        DeviceCommand::Disable { id } => Ok(client.set_device_status(&id, false).await?),
    }
}

async fn certificate(
    client: &ServiceClient,
    command: CertificateCommand,
) -> Result<Value, ServiceCommandError> {
    match command {
        CertificateCommand::Add { name, file } => {
            let pem = std::fs::read_to_string(&file).map_err(|source| {
                ServiceCommandError::CertificateFile {
                    path: file.clone(),
                    source,
                }
            })?;
            Ok(client.add_certificate(&name, &pem).await?)
        }
        CertificateCommand::CreateCa { name } => Ok(client.generate_certificate(&name).await?),
        CertificateCommand::List => Ok(client.list_certificates().await?),
        CertificateCommand::Show { name } => Ok(client.get_certificate(&name).await?),
        CertificateCommand::Delete { name } => {
            client.delete_certificate(&name).await?;
            Ok(json!({ "name": name, "deleted": true }))
        }
        CertificateCommand::Issue {
            device,
            ca,
            self_signed: _,
            out,
            days,
        } => {
            let answer = client
                .issue_certificate(&device, ca.as_deref(), days)
                .await?;
            let field = |name: &'static str| {
                answer[name]
                    .as_str()
                    .ok_or(ServiceCommandError::IssueAnswer(name))
            };
            let cert_path = out.join(format!("{device}.pem"));
            let key_path = out.join(format!("{device}.key"));
            let write_error = |path: &Path| {
                let path = path.to_owned();
                move |source| ServiceCommandError::WriteFile { path, source }
            };
            std::fs::create_dir_all(&out).map_err(write_error(&out))?;
            write_private(&key_path, field("privateKey")?).map_err(write_error(&key_path))?;
            std::fs::write(&cert_path, field("certificate")?).map_err(write_error(&cert_path))?;
            Ok(json!({
                "deviceId": device,
                "certificateFile": cert_path,
                "keyFile": key_path,
                "thumbprintSha1": answer["thumbprintSha1"],
                "thumbprintSha256": answer["thumbprintSha256"],
                "notAfter": answer["notAfter"],
                "ca": ca,
            }))
        }
    }
}

/// Writes a private key readable by its owner only (0600, also when the file existed).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Registers `prefix` + `first ..` (`count` devices) with keys derived from `group_key`, through
/// bulk registry calls of 100. Every id and key is checked before the first call. Prints what
/// was created and each device the hub refused (an id that exists already, say).
async fn create_range(
    client: &ServiceClient,
    prefix: &str,
    first: u64,
    count: u64,
    group_key: &str,
    enabled: bool,
) -> Result<Value, ServiceCommandError> {
    use crate::protocol::{identity, sas};
    let ids = identity::numbered_ids(prefix, first, count)
        .ok_or(ServiceCommandError::RangeTooLarge { first, count })?;
    let status = if enabled { "enabled" } else { "disabled" };
    let mut operations = Vec::new();
    for id in ids {
        identity::validate_device_id(&id).map_err(|source| ServiceCommandError::BadPrefix {
            prefix: prefix.to_owned(),
            source,
        })?;
        let key = sas::derive_device_key(group_key, &id).map_err(ServiceCommandError::GroupKey)?;
        operations.push(json!({
            "id": id,
            "importMode": "create",
            "status": status,
            "authentication": {
                "type": "sas",
                "symmetricKey": {"primaryKey": key, "secondaryKey": key},
            },
        }));
    }
    let (mut created, mut errors) = (0u64, Vec::new());
    for chunk in operations.chunks(crate::service::client::BULK_MAX_DEVICES) {
        let result = client.bulk_registry(chunk).await?;
        let failed = result["errors"].as_array().cloned().unwrap_or_default();
        created += (chunk.len() - failed.len().min(chunk.len())) as u64;
        errors.extend(failed);
    }
    Ok(json!({"created": created, "failed": errors.len(), "errors": errors}))
}

async fn twin(client: &ServiceClient, command: TwinCommand) -> Result<Value, ServiceCommandError> {
    match command {
        TwinCommand::Show { device } => Ok(client.get_twin(&device).await?),
        TwinCommand::Update {
            device,
            tags,
            desired,
            etag,
        } => {
            let patch = twin_patch(tags.as_deref(), desired.as_deref())?;
            Ok(client.update_twin(&device, &patch, etag.as_deref()).await?)
        }
    }
}

/// `{"tags": .., "properties": {"desired": ..}}` from the `--tags` and `--desired` JSON.
fn twin_patch(tags: Option<&str>, desired: Option<&str>) -> Result<Value, ServiceCommandError> {
    if tags.is_none() && desired.is_none() {
        return Err(ServiceCommandError::EmptyTwinUpdate);
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

fn parse_json(what: &'static str, text: &str) -> Result<Value, ServiceCommandError> {
    serde_json::from_str(text).map_err(|source| ServiceCommandError::NotJson { what, source })
}

fn parse_object(what: &'static str, text: &str) -> Result<Value, ServiceCommandError> {
    let value = parse_json(what, text)?;
    if !value.is_object() {
        return Err(ServiceCommandError::NotObject { what });
    }
    Ok(value)
}

fn write_json(out: &mut impl Write, value: &Value) -> Result<(), ServiceCommandError> {
    // A `Value` has only string keys and finite numbers, so it always serializes.
    let text = serde_json::to_string_pretty(value).expect("a serde_json::Value always serializes");
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(ServiceCommandError::Output)
}

/// With `--local`: the local hub's `hub.json` (from `--state-dir` or the default), its CA added
/// to `ca_pem`.
fn local_hub(args: &ServiceArgs, ca_pem: &mut String) -> Result<HubInfo, ServiceCommandError> {
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(crate::common::local_hub::default_state_dir);
    let info = match HubInfo::read(&state_dir) {
        Ok(info) => info,
        Err(source) => return Err(ServiceCommandError::LocalHub { state_dir, source }),
    };
    ca_pem.push_str(&read_ca(&info.ca_file)?);
    Ok(info)
}

/// The client for the hub the arguments name: the local hub's `hub.json` with `--local`, else
/// the connection string.
fn connect(args: &ServiceArgs) -> Result<ServiceClient, ServiceCommandError> {
    let mut ca_pem = String::new();
    let connection_string = if args.local {
        let info = local_hub(args, &mut ca_pem)?;
        // `service dps ...` talks to the local DPS, with its own policy.
        match (&args.command, info.dps_service_connection_string) {
            (ServiceCommand::Dps(_), Some(dps)) => dps,
            _ => info.service_connection_string,
        }
    } else {
        args.connection_string
            .clone()
            .ok_or(ServiceCommandError::NoHub)?
    };
    let connection_string: ServiceConnectionString = connection_string
        .parse()
        .map_err(ServiceCommandError::ConnectionString)?;
    if let Some(path) = &args.ca_file {
        ca_pem.push('\n');
        ca_pem.push_str(&read_ca(path)?);
    }
    let extra = (!ca_pem.trim().is_empty()).then_some(ca_pem.as_str());
    Ok(ServiceClient::new(&connection_string, extra)?)
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `service monitor`: the target from `--local` (hub.json: the service connection string, the
/// AMQP port, the CA) or the connection string (a service one, or an Event Hubs one), then
/// every event as one compact JSON line on `out` until `stop`.
async fn monitor(
    args: &ServiceArgs,
    out: &mut impl Write,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), ServiceCommandError> {
    use crate::service::monitor::{self as m, Options, StartFrom, Target};
    let ServiceCommand::Monitor {
        device,
        consumer_group,
        from,
        properties,
        amqp_port,
    } = &args.command
    else {
        return Ok(());
    };
    let options = Options {
        device: device.clone(),
        consumer_group: consumer_group.clone(),
        from: StartFrom::parse(from)?,
        properties: *properties,
    };
    let mut ca_pem = String::new();
    let target = if args.local {
        let info = local_hub(args, &mut ca_pem)?;
        Target::IotHub {
            connection_string: info
                .service_connection_string
                .parse()
                .map_err(ServiceCommandError::ConnectionString)?,
            port: amqp_port.or(info.amqp_port).unwrap_or(m::AMQPS_PORT),
        }
    } else {
        let text = args
            .connection_string
            .as_deref()
            .ok_or(ServiceCommandError::NoHub)?;
        if text
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("endpoint=")
        {
            let mut endpoint = m::parse_event_hub_connection_string(text)?;
            if let Some(port) = amqp_port {
                endpoint.port = *port;
            }
            Target::EventHub(endpoint)
        } else {
            Target::IotHub {
                connection_string: text
                    .parse()
                    .map_err(ServiceCommandError::ConnectionString)?,
                port: amqp_port.unwrap_or(m::AMQPS_PORT),
            }
        }
    };
    if let Some(path) = &args.ca_file {
        ca_pem.push('\n');
        ca_pem.push_str(&read_ca(path)?);
    }
    let extra = (!ca_pem.trim().is_empty()).then_some(ca_pem);
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel(m::QUEUE);
    let reader = tokio::spawn({
        let stop = stop.clone();
        async move { m::monitor(target, options, extra.as_deref(), lines_tx, stop).await }
    });
    let mut written = Ok(());
    while let Some(line) = lines.recv().await {
        if let Err(error) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            // A closed pipe: stop reading, the events go nowhere.
            written = Err(ServiceCommandError::Output(error));
            stop.cancel();
            break;
        }
    }
    drop(lines);
    match reader.await {
        Ok(result) => written.and(Ok(result?)),
        // The reader panicked: say so rather than exit 0.
        Err(error) => Err(ServiceCommandError::Output(std::io::Error::other(error))),
    }
}

fn read_ca(path: &Path) -> Result<String, ServiceCommandError> {
    std::fs::read_to_string(path).map_err(|source| ServiceCommandError::CaFile {
        path: path.to_owned(),
        source,
    })
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
    fn json_arguments_keep_the_parser_error_as_source() {
        let error = parse_json("PAYLOAD", "{oops").unwrap_err();
        assert_eq!(error.to_string(), "PAYLOAD is not valid JSON");
        let source = std::error::Error::source(&error).expect("the serde_json error");
        assert!(source.to_string().contains("line 1"), "{source}");
        assert!(error.is_usage());
    }

    #[test]
    fn usage_or_not() {
        assert!(ServiceCommandError::NoHub.is_usage());
        assert!(ServiceCommandError::EmptyTwinUpdate.is_usage());
        let hub_said_no =
            ServiceCommandError::from(crate::service::client::parse_hub_error(404, None, ""));
        assert!(!hub_said_no.is_usage());
        assert_eq!(hub_said_no.status(), Some(404));
        assert!(!ServiceCommandError::Output(std::io::ErrorKind::BrokenPipe.into()).is_usage());
    }

    fn args(argv: &[&str]) -> ServiceArgs {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            service: ServiceArgs,
        }
        use clap::Parser;
        match Wrapper::try_parse_from(std::iter::once("service").chain(argv.iter().copied())) {
            Ok(wrapper) => wrapper.service,
            Err(error) => panic!("{argv:?} does not parse: {error}"),
        }
    }

    #[test]
    fn no_hub_is_a_usage_error() {
        let mut no_hub = args(&["query", "SELECT * FROM devices"]);
        // Whatever the environment of the test run says.
        no_hub.connection_string = None;
        let error = connect(&no_hub).unwrap_err();
        assert!(matches!(error, ServiceCommandError::NoHub), "{error}");
        assert!(error.is_usage());
    }

    #[test]
    fn a_connection_string_that_does_not_parse_names_the_field_not_the_key() {
        let mut bad = args(&["device", "list"]);
        bad.local = false;
        bad.connection_string =
            Some("HostName=h;SharedAccessKeyName=p;SharedAccessKey=not base64!".into());
        let error = connect(&bad).unwrap_err();
        assert!(error.is_usage());
        let source = std::error::Error::source(&error).expect("the parse error");
        assert_eq!(
            source.to_string(),
            "connection string field 'SharedAccessKey' is not valid base64"
        );
        assert!(!format!("{error}: {source}").contains("not base64!"));
    }

    #[test]
    fn connection_options_parse_before_or_after_the_verb() {
        let before = args(&[
            "--local",
            "--state-dir",
            "/d",
            "--ca-file",
            "/ca.pem",
            "events",
            "door-01",
        ]);
        let after = args(&[
            "events",
            "door-01",
            "--local",
            "--state-dir",
            "/d",
            "--ca-file",
            "/ca.pem",
        ]);
        let nested = args(&[
            "device",
            "show",
            "x",
            "--state-dir",
            "/d",
            "--local",
            "--ca-file",
            "/ca.pem",
        ]);
        for parsed in [&before, &after, &nested] {
            assert!(parsed.local, "{parsed:?}");
            assert_eq!(
                parsed.state_dir.as_deref(),
                Some(Path::new("/d")),
                "{parsed:?}"
            );
            assert_eq!(
                parsed.ca_file.as_deref(),
                Some(Path::new("/ca.pem")),
                "{parsed:?}"
            );
        }
        assert!(matches!(
            &after.command,
            ServiceCommand::Events { device: Some(d), .. } if d == "door-01"
        ));
        assert!(matches!(
            &nested.command,
            ServiceCommand::Device(DeviceCommand::Show { id }) if id == "x"
        ));
        let cs = "HostName=h;SharedAccessKeyName=p;SharedAccessKey=a2V5";
        let given = args(&["twin", "show", "d1", "--connection-string", cs]);
        assert_eq!(given.connection_string.as_deref(), Some(cs));
        assert!(!given.local);
    }
}
