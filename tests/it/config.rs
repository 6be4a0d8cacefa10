//! The agent's configuration through its public API: defaults, the file, environment
//! overrides, and the errors a user sees (each naming the key and where the value came from).

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use simdevice::config::{Config, ConfigError, Identity, Secret};

const KEY: &str = "c2VjcmV0LWtleS1ieXRlcy1mb3ItdGVzdGluZw==";

fn identity_toml() -> String {
    format!(
        "[identity]\nhost_name = \"hub.example.net\"\ndevice_id = \"door-01\"\nkey = \"{KEY}\"\n"
    )
}

fn path() -> &'static Path {
    Path::new("/etc/simdevice/test.toml")
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_sources(Some((path(), text)), &env(pairs))
}

fn load_err(text: &str, pairs: &[(&str, &str)]) -> String {
    match load(text, pairs) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains(KEY), "the key leaked: {message}");
            message
        }
    }
}

fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn identity(host_name: &str, gateway: Option<&str>) -> Identity {
    Identity {
        host_name: host_name.to_string(),
        device_id: "d1".to_string(),
        key: Secret::new(KEY.to_string()),
        gateway_host_name: gateway.map(str::to_string),
        ca_file: None,
        x509: None,
    }
}

#[test]
fn defaults_fill_everything_but_the_identity() {
    let config = load(&identity_toml(), &[]).unwrap();
    assert_eq!(config.file.as_deref(), Some(path()));
    assert_eq!(config.identity.host_name, "hub.example.net");
    assert_eq!(config.identity.device_id, "door-01");
    assert_eq!(config.identity.key.expose(), KEY);
    assert_eq!(config.identity.gateway_host_name, None);
    assert_eq!(config.identity.ca_file, None);
    let c = &config.connection;
    assert_eq!(c.keep_alive, Duration::from_secs(240));
    assert_eq!(c.sas_lifetime, Duration::from_secs(3600));
    assert_eq!(c.renew_at, 0.8);
    assert_eq!(c.backoff_min, Duration::from_secs(1));
    assert_eq!(c.backoff_max, Duration::from_secs(60));
    assert_eq!(c.connect_timeout, Duration::from_secs(30));
    let t = &config.telemetry;
    assert_eq!(t.interval, Duration::from_secs(10));
    assert_eq!(t.queue_size, 1000);
    assert_eq!(t.seed, None);
    assert_eq!(t.temperature, (70.0, 100.0));
    assert_eq!(t.humidity, (70.0, 100.0));
    assert_eq!(t.uv, (0.0, 1.0));
    assert_eq!(config.connectivity.operator, "Contoso Mobile");
    assert_eq!(config.connectivity.technology, "LTE-M");
    assert!(config.methods.is_empty());

    let local = Config::for_identity(identity("localhost", None));
    assert_eq!(local.file, None);
    assert_eq!(local.telemetry.interval, Duration::from_secs(10));
    assert_eq!(local.connection.keep_alive, Duration::from_secs(240));
}

#[test]
fn the_file_overrides_defaults() {
    let text = format!(
        "{}\n[connection]\nkeep_alive_secs = 60\nsas_lifetime_secs = 2.5\nrenew_at = 0.5\n\
         backoff_min_secs = 0.25\nbackoff_max_secs = 5\nconnect_timeout_secs = 3\n\
         [telemetry]\ninterval_secs = 0.5\nqueue_size = 7\nseed = 42\n\
         temperature_min = -10\ntemperature_max = 40.5\nhumidity_min = 10\nhumidity_max = 20\n\
         uv_min = 0.2\nuv_max = 0.3\n\
         [connectivity]\noperator = \"Fabrikam\"\ntechnology = \"NB-IoT\"\n\
         [methods.reboot]\ncommand = [\"/usr/local/bin/reboot-device\", \"--now\"]\ntimeout_secs = 5\n\
         [methods.\"get.logs\"]\ncommand = [\"/bin/true\"]\n",
        identity_toml()
    );
    let config = load(&text, &[]).unwrap();
    let c = &config.connection;
    assert_eq!(c.keep_alive, Duration::from_secs(60));
    assert_eq!(c.sas_lifetime, Duration::from_millis(2500));
    assert_eq!(c.renew_at, 0.5);
    assert_eq!(c.backoff_min, Duration::from_millis(250));
    assert_eq!(c.backoff_max, Duration::from_secs(5));
    assert_eq!(c.connect_timeout, Duration::from_secs(3));
    let t = &config.telemetry;
    assert_eq!(t.interval, Duration::from_millis(500));
    assert_eq!(t.queue_size, 7);
    assert_eq!(t.seed, Some(42));
    assert_eq!(t.temperature, (-10.0, 40.5));
    assert_eq!(t.humidity, (10.0, 20.0));
    assert_eq!(t.uv, (0.2, 0.3));
    assert_eq!(config.connectivity.operator, "Fabrikam");
    assert_eq!(config.connectivity.technology, "NB-IoT");
    assert_eq!(config.methods.len(), 2);
    assert_eq!(config.methods[0].name, "get.logs");
    assert_eq!(config.methods[0].command, vec!["/bin/true"]);
    assert_eq!(config.methods[0].timeout, Duration::from_secs(30));
    assert_eq!(config.methods[1].name, "reboot");
    assert_eq!(
        config.methods[1].command,
        vec!["/usr/local/bin/reboot-device", "--now"]
    );
    assert_eq!(config.methods[1].timeout, Duration::from_secs(5));
}

#[test]
fn the_environment_overrides_the_file() {
    let text = format!("{}\n[telemetry]\ninterval_secs = 3\n", identity_toml());
    let config = load(
        &text,
        &[
            ("SIMDEVICE__TELEMETRY__INTERVAL_SECS", "5"),
            ("SIMDEVICE__IDENTITY__DEVICE_ID", "007"),
            ("SIMDEVICE__CONNECTION__RENEW_AT", "0.25"),
            ("SIMDEVICE__TELEMETRY__SEED", "18446744073709551615"),
            // Not ours: a single underscore after the prefix.
            ("SIMDEVICE_HUB_STATE_DIR", "/tmp/x"),
        ],
    )
    .unwrap();
    assert_eq!(config.telemetry.interval, Duration::from_secs(5));
    // Kept as text: not turned into the number 7.
    assert_eq!(config.identity.device_id, "007");
    assert_eq!(config.connection.renew_at, 0.25);
    assert_eq!(config.telemetry.seed, Some(u64::MAX));
    assert_eq!(config.identity.host_name, "hub.example.net");
}

#[test]
fn the_environment_alone_can_configure_a_device() {
    let config = Config::from_sources(
        None,
        &env(&[
            ("SIMDEVICE__IDENTITY__CONNECTION_STRING", &format!("HostName=h.example;DeviceId=d1;SharedAccessKey={KEY};GatewayHostName=localhost:18883")),
            ("SIMDEVICE__TELEMETRY__QUEUE_SIZE", "12"),
        ]),
    )
    .unwrap();
    assert_eq!(config.file, None);
    assert_eq!(config.identity.host_name, "h.example");
    assert_eq!(config.identity.device_id, "d1");
    assert_eq!(config.identity.key.expose(), KEY);
    assert_eq!(
        config.identity.connect_address(),
        ("localhost".to_string(), 18883)
    );
    assert_eq!(config.telemetry.queue_size, 12);
}

#[test]
fn an_unknown_key_is_named_with_the_file() {
    let message = load_err(
        &format!("{}\n[telemetry]\nintervall_secs = 3\n", identity_toml()),
        &[],
    );
    assert!(message.contains("telemetry.intervall_secs"), "{message}");
    assert!(message.contains("/etc/simdevice/test.toml"), "{message}");
    assert!(message.contains("interval_secs"), "{message}");

    let message = load_err(&format!("{}\n[telemetri]\n", identity_toml()), &[]);
    assert!(message.contains("telemetri"), "{message}");
    assert!(message.contains("/etc/simdevice/test.toml"), "{message}");

    let message = load_err(
        &format!(
            "{}\n[methods.x]\ncommand = [\"/bin/true\"]\ntimeout = 3\n",
            identity_toml()
        ),
        &[],
    );
    assert!(message.contains("methods.x.timeout"), "{message}");

    let message = load_err(&identity_toml(), &[("SIMDEVICE__TELEMETRY__BOGUS", "1")]);
    assert!(message.contains("telemetry.bogus"), "{message}");
    assert!(message.contains("SIMDEVICE__TELEMETRY__BOGUS"), "{message}");
}

#[test]
fn bad_values_name_their_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "connection",
            "keep_alive_secs = 4",
            "connection.keep_alive_secs",
        ),
        (
            "connection",
            "keep_alive_secs = 1178",
            "connection.keep_alive_secs",
        ),
        (
            "connection",
            "sas_lifetime_secs = 1",
            "connection.sas_lifetime_secs",
        ),
        ("connection", "renew_at = 0.05", "connection.renew_at"),
        ("connection", "renew_at = 0.96", "connection.renew_at"),
        (
            "connection",
            "backoff_min_secs = 0",
            "connection.backoff_min_secs",
        ),
        (
            "connection",
            "backoff_min_secs = 10\nbackoff_max_secs = 5",
            "connection.backoff_max_secs",
        ),
        (
            "connection",
            "connect_timeout_secs = 0",
            "connection.connect_timeout_secs",
        ),
        (
            "connection",
            "connect_timeout_secs = \"soon\"",
            "connection.connect_timeout_secs",
        ),
        (
            "telemetry",
            "interval_secs = 0.01",
            "telemetry.interval_secs",
        ),
        (
            "telemetry",
            "interval_secs = 86401",
            "telemetry.interval_secs",
        ),
        (
            "telemetry",
            "interval_secs = true",
            "telemetry.interval_secs",
        ),
        (
            "telemetry",
            "interval_secs = nan",
            "telemetry.interval_secs",
        ),
        ("telemetry", "queue_size = 0", "telemetry.queue_size"),
        ("telemetry", "queue_size = 1000001", "telemetry.queue_size"),
        ("telemetry", "queue_size = 1.5", "telemetry.queue_size"),
        ("telemetry", "seed = -1", "telemetry.seed"),
        (
            "telemetry",
            "temperature_min = 100",
            "telemetry.temperature_min",
        ),
        (
            "telemetry",
            "humidity_min = 50\nhumidity_max = 50",
            "telemetry.humidity_min",
        ),
        ("telemetry", "uv_max = inf", "telemetry.uv_max"),
        ("telemetry", "uv_min = [1]", "telemetry.uv_min"),
        ("connectivity", "operator = 5", "connectivity.operator"),
    ];
    for (section, line, key) in cases {
        let text = format!("{}\n[{section}]\n{line}\n", identity_toml());
        let message = load_err(&text, &[]);
        assert!(message.contains(key), "{line}: {message}");
        assert!(
            message.contains("/etc/simdevice/test.toml"),
            "{line}: {message}"
        );
    }

    let methods: &[(&str, &str)] = &[
        ("[methods.m]\ncommand = []", "methods.m.command"),
        ("[methods.m]\ncommand = [\"bin/x\"]", "methods.m.command"),
        ("[methods.m]\ncommand = \"/bin/x\"", "methods.m.command"),
        (
            "[methods.m]\ncommand = [\"/bin/x\", 1]",
            "methods.m.command",
        ),
        ("[methods.m]\ntimeout_secs = 5", "methods.m.command"),
        (
            "[methods.m]\ncommand = [\"/bin/x\"]\ntimeout_secs = 0.5",
            "methods.m.timeout_secs",
        ),
        (
            "[methods.m]\ncommand = [\"/bin/x\"]\ntimeout_secs = 301",
            "methods.m.timeout_secs",
        ),
        ("[methods.\"a/b\"]\ncommand = [\"/bin/x\"]", "methods.a/b"),
    ];
    for (table, key) in methods {
        let message = load_err(&format!("{}\n{table}\n", identity_toml()), &[]);
        assert!(message.contains(key), "{table}: {message}");
    }

    let identities: &[(&str, &str)] = &[
        (
            "host_name = \"hub.example.net\"\ndevice_id = \"door/01\"\nkey = \"a2V5\"",
            "identity.device_id",
        ),
        (
            "host_name = \"hub.example.net\"\ndevice_id = \"d\"\nkey = \"not base64!\"",
            "identity.key",
        ),
        (
            "host_name = \"hub example\"\ndevice_id = \"d\"\nkey = \"a2V5\"",
            "identity.host_name",
        ),
        (
            "host_name = \"h\"\ndevice_id = \"d\"\nkey = \"a2V5\"\ngateway_host_name = \"g:99999\"",
            "identity.gateway_host_name",
        ),
        ("device_id = \"d\"\nkey = \"a2V5\"", "identity.host_name"),
        ("host_name = \"h\"\nkey = \"a2V5\"", "identity.device_id"),
        ("host_name = \"h\"\ndevice_id = \"d\"", "identity.key"),
    ];
    for (body, key) in identities {
        let message = load_err(&format!("[identity]\n{body}\n"), &[]);
        assert!(message.contains(key), "{body}: {message}");
    }

    // A bad value from the environment says so.
    let message = load_err(
        &identity_toml(),
        &[("SIMDEVICE__TELEMETRY__INTERVAL_SECS", "fast")],
    );
    assert!(message.contains("telemetry.interval_secs"), "{message}");
    assert!(
        message.contains("environment variable SIMDEVICE__TELEMETRY__INTERVAL_SECS"),
        "{message}"
    );
}

#[test]
fn a_toml_syntax_error_names_the_file_and_hides_the_line() {
    let error = load(
        &format!("[identity]\nkey = \"{KEY}\nhost_name = \"h\"\n"),
        &[],
    )
    .unwrap_err();
    assert!(matches!(error, ConfigError::Parse { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("/etc/simdevice/test.toml"), "{message}");
    assert!(message.contains("line 2"), "{message}");
    assert!(!message.contains(KEY), "{message}");
}

#[test]
fn a_key_file_must_be_private() {
    let dir = tempfile::tempdir().unwrap();
    let text = |path: &Path| {
        format!(
            "[identity]\nhost_name = \"h\"\ndevice_id = \"d\"\nkey_file = \"{}\"\n",
            path.display()
        )
    };
    let open = write_file(dir.path(), "open.key", &format!("{KEY}\n"), 0o644);
    let error = load(&text(&open), &[]).unwrap_err();
    assert!(matches!(error, ConfigError::KeyFile { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("open.key"), "{message}");
    assert!(message.contains("0644"), "{message}");

    let private = write_file(dir.path(), "private.key", &format!("{KEY}\n"), 0o600);
    let config = load(&text(&private), &[]).unwrap();
    assert_eq!(config.identity.key.expose(), KEY);

    let garbage = write_file(dir.path(), "garbage.key", "not a key!\n", 0o600);
    let message = load(&text(&garbage), &[]).unwrap_err().to_string();
    assert!(message.contains("base64"), "{message}");
    assert!(!message.contains("not a key!"), "{message}");

    let missing = dir.path().join("missing.key");
    let message = load(&text(&missing), &[]).unwrap_err().to_string();
    assert!(message.contains("missing.key"), "{message}");
}

#[test]
fn a_key_from_an_environment_variable() {
    let text = "[identity]\nhost_name = \"h\"\ndevice_id = \"d\"\nkey_env = \"DOOR_KEY\"\n";
    let config = load(text, &[("DOOR_KEY", KEY)]).unwrap();
    assert_eq!(config.identity.key.expose(), KEY);

    let message = load_err(text, &[]);
    assert!(message.contains("identity.key_env"), "{message}");
    assert!(message.contains("DOOR_KEY"), "{message}");

    let message = load_err(text, &[("DOOR_KEY", "secret!")]);
    assert!(message.contains("base64"), "{message}");
    assert!(!message.contains("secret!"), "{message}");
}

#[test]
fn a_missing_identity_is_explained() {
    let error = load("[telemetry]\ninterval_secs = 3\n", &[]).unwrap_err();
    assert!(
        matches!(error, ConfigError::MissingIdentity { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("identity.connection_string"), "{message}");
    assert!(message.contains("/etc/simdevice/test.toml"), "{message}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let error = Config::load(Some(&missing)).unwrap_err();
    assert!(
        matches!(error, ConfigError::FileMissing { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("nope.toml"));
}

#[test]
fn two_identity_sources_are_refused() {
    let cs = format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}");
    let message = load_err(
        &format!("[identity]\nconnection_string = \"{cs}\"\ndevice_id = \"d\"\n"),
        &[],
    );
    assert!(message.contains("identity.connection_string"), "{message}");
    assert!(message.contains("identity.device_id"), "{message}");

    let message = load_err(
        &format!("[identity]\nconnection_string = \"{cs}\"\n"),
        &[("SIMDEVICE__IDENTITY__HOST_NAME", "other")],
    );
    assert!(message.contains("identity.host_name"), "{message}");

    let message = load_err(
        &format!(
            "[identity]\nhost_name = \"h\"\ndevice_id = \"d\"\nkey = \"{KEY}\"\nkey_env = \"X\"\n"
        ),
        &[("X", KEY)],
    );
    assert!(message.contains("identity.key_env"), "{message}");
}

#[test]
fn connection_strings_must_carry_a_key() {
    let ok = load(
        &format!("[identity]\nconnection_string = \"HostName=h.example;DeviceId=d1;SharedAccessKey={KEY}\"\n"),
        &[],
    )
    .unwrap();
    assert_eq!(ok.identity.device_id, "d1");
    assert_eq!(ok.identity.key.expose(), KEY);

    let sas = "HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h%2Fdevices%2Fd&sig=c2VjcmV0&se=1";
    let message = load_err(&format!("[identity]\nconnection_string = \"{sas}\"\n"), &[]);
    assert!(message.contains("SharedAccessSignature"), "{message}");
    assert!(message.contains("SharedAccessKey"), "{message}");
    assert!(!message.contains("c2VjcmV0"), "{message}");

    let message = load_err(
        "[identity]\nconnection_string = \"HostName=h;DeviceId=d;x509=true\"\n",
        &[],
    );
    assert!(message.contains("x509"), "{message}");

    let message = load_err(
        &format!("[identity]\nconnection_string = \"HostName=h;SharedAccessKey={KEY}\"\n"),
        &[],
    );
    assert!(message.contains("DeviceId"), "{message}");
}

#[test]
fn a_ca_file_must_hold_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = write_file(dir.path(), "ca.pem", "hello\n", 0o644);
    let text = format!("{}ca_file = \"{}\"\n", identity_toml(), not_pem.display());
    let error = load(&text, &[]).unwrap_err();
    assert!(matches!(error, ConfigError::CaFile { .. }), "{error:?}");
    assert!(error.to_string().contains("ca.pem"));

    let missing = format!(
        "{}ca_file = \"{}/none.pem\"\n",
        identity_toml(),
        dir.path().display()
    );
    assert!(matches!(
        load(&missing, &[]).unwrap_err(),
        ConfigError::CaFile { .. }
    ));
}

#[test]
fn a_telemetry_template_is_read_at_load_and_shown_by_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let template = write_file(
        dir.path(),
        "t.json",
        r#"{"body": {"n": "${seq}"}, "properties": {"k": "v"}}"#,
        0o644,
    );
    let text = format!(
        "{}\n[telemetry]\ntemplate = \"{}\"\n",
        identity_toml(),
        template.display()
    );
    let config = load(&text, &[]).unwrap();
    let loaded = config.telemetry.template.as_ref().expect("a template");
    assert_eq!(loaded.path(), template);
    let masked = config.to_masked_toml();
    assert!(
        masked.contains(&format!("template = \"{}\"", template.display())),
        "{masked}"
    );
    let reloaded = load(&masked.replace("\"***\"", &format!("\"{KEY}\"")), &[]).unwrap();
    assert_eq!(reloaded.telemetry.template.unwrap().path(), template);

    // From the environment too; an empty value is "not set", as for every key.
    let from_env = load(
        &identity_toml(),
        &[("SIMDEVICE__TELEMETRY__TEMPLATE", template.to_str().unwrap())],
    )
    .unwrap();
    assert!(from_env.telemetry.template.is_some());
    let empty = load(
        &format!("{}\n[telemetry]\ntemplate = \"\"\n", identity_toml()),
        &[],
    );
    assert!(empty.unwrap().telemetry.template.is_none());
    assert!(load(&identity_toml(), &[])
        .unwrap()
        .telemetry
        .template
        .is_none());
}

#[test]
fn a_bad_template_is_a_config_error_naming_the_key_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let template = write_file(
        dir.path(),
        "t.json",
        "{\n  \"body\": {\"n\": \"${seq} ${int(9, 1)}\"}\n}\n",
        0o644,
    );
    let text = format!(
        "{}\n[telemetry]\ntemplate = \"{}\"\n",
        identity_toml(),
        template.display()
    );
    let error = load(&text, &[]).unwrap_err();
    assert!(matches!(error, ConfigError::Template { .. }), "{error:?}");
    let chain = simdevice::common::logging::error_chain(&error);
    let expected = format!(
        "telemetry.template in /etc/simdevice/test.toml: the template is refused: {}, line 2, \
         column 25: `${{int(min, max)}}`: min (9) is more than max (1)",
        template.display()
    );
    assert_eq!(chain, expected);

    // Set by the environment: the variable is named; a missing file is named with its cause.
    let missing = dir.path().join("none.json");
    let error = load(
        &identity_toml(),
        &[("SIMDEVICE__TELEMETRY__TEMPLATE", missing.to_str().unwrap())],
    )
    .unwrap_err();
    let chain = simdevice::common::logging::error_chain(&error);
    assert!(
        chain.starts_with(&format!(
            "telemetry.template (from environment variable SIMDEVICE__TELEMETRY__TEMPLATE): \
             the template is refused: {}: cannot read it: ",
            missing.display()
        )),
        "{chain}"
    );
    let message = load_err(
        &format!("{}\n[telemetry]\ntemplate = 5\n", identity_toml()),
        &[],
    );
    assert!(message.contains("telemetry.template"), "{message}");
}

#[test]
fn secrets_stay_masked() {
    let text = format!(
        "{}\n[methods.reboot]\ncommand = [\"/sbin/reboot\"]\n[telemetry]\nseed = 9\n",
        identity_toml()
    );
    let config = load(&text, &[]).unwrap();
    let masked = config.to_masked_toml();
    assert!(!masked.contains(KEY), "{masked}");
    assert!(masked.contains("key = \"***\""), "{masked}");
    assert!(masked.contains("device_id = \"door-01\""), "{masked}");
    assert!(masked.contains("[methods.reboot]"), "{masked}");
    // A section given as a string is refused without quoting it.
    let cs = format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}");
    let message = load_err(&format!("identity = \"{cs}\"\n"), &[]);
    assert!(message.contains("identity"), "{message}");
    let message = load_err("", &[("SIMDEVICE__IDENTITY", &cs)]);
    assert!(message.contains("SIMDEVICE__IDENTITY"), "{message}");

    let debug = format!("{config:?}");
    assert!(!debug.contains(KEY), "{debug}");
    assert_eq!(format!("{}", config.identity.key), "***");

    // The masked output is the same configuration, once a key is put back.
    let reloaded = load(&masked.replace("\"***\"", &format!("\"{KEY}\"")), &[]).unwrap();
    assert_eq!(reloaded.telemetry.seed, Some(9));
    assert_eq!(reloaded.methods[0].command, vec!["/sbin/reboot"]);
    assert_eq!(reloaded.connection.keep_alive, config.connection.keep_alive);
    assert_eq!(reloaded.telemetry.uv, config.telemetry.uv);
}

#[test]
fn connect_address_with_and_without_gateway_and_port() {
    assert_eq!(
        identity("hub.example.net", None).connect_address(),
        ("hub.example.net".to_string(), 8883)
    );
    assert_eq!(
        identity("localhost:18883", None).connect_address(),
        ("localhost".to_string(), 18883)
    );
    assert_eq!(
        identity("hub.example.net", Some("edge.local")).connect_address(),
        ("edge.local".to_string(), 8883)
    );
    assert_eq!(
        identity("hub.example.net", Some("127.0.0.1:9883")).connect_address(),
        ("127.0.0.1".to_string(), 9883)
    );
    assert_eq!(
        identity("hub.example.net", Some("[::1]:9883")).connect_address(),
        ("::1".to_string(), 9883)
    );
    assert_eq!(
        identity("[::1]", None).connect_address(),
        ("::1".to_string(), 8883)
    );
}

#[test]
fn the_committed_example_shows_every_default() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/simdevice.toml"
    ))
    .unwrap();
    // Uncomment every setting outside [identity], and the example method.
    let mut section = String::new();
    let mut uncommented = String::new();
    for line in example.lines() {
        if line.starts_with('[') {
            section = line.to_string();
        }
        let setting = line
            .strip_prefix("# ")
            .filter(|rest| {
                let name = rest.split(" = ").next().unwrap_or("");
                (rest.contains(" = ")
                    && !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                    || rest.starts_with("[methods.")
            })
            .filter(|_| section != "[identity]");
        uncommented.push_str(setting.unwrap_or(line));
        uncommented.push('\n');
    }
    let identity = [
        ("SIMDEVICE__IDENTITY__HOST_NAME", "h"),
        ("SIMDEVICE__IDENTITY__DEVICE_ID", "d"),
        ("SIMDEVICE__IDENTITY__KEY", KEY),
    ];
    let file = Path::new("config/simdevice.toml");
    let defaults = Config::from_sources(Some((file, &example)), &env(&identity)).unwrap();
    let all = Config::from_sources(Some((file, &uncommented)), &env(&identity)).unwrap();
    assert_eq!(all.telemetry.seed, Some(1));
    assert_eq!(all.methods.len(), 1, "{uncommented}");
    assert_eq!(all.methods[0].timeout, Duration::from_secs(30));
    let without_seed_and_methods = |config: &Config| {
        let mut config = config.clone();
        config.telemetry.seed = None;
        config.methods.clear();
        config.file = None;
        config.to_masked_toml()
    };
    assert_eq!(
        without_seed_and_methods(&all),
        without_seed_and_methods(&defaults),
        "{uncommented}"
    );
    let local = Config::for_identity(defaults.identity.clone());
    assert_eq!(
        without_seed_and_methods(&local),
        without_seed_and_methods(&defaults)
    );
}
