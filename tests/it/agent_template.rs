//! Telemetry templates as a user sees them: an agent configured with `[telemetry] template`
//! sends the rendered bodies and application properties to the in-process hub (the agent's
//! content type, encoding, message id and creation time kept); readings made while the hub
//! was unreachable keep their properties through the SQLite outbox and a restart; and a bad
//! template stops `simdevice run` and `simdevice config check` with exit 78, naming the file,
//! the line and the column.

use std::path::Path;
use std::time::Duration;

use crate::common::agent::{eventually, identity_toml, RunningAgent};
use crate::common::*;
use serde_json::Value;
use simdevice::config::Config;

const TEMPLATE: &str = r#"{
  "body": {
    "deviceId": "${deviceId}",
    "time": "${time}",
    "counter": "${seq}",
    "pressure": "${int(800, 1200)}",
    "temperature": "${walk(21.0, 15.0, 30.0, 0.5)}",
    "humidity": "${float(40, 60, 1)}",
    "status": "${pick(\"ok\", \"warn\")}",
    "label": "reading ${seq} of ${deviceId}",
    "site": {"building": 43, "tags": ["a", "b"]}
  },
  "properties": {
    "reading": "r-${seq}",
    "level": "${pick('low', 'high')}",
    "source": "simdevice"
  }
}
"#;

/// An agent configuration file's text for device `id` dialling `mqtt_port`, with the
/// template at `template` and `extra` TOML after the `[telemetry]` section.
fn config_text(hub: &TestHub, id: &str, key: &str, mqtt_port: u16, template: &Path) -> String {
    let identity = identity_toml(id, key, mqtt_port, &hub.hub.info().ca_file);
    format!(
        "{identity}\n[connection]\nbackoff_min_secs = 0.1\nbackoff_max_secs = 0.5\n\n\
         [telemetry]\ninterval_secs = 0.2\nseed = 7\ntemplate = \"{}\"\n",
        template.display()
    )
}

fn load(text: &str) -> Config {
    Config::from_sources(Some((Path::new("agent.toml"), text)), &[]).expect("the config loads")
}

fn body_seq(event: &Value) -> u64 {
    event["body"]["counter"]
        .as_u64()
        .expect("the template's counter is a number")
}

#[tokio::test]
async fn an_agent_with_a_template_sends_its_rendered_bodies_and_properties() {
    let hub = TestHub::start().await;
    let key = hub.add_device("tpl-01");
    let service = hub.service();
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template.json");
    std::fs::write(&template, TEMPLATE).unwrap();
    let config = load(&config_text(
        &hub,
        "tpl-01",
        &key,
        hub.hub.mqtt_addr().port(),
        &template,
    ));
    let agent = RunningAgent::start(config);

    let events = eventually(Duration::from_secs(20), || async {
        let all = service.events("tpl-01").await;
        (all.len() >= 5).then_some(all)
    })
    .await;
    agent.stop().await;

    let seqs: Vec<u64> = events.iter().map(body_seq).collect();
    assert_eq!(seqs[..5], [1, 2, 3, 4, 5], "the device's sequence numbers");
    let mut last_temperature: Option<f64> = None;
    for event in &events {
        let body = &event["body"];
        let seq = body_seq(event);
        assert_eq!(body["deviceId"], "tpl-01", "{body}");
        let time = body["time"].as_str().expect("the time is a string");
        assert!(time.ends_with('Z'), "UTC: {time}");
        chrono::DateTime::parse_from_rfc3339(time).expect("the time is RFC 3339");
        // The body's time is the reading's creation time, as its system property says.
        assert_eq!(event["properties"]["iothub-creation-time-utc"], time);
        let pressure = body["pressure"].as_i64().expect("an integer");
        assert!((800..=1200).contains(&pressure), "{body}");
        let temperature = body["temperature"].as_f64().expect("a number");
        assert!((15.0..=30.0).contains(&temperature), "{body}");
        match last_temperature {
            None => assert_eq!(temperature, 21.0, "a walk starts at its start"),
            Some(last) => assert!((temperature - last).abs() <= 0.5 + 1e-9, "{body}"),
        }
        last_temperature = Some(temperature);
        let humidity = body["humidity"].as_f64().expect("a number");
        assert!((40.0..=60.0).contains(&humidity), "{body}");
        assert!(["ok", "warn"].contains(&body["status"].as_str().unwrap()));
        assert_eq!(body["label"], format!("reading {seq} of tpl-01"));
        assert_eq!(
            body["site"],
            serde_json::json!({"building": 43, "tags": ["a", "b"]})
        );

        let properties = &event["properties"];
        assert_eq!(properties["reading"], format!("r-{seq}"), "{event}");
        assert!(["low", "high"].contains(&properties["level"].as_str().unwrap()));
        assert_eq!(properties["source"], "simdevice");
        let system = &event["systemProperties"];
        assert_eq!(system["content-type"], "application/json", "{event}");
        assert_eq!(system["content-encoding"], "utf-8");
        assert!(system["message-id"].is_string());
    }
    assert_ne!(
        events[0]["systemProperties"]["message-id"],
        events[1]["systemProperties"]["message-id"]
    );
    hub.stop().await;
}

#[tokio::test]
async fn readings_made_offline_keep_their_template_properties_through_the_outbox_file() {
    let hub = TestHub::start().await;
    let key = hub.add_device("tpl-02");
    let service = hub.service();
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template.json");
    std::fs::write(&template, TEMPLATE).unwrap();
    let db = dir.path().join("outbox.db");
    let outbox = format!("\n[outbox]\npath = \"{}\"\n", db.display());

    // First the hub is unreachable: a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let offline = load(&(config_text(&hub, "tpl-02", &key, closed_port, &template) + &outbox));
    let agent = RunningAgent::start(offline);
    let stored = eventually(Duration::from_secs(20), || async {
        let rows = outbox_rows(&db);
        (rows.len() >= 3).then_some(rows)
    })
    .await;
    agent.stop().await;
    assert_eq!(stored[0].0, 1);
    assert!(
        stored[0].2.contains("reading=r-1"),
        "the properties are on disk: {stored:?}"
    );

    // Then a restart against the hub: the stored readings go out as they were made.
    let online =
        load(&(config_text(&hub, "tpl-02", &key, hub.hub.mqtt_addr().port(), &template) + &outbox));
    let agent = RunningAgent::start(online);
    let events = eventually(Duration::from_secs(20), || async {
        let all = service.events("tpl-02").await;
        let seqs: Vec<u64> = all.iter().map(body_seq).collect();
        stored
            .iter()
            .all(|(seq, _, _)| seqs.contains(seq))
            .then_some(all)
    })
    .await;
    agent.stop().await;
    for (seq, mid, _) in &stored {
        let event = events
            .iter()
            .find(|e| body_seq(e) == *seq)
            .expect("the stored reading arrived");
        assert_eq!(event["systemProperties"]["message-id"], mid.as_str());
        assert_eq!(
            event["properties"]["reading"],
            format!("r-{seq}"),
            "{event}"
        );
        assert_eq!(event["properties"]["source"], "simdevice");
        assert_eq!(
            event["systemProperties"]["content-type"],
            "application/json"
        );
    }
    hub.stop().await;
}

/// (seq, message id, properties) of the readings in an outbox file, read as any SQLite client
/// would; none while the file does not exist yet.
fn outbox_rows(path: &Path) -> Vec<(u64, String, String)> {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let Ok(mut stmt) =
        conn.prepare("SELECT seq, message_id, coalesce(properties, '') FROM readings ORDER BY seq")
    else {
        return Vec::new();
    };
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    rows.map(|row| row.unwrap()).collect()
}

#[tokio::test]
async fn a_bad_template_exits_78_naming_its_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("bad.json");
    std::fs::write(
        &template,
        "{\n  \"body\": {\n    \"t\": \"${walk(21, 15, 30, 0.5)}\", \"x\": \"${temprature}\"\n  }\n}\n",
    )
    .unwrap();
    let not_json = dir.path().join("not-json.json");
    std::fs::write(&not_json, "{\n  \"body\": {\"a\": 1,}\n}\n").unwrap();
    let config = dir.path().join("agent.toml");
    let identity = "[identity]\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0\"\n";
    for (file, position) in [
        (
            &template,
            "line 3, column 44: unknown placeholder \"temprature\"",
        ),
        (&not_json, "line 2, column 19: not valid JSON"),
    ] {
        std::fs::write(
            &config,
            format!("{identity}[telemetry]\ntemplate = \"{}\"\n", file.display()),
        )
        .unwrap();
        for args in [vec!["run", "--config"], vec!["config", "check", "--config"]] {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
                .args(&args)
                .arg(&config)
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(78), "{args:?}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains("telemetry.template"), "{stderr}");
            let expected = format!("{}, {position}", file.display());
            assert!(stderr.contains(&expected), "{expected} in {stderr}");
        }
    }

    std::fs::write(&template, TEMPLATE).unwrap();
    std::fs::write(
        &config,
        format!(
            "{identity}[telemetry]\ntemplate = \"{}\"\n",
            template.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = format!("template = \"{}\"", template.display());
    assert!(stdout.contains(&line), "{stdout}");
}
