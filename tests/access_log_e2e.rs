//! The access log's fields, in both formats, read from what the gateway's own subscriber
//! writes: time, client address behind a trusted proxy, method, route, operation, action,
//! status, bytes in and out, durations as fixed decimals, protocol, user agent (cut, escaped,
//! redacted) and request id (taken when well-formed, else made; forwarded upstream and returned);
//! and a line for a response cut off mid-body or a client gone before the answer.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::LogFormat;
use support::logs::{Capture, capture, text_fields};
use support::{
    CLIENT_ID, CLIENT_SECRET, Gateway, basic_auth, call, config_for, h2c_client, http1_client,
    setup_with,
};
use tracing::level_filters::LevelFilter;

/// The access events in `logs`, each as `field -> value` (JSON numbers and booleans as text),
/// once `n` were written (5 s at most): an event is written when its response body ends, which
/// may be a moment after the client read it.
async fn access_events(
    logs: &Capture,
    format: LogFormat,
    n: usize,
) -> Vec<HashMap<String, String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let lines = logs.access_lines();
        if lines.len() >= n {
            return lines.iter().map(|l| fields(l, format)).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} access events, not {n}: {lines:#?}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fields(line: &str, format: LogFormat) -> HashMap<String, String> {
    match format {
        LogFormat::Text => {
            let mut f = text_fields(line);
            let time = line.split_whitespace().next().unwrap_or("");
            f.insert("time".into(), time.to_owned());
            f
        }
        LogFormat::Json => {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let obj = v.as_object().expect("an object");
            let mut f: HashMap<String, String> = obj
                .iter()
                .map(|(k, v)| {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), text)
                })
                .collect();
            if let Some(t) = f.get("timestamp").cloned() {
                f.insert("time".into(), t);
            }
            // Durations are JSON strings, never numbers (a number could read 6.376e-6).
            for key in ["duration_seconds", "upstream_duration_seconds"] {
                if let Some(d) = obj.get(key) {
                    assert!(d.is_string(), "{key} is {d}");
                }
            }
            f
        }
    }
}

/// `0.000614`: digits, a point, exactly six digits.
fn fixed6(s: &str) -> bool {
    s.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.len() == 6
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

/// RFC 3339 in UTC with a fraction: `2026-12-02T05:54:29.084480Z`.
fn rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > 20 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && s.ends_with('Z')
}

/// A new request id: `8-4-4-4-12` lowercase hex.
fn made_id(s: &str) -> bool {
    let groups: Vec<_> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
}

fn by_id<'a>(events: &'a [HashMap<String, String>], id: &str) -> &'a HashMap<String, String> {
    events
        .iter()
        .find(|e| e.get("request_id").map(String::as_str) == Some(id))
        .unwrap_or_else(|| panic!("no event with request_id {id}: {events:#?}"))
}

async fn every_field(format: LogFormat) {
    let (_guard, logs) = capture(format, LevelFilter::INFO);
    let (gh, gw) = setup_with(|c| {
        c.failed_checks.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let auth = basic_auth();

    // A legacy check over HTTP/1.1 through a trusted proxy, with the app's own request id.
    let check = call(
        &http1_client(),
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("user-agent", "octokit-rest.js/18.12.0"),
            ("x-request-id", "req-42"),
            ("x-forwarded-for", "198.51.100.9, 203.0.113.7"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(check.status, 200);
    assert_eq!(check.headers["x-request-id"], "req-42");
    // A small body (read whole) over HTTP/1.1, a large one (streamed) over HTTP/2.
    let small = call(
        &http1_client(),
        Method::POST,
        &format!("{}/echo", gw.url()),
        &[("user-agent", "curl/8.5.0")],
        "0123456789",
    )
    .await;
    assert_eq!(small.status, 200);
    let large_body = vec![b'x'; 100_000];
    let large = call(
        &h2c_client(),
        Method::POST,
        &format!("{}/echo", gw.url()),
        &[],
        large_body,
    )
    .await;
    assert_eq!(large.status, 200);
    assert_eq!(large.body.len(), 100_000);
    let small_id = small.headers["x-request-id"].to_str().unwrap().to_owned();
    let large_id = large.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(made_id(&small_id) && made_id(&large_id) && small_id != large_id);
    // Forwarded upstream as returned.
    let seen: Vec<_> = gh
        .requests()
        .iter()
        .map(|r| r.headers["x-request-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, ["req-42", small_id.as_str(), large_id.as_str()]);

    let events = access_events(&logs, format, 3).await;
    for e in &events {
        assert!(rfc3339(&e["time"]), "time {:?}", e["time"]);
        assert!(fixed6(&e["duration_seconds"]), "{e:?}");
        assert!(fixed6(&e["upstream_duration_seconds"]), "{e:?}");
        assert_eq!(e["outcome"], "answered");
        assert_eq!(e["response_complete"], "true");
        assert_eq!(e["status"], "200");
    }
    let c = by_id(&events, "req-42");
    assert_eq!(
        c["client_addr"], "203.0.113.7",
        "the hop before the trusted proxy"
    );
    assert_eq!(c["protocol"], "HTTP/1.1");
    assert_eq!(c["method"], "GET");
    assert_eq!(c["route"], "legacy");
    assert_eq!(c["operation"], "check");
    assert_eq!(c["action"], "rewritten");
    assert_eq!(c["request_bytes"], "0");
    assert_eq!(c["response_bytes"], check.body.len().to_string());
    assert_eq!(c["user_agent"], "octokit-rest.js/18.12.0");
    assert_eq!(c["client_id"], CLIENT_ID);
    let s = by_id(&events, &small_id);
    assert_eq!(
        s["client_addr"], "127.0.0.1",
        "no X-Forwarded-For: the peer"
    );
    assert_eq!(s["protocol"], "HTTP/1.1");
    assert_eq!(s["method"], "POST");
    assert_eq!(
        (s["route"].as_str(), s["operation"].as_str()),
        ("pass_through", "pass_through")
    );
    assert!(
        !s.contains_key("action"),
        "no action for a pass-through call"
    );
    assert_eq!(
        (s["request_bytes"].as_str(), s["response_bytes"].as_str()),
        ("10", "10")
    );
    assert_eq!(s["user_agent"], "curl/8.5.0");
    let l = by_id(&events, &large_id);
    assert_eq!(l["protocol"], "HTTP/2");
    assert_eq!(
        (l["request_bytes"].as_str(), l["response_bytes"].as_str()),
        ("100000", "100000")
    );
    assert_eq!(l["user_agent"], "", "no User-Agent");
    gw.shutdown().await;
}

#[tokio::test]
async fn every_field_in_text() {
    every_field(LogFormat::Text).await;
}

#[tokio::test]
async fn every_field_in_json() {
    every_field(LogFormat::Json).await;
}

#[tokio::test]
async fn request_ids_are_taken_when_well_formed_and_otherwise_made_and_never_echoed() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    let (gh, gw) = setup_with(|_| {}).await;
    let auth = basic_auth();
    let long = "a".repeat(129);
    let taken = [
        "req-42",
        "3f2c8a51-9d0e-4b7a-8c13-5e6f70a1b2c3",
        "trace_1:span.2",
    ];
    let refused = [
        "gho_16C7e42F292c6912E7710c838347Ae178B4a",
        "two words",
        "slash/ed",
        long.as_str(),
        // Well-formed, but the secret of the request's own Basic credentials.
        CLIENT_SECRET,
    ];
    let url = format!("{}/echo", gw.url());
    let h1 = http1_client();
    for id in taken.iter().chain(&refused) {
        let a = call(
            &h1,
            Method::GET,
            &url,
            &[("x-request-id", id), ("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, 200);
        let returned = a.headers["x-request-id"].to_str().unwrap();
        let forwarded = gh.requests().last().unwrap().headers.clone();
        let forwarded: Vec<_> = forwarded.get_all("x-request-id").iter().collect();
        assert_eq!(forwarded, [returned], "one id upstream, the one returned");
        if taken.contains(id) {
            assert_eq!(returned, *id);
        } else {
            assert!(made_id(returned), "{id:?} became {returned:?}");
        }
    }
    // Two ids: neither is taken.
    let mut req = http::Request::get(&url);
    req = req
        .header("x-request-id", "one")
        .header("x-request-id", "two");
    let resp = h1
        .request(req.body(http_body_util::Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert!(made_id(resp.headers()["x-request-id"].to_str().unwrap()));

    let events = access_events(&logs, LogFormat::Text, taken.len() + refused.len() + 1).await;
    for id in taken {
        by_id(&events, id);
    }
    let all = logs.text();
    for id in refused {
        assert!(!all.contains(id), "refused id {id:?} logged");
        for r in gh.requests() {
            for v in r.headers.values() {
                assert!(!v.as_bytes().windows(id.len()).any(|w| w == id.as_bytes()));
            }
        }
    }
    gw.shutdown().await;
}

async fn user_agents(format: LogFormat) {
    let (_guard, logs) = capture(format, LevelFilter::INFO);
    let (_gh, gw) = setup_with(|_| {}).await;
    let url = format!("{}/echo", gw.url());
    let h1 = http1_client();
    let long = "a".repeat(300);
    let token = "gho_16C7e42F292c6912E7710c838347Ae178B4a";
    let cases = [
        ("long", long.clone()),
        // A C1 control (CSI, as UTF-8) and a tab.
        ("escaped", "evil\u{9b}[31m\tx".to_owned()),
        ("token", format!("my-app/1.0 (token {token})")),
    ];
    let mut ids = HashMap::new();
    for (name, ua) in &cases {
        let a = call(&h1, Method::GET, &url, &[("user-agent", ua)], Bytes::new()).await;
        assert_eq!(a.status, 200);
        ids.insert(
            *name,
            a.headers["x-request-id"].to_str().unwrap().to_owned(),
        );
    }
    let events = access_events(&logs, format, cases.len()).await;
    let ua = |name: &str| by_id(&events, &ids[name])["user_agent"].clone();
    assert_eq!(ua("long"), "a".repeat(256), "cut to 256 bytes");
    match format {
        // The text format escapes the backslash of `\u{9b}` and the tab once more.
        LogFormat::Text => assert_eq!(ua("escaped"), r"evil\\u{9b}[31m\tx"),
        LogFormat::Json => assert_eq!(ua("escaped"), "evil\\u{9b}[31m\tx"),
    }
    assert_eq!(ua("token"), "[redacted]");
    let all = logs.text();
    assert!(
        !all.contains('\u{9b}'),
        "a raw control character was logged"
    );
    assert!(!all.contains(token));
    gw.shutdown().await;
}

#[tokio::test]
async fn user_agents_are_cut_escaped_and_redacted_in_text() {
    user_agents(LogFormat::Text).await;
}

#[tokio::test]
async fn user_agents_are_cut_escaped_and_redacted_in_json() {
    user_agents(LogFormat::Json).await;
}

#[tokio::test]
async fn a_response_cut_mid_body_and_a_client_gone_before_the_answer_get_their_lines() {
    let (_guard, logs) = capture(LogFormat::Text, LevelFilter::INFO);
    let (_gh, gw) = setup_with(|_| {}).await;
    // The upstream sends 12 bytes and never ends the body; the client reads the head and leaves.
    let resp = support::open_stream(&format!("{}/slow-body", gw.url())).await;
    let cut_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    drop(resp);
    // An upstream that never answers in time; the client leaves while the call is forwarded.
    let (slow, reached) = support::upstream_counting(200, Duration::from_secs(30)).await;
    let gw2 = Gateway::start(config_for(&slow)).await;
    let url = format!("{}/user", gw2.url());
    let user = tokio::spawn(async move {
        call(
            &http1_client(),
            Method::GET,
            &url,
            &[("x-request-id", "gone-1")],
            "",
        )
        .await
    });
    while reached.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    user.abort();

    let events = access_events(&logs, LogFormat::Text, 2).await;
    let cut = by_id(&events, &cut_id);
    assert_eq!(cut["outcome"], "answered");
    assert_eq!(cut["status"], "200");
    assert_eq!(cut["response_complete"], "false");
    let sent: u64 = cut["response_bytes"].parse().unwrap();
    assert!(sent <= 12, "{sent}");
    let gone = by_id(&events, "gone-1");
    assert_eq!(gone["outcome"], "client_gone");
    assert_eq!(gone["status"], "499");
    assert_eq!(gone["response_bytes"], "0");
    assert_eq!(gone["response_complete"], "false");
    assert_eq!(gone["client_addr"], "127.0.0.1");
    assert!(fixed6(&gone["duration_seconds"]));
    assert!(
        !gone.contains_key("upstream_duration_seconds"),
        "the upstream never answered"
    );
    gw.shutdown().await;
    gw2.shutdown().await;
}
