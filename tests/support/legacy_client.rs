//! The real legacy client, @octokit/rest 16.43.2 on node (tests/legacy-client/demo.js), run
//! against a gateway: one JSON line per call it made. Each run is bounded (killed at the
//! deadline) and at most two node processes run at once. Without node or the pinned
//! node_modules, [`Demo::require`] panics with the install step: tests that use it are
//! `#[ignore = "needs node …"]`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;

use super::{CLIENT_ID, CLIENT_SECRET};

/// The @octokit/rest release tests/legacy-client pins.
pub const OCTOKIT_VERSION: &str = "16.43.2";
/// How to install node and the client.
pub const INSTALL: &str = "bash tests/legacy-client/install.sh (node and npm from apt, then `npm ci` in tests/legacy-client)";
/// One demo run makes at most eight local calls; node itself starts in well under a second.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most two node processes at once, whatever the test harness's thread count.
static NODE_SLOTS: Semaphore = Semaphore::const_new(2);

/// `OCTOKIT_AUTH` values demo.js accepts: `new Octokit({ auth: { clientId, clientSecret } })`
/// and `octokit.authenticate({ type: "basic", ... })`.
pub const AUTH_STYLES: [&str; 2] = ["auth-object", "authenticate-basic"];

/// The gateway's operation name (the `operation` label) of a demo.js operation name such as
/// `apps.checkAuthorization`.
pub fn operation_label(demo_operation: &str) -> &'static str {
    match demo_operation.rsplit('.').next() {
        Some("checkAuthorization") => "check",
        Some("resetAuthorization") => "reset",
        Some("revokeAuthorizationForApplication") => "revoke_token",
        Some("revokeGrantForApplication") => "revoke_grant",
        _ => panic!("demo.js printed an operation this test does not know: {demo_operation:?}"),
    }
}

/// The installed fixture: tests/legacy-client with its node_modules.
pub struct Demo {
    dir: PathBuf,
}

impl Demo {
    /// The fixture, after checking that node runs and the pinned client is installed; panics
    /// naming what is missing and how to install it.
    pub async fn require() -> Demo {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/legacy-client");
        let probe = dir.clone();
        let missing = tokio::task::spawn_blocking(move || missing_prerequisite(&probe))
            .await
            .expect("join the blocking task");
        if let Some(why) = missing {
            panic!(
                "this test needs node and @octokit/rest {OCTOKIT_VERSION}: {why}. Install: {INSTALL}"
            );
        }
        Demo { dir }
    }

    /// Runs demo.js against `base_url` (only `operation` when given) and returns its JSON lines.
    pub async fn run(
        &self,
        base_url: &str,
        token: &str,
        auth: &str,
        operation: Option<&str>,
    ) -> Vec<Value> {
        self.run_with_stderr(base_url, token, auth, operation)
            .await
            .0
    }

    /// As [`Demo::run`], with what the client wrote to stderr. The child runs on the blocking
    /// pool, so a gateway on this runtime keeps serving it.
    pub async fn run_with_stderr(
        &self,
        base_url: &str,
        token: &str,
        auth: &str,
        operation: Option<&str>,
    ) -> (Vec<Value>, String) {
        let mut cmd = Command::new("node");
        cmd.arg(self.dir.join("demo.js"))
            .current_dir(&self.dir)
            .env("GATEWAY_URL", base_url)
            .env("CLIENT_ID", CLIENT_ID)
            .env("CLIENT_SECRET", CLIENT_SECRET)
            .env("ACCESS_TOKEN", token)
            .env("OCTOKIT_AUTH", auth)
            .env_remove("ONLY")
            .env_remove("DEMO_VERBOSE");
        if let Some(op) = operation {
            cmd.env("ONLY", op);
        }
        let what = format!(
            "demo.js (ONLY={}, OCTOKIT_AUTH={auth}, GATEWAY_URL={base_url})",
            operation.unwrap_or("")
        );

        let _slot = NODE_SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let done = tokio::task::spawn_blocking(move || run_bounded(cmd, NODE_TIMEOUT))
            .await
            .expect("join the blocking task")
            .unwrap_or_else(|e| panic!("{what}: could not start node: {e}"));
        let Some(status) = done.status else {
            panic!(
                "{what}: no exit within {NODE_TIMEOUT:?}; killed. stdout:\n{}\nstderr:\n{}",
                done.stdout, done.stderr
            );
        };
        assert!(
            status.success(),
            "{what}: {status}. stdout:\n{}\nstderr:\n{}",
            done.stdout,
            done.stderr
        );
        let lines = done
            .stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!(
                        "{what}: not a JSON line ({e}): {line:?}\nstderr:\n{}",
                        done.stderr
                    )
                })
            })
            .collect();
        (lines, done.stderr)
    }
}

/// A finished (or killed) child: `status` is `None` when it was killed at the deadline.
struct Finished {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with its output captured, killing it if it has not exited within `limit`.
/// Blocking: call from `spawn_blocking`.
fn run_bounded(mut cmd: Command, limit: Duration) -> std::io::Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    // Readers on their own threads, so a chatty child can never block on a full pipe.
    let stdout = read_to_end(child.stdout.take());
    let stderr = read_to_end(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            // Deadline passed, or the child cannot be polled: either way it must not outlive us.
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    Ok(Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn read_to_end(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Why the legacy client cannot run here, if it cannot.
fn missing_prerequisite(dir: &Path) -> Option<String> {
    let mut node = Command::new("node");
    node.arg("--version");
    match run_bounded(node, Duration::from_secs(10)) {
        Err(e) => return Some(format!("`node` could not be started: {e}")),
        Ok(done) => match done.status {
            Some(s) if s.success() => {}
            Some(s) => return Some(format!("`node --version` {s}: {}", done.stderr.trim())),
            None => return Some("`node --version` did not exit within 10 s".to_owned()),
        },
    }
    let manifest = dir.join("node_modules/@octokit/rest/package.json");
    let version = std::fs::read(&manifest)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned));
    match version {
        Some(v) if v == OCTOKIT_VERSION => None,
        Some(v) => Some(format!(
            "tests/legacy-client/node_modules has @octokit/rest {v}, not {OCTOKIT_VERSION}"
        )),
        None => Some("tests/legacy-client/node_modules/@octokit/rest is not installed".to_owned()),
    }
}
