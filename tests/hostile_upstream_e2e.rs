//! A hostile upstream (issue 10, point 6): the gateway forwards through an in-test TCP relay
//! (tests/support/faulty_relay.rs) in front of the fake GitHub, which breaks chosen exchanges on
//! the wire: a reset before or after some bytes of the answer, a black hole, garbage instead of
//! HTTP, a half-close, a body shorter than its Content-Length, a delayed extra answer, an
//! unsolicited `101`. For each, this suite proves what the app gets (a GitHub-shaped `502` or
//! `504`, or a truncated body that never looks complete), that `upstream_failures_total` counts
//! each failed call once under the documented kind, that the next call through the same gateway
//! is answered by the upstream (the pool recovers, no stale answer reaches anyone), and that a
//! reset or revoke that reached the upstream is never sent twice while a bodiless GET is retried
//! at most once. Then a load of legacy and pass-through calls with a fault on every 20th
//! upstream request: every call is answered, and the app's tally, the gateway's counters, the
//! relay's log and the fake GitHub's log reconcile exactly.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use support::faulty_relay::{Arrival, Fault, FaultyRelay, RequestHead, STALE_BODY};
use support::{CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic_auth, config_for, scrape};

/// `server.request_timeout` of the gateways here: how long a black hole holds a call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The four `upstream_failures_total` kinds (README: Metrics).
const KINDS: [&str; 4] = ["connect", "tls", "timeout", "protocol"];

/// The fake GitHub, the relay in front of it, and a gateway in front of the relay (one worker
/// thread, so one upstream pool: the next call meets whatever the last one left in it).
struct Rig {
    gh: FakeGithub,
    relay: FaultyRelay,
    gw: Gateway,
}

async fn rig(choose: impl Fn(usize, &RequestHead) -> Fault + Send + Sync + 'static) -> Rig {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let relay = FaultyRelay::start(gh.addr(), choose).await;
    let mut config = config_for(&relay.url());
    config.server.request_timeout = REQUEST_TIMEOUT;
    config.server.worker_threads = Some(1);
    let gw = Gateway::start(config).await;
    Rig { gh, relay, gw }
}

/// A rig whose relay applies `script[i]` to the i-th upstream request, then passes.
async fn scripted(script: Vec<Fault>) -> Rig {
    rig(move |i, _| script.get(i).copied().unwrap_or(Fault::Pass)).await
}

/// What the app got: the status and headers, and the body or why it could not be read whole.
struct Got {
    status: u16,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

impl Got {
    /// The body as JSON; panics (without printing the body, which may hold a token) otherwise.
    fn json(&self) -> serde_json::Value {
        let body = self.body.as_ref().expect("a whole body");
        serde_json::from_slice(body).expect("a JSON body")
    }
}

/// Sends one call on a new connection and reads the answer, each part within 10 s.
async fn send(method: Method, url: &str, headers: &[(&str, &str)]) -> Got {
    let client = support::http1_client();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("a response head within 10 s")
        .expect("a response head");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the body ends within 10 s")
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// The legacy check of `token` with the app's credentials.
async fn legacy_check(gw: &Gateway, token: &str) -> Got {
    let url = format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url());
    let auth = basic_auth();
    send(Method::GET, &url, &[("authorization", auth.as_str())]).await
}

/// A pass-through `GET /headers` (the fake echoes the request headers) tagged `x-seq: seq`.
async fn pass_through(gw: &Gateway, seq: &str) -> Got {
    let url = format!("{}/headers", gw.url());
    send(Method::GET, &url, &[("x-seq", seq)]).await
}

/// The gateway's own answer: `status`, GitHub-shaped JSON (`message` naming `word`, and
/// `documentation_url`), nothing else.
/// Prints no body but the gateway's own (an upstream answer may hold a token).
fn assert_gateway_error(got: &Got, status: u16, word: &str) {
    assert_eq!(got.status, status, "the answer's status");
    assert_eq!(
        got.headers["content-type"],
        "application/json; charset=utf-8"
    );
    let v = got.json();
    let obj = v.as_object().expect("a JSON object");
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys, ["documentation_url", "message"], "the body's fields");
    assert!(
        obj["message"].as_str().is_some_and(|m| m.contains(word)),
        "{v}"
    );
    assert!(obj["documentation_url"].is_string(), "{v}");
}

/// The metric `series`, which must exist.
fn series(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} missing from /metrics"))
}

/// `upstream_failures_total` by kind.
fn failures(m: &HashMap<String, f64>) -> BTreeMap<&'static str, f64> {
    KINDS
        .iter()
        .map(|k| {
            let s = format!("oauth_apps_gateway_upstream_failures_total{{kind=\"{k}\"}}");
            (*k, series(m, &s))
        })
        .collect()
}

/// Exactly `n` failures of `kind`, none of any other kind.
fn assert_failures(m: &HashMap<String, f64>, kind: &str, n: f64) {
    for (k, v) in failures(m) {
        let want = if k == kind { n } else { 0.0 };
        assert_eq!(v, want, "upstream_failures_total{{kind=\"{k}\"}}");
    }
}

/// `responses_total{route,status}`, 0 when the series does not exist.
fn responses(m: &HashMap<String, f64>, route: &str, status: u16) -> f64 {
    let s = format!("oauth_apps_gateway_responses_total{{route=\"{route}\",status=\"{status}\"}}");
    m.get(&s).copied().unwrap_or(0.0)
}

/// The next legacy check through the same gateway is forwarded, passed and answered 200 with
/// the token's own authorization, not anything a broken exchange left behind.
async fn assert_next_check_is_served(rig: &Rig) {
    let token = rig.gh.issue_token(CLIENT_ID, "next-caller");
    let before = rig.relay.arrivals().len();
    let got = legacy_check(&rig.gw, &token).await;
    assert_eq!(got.status, 200, "the call after the fault");
    assert!(
        got.json()["token"] == token.as_str(),
        "the call after the fault got another call's answer"
    );
    let arrivals = rig.relay.arrivals();
    assert_eq!(arrivals.len(), before + 1, "forwarded once");
    assert_eq!(arrivals[before].fault, Fault::Pass);
}

/// A legacy check meets `fault` on its way back: the app gets the gateway's `status` naming
/// `kind`, the check went upstream exactly once (never retried), one failure of `kind` is
/// counted, and the next call is served.
async fn a_check_meets(fault: Fault, status: u16, kind: &str) -> Rig {
    let rig = scripted(vec![fault]).await;
    let token = rig.gh.issue_token(CLIENT_ID, "octocat");
    let started = Instant::now();
    let got = legacy_check(&rig.gw, &token).await;
    let took = started.elapsed();
    assert_gateway_error(&got, status, kind);
    if status == 504 {
        assert!(
            took >= REQUEST_TIMEOUT && took < REQUEST_TIMEOUT + Duration::from_secs(3),
            "answered after {took:?}"
        );
    }
    let arrivals = rig.relay.arrivals();
    assert_eq!(
        arrivals.len(),
        1,
        "the check went upstream once: {arrivals:?}"
    );
    assert_eq!(
        (arrivals[0].method.as_str(), arrivals[0].fault),
        ("POST", fault)
    );
    let forwarded = usize::from(arrivals[0].forwarded);
    assert_eq!(rig.gh.request_count(), forwarded);

    let m = scrape(&rig.gw).await;
    assert_failures(&m, kind, 1.0);
    assert_eq!(responses(&m, "legacy", status), 1.0);
    assert_eq!(
        series(
            &m,
            "oauth_apps_gateway_upstream_duration_seconds_count{route=\"legacy\"}"
        ),
        0.0,
        "the upstream never answered"
    );
    assert_eq!(
        series(
            &m,
            "oauth_apps_gateway_deprecated_calls_total{action=\"rewritten\",operation=\"check\"}"
        ),
        1.0
    );

    assert_next_check_is_served(&rig).await;
    let m = scrape(&rig.gw).await;
    assert_failures(&m, kind, 1.0);
    assert_eq!(responses(&m, "legacy", 200), 1.0);
    rig
}

#[tokio::test]
async fn a_reset_before_any_answer_byte_is_a_502_and_the_next_call_is_served() {
    a_check_meets(Fault::ResetAfter(0), 502, "protocol").await;
}

#[tokio::test]
async fn a_reset_in_the_middle_of_the_answer_head_is_a_502_and_the_next_call_is_served() {
    // "HTTP/1.1 200" and no more.
    a_check_meets(Fault::ResetAfter(12), 502, "protocol").await;
}

#[tokio::test]
async fn garbage_instead_of_http_is_a_502_and_the_next_call_is_served() {
    a_check_meets(Fault::Garbage, 502, "protocol").await;
}

#[tokio::test]
async fn a_half_close_without_an_answer_is_a_502_and_the_next_call_is_served() {
    let rig = a_check_meets(Fault::HalfClose, 502, "protocol").await;
    // The gateway hung up its side of the half-closed connection.
    assert!(
        rig.relay
            .await_closed_by_peer(0, Duration::from_secs(5))
            .await
    );
}

#[tokio::test]
async fn an_unsolicited_101_is_a_502_and_the_next_call_is_served() {
    a_check_meets(Fault::Switching, 502, "protocol").await;
}

#[tokio::test]
async fn a_black_hole_is_a_504_after_request_timeout_and_its_connection_is_released() {
    let rig = a_check_meets(Fault::BlackHole, 504, "timeout").await;
    assert!(
        rig.relay
            .await_closed_by_peer(0, Duration::from_secs(5))
            .await,
        "the gateway still holds the black-holed upstream connection"
    );
}

/// A legacy check whose answer head arrives whole but whose body is cut by `fault`: the app
/// gets the head and a body that fails, never one that looks complete; no upstream failure is
/// counted (the upstream answered); the next call is served.
async fn a_check_body_is_cut_by(fault: Fault) {
    let rig = scripted(vec![fault]).await;
    let token = rig.gh.issue_token(CLIENT_ID, "octocat");
    let got = legacy_check(&rig.gw, &token).await;
    assert_eq!(got.status, 200);
    assert!(got.body.is_err(), "a cut body was delivered as complete");
    let arrivals = rig.relay.arrivals();
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    assert!(arrivals[0].body_cut(), "{:?}", arrivals[0]);

    let m = scrape(&rig.gw).await;
    assert_failures(&m, "protocol", 0.0);
    assert_eq!(responses(&m, "legacy", 200), 1.0);
    assert_eq!(
        series(
            &m,
            "oauth_apps_gateway_upstream_duration_seconds_count{route=\"legacy\"}"
        ),
        1.0
    );
    assert_next_check_is_served(&rig).await;
}

#[tokio::test]
async fn a_reset_inside_the_body_reaches_the_app_as_a_truncated_body() {
    a_check_body_is_cut_by(Fault::ResetInBody(10)).await;
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_reaches_the_app_as_a_truncated_body() {
    a_check_body_is_cut_by(Fault::TruncatedBody).await;
}

#[tokio::test]
async fn a_delayed_extra_response_is_never_delivered_to_the_next_call() {
    let rig = scripted(vec![Fault::ExtraResponse(Duration::from_millis(50))]).await;
    let first = pass_through(&rig.gw, "first").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["x-seq"], serde_json::json!(["first"]));
    // 50 ms later the upstream sends an answer nobody asked for on the idle pooled connection:
    // the gateway must drop that connection rather than keep it for the next call.
    assert!(
        rig.relay
            .await_closed_by_peer(0, Duration::from_secs(5))
            .await,
        "the gateway kept the connection that sent an unrequested answer"
    );
    let second = pass_through(&rig.gw, "second").await;
    assert_eq!(second.status, 200);
    assert!(second.headers.get("x-stale").is_none(), "the stale answer");
    assert_ne!(second.body.as_deref().ok(), Some(STALE_BODY.as_bytes()));
    assert_eq!(second.json()["x-seq"], serde_json::json!(["second"]));
    let arrivals = rig.relay.arrivals();
    assert_eq!(arrivals.len(), 2, "{arrivals:?}");
    assert_ne!(arrivals[0].conn, arrivals[1].conn, "a new connection");
    let m = scrape(&rig.gw).await;
    assert_failures(&m, "protocol", 0.0);
    assert_eq!(responses(&m, "pass_through", 200), 2.0);
}

#[tokio::test]
async fn reset_and_revoke_that_reached_the_upstream_are_never_sent_twice() {
    // The fault is chosen by a header the gateway forwards, so every case runs at once.
    let rig = rig(|_, head| match head.header("x-fault") {
        Some("reset") => Fault::ResetAfter(0),
        Some("half-close") => Fault::HalfClose,
        Some("garbage") => Fault::Garbage,
        Some("black-hole") => Fault::BlackHole,
        _ => Fault::Pass,
    })
    .await;
    let ops = [
        ("reset", Method::POST, "tokens"),
        ("revoke_token", Method::DELETE, "tokens"),
        ("revoke_grant", Method::DELETE, "grants"),
    ];
    let faults = [
        ("reset", 502, "protocol"),
        ("half-close", 502, "protocol"),
        ("garbage", 502, "protocol"),
        ("black-hole", 504, "timeout"),
    ];
    let mut cases = Vec::new();
    for (op, method, segment) in &ops {
        for (fault, status, word) in faults {
            let seq = format!("{op}/{fault}");
            // Its own user, so that one revoke_grant takes no other case's token.
            let token = rig.gh.issue_token(CLIENT_ID, &seq);
            let url = format!(
                "{}/applications/{CLIENT_ID}/{segment}/{token}",
                rig.gw.url()
            );
            let method = method.clone();
            let call = tokio::spawn(async move {
                let auth = basic_auth();
                let hdrs = [
                    ("authorization", auth.as_str()),
                    ("x-fault", fault),
                    ("x-seq", seq.as_str()),
                ];
                send(method, &url, &hdrs).await
            });
            cases.push((format!("{op}/{fault}"), token, status, word, call));
        }
    }
    let mut sent_upstream = HashMap::<String, usize>::new();
    let mut results = Vec::new();
    for (seq, token, status, word, call) in cases {
        let got = call.await.expect("the call task");
        assert_gateway_error(&got, status, word);
        results.push((seq, token, status));
    }
    for r in rig.gh.requests() {
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("a JSON body");
        let token = body["access_token"].as_str().expect("access_token");
        *sent_upstream.entry(token.to_owned()).or_default() += 1;
    }
    let arrivals = rig.relay.arrivals();
    for (seq, token, status) in &results {
        let at_relay = arrivals
            .iter()
            .filter(|a| a.seq.as_deref() == Some(seq.as_str()))
            .count();
        assert_eq!(at_relay, 1, "{seq} reached the upstream {at_relay} times");
        let forwarded = sent_upstream.get(token).copied().unwrap_or(0);
        let black_hole = *status == 504;
        assert_eq!(
            forwarded,
            usize::from(!black_hole),
            "{seq} reached the fake GitHub {forwarded} times"
        );
        // Where it arrived, it took effect, though the app was told 502.
        assert_eq!(
            rig.gh.token_is_valid(CLIENT_ID, token),
            black_hole,
            "{seq}: the token's state"
        );
    }
    let m = scrape(&rig.gw).await;
    let f = failures(&m);
    assert_eq!((f["protocol"], f["timeout"]), (9.0, 3.0), "{f:?}");
    assert_eq!(responses(&m, "legacy", 502), 9.0);
    assert_eq!(responses(&m, "legacy", 504), 3.0);
    for (op, _, _) in ops {
        let s = format!(
            "oauth_apps_gateway_deprecated_calls_total{{action=\"rewritten\",operation=\"{op}\"}}"
        );
        assert_eq!(series(&m, &s), 4.0, "{op}");
    }
}

#[tokio::test]
async fn a_get_reset_before_any_answer_byte_is_retried_once_and_no_more() {
    // Every attempt is reset before a byte of answer.
    let rig = rig(|_, _| Fault::ResetAfter(0)).await;
    let got = pass_through(&rig.gw, "once").await;
    assert_gateway_error(&got, 502, "protocol");
    let arrivals = rig.relay.arrivals();
    assert_eq!(
        arrivals.len(),
        2,
        "sent, reset, sent again, reset: {arrivals:?}"
    );
    assert!(
        arrivals
            .iter()
            .all(|a| a.method == "GET" && a.seq.as_deref() == Some("once"))
    );
    assert_ne!(
        arrivals[0].conn, arrivals[1].conn,
        "again on a new connection"
    );
    let m = scrape(&rig.gw).await;
    // One call failed, once.
    assert_failures(&m, "protocol", 1.0);
    assert_eq!(responses(&m, "pass_through", 502), 1.0);
}

#[tokio::test]
async fn a_get_answered_with_garbage_is_not_retried() {
    let rig = scripted(vec![Fault::Garbage]).await;
    let got = pass_through(&rig.gw, "garbled").await;
    assert_gateway_error(&got, 502, "protocol");
    assert_eq!(rig.relay.arrivals().len(), 1);
    let m = scrape(&rig.gw).await;
    assert_failures(&m, "protocol", 1.0);
    let next = pass_through(&rig.gw, "next").await;
    assert_eq!(next.status, 200);
    assert_eq!(next.json()["x-seq"], serde_json::json!(["next"]));
}

#[tokio::test]
async fn a_get_cut_inside_its_answer_head_is_sent_again_once_and_answered() {
    // README, "Never retried": a bodiless GET whose connection was closed or reset before a
    // complete answer head is sent again once (hyper reports a cut inside the head and a cut
    // before it alike; nginx's `proxy_next_upstream error` retries both). Here 12 bytes of the
    // head arrived, then a reset; the second attempt is answered.
    let rig = scripted(vec![Fault::ResetAfter(12)]).await;
    let got = pass_through(&rig.gw, "partial").await;
    let arrivals = rig.relay.arrivals();
    assert_eq!(arrivals.len(), 2, "cut, then sent again once: {arrivals:?}");
    assert_eq!(got.status, 200, "the second attempt's answer");
    assert_eq!(got.json()["x-seq"], serde_json::json!(["partial"]));
}

// ---------------------------------------------------------------------------------------------
// Load with 5% upstream faults

/// Calls in the load, in all.
const LOAD_CALLS: usize = 2000;
/// Calls in flight at once.
const CONCURRENCY: usize = 32;
/// One upstream request in this many meets a fault.
const FAULT_EVERY: usize = 20;
/// The whole load must be over within this.
const LOAD_BUDGET: Duration = Duration::from_secs(20);

/// The faults of the load, in turn: a reset before any byte, garbage, a short body.
fn load_fault(index: usize) -> Fault {
    if index % FAULT_EVERY != FAULT_EVERY / 2 {
        return Fault::Pass;
    }
    match (index / FAULT_EVERY) % 3 {
        0 => Fault::ResetAfter(0),
        1 => Fault::Garbage,
        _ => Fault::TruncatedBody,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Op {
    Check,
    Reset,
    RevokeToken,
    RevokeGrant,
    PassThrough,
}

impl Op {
    const ALL: [Op; 5] = [
        Op::Check,
        Op::Reset,
        Op::RevokeToken,
        Op::RevokeGrant,
        Op::PassThrough,
    ];

    fn of(i: usize) -> Op {
        Op::ALL[i % Op::ALL.len()]
    }

    fn route(self) -> &'static str {
        match self {
            Op::PassThrough => "pass_through",
            _ => "legacy",
        }
    }

    fn operation(self) -> Option<&'static str> {
        match self {
            Op::Check => Some("check"),
            Op::Reset => Some("reset"),
            Op::RevokeToken => Some("revoke_token"),
            Op::RevokeGrant => Some("revoke_grant"),
            Op::PassThrough => None,
        }
    }

    /// Method and path of the upstream request the gateway makes of it.
    fn upstream(self) -> (&'static str, &'static str) {
        match self {
            Op::Check => ("POST", "/token"),
            Op::Reset => ("PATCH", "/token"),
            Op::RevokeToken => ("DELETE", "/token"),
            Op::RevokeGrant => ("DELETE", "/grant"),
            Op::PassThrough => ("GET", "/headers"),
        }
    }
}

/// How one call of the load ended, as the app saw it.
#[derive(Debug)]
struct Tally {
    i: usize,
    op: Op,
    status: u16,
    /// The body was cut (an error while reading it).
    truncated: bool,
    /// The body was the one this call should get (or the gateway's error for a 502).
    right_body: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_upstream_faults_under_load_every_call_is_answered_and_the_counters_reconcile()
{
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    let relay = FaultyRelay::start(gh.addr(), |i, _| load_fault(i)).await;
    let mut config = config_for(&relay.url());
    config.server.request_timeout = Duration::from_secs(5);
    let gw = Gateway::start(config).await;

    // A token per reset and revoke, each for its own user (a revoke_grant takes all of a
    // user's tokens), and one for every check.
    let check_token = gh.issue_token(CLIENT_ID, "checker");
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..LOAD_CALLS)
            .map(|i| match Op::of(i) {
                Op::Check | Op::PassThrough => String::new(),
                _ => gh.issue_token(CLIENT_ID, &format!("user-{i}")),
            })
            .collect(),
    );

    let client = support::http1_client();
    let next = Arc::new(AtomicUsize::new(0));
    let auth = basic_auth();
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (client, next, tokens) = (client.clone(), next.clone(), tokens.clone());
        let (base, auth, check_token) = (gw.url(), auth.clone(), check_token.clone());
        workers.spawn(async move {
            let mut tallies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= LOAD_CALLS {
                    return tallies;
                }
                let op = Op::of(i);
                let seq = i.to_string();
                let (method, url) = match op {
                    Op::Check => (
                        Method::GET,
                        format!("{base}/applications/{CLIENT_ID}/tokens/{check_token}"),
                    ),
                    Op::Reset => (
                        Method::POST,
                        format!("{base}/applications/{CLIENT_ID}/tokens/{}", tokens[i]),
                    ),
                    Op::RevokeToken => (
                        Method::DELETE,
                        format!("{base}/applications/{CLIENT_ID}/tokens/{}", tokens[i]),
                    ),
                    Op::RevokeGrant => (
                        Method::DELETE,
                        format!("{base}/applications/{CLIENT_ID}/grants/{}", tokens[i]),
                    ),
                    Op::PassThrough => (Method::GET, format!("{base}/headers")),
                };
                let mut req = Request::builder()
                    .method(method)
                    .uri(url)
                    .header("x-seq", seq.as_str());
                if op != Op::PassThrough {
                    req = req.header("authorization", auth.as_str());
                }
                let req = req.body(Full::new(Bytes::new())).expect("request");
                let answer = tokio::time::timeout(Duration::from_secs(10), async {
                    let resp = client.request(req).await.map_err(|e| e.to_string())?;
                    let (parts, body) = resp.into_parts();
                    Ok::<_, String>((parts.status.as_u16(), body.collect().await))
                })
                .await;
                let (status, body) = match answer {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(e)) => panic!("call {i} ({op:?}) got no answer: {e}"),
                    Err(_) => panic!("call {i} ({op:?}) not answered within 10 s"),
                };
                let body = body.map(|c| c.to_bytes()).ok();
                let json = body
                    .as_ref()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
                let right_body = match (status, op, &json) {
                    (502, _, Some(v)) => {
                        v["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("protocol"))
                            && v["documentation_url"].is_string()
                    }
                    (200, Op::Check, Some(v)) => v["token"] == check_token.as_str(),
                    (200, Op::Reset, Some(v)) => {
                        v["token"].is_string() && v["token"] != tokens[i].as_str()
                    }
                    (204, Op::RevokeToken | Op::RevokeGrant, _) => {
                        body.as_ref().is_some_and(Bytes::is_empty)
                    }
                    (200, Op::PassThrough, Some(v)) => v["x-seq"] == serde_json::json!([seq]),
                    _ => false,
                };
                tallies.push(Tally {
                    i,
                    op,
                    status,
                    truncated: body.is_none(),
                    right_body,
                });
            }
        });
    }
    let mut tallies = Vec::with_capacity(LOAD_CALLS);
    let joined = tokio::time::timeout(LOAD_BUDGET, async {
        while let Some(done) = workers.join_next().await {
            tallies.extend(done.expect("a load worker"));
        }
    })
    .await;
    let took = started.elapsed();
    assert!(
        joined.is_ok(),
        "the load was not over within {LOAD_BUDGET:?}"
    );
    eprintln!("{LOAD_CALLS} calls, {CONCURRENCY} at a time, in {took:?}");

    // Every call answered: the right answer, the gateway's 502, or a 200 whose body was cut.
    assert_eq!(tallies.len(), LOAD_CALLS);
    for t in &tallies {
        match (t.status, t.truncated) {
            (200, true) => {}
            (_, true) => panic!("call {} ({:?}): status {} cut", t.i, t.op, t.status),
            (_, false) => assert!(
                t.right_body,
                "call {} ({:?}): status {} with another body",
                t.i, t.op, t.status
            ),
        }
    }
    let count = |f: &dyn Fn(&Tally) -> bool| tallies.iter().filter(|t| f(t)).count();
    let gateway_502 = count(&|t| t.status == 502);
    let truncated = count(&|t| t.truncated);

    // The relay: a fault on every 20th upstream request, as chosen.
    let arrivals = relay.arrivals();
    let faults = |f: &dyn Fn(&Arrival) -> bool| arrivals.iter().filter(|a| f(a)).count();
    let injected = faults(&|a| a.fault != Fault::Pass);
    assert_eq!(
        injected,
        (0..arrivals.len())
            .filter(|&i| load_fault(i) != Fault::Pass)
            .count()
    );
    assert!(
        injected * (FAULT_EVERY + 1) >= LOAD_CALLS,
        "{injected} faults in {} upstream requests",
        arrivals.len()
    );
    eprintln!(
        "{} upstream requests, {injected} faults: {gateway_502} answered 502, {truncated} bodies cut",
        arrivals.len()
    );

    // Upstream requests per call: one, but a GET reset before any answer byte goes again, once.
    let mut per_seq: HashMap<&str, Vec<&Arrival>> = HashMap::new();
    for a in &arrivals {
        per_seq
            .entry(a.seq.as_deref().expect("every load call is tagged"))
            .or_default()
            .push(a);
    }
    assert_eq!(per_seq.len(), LOAD_CALLS, "every call reached the upstream");
    let mut retried = 0;
    for t in &tallies {
        let seq = t.i.to_string();
        let sent = &per_seq[seq.as_str()];
        let (method, path) = t.op.upstream();
        assert!(
            sent.iter()
                .all(|a| a.method == method && a.target.ends_with(path)),
            "call {} ({:?}) was sent as something else",
            t.i,
            t.op
        );
        match sent.as_slice() {
            [_] => {}
            [first, _] if t.op == Op::PassThrough && first.fault == Fault::ResetAfter(0) => {
                retried += 1;
            }
            more => panic!(
                "call {} ({:?}) was sent {} times: {:?}",
                t.i,
                t.op,
                more.len(),
                more.iter().map(|a| a.fault).collect::<Vec<_>>()
            ),
        }
    }
    assert_eq!(arrivals.len(), LOAD_CALLS + retried);
    // Each fault ends in one way: a 502, a cut body, or a GET sent again.
    let breaking = faults(&|a| matches!(a.fault, Fault::ResetAfter(0) | Fault::Garbage));
    assert_eq!(
        gateway_502,
        breaking - retried,
        "502s against breaking faults"
    );
    assert_eq!(truncated, faults(&|a| a.body_cut()), "cut bodies");
    assert!(
        arrivals
            .iter()
            .filter(|a| a.fault == Fault::TruncatedBody)
            .all(|a| a.body_cut() || a.method.starts_with("DELETE")),
        "only a body-less 204 escapes a truncation"
    );

    // The fake GitHub: every upstream request reached it; every reset and revoke exactly once,
    // and took effect.
    let received = gh.requests();
    assert_eq!(received.len(), arrivals.len());
    let mut per_token = HashMap::<&str, usize>::new();
    let bodies: Vec<serde_json::Value> = received
        .iter()
        .filter(|r| r.method != Method::GET)
        .map(|r| serde_json::from_slice(&r.body).expect("a JSON body"))
        .collect();
    for b in &bodies {
        *per_token
            .entry(b["access_token"].as_str().expect("access_token"))
            .or_default() += 1;
    }
    for t in tallies.iter().filter(|t| t.op.operation().is_some()) {
        if t.op == Op::Check {
            continue;
        }
        let token = tokens[t.i].as_str();
        let n = per_token.get(token).copied().unwrap_or(0);
        assert_eq!(n, 1, "call {} ({:?}) reached the fake {n} times", t.i, t.op);
        assert!(
            !gh.token_is_valid(CLIENT_ID, token),
            "call {} ({:?}) took no effect",
            t.i,
            t.op
        );
    }
    let checks = count(&|t| t.op == Op::Check);
    assert_eq!(per_token.get(check_token.as_str()).copied(), Some(checks));

    // The gateway's counters: the app's tally, exactly.
    let m = scrape(&gw).await;
    let mut app_counts = BTreeMap::<(&str, u16), f64>::new();
    for t in &tallies {
        *app_counts.entry((t.op.route(), t.status)).or_default() += 1.0;
    }
    let mut gateway_counts = BTreeMap::<(&str, u16), f64>::new();
    for (s, v) in &m {
        let Some(labels) = s.strip_prefix("oauth_apps_gateway_responses_total{") else {
            continue;
        };
        let route = ["legacy", "token_api", "pass_through"]
            .into_iter()
            .find(|r| labels.contains(&format!("route=\"{r}\"")))
            .expect("a route label");
        let status: u16 = labels
            .split("status=\"")
            .nth(1)
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .expect("a status label");
        if *v > 0.0 {
            gateway_counts.insert((route, status), *v);
        }
    }
    assert_eq!(
        gateway_counts, app_counts,
        "responses_total against the app"
    );
    let f = failures(&m);
    assert_eq!(f["protocol"], gateway_502 as f64, "{f:?}");
    assert_eq!((f["connect"], f["tls"], f["timeout"]), (0.0, 0.0, 0.0));
    for route in ["legacy", "pass_through"] {
        let calls = count(&|t| t.op.route() == route);
        let answered = count(&|t| t.op.route() == route && t.status != 502);
        let requests =
            format!("oauth_apps_gateway_request_duration_seconds_count{{route=\"{route}\"}}");
        let upstream =
            format!("oauth_apps_gateway_upstream_duration_seconds_count{{route=\"{route}\"}}");
        assert_eq!(series(&m, &requests), calls as f64, "{requests}");
        assert_eq!(series(&m, &upstream), answered as f64, "{upstream}");
        for outcome in ["client_gone", "shutdown"] {
            let s = format!(
                "oauth_apps_gateway_interrupted_requests_total{{outcome=\"{outcome}\",route=\"{route}\"}}"
            );
            assert_eq!(series(&m, &s), 0.0, "{s}");
        }
    }
    for op in Op::ALL {
        let Some(operation) = op.operation() else {
            continue;
        };
        let s = format!(
            "oauth_apps_gateway_deprecated_calls_total{{action=\"rewritten\",operation=\"{operation}\"}}"
        );
        assert_eq!(series(&m, &s), count(&|t| t.op == op) as f64, "{s}");
    }
    assert_eq!(series(&m, "oauth_apps_gateway_in_flight_requests"), 0.0);
    assert_eq!(series(&m, "oauth_apps_gateway_detached_exchanges"), 0.0);

    // The legacy-clients report tells each operation's successes and the gateway's answers.
    let report = support::get(&format!("{}/legacy-clients", gw.admin_url())).await;
    assert_eq!(report.status, 200);
    let report = report.json();
    let clients = report["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 1, "{report}");
    let app = &clients[0];
    assert_eq!(app["client_id"], CLIENT_ID);
    for op in Op::ALL {
        let Some(operation) = op.operation() else {
            continue;
        };
        let calls = count(&|t| t.op == op);
        let failed = count(&|t| t.op == op && t.status == 502);
        assert_eq!(app["calls"][operation], calls, "{operation}");
        assert_eq!(
            app["outcomes"][operation]["success"],
            calls - failed,
            "{operation}"
        );
        assert_eq!(app["outcomes"][operation]["gateway"], failed, "{operation}");
    }
}
