//! Secrets never reach the logs: every operation (legacy and new forms, both prefixes, HTTP/1.1
//! and HTTP/2, query-parameter credentials, gateway errors) runs with logs at trace level, in
//! both formats, through the gateway's own subscriber; then no access token, client secret or
//! Authorization value may appear anywhere in what was written.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::{LogConfig, LogFormat};
use oauth_apps_gateway::logging;
use support::{
    CLIENT_ID, CLIENT_SECRET, basic_auth, call, get, h2c_client, http1_client, setup_with,
};
use tracing::level_filters::LevelFilter;

/// Collects everything the subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn exercise_everything() -> Vec<String> {
    let (gh, gw) = setup_with(|c| c.server.request_timeout = Duration::from_millis(300)).await;
    let mut secrets = vec![CLIENT_SECRET.to_owned(), basic_auth()];
    let auth = basic_auth();
    // Base64 of the credentials alone, as it sits in the header.
    secrets.push(auth.trim_start_matches("Basic ").to_owned());
    let h1 = http1_client();
    let h2 = h2c_client();

    for prefix in ["", "/api/v3"] {
        for client in [&h1, &h2] {
            // check, reset (which mints a new token), revoke_token, revoke_grant.
            let t = gh.issue_token(CLIENT_ID, "octocat");
            secrets.push(t.clone());
            let base = format!("{}{prefix}/applications/{CLIENT_ID}", gw.url());
            let hdrs = [("authorization", auth.as_str())];
            let a = call(
                client,
                Method::GET,
                &format!("{base}/tokens/{t}"),
                &hdrs,
                Bytes::new(),
            )
            .await;
            assert_eq!(a.status, 200);
            let a = call(
                client,
                Method::POST,
                &format!("{base}/tokens/{t}"),
                &hdrs,
                Bytes::new(),
            )
            .await;
            assert_eq!(a.status, 200);
            let new = a.json()["token"].as_str().unwrap().to_owned();
            secrets.push(new.clone());
            let a = call(
                client,
                Method::DELETE,
                &format!("{base}/tokens/{new}"),
                &hdrs,
                Bytes::new(),
            )
            .await;
            assert_eq!(a.status, 204);
            let t2 = gh.issue_token(CLIENT_ID, "octocat");
            secrets.push(t2.clone());
            // Deprecated query credentials instead of the header.
            let a = call(
                client,
                Method::DELETE,
                &format!("{base}/grants/{t2}?client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"),
                &[],
                Bytes::new(),
            )
            .await;
            assert_eq!(a.status, 204);
            // The new forms, passed through.
            let t3 = gh.issue_token(CLIENT_ID, "octocat");
            secrets.push(t3.clone());
            let json = format!(r#"{{"access_token":"{t3}"}}"#);
            let jh = [
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ];
            for (m, path) in [
                (Method::POST, "token"),
                (Method::POST, "token/scoped"),
                (Method::PATCH, "token"),
            ] {
                let a = call(client, m, &format!("{base}/{path}"), &jh, json.clone()).await;
                assert!(a.status == 200 || a.status == 404, "{path}: {}", a.status);
                if let Some(tok) = a.json()["token"].as_str() {
                    secrets.push(tok.to_owned());
                }
            }
            // An invalid token (404), a malformed one (400).
            let bad = "gho_invalid_but_still_secret_0000";
            secrets.push(bad.to_owned());
            let a = call(
                client,
                Method::GET,
                &format!("{base}/tokens/{bad}"),
                &hdrs,
                Bytes::new(),
            )
            .await;
            assert_eq!(a.status, 404);
            let a = call(
                client,
                Method::GET,
                &format!("{base}/tokens/%FF{bad}"),
                &hdrs,
                Bytes::new(),
            )
            .await;
            assert_eq!(a.status, 400);
        }
    }
    // Guess until the failed-check limiter answers 429 (its logs name the client_id only).
    let mut limited = false;
    for i in 0..40 {
        let guess = format!("gho_guessed_secret_{i:04}");
        secrets.push(guess.clone());
        let url = format!("{}/applications/{CLIENT_ID}/tokens/{guess}", gw.url());
        let a = call(
            &h1,
            Method::GET,
            &url,
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await;
        if a.status == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "the limiter never answered 429");
    // access_token as a query parameter on a pass-through call, and a 504.
    let user_token = "gho_user_token_in_query_1234567890";
    secrets.push(user_token.to_owned());
    let a = get(&format!("{}/headers?access_token={user_token}", gw.url())).await;
    assert_eq!(a.status, 200);
    let a = get(&format!("{}/slow?access_token={user_token}", gw.url())).await;
    assert_eq!(a.status, 504);
    gw.shutdown().await;
    secrets
}

async fn assert_no_secret_logged(format: LogFormat) {
    let capture = Capture::default();
    let cfg = LogConfig {
        format,
        level: LevelFilter::TRACE,
    };
    let writer = capture.clone();
    let sub = logging::subscriber(&cfg, None, move || writer.clone()).unwrap();
    // The test runs on a current-thread runtime, so every task the gateway spawns logs here.
    let guard = tracing::subscriber::set_default(sub);
    let secrets = exercise_everything().await;
    drop(guard);

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    // The capture really holds trace-level output and the access events.
    assert!(
        logs.contains("TRACE") || logs.contains("\"level\":\"TRACE\""),
        "no trace output"
    );
    for op in [
        "check",
        "reset",
        "revoke_token",
        "revoke_grant",
        "scope_token",
        "pass_through",
    ] {
        assert!(logs.contains(op), "no access event for {op}");
    }
    for secret in &secrets {
        assert!(!secret.is_empty());
        let encoded: String = url_encode(secret);
        for form in [secret.as_str(), encoded.as_str()] {
            if let Some(at) = logs.find(form) {
                let line_start = logs[..at].rfind('\n').map_or(0, |i| i + 1);
                panic!(
                    "{format} log leaks a secret on this line: {}",
                    &logs[line_start..at]
                );
            }
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn no_secret_in_text_logs_at_trace_level() {
    assert_no_secret_logged(LogFormat::Text).await;
}

#[tokio::test]
async fn no_secret_in_json_logs_at_trace_level() {
    assert_no_secret_logged(LogFormat::Json).await;
}
