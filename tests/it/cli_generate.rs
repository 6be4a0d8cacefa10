//! What `simdevice` writes for the user: `config init` (a commented configuration that
//! `config check` accepts, mode 0600, never overwritten without --force, the key never
//! printed), shell completions that their shells parse, and a man page groff renders cleanly.
//! The checkers must be installed: a missing one fails the test with the Debian package to
//! install (scripts/test installs them; scripts/check-generated runs the same checks).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";

fn simdevice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_simdevice"))
        .args(args)
        .env_remove("SIMDEVICE_CONNECTION_STRING")
        .output()
        .expect("simdevice runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Fails unless `program` is on the PATH, naming the Debian package that provides it.
fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is not installed, so the generated output cannot be checked: \
         apt-get install {package} (scripts/test installs it)"
    );
}

#[test]
fn config_init_writes_a_private_file_that_config_check_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("etc/config.toml");
    let output = path.to_str().unwrap();
    let cs = format!("HostName=myhub.azure-devices.net;DeviceId=door-07;SharedAccessKey={KEY}");

    let init = simdevice(&[
        "config",
        "init",
        "--connection-string",
        &cs,
        "--output",
        output,
    ]);
    assert!(init.status.success(), "{}", text(&init.stderr));
    let said = text(&init.stdout) + &text(&init.stderr);
    assert!(said.contains("door-07"), "{said}");
    assert!(!said.contains(KEY), "{said}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.contains("# interval_secs = 10"),
        "commented like the example"
    );

    let check = simdevice(&["config", "check", "--config", output]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    let effective = text(&check.stdout);
    assert!(effective.contains("device_id = \"door-07\""), "{effective}");
    assert!(effective.contains("host_name = \"myhub.azure-devices.net\""));
    assert!(!effective.contains(KEY));

    // Not overwritten without --force; replaced with it.
    let other = cs.replace("door-07", "door-08");
    let again = simdevice(&[
        "config",
        "init",
        "--connection-string",
        &other,
        "--output",
        output,
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("exists; pass --force"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written);
    let forced = simdevice(&[
        "config",
        "init",
        "--connection-string",
        &other,
        "--output",
        output,
        "--force",
    ]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert!(std::fs::read_to_string(&path).unwrap().contains("door-08"));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["config.toml"], "no temporary file left");
}

#[test]
fn config_init_refuses_a_bad_connection_string_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let cs = format!("HostName=h;SharedAccessKey={KEY}");
    let init = simdevice(&[
        "config",
        "init",
        "--connection-string",
        &cs,
        "--output",
        path.to_str().unwrap(),
    ]);
    assert_eq!(init.status.code(), Some(78));
    let stderr = text(&init.stderr);
    assert!(stderr.contains("identity.connection_string"), "{stderr}");
    assert!(!stderr.contains(KEY), "{stderr}");
    assert!(!Path::new(&path).exists());
}

#[test]
fn completions_parse_in_their_shells() {
    for shell in ["bash", "zsh", "fish"] {
        // Each shell's Debian package has the shell's name.
        require(shell, shell);
        let generated = simdevice(&["completions", shell]);
        assert!(generated.status.success());
        let script = text(&generated.stdout);
        assert!(
            script.contains("doctor"),
            "{shell}: the subcommands are completed"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("simdevice.{shell}"));
        std::fs::write(&file, &script).unwrap();
        let parsed = Command::new(shell).arg("-n").arg(&file).output().unwrap();
        assert!(
            parsed.status.success(),
            "{shell} -n: {}",
            text(&parsed.stderr)
        );
    }
}

#[test]
fn the_man_page_renders_without_warnings() {
    let generated = simdevice(&["man"]);
    assert!(generated.status.success());
    let page = text(&generated.stdout);
    assert!(page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH simdevice 1"));
    assert!(page.contains("simdevice\\-doctor"), "lists the subcommands");
    require("groff", "groff-base");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("simdevice.1");
    std::fs::write(&file, &page).unwrap();
    let rendered = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(rendered.status.success());
    assert_eq!(text(&rendered.stderr), "", "groff warnings");
}
