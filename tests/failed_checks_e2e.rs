//! The failed-check limiter end to end, on a manual clock (no sleeps): exactly `burst` failures
//! reach the upstream, then token operations get 429 with Retry-After and never reach it; keys
//! recover after the replenish interval; other keys, successes and non-token calls are not
//! limited; client IPs come from X-Forwarded-For only behind a trusted proxy.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::Config;
use oauth_apps_gateway::limiter::LimiterClock;
use support::{
    Answer, CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic_auth, call, config_for, get,
    http1_client, scrape,
};

struct Setup {
    gh: FakeGithub,
    gw: Gateway,
    clock: LimiterClock,
}

async fn setup(adjust: impl FnOnce(&mut Config)) -> Setup {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    gh.add_app("Iv1.other", "other-secret");
    let mut config = config_for(&gh.url());
    config.failed_checks.client_id_burst = 3;
    config.failed_checks.client_id_replenish = Duration::from_secs(60);
    config.failed_checks.client_ip_burst = 5;
    config.failed_checks.client_ip_replenish = Duration::from_secs(30);
    // The tests speak from 127.0.0.1 and name the client in X-Forwarded-For.
    config.failed_checks.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    adjust(&mut config);
    let clock = LimiterClock::manual();
    let gw = Gateway::start_with_clock(config, clock.clone()).await;
    Setup { gh, gw, clock }
}

/// A legacy check of `token` for `client_id`, coming from `client_ip` via the trusted proxy.
async fn check(s: &Setup, client_id: &str, token: &str, client_ip: &str) -> Answer {
    let secret = if client_id == CLIENT_ID {
        CLIENT_SECRET
    } else {
        "other-secret"
    };
    let auth = basic(client_id, secret);
    call(
        &http1_client(),
        Method::GET,
        &format!("{}/applications/{client_id}/tokens/{token}", s.gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("x-forwarded-for", client_ip),
        ],
        Bytes::new(),
    )
    .await
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

#[tokio::test]
async fn exactly_burst_failures_pass_then_429_without_reaching_the_upstream() {
    let s = setup(|_| {}).await;
    for i in 0..3 {
        let a = check(&s, CLIENT_ID, &format!("gho_guess_{i}"), "203.0.113.1").await;
        assert_eq!(a.status, 404, "failure {i} reaches the upstream");
    }
    assert_eq!(s.gh.request_count(), 3);

    // Quota spent: even a valid token gets 429 now, and nothing is forwarded.
    let good = s.gh.issue_token(CLIENT_ID, "octocat");
    for ip in ["203.0.113.1", "203.0.113.2"] {
        let a = check(&s, CLIENT_ID, &good, ip).await;
        assert_eq!(a.status, 429);
        assert_eq!(a.headers["retry-after"], "60");
        let body = a.json();
        assert!(
            body["message"].as_str().unwrap().contains("client_id"),
            "{body}"
        );
        assert!(body["documentation_url"].is_string());
        assert!(!String::from_utf8_lossy(&a.body).contains(&good));
        assert!(
            a.headers
                .keys()
                .all(|k| !k.as_str().starts_with("x-ratelimit"))
        );
        // A legacy call's 429 is signalled as deprecated like every other answer.
        assert_eq!(a.headers["deprecation"], "@1581638400");
    }
    // The new form is limited by the same key.
    let auth = basic_auth();
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/applications/{CLIENT_ID}/token", s.gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        format!(r#"{{"access_token":"{good}"}}"#),
    )
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(
        s.gh.request_count(),
        3,
        "a blocked key reached the upstream"
    );

    let m = scrape(&s.gw).await;
    assert_eq!(
        m["oauth_apps_gateway_failed_checks_total{key_kind=\"client_id\"}"],
        3.0
    );
    assert_eq!(
        m["oauth_apps_gateway_failed_checks_total{key_kind=\"client_ip\"}"],
        3.0
    );
    assert_eq!(
        m["oauth_apps_gateway_failed_checks_rejected_total{key_kind=\"client_id\"}"],
        3.0
    );
    assert_eq!(
        m["oauth_apps_gateway_failed_checks_tracked_keys{key_kind=\"client_id\"}"],
        1.0
    );
    assert_eq!(
        m["oauth_apps_gateway_failed_checks_tracked_keys{key_kind=\"client_ip\"}"],
        1.0
    );
    assert_eq!(
        m["oauth_apps_gateway_responses_total{route=\"legacy\",status=\"429\"}"],
        2.0
    );
    // The two 429'd legacy checks were never forwarded: counted as limited, not rewritten.
    let dep = |action: &str| {
        m[&format!(
            "oauth_apps_gateway_deprecated_calls_total{{action=\"{action}\",operation=\"check\"}}"
        )]
    };
    assert_eq!((dep("rewritten"), dep("limited")), (3.0, 2.0));
}

#[tokio::test]
async fn a_key_recovers_after_the_replenish_interval() {
    let s = setup(|_| {}).await;
    for i in 0..3 {
        check(&s, CLIENT_ID, &format!("gho_guess_{i}"), "203.0.113.1").await;
    }
    let good = s.gh.issue_token(CLIENT_ID, "octocat");
    s.clock.advance(Duration::from_millis(59_500));
    let a = check(&s, CLIENT_ID, &good, "203.0.113.1").await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers["retry-after"], "1", "half a second rounds up");
    s.clock.advance(Duration::from_millis(500));
    assert_eq!(check(&s, CLIENT_ID, &good, "203.0.113.1").await.status, 200);
    // One failure regained, one spent: blocked again for a full interval.
    assert_eq!(
        check(&s, CLIENT_ID, "gho_guess_x", "203.0.113.1")
            .await
            .status,
        404
    );
    let a = check(&s, CLIENT_ID, &good, "203.0.113.1").await;
    assert_eq!(
        (
            a.status.as_u16(),
            a.headers["retry-after"].to_str().unwrap()
        ),
        (429, "60")
    );
}

#[tokio::test]
async fn other_client_ids_and_addresses_are_unaffected() {
    let s = setup(|_| {}).await;
    for i in 0..3 {
        check(&s, CLIENT_ID, &format!("gho_guess_{i}"), "203.0.113.1").await;
    }
    let other = s.gh.issue_token("Iv1.other", "octocat");
    // Same address (2 more failures allowed there), another app: fine.
    assert_eq!(
        check(&s, "Iv1.other", &other, "203.0.113.1").await.status,
        200
    );

    // The address quota (5) spans apps: two more failures from it spend it.
    for i in 0..2 {
        assert_eq!(
            check(&s, "Iv1.other", &format!("gho_x{i}"), "203.0.113.1")
                .await
                .status,
            404
        );
    }
    let a = check(&s, "Iv1.other", &other, "203.0.113.1").await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers["retry-after"], "30");
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("client address")
    );
    // Another address, same app: fine.
    assert_eq!(
        check(&s, "Iv1.other", &other, "203.0.113.9").await.status,
        200
    );
}

#[tokio::test]
async fn successes_are_never_charged_or_limited() {
    let s = setup(|_| {}).await;
    let good = s.gh.issue_token(CLIENT_ID, "octocat");
    for _ in 0..50 {
        assert_eq!(check(&s, CLIENT_ID, &good, "203.0.113.1").await.status, 200);
    }
    // The full burst of failures is still there after fifty successes.
    for i in 0..3 {
        assert_eq!(
            check(&s, CLIENT_ID, &format!("gho_guess_{i}"), "203.0.113.1")
                .await
                .status,
            404
        );
    }
    assert_eq!(check(&s, CLIENT_ID, &good, "203.0.113.1").await.status, 429);
    let m = scrape(&s.gw).await;
    assert_eq!(
        m["oauth_apps_gateway_failed_checks_total{key_kind=\"client_id\"}"],
        3.0
    );
}

#[tokio::test]
async fn wrong_client_secret_401s_count_and_other_calls_are_not_limited() {
    let s = setup(|_| {}).await;
    let good = s.gh.issue_token(CLIENT_ID, "octocat");
    let wrong = basic(CLIENT_ID, "guessed-secret");
    for _ in 0..3 {
        let a = call(
            &http1_client(),
            Method::DELETE,
            &format!("{}/applications/{CLIENT_ID}/grants/{good}", s.gw.url()),
            &[
                ("authorization", wrong.as_str()),
                ("x-forwarded-for", "203.0.113.1"),
            ],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, 401);
    }
    assert_eq!(check(&s, CLIENT_ID, &good, "203.0.113.7").await.status, 429);
    assert!(
        s.gh.token_is_valid(CLIENT_ID, &good),
        "guessed secret must not revoke"
    );
    // Calls that are not token operations pass, blocked key or not.
    let a = get(&format!("{}/headers", s.gw.url())).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let s = setup(|c| c.failed_checks.trusted_proxies.clear()).await;
    // Each call claims a new address, and uses a new client_id, but the peer is 127.0.0.1:
    // the address quota (5) applies to the peer.
    for i in 0..5 {
        let a = check(
            &s,
            CLIENT_ID,
            &format!("gho_guess_{i}"),
            &format!("198.51.100.{i}"),
        )
        .await;
        assert_eq!(a.status, if i < 3 { 404 } else { 429 }, "call {i}");
    }
    let other = s.gh.issue_token("Iv1.other", "octocat");
    for i in 0..2 {
        check(
            &s,
            "Iv1.other",
            &format!("gho_y{i}"),
            &format!("198.51.100.{}", 50 + i),
        )
        .await;
    }
    let a = check(&s, "Iv1.other", &other, "198.51.100.99").await;
    assert_eq!(a.status, 429);
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("client address")
    );
}

#[tokio::test]
async fn sprayed_client_ids_stay_within_the_cap_and_keep_being_limited() {
    let s = setup(|c| {
        c.failed_checks.max_tracked_keys = 50;
        c.failed_checks.client_ip_burst = 1_000_000;
    })
    .await;
    let mut statuses = HashMap::<u16, usize>::new();
    for i in 0..300 {
        let a = check(&s, &format!("made-up-{i}"), "gho_guess", "203.0.113.1").await;
        *statuses.entry(a.status.as_u16()).or_default() += 1;
    }
    // 49 ids of their own (one slot is the shared overflow bucket) plus the overflow burst of 3.
    assert_eq!(statuses.get(&404), Some(&(49 + 3)), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&(300 - 52)), "{statuses:?}");
    let m = scrape(&s.gw).await;
    assert!(m["oauth_apps_gateway_failed_checks_tracked_keys{key_kind=\"client_id\"}"] <= 50.0);
}

#[tokio::test]
async fn disabled_limiter_never_answers_429() {
    let s = setup(|c| c.failed_checks.enabled = false).await;
    for i in 0..20 {
        assert_eq!(
            check(&s, CLIENT_ID, &format!("gho_guess_{i}"), "203.0.113.1")
                .await
                .status,
            404
        );
    }
    assert_eq!(s.gh.request_count(), 20);
}

#[tokio::test]
async fn concurrent_guesses_that_race_past_the_gate_are_charged_as_debt() {
    // An upstream that takes a while to say 404: thirty guesses are all in flight before the
    // first failure is charged, so all thirty pass the gate.
    let upstream = support::upstream_answering(404, Duration::from_millis(300)).await;
    let mut config = config_for(&upstream);
    config.failed_checks.client_id_burst = 3;
    config.failed_checks.client_id_replenish = Duration::from_secs(60);
    let clock = LimiterClock::manual();
    let gw = Gateway::start_with_clock(config, clock.clone()).await;
    let client = http1_client();
    let auth = basic_auth();
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (client, auth) = (client.clone(), auth.clone());
        let url = format!("{}/applications/{CLIENT_ID}/tokens/gho_guess_{i}", gw.url());
        guesses.spawn(async move {
            call(
                &client,
                Method::GET,
                &url,
                &[("authorization", auth.as_str())],
                Bytes::new(),
            )
            .await
            .status
        });
    }
    while let Some(status) = guesses.join_next().await {
        assert_eq!(status.unwrap(), 404);
    }
    // 3 within the burst, 27 over it: each of those costs one more minute.
    let a = call(
        &client,
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/tokens/gho_next", gw.url()),
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers["retry-after"], (28 * 60).to_string().as_str());
}
