//! Direct methods declared in the configuration (`[methods.NAME] command = [...]`) that run a
//! program.
//!
//! The program is checked once, at start-up ([`CommandMethod::new`]): an absolute path to an
//! executable file that neither group nor others may write. Each call runs it without a shell,
//! with the JSON payload on stdin, a minimal environment (so a device key held in the agent's
//! environment never reaches it) and `SIMDEVICE_METHOD` set to the method name. Its stdout is
//! the answer: exit 0 -> 200 with stdout as JSON (empty -> `null`), exit 2 -> 400 (the payload
//! was refused; stdout if it is JSON), anything else -> 500; past the timeout the program is
//! killed and the answer is 504. Stdout is capped at 128 KiB (more is a 500 and the program is
//! stopped); only the last 4 KiB of stderr are kept, for the log. The program's own children
//! are not killed: they lose their pipes when it dies.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{BoxFuture, MethodHandler, MethodResponse};
use crate::agent::context::HandlerContext;
use crate::config::CommandMethodConfig;

/// The most a program may write on stdout: IoT Hub's limit on a method's answer.
pub const MAX_STDOUT_BYTES: usize = 128 * 1024;
/// How much of the end of stderr is kept for the log.
pub const STDERR_TAIL_BYTES: usize = 4 * 1024;
/// The exit status by which a program says it refused the payload.
pub const EXIT_REFUSED: i32 = 2;
/// Variables passed on to the program when the agent has them; nothing else is.
const PASSED_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Why a configured command cannot serve as a method. Each names the method and the path.
#[derive(Debug, thiserror::Error)]
pub enum CommandMethodError {
    #[error("method {method:?}: the command is empty")]
    Empty { method: String },
    #[error("method {method:?}: {} is not an absolute path", path.display())]
    NotAbsolute { method: String, path: PathBuf },
    #[error("method {method:?}: cannot use {}", path.display())]
    Unusable {
        method: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("method {method:?}: {} is not a regular file", path.display())]
    NotAFile { method: String, path: PathBuf },
    #[error("method {method:?}: {} is not executable (mode {mode:04o})", path.display())]
    NotExecutable {
        method: String,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "method {method:?}: {} is writable by group or others (mode {mode:04o}); run: chmod go-w {}",
        path.display(),
        path.display()
    )]
    Writable {
        method: String,
        path: PathBuf,
        mode: u32,
    },
}

/// A method answered by running a program.
pub struct CommandMethod {
    spec: Arc<Spec>,
}

struct Spec {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    timeout: Duration,
}

impl CommandMethod {
    /// Checks the program: absolute, an existing regular file, executable, and not writable
    /// by group or others.
    pub fn new(config: &CommandMethodConfig) -> Result<Self, CommandMethodError> {
        let method = config.name.clone();
        let Some((program, args)) = config.command.split_first() else {
            return Err(CommandMethodError::Empty { method });
        };
        let path = PathBuf::from(program);
        if !path.is_absolute() {
            return Err(CommandMethodError::NotAbsolute { method, path });
        }
        let metadata = std::fs::metadata(&path).map_err(|source| CommandMethodError::Unusable {
            method: method.clone(),
            path: path.clone(),
            source,
        })?;
        if !metadata.is_file() {
            return Err(CommandMethodError::NotAFile { method, path });
        }
        check_mode(&method, &path, &metadata)?;
        Ok(CommandMethod {
            spec: Arc::new(Spec {
                name: config.name.clone(),
                program: path,
                args: args.to_vec(),
                timeout: config.timeout,
            }),
        })
    }
}

#[cfg(unix)]
fn check_mode(
    method: &str,
    path: &Path,
    metadata: &std::fs::Metadata,
) -> Result<(), CommandMethodError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o111 == 0 {
        return Err(CommandMethodError::NotExecutable {
            method: method.to_string(),
            path: path.to_path_buf(),
            mode,
        });
    }
    if mode & 0o022 != 0 {
        return Err(CommandMethodError::Writable {
            method: method.to_string(),
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &str, _: &Path, _: &std::fs::Metadata) -> Result<(), CommandMethodError> {
    Ok(())
}

impl MethodHandler for CommandMethod {
    fn call(&self, _ctx: HandlerContext, payload: Value) -> BoxFuture<MethodResponse> {
        let spec = Arc::clone(&self.spec);
        Box::pin(async move { spec.call(payload).await })
    }
}

/// How a run ended, before it becomes an answer.
enum Outcome {
    Exited { status: ExitStatus, stdout: Vec<u8> },
    StdoutTooLarge,
    TimedOut,
    Failed(String),
}

impl Spec {
    async fn call(&self, payload: Value) -> MethodResponse {
        let started = Instant::now();
        let (outcome, stderr) = self.run(&payload).await;
        let response = self.answer(outcome);
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let stderr = String::from_utf8_lossy(&stderr);
        let stderr = stderr.trim_end();
        if response.status == 200 {
            tracing::info!(method = %self.name, status = response.status, duration_ms, stderr,
                "command method answered");
        } else {
            tracing::warn!(method = %self.name, status = response.status, duration_ms, stderr,
                error = %response.payload, "command method failed");
        }
        response
    }

    /// Runs the program once; also returns the tail of its stderr.
    async fn run(&self, payload: &Value) -> (Outcome, Vec<u8>) {
        let input = match serde_json::to_vec(payload) {
            Ok(input) => input,
            Err(error) => {
                return (
                    Outcome::Failed(format!("cannot encode the payload: {error}")),
                    Vec::new(),
                )
            }
        };
        let mut child = match self.spawn().await {
            Ok(child) => child,
            Err(error) => {
                return (
                    Outcome::Failed(format!("cannot start {}: {error}", self.program.display())),
                    Vec::new(),
                )
            }
        };
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return (
                Outcome::Failed("the program's pipes are missing".to_string()),
                Vec::new(),
            );
        };

        let mut stderr_tail = Vec::new();
        let work = async {
            let write = async {
                // A program that exits without reading its stdin is not an error.
                let _ = stdin.write_all(&input).await;
                drop(stdin);
            };
            let (_, stdout, stderr) = tokio::join!(
                write,
                read_at_most(stdout, MAX_STDOUT_BYTES),
                read_tail(stderr, STDERR_TAIL_BYTES, &mut stderr_tail),
            );
            let stdout = match stdout {
                Ok(Some(stdout)) => stdout,
                // Its stdout was closed: the program gets SIGPIPE or EPIPE; stop it anyway.
                Ok(None) => return Outcome::StdoutTooLarge,
                Err(error) => return Outcome::Failed(format!("cannot read its stdout: {error}")),
            };
            if let Err(error) = stderr {
                return Outcome::Failed(format!("cannot read its stderr: {error}"));
            }
            match child.wait().await {
                Ok(status) => Outcome::Exited { status, stdout },
                Err(error) => Outcome::Failed(format!("cannot wait for it: {error}")),
            }
        };
        let outcome = tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Outcome::TimedOut);
        if !matches!(outcome, Outcome::Exited { .. }) {
            // Kill and reap; an error means it has already exited.
            let _ = child.kill().await;
        }
        (outcome, stderr_tail)
    }

    async fn spawn(&self) -> io::Result<tokio::process::Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("SIMDEVICE_METHOD", &self.name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        // "Text file busy": the program is being replaced, or another thread is forking while
        // holding it open for writing. Both pass quickly.
        let mut attempts = 0;
        loop {
            match command.spawn() {
                Err(error) if error.kind() == io::ErrorKind::ExecutableFileBusy && attempts < 5 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                result => return result,
            }
        }
    }

    fn answer(&self, outcome: Outcome) -> MethodResponse {
        let name = &self.name;
        match outcome {
            Outcome::TimedOut => MethodResponse::error(
                504,
                format!(
                    "method '{name}' timed out after {} s",
                    seconds(self.timeout)
                ),
            ),
            Outcome::StdoutTooLarge => MethodResponse::error(
                500,
                format!(
                    "method '{name}' wrote more than {MAX_STDOUT_BYTES} bytes on stdout; \
                     it was stopped"
                ),
            ),
            Outcome::Failed(reason) => {
                MethodResponse::error(500, format!("method '{name}' failed: {reason}"))
            }
            Outcome::Exited { status, stdout } => match status.code() {
                Some(0) => match parse_stdout(&stdout) {
                    Ok(payload) => MethodResponse::ok(payload),
                    Err(error) => MethodResponse::error(
                        500,
                        format!("method '{name}' printed something that is not JSON: {error}"),
                    ),
                },
                Some(EXIT_REFUSED) => match parse_stdout(&stdout) {
                    Ok(payload) if !payload.is_null() => MethodResponse {
                        status: 400,
                        payload,
                    },
                    _ => MethodResponse::error(
                        400,
                        format!("method '{name}' refused the payload (exit status 2)"),
                    ),
                },
                Some(code) => MethodResponse::error(
                    500,
                    format!("method '{name}' failed: the command exited with status {code}"),
                ),
                None => MethodResponse::error(
                    500,
                    format!(
                        "method '{name}' failed: the command was {}",
                        signal(&status)
                    ),
                ),
            },
        }
    }
}

/// Empty (or blank) output is `null`.
fn parse_stdout(stdout: &[u8]) -> Result<Value, serde_json::Error> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        Ok(Value::Null)
    } else {
        serde_json::from_slice(stdout)
    }
}

#[cfg(unix)]
fn signal(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match status.signal() {
        Some(signal) => format!("killed by signal {signal}"),
        None => format!("ended without an exit status ({status})"),
    }
}

#[cfg(not(unix))]
fn signal(status: &ExitStatus) -> String {
    format!("ended without an exit status ({status})")
}

/// "30", or "0.5" for fractions.
fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        duration.as_secs().to_string()
    } else {
        duration.as_secs_f64().to_string()
    }
}

/// All of `reader` if it holds at most `limit` bytes; `None` (and the reader closed) if more.
async fn read_at_most(reader: impl AsyncRead + Unpin, limit: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buffer = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader.take(cap).read_to_end(&mut buffer).await?;
    Ok((buffer.len() <= limit).then_some(buffer))
}

/// Reads `reader` to the end, keeping only its last `limit` bytes in `tail`.
async fn read_tail(
    mut reader: impl AsyncRead + Unpin,
    limit: usize,
    tail: &mut Vec<u8>,
) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&chunk[..n]);
        if tail.len() > 2 * limit {
            tail.drain(..tail.len() - limit);
        }
    }
    if tail.len() > limit {
        tail.drain(..tail.len() - limit);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use serde_json::json;

    use super::*;

    struct Script {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    fn script(body: &str, mode: u32) -> Script {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("method.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        Script { _dir: dir, path }
    }

    fn config(path: &Path, timeout: Duration) -> CommandMethodConfig {
        CommandMethodConfig {
            name: "doThing".to_string(),
            command: vec![path.display().to_string(), "arg one".to_string()],
            timeout,
        }
    }

    async fn call_script(body: &str, payload: Value) -> MethodResponse {
        let script = script(body, 0o755);
        let method = CommandMethod::new(&config(&script.path, Duration::from_secs(10))).unwrap();
        let (ctx, _reports) = HandlerContext::for_tests();
        method.call(ctx, payload).await
    }

    fn error_text(response: &MethodResponse) -> String {
        response.payload["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn exit_0_answers_200_with_stdout_as_json() {
        let response = call_script(
            r#"echo "first arg: $1" >&2; printf '{"ok":true,"arg":"%s","method":"%s"}' "$1" "$SIMDEVICE_METHOD""#,
            json!({}),
        )
        .await;
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(
            response.payload,
            json!({"ok": true, "arg": "arg one", "method": "doThing"})
        );

        let empty = call_script("exit 0", json!(null)).await;
        assert_eq!(empty, MethodResponse::ok(Value::Null));
    }

    #[tokio::test]
    async fn the_payload_reaches_stdin() {
        let payload = json!({"lockTime": "10m", "nested": [1, 2, {"a": null}]});
        let response = call_script("cat", payload.clone()).await;
        assert_eq!(response, MethodResponse::ok(payload));
    }

    #[tokio::test]
    async fn exit_2_answers_400() {
        let response = call_script(r#"echo '{"reason":"no such mode"}'; exit 2"#, json!(1)).await;
        assert_eq!(response.status, 400);
        assert_eq!(response.payload, json!({"reason": "no such mode"}));

        let response = call_script("echo 'bad payload'; exit 2", json!(1)).await;
        assert_eq!(response.status, 400);
        assert!(
            error_text(&response).contains("refused the payload"),
            "{response:?}"
        );
    }

    #[tokio::test]
    async fn another_exit_or_a_signal_answers_500() {
        let response = call_script("echo secret-detail >&2; exit 1", json!(1)).await;
        assert_eq!(response.status, 500);
        let text = error_text(&response);
        assert!(text.contains("status 1"), "{text}");
        assert!(
            !text.contains("secret-detail"),
            "stderr is for the log only: {text}"
        );

        let response = call_script("kill -9 $$", json!(1)).await;
        assert_eq!(response.status, 500);
        assert!(error_text(&response).contains("signal 9"), "{response:?}");
    }

    #[tokio::test]
    async fn non_json_stdout_answers_500() {
        let response = call_script("echo 'all good'", json!(1)).await;
        assert_eq!(response.status, 500);
        assert!(error_text(&response).contains("not JSON"), "{response:?}");
    }

    #[tokio::test]
    async fn a_slow_command_is_killed_at_the_timeout() {
        let script = script("exec sleep 10", 0o755);
        let method = CommandMethod::new(&config(&script.path, Duration::from_secs(1))).unwrap();
        let (ctx, _reports) = HandlerContext::for_tests();
        let started = Instant::now();
        let response = method.call(ctx, json!(null)).await;
        let elapsed = started.elapsed();
        assert_eq!(response.status, 504);
        assert_eq!(
            response.payload,
            json!({"error": "method 'doThing' timed out after 1 s"})
        );
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    }

    #[tokio::test]
    async fn too_much_output_answers_500() {
        // Writes forever: only the cap stops it.
        let response = call_script(
            "while :; do echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; done",
            json!(1),
        )
        .await;
        assert_eq!(response.status, 500);
        assert!(error_text(&response).contains("131072"), "{response:?}");

        // Exactly at the cap is fine.
        let response = call_script(
            &format!(
                "printf '\"'; head -c {} /dev/zero | tr '\\0' a; printf '\"'",
                MAX_STDOUT_BYTES - 2
            ),
            json!(1),
        )
        .await;
        assert_eq!(response.status, 200, "{}", error_text(&response));
        assert_eq!(
            response.payload.as_str().map(str::len),
            Some(MAX_STDOUT_BYTES - 2)
        );
    }

    #[tokio::test]
    async fn stderr_keeps_only_its_tail() {
        let data: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_be_bytes()).collect();
        let mut tail = Vec::new();
        read_tail(&data[..], STDERR_TAIL_BYTES, &mut tail)
            .await
            .unwrap();
        assert_eq!(tail, &data[data.len() - STDERR_TAIL_BYTES..]);
    }

    #[test]
    fn unsafe_or_unusable_programs_are_refused_at_start_up() {
        let open = script("exit 0", 0o757);
        let error = CommandMethod::new(&config(&open.path, Duration::from_secs(1)))
            .err()
            .unwrap();
        assert!(
            matches!(error, CommandMethodError::Writable { .. }),
            "{error}"
        );
        let text = error.to_string();
        assert!(
            text.contains("doThing") && text.contains("method.sh"),
            "{text}"
        );

        let group = script("exit 0", 0o775);
        assert!(matches!(
            CommandMethod::new(&config(&group.path, Duration::from_secs(1))),
            Err(CommandMethodError::Writable { .. })
        ));

        let plain = script("exit 0", 0o644);
        let error = CommandMethod::new(&config(&plain.path, Duration::from_secs(1)))
            .err()
            .unwrap();
        assert!(error.to_string().contains("not executable"), "{error}");

        let error = CommandMethod::new(&config(Path::new("bin/method.sh"), Duration::from_secs(1)))
            .err()
            .unwrap();
        assert!(
            matches!(error, CommandMethodError::NotAbsolute { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("bin/method.sh"), "{error}");

        let error = CommandMethod::new(&config(
            Path::new("/nonexistent/method"),
            Duration::from_secs(1),
        ))
        .err()
        .unwrap();
        assert!(error.to_string().contains("/nonexistent/method"), "{error}");

        let dir = tempfile::tempdir().unwrap();
        assert!(CommandMethod::new(&config(dir.path(), Duration::from_secs(1))).is_err());

        let empty = CommandMethodConfig {
            name: "x".to_string(),
            command: Vec::new(),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            CommandMethod::new(&empty),
            Err(CommandMethodError::Empty { .. })
        ));
    }
}
