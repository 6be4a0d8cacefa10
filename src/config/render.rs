//! The effective configuration as TOML, for `simdevice config check`: every key with the value
//! the agent will use, the device key masked. The output loads back as the same configuration.
//!
//! Pure: formats a checked [`Config`], reads nothing.

use std::path::Path;
use std::time::Duration;

use super::{Config, OutboxSettings};

impl Config {
    /// The effective configuration as TOML with the key masked, for `simdevice config check`.
    pub fn to_masked_toml(&self) -> String {
        use toml::{Table, Value};
        let text = |s: &str| Value::String(s.to_string());
        let path = |p: &Path| Value::String(p.display().to_string());

        let mut identity = Table::new();
        identity.insert("host_name".into(), text(&self.identity.host_name));
        identity.insert("device_id".into(), text(&self.identity.device_id));
        match &self.identity.x509 {
            None => {
                identity.insert("key".into(), text("***"));
            }
            Some(x509) => {
                identity.insert("certificate_file".into(), path(&x509.certificate_file));
                identity.insert("private_key_file".into(), path(&x509.private_key_file));
            }
        }
        if let Some(gateway) = &self.identity.gateway_host_name {
            identity.insert("gateway_host_name".into(), text(gateway));
        }
        if let Some(ca_file) = &self.identity.ca_file {
            identity.insert("ca_file".into(), path(ca_file));
        }

        let c = &self.connection;
        let mut connection = Table::new();
        connection.insert("keep_alive_secs".into(), seconds(c.keep_alive));
        connection.insert("sas_lifetime_secs".into(), seconds(c.sas_lifetime));
        connection.insert("renew_at".into(), Value::Float(c.renew_at));
        connection.insert("backoff_min_secs".into(), seconds(c.backoff_min));
        connection.insert("backoff_max_secs".into(), seconds(c.backoff_max));
        connection.insert("connect_timeout_secs".into(), seconds(c.connect_timeout));
        connection.insert(
            "transport".into(),
            Value::String(c.transport.as_str().into()),
        );
        if let Some(proxy) = &c.proxy {
            // Credentials masked, as the key is.
            connection.insert("proxy".into(), Value::String(proxy.to_string()));
        }

        let t = &self.telemetry;
        let mut telemetry = Table::new();
        telemetry.insert("interval_secs".into(), seconds(t.interval));
        telemetry.insert("queue_size".into(), count(t.queue_size));
        if let Some(seed) = t.seed {
            // TOML integers are signed; a larger seed is written as text, which loads back.
            let value = i64::try_from(seed)
                .map(Value::Integer)
                .unwrap_or_else(|_| Value::String(seed.to_string()));
            telemetry.insert("seed".into(), value);
        }
        if let Some(template) = &t.template {
            telemetry.insert("template".into(), path(template.path()));
        }
        for (name, (min, max)) in [
            ("temperature", t.temperature),
            ("humidity", t.humidity),
            ("uv", t.uv),
        ] {
            telemetry.insert(format!("{name}_min"), Value::Float(min));
            telemetry.insert(format!("{name}_max"), Value::Float(max));
        }

        let mut connectivity = Table::new();
        connectivity.insert("operator".into(), text(&self.connectivity.operator));
        connectivity.insert("technology".into(), text(&self.connectivity.technology));

        let mut methods = Table::new();
        for method in &self.methods {
            let mut table = Table::new();
            table.insert(
                "command".into(),
                Value::Array(method.command.iter().map(|arg| text(arg)).collect()),
            );
            table.insert("timeout_secs".into(), seconds(method.timeout));
            methods.insert(method.name.clone(), Value::Table(table));
        }

        let mut metrics = Table::new();
        let listen = self.metrics.listen.map(|addr| addr.to_string());
        metrics.insert("listen".into(), text(listen.as_deref().unwrap_or("")));

        let o = &self.outbox;
        let mut outbox = Table::new();
        let outbox_path = o.path.clone().unwrap_or_else(OutboxSettings::default_path);
        outbox.insert("path".into(), path(&outbox_path));
        outbox.insert("max_readings".into(), count(o.max_readings));
        outbox.insert("max_age_secs".into(), seconds(o.max_age));

        let mut root = Table::new();
        // An identity DPS has not assigned yet is the `[provisioning]` section's, not the file's.
        let unassigned =
            self.provisioning.is_some() && self.identity.host_name == super::UNASSIGNED_HOST;
        if !unassigned {
            root.insert("identity".into(), Value::Table(identity));
        } else if let Some(x509) = &self.identity.x509 {
            // An X.509 device DPS assigns: its `[identity]` is its certificate and key only.
            let mut files = Table::new();
            files.insert("certificate_file".into(), path(&x509.certificate_file));
            files.insert("private_key_file".into(), path(&x509.private_key_file));
            root.insert("identity".into(), Value::Table(files));
        }
        if let Some(p) = &self.provisioning {
            let mut provisioning = Table::new();
            provisioning.insert("id_scope".into(), text(&p.id_scope));
            provisioning.insert("registration_id".into(), text(&p.registration_id));
            provisioning.insert(
                "global_endpoint".into(),
                text(&format!("{}:{}", p.host, p.port)),
            );
            // The device key, whether given or derived from a group key (none for X.509).
            if p.x509.is_none() {
                provisioning.insert("key".into(), text("***"));
            }
            if let Some(ca_file) = &p.ca_file {
                provisioning.insert("ca_file".into(), path(ca_file));
            }
            if let Some(gateway) = &p.gateway_host_name {
                provisioning.insert("gateway_host_name".into(), text(gateway));
            }
            root.insert("provisioning".into(), Value::Table(provisioning));
        }
        root.insert("connection".into(), Value::Table(connection));
        root.insert("telemetry".into(), Value::Table(telemetry));
        root.insert("connectivity".into(), Value::Table(connectivity));
        root.insert("metrics".into(), Value::Table(metrics));
        root.insert("outbox".into(), Value::Table(outbox));
        if !methods.is_empty() {
            root.insert("methods".into(), Value::Table(methods));
        }
        let source = match &self.file {
            Some(file) => format!("defaults, then {}, then", file.display()),
            None => "defaults (no file), then".to_string(),
        };
        let body = toml::to_string(&root)
            .unwrap_or_else(|error| format!("# cannot format the configuration: {error}\n"));
        format!(
            "# simdevice effective configuration: {source} SIMDEVICE__* environment variables.\n\
             # The device key is masked.\n\n{body}"
        )
    }
}

/// Whole seconds as a TOML integer, fractions as a float.
fn seconds(duration: Duration) -> toml::Value {
    if duration.subsec_nanos() == 0 {
        if let Ok(secs) = i64::try_from(duration.as_secs()) {
            return toml::Value::Integer(secs);
        }
    }
    toml::Value::Float(duration.as_secs_f64())
}

/// A count as a TOML integer (signed; a larger count, impossible in practice, is capped).
fn count(n: usize) -> toml::Value {
    toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}
