//! Runs a real legacy client, @octokit/rest 16.43.2 on node (tests/legacy-client/demo.js),
//! against a gateway in front of the fake GitHub: each of its eight legacy methods, in both auth
//! styles, with and without `/api/v3`. Checks what the client sees, the fake's token state, and
//! that the upstream got only the replacement form. Without node or the client's node_modules it
//! skips with a note, or fails under `CI=true`; install with tests/legacy-client/install.sh.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};
use support::fake_github::RecordedRequest;
use support::{CLIENT_ID, CLIENT_SECRET, basic_auth, setup, setup_with};
use tokio::sync::Semaphore;

const OCTOKIT_VERSION: &str = "16.43.2";
/// One demo run makes at most eight local calls; node itself starts in well under a second.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most two node processes at once, whatever the test harness's thread count.
static NODE_SLOTS: Semaphore = Semaphore::const_new(2);

/// `OCTOKIT_AUTH` values demo.js accepts: `new Octokit({ auth: { clientId, clientSecret } })`
/// and `octokit.authenticate({ type: "basic", ... })`.
const AUTH_STYLES: [&str; 2] = ["auth-object", "authenticate-basic"];
/// The API base URL's path: api.github.com style, then GitHub Enterprise Server style.
const PREFIXES: [&str; 2] = ["", "/api/v3"];

/// The four legacy operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Check,
    Reset,
    RevokeToken,
    RevokeGrant,
}

impl Kind {
    /// Method and last path segment of the replacement endpoint the upstream must receive.
    fn replacement(self) -> (Method, &'static str) {
        match self {
            Kind::Check => (Method::POST, "token"),
            Kind::Reset => (Method::PATCH, "token"),
            Kind::RevokeToken => (Method::DELETE, "token"),
            Kind::RevokeGrant => (Method::DELETE, "grant"),
        }
    }
}

/// demo.js's operations, in the order it runs them when ONLY is unset.
const OPERATIONS: [(&str, Kind); 8] = [
    ("apps.checkAuthorization", Kind::Check),
    ("apps.resetAuthorization", Kind::Reset),
    ("apps.revokeAuthorizationForApplication", Kind::RevokeToken),
    ("apps.revokeGrantForApplication", Kind::RevokeGrant),
    ("oauthAuthorizations.checkAuthorization", Kind::Check),
    ("oauthAuthorizations.resetAuthorization", Kind::Reset),
    (
        "oauthAuthorizations.revokeAuthorizationForApplication",
        Kind::RevokeToken,
    ),
    (
        "oauthAuthorizations.revokeGrantForApplication",
        Kind::RevokeGrant,
    ),
];

#[tokio::test]
async fn check_authorization() {
    each_operation_of(Kind::Check).await;
}

#[tokio::test]
async fn reset_authorization() {
    each_operation_of(Kind::Reset).await;
}

#[tokio::test]
async fn revoke_authorization_for_application() {
    each_operation_of(Kind::RevokeToken).await;
}

#[tokio::test]
async fn revoke_grant_for_application() {
    each_operation_of(Kind::RevokeGrant).await;
}

/// All eight operations in one run, as an operator would first try it. demo.js passes the same
/// ACCESS_TOKEN to every call, so once `apps.resetAuthorization` has replaced it, every later
/// call names a token that no longer exists and GitHub (the fake) answers 404. That is correct.
#[tokio::test]
async fn full_run_reuses_the_token_it_reset() {
    let Some(demo) = legacy_client().await else {
        return;
    };
    for auth in AUTH_STYLES {
        for prefix in PREFIXES {
            let label = format!("all operations, OCTOKIT_AUTH={auth}, prefix {prefix:?}");
            let (gh, gw) = setup().await;
            let token = gh.issue_token(CLIENT_ID, "octocat");
            let lines = demo
                .run(&format!("{}{prefix}", gw.url()), &token, auth, None)
                .await;

            let names: Vec<&str> = OPERATIONS.iter().map(|(name, _)| *name).collect();
            let seen: Vec<&str> = lines
                .iter()
                .map(|l| l["operation"].as_str().unwrap_or(""))
                .collect();
            assert_eq!(seen, names, "{label}");
            let statuses: Vec<Value> = lines.iter().map(|l| l["status"].clone()).collect();
            let want = [200, 200, 404, 404, 404, 404, 404, 404].map(Value::from);
            assert_eq!(statuses, want, "{label}: {lines:#?}");
            assert_eq!(lines[0]["body"]["token"], token.as_str(), "{label}");
            let new = lines[1]["body"]["token"]
                .as_str()
                .unwrap_or_else(|| panic!("{label}: reset gave no token: {:?}", lines[1]));
            assert_ne!(new, token, "{label}");
            for line in &lines[2..] {
                assert_eq!(line["body"]["message"], "Not Found", "{label}: {line}");
            }
            assert!(!gh.token_is_valid(CLIENT_ID, &token), "{label}: old token");
            assert!(gh.token_is_valid(CLIENT_ID, new), "{label}: new token");

            // The report names the library and the release that stops the legacy calls.
            let report = support::get(&format!("{}/legacy-clients", gw.admin_url())).await;
            let client = &report.json()["clients"][0];
            assert_eq!(client["client_id"], CLIENT_ID, "{label}");
            assert_eq!(
                client["advice"][0]["advice"],
                format!("upgrade @octokit/rest (npm) {OCTOKIT_VERSION} to 17.0.0 or later"),
                "{label}: {client}"
            );
            assert_eq!(client["outcomes"]["check"]["success"], 1, "{label}");
            assert_eq!(
                client["outcomes"]["revoke_grant"]["token_failure"], 2,
                "{label}"
            );

            let requests = gh.requests();
            assert_eq!(requests.len(), OPERATIONS.len(), "{label}: upstream calls");
            for (req, (name, kind)) in requests.iter().zip(OPERATIONS) {
                assert_replacement_form(req, kind, prefix, &token, &format!("{label}, {name}"));
            }
        }
    }
}

/// Under the default configuration the client never prints a token or its client secret: no
/// response carries `Deprecation`, which @octokit/request answers by logging the request URL
/// (a legacy URL holds the token; revokeGrant in auth style `auth-object` sends the secret in the
/// query). With `deprecation_headers = true` it does, which is why the default is off.
#[tokio::test]
async fn the_default_never_makes_the_client_print_its_secrets() {
    let Some(demo) = legacy_client().await else {
        return;
    };
    for headers_on in [false, true] {
        let (gh, gw) = setup_with(|c| c.migration.deprecation_headers = headers_on).await;
        let token = gh.issue_token(CLIENT_ID, "octocat");
        let (lines, stderr) = demo
            .run_with_stderr(&gw.url(), &token, "auth-object", None)
            .await;
        assert_eq!(lines.len(), OPERATIONS.len());
        let printed = stderr.contains(&token) || stderr.contains(CLIENT_SECRET);
        assert_eq!(
            printed, headers_on,
            "deprecation_headers = {headers_on}; stderr:\n{stderr}"
        );
    }
}

/// Runs each demo operation of `kind` (its `apps.*` and `oauthAuthorizations.*` names) in both
/// auth styles, with and without `/api/v3`, each against a fresh fake with fresh tokens.
async fn each_operation_of(kind: Kind) {
    let Some(demo) = legacy_client().await else {
        return;
    };
    for (operation, _) in OPERATIONS.iter().filter(|(_, k)| *k == kind) {
        for auth in AUTH_STYLES {
            for prefix in PREFIXES {
                let label = format!("ONLY={operation}, OCTOKIT_AUTH={auth}, prefix {prefix:?}");
                one_operation(&demo, kind, operation, auth, prefix, &label).await;
            }
        }
    }
}

async fn one_operation(
    demo: &Demo,
    kind: Kind,
    operation: &str,
    auth: &str,
    prefix: &str,
    label: &str,
) {
    let (gh, gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    // Same user's other token (gone only with the grant) and another user's (never touched).
    let sibling = gh.issue_token(CLIENT_ID, "octocat");
    let stranger = gh.issue_token(CLIENT_ID, "hubot");

    let lines = demo
        .run(
            &format!("{}{prefix}", gw.url()),
            &token,
            auth,
            Some(operation),
        )
        .await;
    assert_eq!(
        lines.len(),
        1,
        "{label}: one line per operation: {lines:#?}"
    );
    let line = &lines[0];
    assert_eq!(line["operation"], operation, "{label}");
    let client = line["client"].as_str().unwrap_or("");
    assert!(
        client.contains(OCTOKIT_VERSION),
        "{label}: client {client:?}"
    );
    let (status, body) = (&line["status"], &line["body"]);

    let valid = |t: &str| gh.token_is_valid(CLIENT_ID, t);
    match kind {
        Kind::Check => {
            assert_eq!(status, 200, "{label}: {line}");
            assert_eq!(body["token"], token.as_str(), "{label}");
            assert_eq!(body["app"]["client_id"], CLIENT_ID, "{label}");
            assert!(valid(&token), "{label}: checking must not change the token");
        }
        Kind::Reset => {
            assert_eq!(status, 200, "{label}: {line}");
            assert_eq!(body["app"]["client_id"], CLIENT_ID, "{label}");
            let new = body["token"]
                .as_str()
                .unwrap_or_else(|| panic!("{label}: no token in {body}"));
            assert_ne!(new, token, "{label}: reset returned the old token");
            assert!(!valid(&token), "{label}: old token still valid");
            assert!(valid(new), "{label}: new token not valid");
            assert!(valid(&sibling), "{label}: reset touched another token");
        }
        Kind::RevokeToken => {
            assert_eq!(status, 204, "{label}: {line}");
            assert_eq!(body, &Value::Null, "{label}");
            assert!(!valid(&token), "{label}: token still valid");
            assert!(
                valid(&sibling),
                "{label}: revoking one token revoked another"
            );
        }
        Kind::RevokeGrant => {
            assert_eq!(status, 204, "{label}: {line}");
            assert_eq!(body, &Value::Null, "{label}");
            assert!(!valid(&token), "{label}: token still valid");
            assert!(!valid(&sibling), "{label}: the user's other token survived");
        }
    }
    assert!(
        valid(&stranger),
        "{label}: another user's token was revoked"
    );

    let requests = gh.requests();
    assert_eq!(requests.len(), 1, "{label}: upstream calls: {requests:#?}");
    assert_replacement_form(&requests[0], kind, prefix, &token, label);
}

/// The upstream got the replacement call: new method and path with no query (so no query
/// credentials), the token only in the JSON body, the app's Basic credentials, octokit's headers.
fn assert_replacement_form(
    req: &RecordedRequest,
    kind: Kind,
    prefix: &str,
    token: &str,
    label: &str,
) {
    let (method, tail) = kind.replacement();
    assert_eq!(req.method, method, "{label}");
    assert_eq!(
        req.path_and_query,
        format!("{prefix}/applications/{CLIENT_ID}/{tail}"),
        "{label}"
    );
    for secret in [token, CLIENT_SECRET, "client_secret", "access_token"] {
        assert!(
            !req.path_and_query.contains(secret),
            "{label}: {secret:?} in the upstream path or query"
        );
    }
    let body: Value = serde_json::from_slice(&req.body)
        .unwrap_or_else(|e| panic!("{label}: upstream body not JSON ({e}): {:?}", req.body));
    assert_eq!(body, json!({ "access_token": token }), "{label}");
    assert_eq!(req.headers["content-type"], "application/json", "{label}");
    assert_eq!(
        req.headers["content-length"],
        req.body.len().to_string().as_str(),
        "{label}"
    );
    assert_eq!(
        req.headers["authorization"],
        basic_auth().as_str(),
        "{label}"
    );
    for (name, value) in &req.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(!value.contains(token), "{label}: token in header {name}");
        if name != "authorization" {
            assert!(
                !value.contains(CLIENT_SECRET),
                "{label}: secret in header {name}"
            );
        }
    }
    // Proof that the call came from octokit 16, forwarded with its own headers.
    let user_agent = req.headers["user-agent"].to_str().unwrap_or("");
    assert!(
        user_agent.starts_with(&format!("octokit.js/{OCTOKIT_VERSION}")),
        "{label}: user-agent {user_agent:?}"
    );
    let accept = req.headers["accept"].to_str().unwrap_or("");
    assert!(
        accept.contains("application/vnd.github.v3+json"),
        "{label}: accept {accept:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Running demo.js

/// The installed fixture: tests/legacy-client with its node_modules.
struct Demo {
    dir: PathBuf,
}

impl Demo {
    /// Runs demo.js against `base_url` (only `operation` when given) and returns its JSON lines.
    async fn run(
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
    /// pool, so the gateway on this runtime keeps serving it.
    async fn run_with_stderr(
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

// ---------------------------------------------------------------------------------------------
// Prerequisites

/// The fixture when node and its node_modules are there. Otherwise `None` after a `skipped:`
/// note on stderr, or a panic naming the install step under `CI=true` (CI must not skip).
async fn legacy_client() -> Option<Demo> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/legacy-client");
    let probe = dir.clone();
    let missing = tokio::task::spawn_blocking(move || missing_prerequisite(&probe))
        .await
        .expect("join the blocking task");
    let Some(why) = missing else {
        return Some(Demo { dir });
    };
    if on_ci() {
        panic!(
            "legacy-client test cannot run: {why}. CI must install it first: \
             `bash tests/legacy-client/install.sh` (node and npm, then `npm ci` in tests/legacy-client)"
        );
    }
    // Once per run, and straight to stderr: libtest captures `eprintln!` of passing tests.
    static NOTED: AtomicBool = AtomicBool::new(false);
    if NOTED.swap(true, Ordering::Relaxed) {
        return None;
    }
    let _ = writeln!(
        std::io::stderr(),
        "legacy_client: skipped: run `npm ci --prefix tests/legacy-client` ({why})"
    );
    None
}

/// Why the legacy client cannot run here, if it cannot.
fn missing_prerequisite(dir: &Path) -> Option<String> {
    let mut node = Command::new("node");
    node.arg("--version");
    match run_bounded(node, Duration::from_secs(10)) {
        Err(e) => {
            return Some(format!(
                "needs node and npm; `node` could not be started: {e}"
            ));
        }
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

/// `CI=true` (GitHub Actions, GitLab and most CI systems set it) or `CI=1`.
fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}
