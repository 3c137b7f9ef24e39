//! Upstream failures are logged with the upstream's origin and the failure in plain words
//! (connection refused, a connect timeout and a request timeout with their values, a TLS failure
//! with its reason, an https URL in front of a plain-HTTP server and the reverse), and
//! `oauth_apps_gateway_upstream_consecutive_failures` counts failures until the upstream
//! answers again.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::LogFormat;
use support::faulty_relay::{Fault, FaultyRelay};
use support::logs::{Capture, capture};
use support::tls::TestPki;
use support::{FakeGithub, Gateway, call, config_for, http1_client, scrape};
use tracing::level_filters::LevelFilter;

const CONSECUTIVE: &str = "oauth_apps_gateway_upstream_consecutive_failures";

/// The `upstream exchange failed` lines written so far.
fn failure_lines(logs: &Capture) -> Vec<String> {
    logs.text()
        .lines()
        .filter(|l| l.contains("upstream exchange failed"))
        .map(str::to_owned)
        .collect()
}

/// GETs `/user` through `gw` with a request id; returns the status.
async fn get_user(gw: &Gateway, id: &str) -> u16 {
    call(
        &http1_client(),
        Method::GET,
        &format!("{}/user", gw.url()),
        &[("x-request-id", id)],
        Bytes::new(),
    )
    .await
    .status
    .as_u16()
}

/// The one failure line of request `id`, holding every one of `words`.
fn assert_failure_line(logs: &Capture, id: &str, words: &[&str]) {
    let lines = failure_lines(logs);
    let line = lines
        .iter()
        .find(|l| l.contains(&format!("request_id=\"{id}\"")))
        .unwrap_or_else(|| panic!("no failure line for {id}: {lines:#?}"));
    for w in words {
        assert!(line.contains(w), "{w:?} not in {line}");
    }
}

#[tokio::test]
async fn connection_refused_names_the_origin_and_counts_consecutive_failures() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    // A port nothing listens on any more.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let gw = Gateway::start(config_for(&format!("http://{addr}"))).await;
    assert_eq!(scrape(&gw).await[CONSECUTIVE], 0.0);
    for id in ["refused-1", "refused-2"] {
        assert_eq!(get_user(&gw, id).await, 502);
    }
    assert_eq!(scrape(&gw).await[CONSECUTIVE], 2.0);
    assert_failure_line(
        &logs,
        "refused-2",
        &[
            &format!("upstream=\"http://{addr}\""),
            "kind=\"connect\"",
            "failure=\"connection refused\"",
        ],
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn any_answer_resets_the_consecutive_failures() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    let gh = FakeGithub::start().await;
    // Two answers that are not HTTP, then the real one, then garbage again.
    let relay = FaultyRelay::start(gh.addr(), |i, _| match i {
        0 | 1 | 3 => Fault::Garbage,
        _ => Fault::Pass,
    })
    .await;
    let gw = Gateway::start(config_for(&relay.url())).await;
    assert_eq!(get_user(&gw, "garbage-1").await, 502);
    assert_eq!(get_user(&gw, "garbage-2").await, 502);
    assert_eq!(scrape(&gw).await[CONSECUTIVE], 2.0);
    // The fake's 404 is an answer like any other.
    assert_eq!(get_user(&gw, "answered").await, 404);
    assert_eq!(scrape(&gw).await[CONSECUTIVE], 0.0);
    assert_eq!(get_user(&gw, "garbage-3").await, 502);
    assert_eq!(scrape(&gw).await[CONSECUTIVE], 1.0);
    let origin = relay.url().replace("http://", "");
    assert_failure_line(
        &logs,
        "garbage-1",
        &[
            &format!("upstream=\"http://{origin}\""),
            "kind=\"protocol\"",
            "the answer was not HTTP",
        ],
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_https_url_in_front_of_a_plain_http_server_is_named() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    let gh = FakeGithub::start().await;
    let gw = Gateway::start(config_for(&format!("https://{}", gh.addr()))).await;
    assert_eq!(get_user(&gw, "plain-1").await, 502);
    assert_failure_line(
        &logs,
        "plain-1",
        &[
            &format!("upstream=\"https://{}\"", gh.addr()),
            "kind=\"tls\"",
            "upstream.url is https but the server spoke plain HTTP",
        ],
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_http_url_in_front_of_a_tls_server_is_named() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    let pki = TestPki::new(&[b"http/1.1"]);
    let gh = FakeGithub::start_tls(pki.server_config.clone()).await;
    let gw = Gateway::start(config_for(&format!("http://{}", gh.addr()))).await;
    assert_eq!(get_user(&gw, "tls-server-1").await, 502);
    assert_failure_line(
        &logs,
        "tls-server-1",
        &[
            &format!("upstream=\"http://{}\"", gh.addr()),
            "if the server speaks TLS on this port, upstream.url must be https://",
        ],
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_tls_failure_gives_its_reason() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    // Signed by a CA the gateway was not told about.
    let pki = TestPki::new(&[b"http/1.1"]);
    let gh = FakeGithub::start_tls(pki.server_config.clone()).await;
    let gw = Gateway::start(config_for(&gh.url())).await;
    assert_eq!(get_user(&gw, "untrusted-1").await, 502);
    assert_failure_line(
        &logs,
        "untrusted-1",
        &[
            &format!("upstream=\"https://{}\"", gh.addr()),
            "kind=\"tls\"",
            "TLS handshake failed: invalid peer certificate: UnknownIssuer",
        ],
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_request_timeout_is_named_with_its_value() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    let url = support::upstream_answering(200, Duration::from_secs(30)).await;
    let mut config = config_for(&url);
    config.server.request_timeout = Duration::from_millis(300);
    let gw = Gateway::start(config).await;
    assert_eq!(get_user(&gw, "slow-1").await, 504);
    assert_failure_line(
        &logs,
        "slow-1",
        &[
            &format!("upstream=\"{url}\""),
            "kind=\"timeout\"",
            "timeout=\"server.request_timeout\"",
            "timeout_seconds=0.300000",
            "no response head within server.request_timeout (0.300000 s)",
        ],
    );
    assert_eq!(scrape(&gw).await[CONSECUTIVE], 1.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_connect_timeout_is_named_with_its_value() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    // A listener that never accepts, its queue full: Linux drops further SYNs, so a connect
    // hangs (it retries after 1 s, past the 200 ms connect timeout).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(100), s.connect(addr)).await {
            fill.push(c);
        }
    }
    let mut config = config_for(&format!("http://{addr}"));
    config.upstream.connect_timeout = Duration::from_millis(200);
    let gw = Gateway::start(config).await;
    assert_eq!(get_user(&gw, "connect-1").await, 504);
    assert_failure_line(
        &logs,
        "connect-1",
        &[
            &format!("upstream=\"http://{addr}\""),
            "kind=\"timeout\"",
            "timeout=\"upstream.connect_timeout\"",
            "timeout_seconds=0.200000",
        ],
    );
    drop((fill, listener));
    gw.shutdown().await;
}
