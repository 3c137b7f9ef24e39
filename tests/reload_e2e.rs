//! Live reload (issue 11): `POST /reload` on the admin listener reads the config file again and
//! puts it in force for new requests without closing a connection or failing a request in
//! flight; a file that does not validate changes nothing and is counted as an error; the
//! failed-check limiter's state and the legacy-caller report carry over.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::{
    CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic, basic_auth, call, get, http1_client,
    scrape,
};

/// Writes a config file forwarding to `upstream` with `extra` appended (sections of its own).
fn write_config(path: &Path, upstream: &str, extra: &str) {
    std::fs::write(path, format!("[upstream]\nurl = {upstream:?}\n{extra}")).unwrap();
}

/// `POST /reload` on the gateway's admin listener: the status and the JSON answer.
async fn reload(gw: &Gateway) -> (StatusCode, serde_json::Value) {
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/reload", gw.admin_url()),
        &[],
        Bytes::new(),
    )
    .await;
    (a.status, a.json())
}

async fn started(extra: &str) -> (FakeGithub, Gateway, tempfile::TempDir, String) {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_config(&path, &gh.url(), extra);
    let gw = Gateway::start_from_file(&path).await;
    (gh, gw, dir, token)
}

/// The acceptance test of point 1: 100 reloads, one in five of a file that does not validate,
/// while keep-alive clients call without pause. Each client uses one connection for the whole
/// run: a connection closed by a reload would fail its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_keep_alive_load_fail_no_request_and_close_no_connection() {
    let (gh, gw, dir, token) = started("").await;
    let path = dir.path().join("config.toml");
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for i in 0..8 {
        let (addr, token) = (gw.addr, token.clone());
        let (stop, stopped) = (stop.clone(), stopped.clone());
        let (ok, failed) = (ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            let auth = basic_auth();
            // Bounded: 20 s or the end of the reloads, whichever first.
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            for n in 0u64.. {
                if stopped.load(Ordering::Relaxed) || tokio::time::Instant::now() > until {
                    break;
                }
                // Legacy checks and pass-through calls, alternately.
                let (path, want) = match (i + n) % 2 {
                    0 => (format!("/applications/{CLIENT_ID}/tokens/{token}"), 200),
                    _ => ("/rate_limit".to_owned(), 0),
                };
                let req = Request::get(path)
                    .header("host", "gateway")
                    .header("authorization", &auth)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let answered = async {
                    let resp = send.send_request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    Ok::<_, hyper::Error>(status)
                };
                match tokio::time::timeout(Duration::from_secs(10), answered).await {
                    Ok(Ok(status)) if want == 0 || status == want => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("client {i}: call {n}: {other:?}");
                        break;
                    }
                }
            }
            drop(stop);
            drop(send);
            let _ = conn.await;
        }));
    }
    // Give every client its connection first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = ok.load(Ordering::Relaxed);
    for i in 0..100 {
        let extra = match i % 5 {
            // Not valid: the running configuration stays.
            2 => "[server]\nrequest_timeout = \"soon\"\n".to_owned(),
            // Valid, each changing what new requests get.
            _ => format!(
                "[server]\nrequest_timeout = \"{}s\"\n[migration]\ndeprecation_headers = {}\n[failed_checks]\ncredential_burst = {}\n[log]\nlevel = \"{}\"\n",
                20 + i,
                i % 2 == 0,
                10 + i % 3,
                ["info", "debug", "warn"][i % 3],
            ),
        };
        write_config(&path, &gh.url(), &extra);
        let (status, body) = reload(&gw).await;
        match i % 5 {
            2 => assert_eq!(status, 422, "{body}"),
            _ => assert_eq!(status, 200, "{body}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = ok.load(Ordering::Relaxed) - before;
    stopped.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed or connections reset"
    );
    assert!(
        during >= 100,
        "only {during} calls were answered during the reloads"
    );
    let m = scrape(&gw).await;
    assert_eq!(
        m[r#"oauth_apps_gateway_config_reloads_total{result="success"}"#],
        80.0
    );
    assert_eq!(
        m[r#"oauth_apps_gateway_config_reloads_total{result="error"}"#],
        20.0
    );
    assert_eq!(m["oauth_apps_gateway_config_last_reload_successful"], 1.0);
    drop(gh);
}

/// A changed operation mode applies to the next call; a file that does not validate changes
/// nothing, answers 422 naming the key, value and what was expected, and is counted; a changed
/// listen address is reported as needing a restart while the rest applies.
#[tokio::test]
async fn a_reload_applies_modes_at_once_and_refuses_a_bad_file_whole() {
    let (gh, gw, dir, token) = started("").await;
    let path = dir.path().join("config.toml");
    let check = format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url());
    let auth = basic_auth();
    let headers = [("authorization", auth.as_str())];
    let client = http1_client();
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        200
    );

    write_config(
        &path,
        &gh.url(),
        "[migration.operations]\ncheck = \"reject\"\n",
    );
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], serde_json::json!(["migration"]));
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        410
    );

    // Not valid, and it would also have switched check back on: nothing of it applies.
    write_config(
        &path,
        &gh.url(),
        "[migration.operations]\ncheck = \"rewrite\"\n[server]\nrequest_timeout = \"soon\"\n",
    );
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 422, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("server.request_timeout") && message.contains("\"soon\""),
        "{message}"
    );
    assert!(message.contains("config.toml"), "names the file: {message}");
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        410
    );
    let m = scrape(&gw).await;
    assert_eq!(
        m[r#"oauth_apps_gateway_config_reloads_total{result="error"}"#],
        1.0
    );
    assert_eq!(m["oauth_apps_gateway_config_last_reload_successful"], 0.0);

    // A new listen address needs a restart; the mode in the same file applies now.
    write_config(
        &path,
        &gh.url(),
        "[server]\nlisten = \"127.0.0.1:1\"\n[migration.operations]\ncheck = \"rewrite\"\n",
    );
    let (status, body) = reload(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["needs_restart"], serde_json::json!(["server.listen"]));
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        200
    );
    let m = scrape(&gw).await;
    assert_eq!(m["oauth_apps_gateway_config_last_reload_successful"], 1.0);
    assert_eq!(
        m[r#"oauth_apps_gateway_config_reloads_total{result="success"}"#],
        2.0
    );
}

/// A reload with the same quotas refills no bucket; a larger burst applies to the spent key at
/// once, from its state; the legacy-caller report and the counters carry over.
#[tokio::test]
async fn limiter_state_and_the_legacy_caller_report_survive_a_reload() {
    let quota = |burst: u32| {
        format!("[failed_checks]\ncredential_burst = {burst}\ncredential_replenish = \"1h\"\n")
    };
    let (gh, gw, dir, token) = started(&quota(3)).await;
    let path = dir.path().join("config.toml");
    let client = http1_client();
    let url = format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url());
    let wrong = basic(CLIENT_ID, "not-the-secret");
    let headers = [("authorization", wrong.as_str())];
    let guess = || call(&client, Method::GET, &url, &headers, Bytes::new());
    for _ in 0..3 {
        assert_eq!(guess().await.status, 401);
    }
    assert_eq!(guess().await.status, 429);
    let report_before = get(&format!("{}/legacy-clients", gw.admin_url()))
        .await
        .json();
    let calls_before = report_before["clients"][0]["total"].as_u64().unwrap();
    assert_eq!(report_before["clients"][0]["client_id"], CLIENT_ID);

    // Same quotas, another change: still spent.
    write_config(
        &path,
        &gh.url(),
        &format!("{}[migration]\ndeprecation_headers = true\n", quota(3)),
    );
    assert_eq!(reload(&gw).await.0, 200);
    let a = guess().await;
    assert_eq!(a.status, 429, "a reload refilled the spent key");
    assert!(
        a.headers.contains_key("deprecation"),
        "the rest of the file applied"
    );

    // Burst 3 -> 5: two more failures, at once, then spent again.
    write_config(&path, &gh.url(), &quota(5));
    assert_eq!(reload(&gw).await.0, 200);
    assert_eq!(guess().await.status, 401);
    assert_eq!(guess().await.status, 401);
    assert_eq!(guess().await.status, 429);

    let report = get(&format!("{}/legacy-clients", gw.admin_url()))
        .await
        .json();
    assert_eq!(report["clients"][0]["client_id"], CLIENT_ID);
    assert!(
        report["clients"][0]["total"].as_u64().unwrap() > calls_before,
        "the report lost its counts: {report}"
    );
    let m = scrape(&gw).await;
    assert_eq!(
        m[r#"oauth_apps_gateway_failed_checks_rejected_total{class="credential",key_kind="credential"}"#],
        3.0
    );
}

/// `/reload` is POST only, and absent when the gateway was not started from a file. (That it
/// is refused to a caller from outside the host is a unit test in `admin`: every address a
/// test may use is a loopback address.)
#[tokio::test]
async fn reload_is_post_only_and_needs_a_file() {
    let (_gh, gw, _dir, _token) = started("").await;
    let url = format!("{}/reload", gw.admin_url());
    let a = get(&url).await;
    assert_eq!(a.status, 405);
    assert_eq!(a.headers["allow"], "POST");
    let m = scrape(&gw).await;
    assert_eq!(
        m.get(r#"oauth_apps_gateway_config_reloads_total{result="success"}"#),
        Some(&0.0)
    );

    let (_gh2, no_file) = support::setup().await;
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/reload", no_file.admin_url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 404);
}

/// A reload keeps the upstream connection pools when `[upstream]` did not change (no reconnect
/// to GitHub per SIGHUP), builds new ones when it did, and a new `upstream.url` takes the next
/// call.
#[tokio::test]
async fn a_reload_keeps_upstream_connections_unless_the_upstream_changed() {
    use support::faulty_relay::{Fault, FaultyRelay};
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let relay = FaultyRelay::start(gh.addr(), |_, _| Fault::Pass).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let one_worker = "[server]\nworker_threads = 1\n";
    write_config(&path, &relay.url(), one_worker);
    let gw = Gateway::start_from_file(&path).await;
    let check = format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url());
    let auth = basic_auth();
    let headers = [("authorization", auth.as_str())];
    let client = http1_client();
    let conns = || {
        let mut c: Vec<usize> = relay.arrivals().iter().map(|a| a.conn).collect();
        c.dedup();
        c
    };
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        200
    );

    write_config(
        &path,
        &relay.url(),
        &format!("{one_worker}[migration]\ndeprecation_headers = true\n"),
    );
    assert_eq!(reload(&gw).await.0, 200);
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(
        conns(),
        vec![0],
        "the pool was rebuilt by a reload that left [upstream] alone"
    );

    std::fs::write(
        &path,
        format!(
            "{one_worker}[upstream]\nurl = {:?}\nconnect_timeout = \"3s\"\n",
            relay.url()
        ),
    )
    .unwrap();
    assert_eq!(reload(&gw).await.0, 200);
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(conns(), vec![0, 1], "a changed [upstream] got new pools");

    // Another upstream altogether: the next call goes there.
    let other = FakeGithub::start().await;
    other.add_app(CLIENT_ID, CLIENT_SECRET);
    other.add_token(CLIENT_ID, "octocat", &token);
    write_config(&path, &other.url(), one_worker);
    assert_eq!(reload(&gw).await.0, 200);
    assert_eq!(
        call(&client, Method::GET, &check, &headers, Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(other.request_count(), 1);
    assert_eq!(relay.arrivals().len(), 3);
}
