//! Secrets never reach the logs: every operation (legacy and new forms, both prefixes, HTTP/1.1
//! and HTTP/2, query-parameter credentials, gateway errors, the failed-check limiter in enforce
//! and shadow mode, a caller who hangs up) runs with logs at trace level, in both formats,
//! through the gateway's own subscriber; then no access token, client secret, Authorization
//! value or credential hash may appear anywhere in what was written, nor in the metrics, the
//! legacy-client report or the gateway's own error bodies. Secrets are also put where the access
//! log reads (User-Agent, X-Request-Id, path, query): none may be logged, and a refused request
//! id is neither returned to the client nor forwarded upstream.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::{FailedChecksMode, LogFormat};
use support::{
    CLIENT_ID, CLIENT_SECRET, Gateway, basic_auth, call, config_for, get, h2c_client, http1_client,
    http1_client_from, setup_with,
};
use tracing::level_filters::LevelFilter;

/// Runs every path; returns the secrets used and what the gateway published (metrics, report,
/// its own error bodies).
async fn exercise_everything() -> (Vec<String>, String) {
    let (gh, gw) = setup_with(|c| {
        c.server.request_timeout = Duration::from_millis(300);
        c.failed_checks.token.burst = 5;
    })
    .await;
    let mut published = String::new();
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
    // Secrets where the access log reads: the User-Agent and X-Request-Id of a legacy call (its
    // token, the client secret, the Authorization value), and of a pass-through call with a
    // token in its path and query. None may be logged, and no refused id echoed or forwarded.
    let t = gh.issue_token(CLIENT_ID, "octocat");
    secrets.push(t.clone());
    let b64 = auth.trim_start_matches("Basic ").to_owned();
    let in_path = "gho_pass_through_path_token_0000";
    let in_query = "gho_pass_through_query_token_000";
    secrets.extend([in_path.to_owned(), in_query.to_owned()]);
    let legacy = format!("{}/applications/{CLIENT_ID}/tokens/{t}", gw.url());
    let pass = format!("{}/repos/{in_path}/x?access_token={in_query}", gw.url());
    let agents = [
        format!("octokit/1 {t}"),
        format!("app/1 (s {CLIENT_SECRET})"),
        format!("app/1 {auth}"),
        format!("app/1 x{b64}x"),
        format!("app/1 {in_path} {in_query}"),
    ];
    let ids = [
        t.clone(),
        CLIENT_SECRET.to_owned(),
        b64.clone(),
        in_path.to_owned(),
        in_query.to_owned(),
    ];
    for (ua, id) in agents.iter().zip(&ids) {
        for url in [&legacy, &pass] {
            let a = call(
                &h1,
                Method::GET,
                url,
                &[
                    ("authorization", auth.as_str()),
                    ("user-agent", ua.as_str()),
                    ("x-request-id", id.as_str()),
                ],
                Bytes::new(),
            )
            .await;
            assert!(a.status == 200 || a.status == 404, "{}", a.status);
            let returned = a.headers["x-request-id"].to_str().unwrap();
            published.push_str(returned);
            published.push('\n');
        }
    }
    // What reached the upstream as X-Request-Id.
    for r in gh.requests() {
        for v in r.headers.get_all("x-request-id") {
            published.push_str(&String::from_utf8_lossy(v.as_bytes()));
            published.push('\n');
        }
    }
    // Guess tokens until the token-failure quota answers 429, then secrets from another
    // address until the credential quota does (its logs name the client_id only).
    let guess_until_429 = |auth: String, from: &'static str, prefix: &'static str| {
        let gw_url = gw.url();
        async move {
            let mut guessed = Vec::new();
            for i in 0..40 {
                let guess = format!("gho_{prefix}_{i:04}");
                guessed.push(guess.clone());
                let url = format!("{gw_url}/applications/{CLIENT_ID}/tokens/{guess}");
                let a = call(
                    &http1_client_from(from),
                    Method::GET,
                    &url,
                    &[("authorization", auth.as_str())],
                    Bytes::new(),
                )
                .await;
                if a.status == 429 {
                    return (guessed, Some(a));
                }
            }
            (guessed, None)
        }
    };
    let (guessed, limited) = guess_until_429(auth.clone(), "127.0.0.1", "guessed_token").await;
    secrets.extend(guessed);
    let limited = limited.expect("the token quota never answered 429");
    published.push_str(&String::from_utf8_lossy(&limited.body));
    let wrong_secret = "wrong-secret-0123456789abcdef";
    let wrong = support::basic(CLIENT_ID, wrong_secret);
    secrets.extend([
        wrong_secret.to_owned(),
        wrong.clone(),
        wrong.trim_start_matches("Basic ").to_owned(),
    ]);
    let (guessed, limited) = guess_until_429(wrong, "127.0.0.2", "guess_with_wrong_secret").await;
    secrets.extend(guessed);
    let limited = limited.expect("the credential quota never answered 429");
    published.push_str(&String::from_utf8_lossy(&limited.body));
    // Shadow mode, and a caller who hangs up, against an upstream slow to say 404.
    let (slow, reached) = support::upstream_counting(404, Duration::from_millis(300)).await;
    let mut shadow = config_for(&slow);
    shadow.failed_checks.mode = FailedChecksMode::Shadow;
    shadow.failed_checks.token.burst = 1;
    let gw2 = Gateway::start(shadow).await;
    for i in 0..3 {
        let guess = format!("gho_shadow_guess_{i:04}");
        secrets.push(guess.clone());
        let url = format!("{}/applications/{CLIENT_ID}/tokens/{guess}", gw2.url());
        let a = call(
            &h1,
            Method::GET,
            &url,
            &[("authorization", auth.as_str())],
            "",
        )
        .await;
        assert_eq!(a.status, 404);
    }
    let gone = "gho_hung_up_guess_0000";
    secrets.push(gone.to_owned());
    let url = format!("{}/applications/{CLIENT_ID}/tokens/{gone}", gw2.url());
    let hung_up = {
        let (h2, auth) = (h2.clone(), auth.clone());
        tokio::spawn(async move {
            let hdrs = [("authorization", auth.as_str())];
            call(&h2, Method::DELETE, &url, &hdrs, "").await
        })
    };
    // Hang up once the call was forwarded (5 s at most), so the detached path runs.
    for _ in 0..500 {
        if reached.load(std::sync::atomic::Ordering::SeqCst) > 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hung_up.abort();
    gw2.shutdown().await;
    // access_token as a query parameter on a pass-through call, and a 504.
    let user_token = "gho_user_token_in_query_1234567890";
    secrets.push(user_token.to_owned());
    let a = get(&format!("{}/headers?access_token={user_token}", gw.url())).await;
    assert_eq!(a.status, 200);
    let a = get(&format!("{}/slow?access_token={user_token}", gw.url())).await;
    assert_eq!(a.status, 504);
    published.push_str(&String::from_utf8_lossy(&a.body));
    for page in ["metrics", "legacy-clients"] {
        let a = get(&format!("{}/{page}", gw.admin_url())).await;
        published.push_str(&String::from_utf8_lossy(&a.body));
    }
    gw.shutdown().await;
    (secrets, published)
}

async fn assert_no_secret_logged(format: LogFormat) {
    let (guard, capture) = support::logs::capture(format, LevelFilter::TRACE);
    let (secrets, published) = exercise_everything().await;
    drop(guard);

    let logs = capture.text();
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
    for path in ["answered 429", "shadow mode", "client_gone"] {
        assert!(logs.contains(path), "the {path} path was not exercised");
    }
    // A credential hash, printed as hex, would be a run of 32 or more hex digits.
    let longest_hex_run = logs
        .split(|c: char| !c.is_ascii_hexdigit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest_hex_run < 32,
        "a {longest_hex_run}-digit hex run was logged"
    );
    for secret in &secrets {
        assert!(
            !published.contains(secret.as_str()),
            "a secret is in the metrics, the report or an error body"
        );
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
