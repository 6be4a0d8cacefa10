//! Azurite, the official Azure Storage emulator, started by a test on 127.0.0.1 with a free
//! port (blob service only, telemetry off), and the official Blob SDK (`@azure/storage-blob`,
//! through `tests/azurite/container.js`) to make containers and SAS URLs. Both are installed by
//! the test command (`npm ci --prefix tests/azurite`, a step of scripts/test). Killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/azurite");
/// Azurite's well-known account and key (published by Microsoft for the emulator).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub struct Azurite {
    child: Child,
    pub port: u16,
    /// `http(s)://127.0.0.1:PORT/devstoreaccount1`.
    pub endpoint: String,
    /// Its data, kept across a restart on the same port.
    pub location: PathBuf,
    /// For HTTPS: the CA that signed its certificate (for NODE_EXTRA_CA_CERTS, SSL_CERT_FILE).
    pub ca_file: Option<PathBuf>,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Azurite {
    /// Azurite over HTTP, data in `location`.
    pub fn start(location: &Path) -> Azurite {
        Azurite::spawn(location, 0, None, None)
    }

    /// Azurite over HTTPS with a certificate for 127.0.0.1 signed by a new CA, written (with
    /// the CA) into `location`.
    pub fn start_https(location: &Path) -> Azurite {
        std::fs::create_dir_all(location).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "azurite test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let (ca_file, cert_file, key_file) = (
            location.join("ca.pem"),
            location.join("cert.pem"),
            location.join("key.pem"),
        );
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Azurite::spawn(location, 0, Some((cert_file, key_file)), Some(ca_file))
    }

    /// Stops it (as storage going down would): SIGTERM, so that it saves its metadata (the
    /// containers) for a restart; SIGKILL if it has not exited within 10 s.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, with the same data (storage coming back).
    pub fn restart(&mut self) {
        self.stop();
        let again = Azurite::spawn(
            &self.location,
            self.port,
            self.tls.clone(),
            self.ca_file.clone(),
        );
        // The old one (stopped already) is dropped here.
        drop(std::mem::replace(self, again));
    }

    fn spawn(
        location: &Path,
        port: u16,
        tls: Option<(PathBuf, PathBuf)>,
        ca_file: Option<PathBuf>,
    ) -> Azurite {
        let program = Path::new(DIR).join("node_modules/.bin/azurite-blob");
        assert!(
            program.exists(),
            "Azurite is not installed: run `npm ci --prefix tests/azurite` (scripts/test does)"
        );
        std::fs::create_dir_all(location).unwrap();
        let mut command = Command::new(&program);
        command
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(location)
            .args(["--disableTelemetry", "--skipApiVersionCheck", "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some((cert, key)) = &tls {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let mut child = command.spawn().expect("Azurite starts");
        // "Azurite Blob service successfully listens on http://127.0.0.1:PORT"
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listens on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(url) => break url,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("Azurite exited at start: {status}");
                    }
                }
                Err(_) => panic!("Azurite did not start listening within 60 s"),
            }
        };
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        Azurite {
            child,
            port,
            endpoint: format!("{scheme}://127.0.0.1:{port}/{ACCOUNT}"),
            location: location.to_owned(),
            ca_file,
            tls,
        }
    }

    /// The storage account's connection string, as the portal shows one (with its endpoint).
    pub fn connection_string(&self) -> String {
        let protocol = if self.tls.is_some() { "https" } else { "http" };
        format!(
            "DefaultEndpointsProtocol={protocol};AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={};",
            self.endpoint
        )
    }

    /// Makes `container` with the official SDK and returns a SAS URL for it (read, add,
    /// create, write, delete, list; one hour).
    pub fn container_sas_url(&self, container: &str) -> String {
        self.node(&[container]).trim().to_string()
    }

    /// The blob names in `container`, listed by the official SDK.
    pub fn blobs(&self, container: &str) -> Vec<String> {
        let output = self.node(&[container, "--list"]);
        output.lines().map(str::to_string).collect()
    }

    fn node(&self, args: &[&str]) -> String {
        let mut command = Command::new("node");
        command
            .arg(Path::new(DIR).join("container.js"))
            .arg(&self.endpoint)
            .args(args);
        if let Some(ca) = &self.ca_file {
            command.env("NODE_EXTRA_CA_CERTS", ca);
        }
        let output = command.output().expect("node runs");
        assert!(
            output.status.success(),
            "container.js: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}
