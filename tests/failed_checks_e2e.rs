//! The failed-check limiter end to end, keyed to the caller: a wrong secret spends the quota of
//! whoever sends it, never the app it names; token failures of a legitimate job stay far below
//! their default quota; concurrent guesses reach the upstream at most as often as their quota
//! allows; shadow mode forwards what enforce mode refuses. Callers are client sockets bound to
//! different loopback addresses (Linux answers all of 127/8); the limiter runs on a manual clock.

mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::{Config, FailedChecksMode, QuotaConfig};
use oauth_apps_gateway::limiter::{IN_FLIGHT_ALLOWANCE, LimiterClock};
use support::{
    Answer, CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic, call, config_for, get,
    http1_client_from, scrape,
};

const APP_ADDR: &str = "127.0.0.1";
const ATTACKER_ADDR: &str = "127.0.0.2";

struct Setup {
    gh: FakeGithub,
    gw: Gateway,
    clock: LimiterClock,
}

/// A fake GitHub with two apps and a gateway on a manual limiter clock, defaults otherwise.
async fn setup(adjust: impl FnOnce(&mut Config)) -> Setup {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    gh.add_app("Iv1.other", "other-secret");
    let mut config = config_for(&gh.url());
    adjust(&mut config);
    let clock = LimiterClock::manual();
    let gw = Gateway::start_with_clock(config, clock.clone()).await;
    Setup { gh, gw, clock }
}

/// A legacy check of `token` for `client_id` with `secret`, from the loopback address `from`.
async fn check(s: &Setup, from: &str, client_id: &str, secret: &str, token: &str) -> Answer {
    let auth = basic(client_id, secret);
    call(
        &http1_client_from(from),
        Method::GET,
        &format!("{}/applications/{client_id}/tokens/{token}", s.gw.url()),
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await
}

/// A quota of `burst` failures, then one a minute.
fn per_minute(burst: u32) -> QuotaConfig {
    QuotaConfig {
        burst,
        replenish: Duration::from_secs(60),
    }
}

fn series(m: &HashMap<String, f64>, name: &str, labels: &str) -> f64 {
    let key = match labels {
        "" => format!("oauth_apps_gateway_{name}"),
        l => format!("oauth_apps_gateway_{name}{{{l}}}"),
    };
    *m.get(&key).unwrap_or_else(|| panic!("{key} missing"))
}

#[tokio::test]
async fn an_attacker_with_wrong_secrets_never_locks_the_app_out() {
    let s = setup(|_| {}).await;
    let good = s.gh.issue_token(CLIENT_ID, "octocat");
    let mut attacker = HashMap::<u16, usize>::new();
    // The attacker names the real app's public client_id with one wrong secret, then with a new
    // one each time; between its guesses the real app checks its token.
    for i in 0..60 {
        let secret = if i < 20 {
            "guessed".to_owned()
        } else {
            format!("guess-{i}")
        };
        let a = check(&s, ATTACKER_ADDR, CLIENT_ID, &secret, "gho_whatever").await;
        *attacker.entry(a.status.as_u16()).or_default() += 1;
        let app = check(&s, APP_ADDR, CLIENT_ID, CLIENT_SECRET, &good).await;
        assert_eq!(app.status, 200, "the real app was refused after guess {i}");
    }
    // The attacker's own keys are spent: ten tries of its one secret (the credential quota),
    // then twenty more new secrets until its address had thirty (the address quota).
    assert_eq!(attacker.get(&401), Some(&30), "{attacker:?}");
    assert_eq!(attacker.get(&429), Some(&30), "{attacker:?}");
    let a = check(&s, ATTACKER_ADDR, CLIENT_ID, "yet-another", "gho_whatever").await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers["retry-after"], "2");
    let body = a.json();
    assert!(
        body["message"].as_str().unwrap().contains("client address"),
        "{body}"
    );
    assert!(body["documentation_url"].is_string());
    assert!(
        a.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-ratelimit"))
    );
    // Nothing the attacker sent once spent reached the upstream: 30 guesses and 60 checks.
    assert_eq!(s.gh.request_count(), 30 + 60);

    let m = scrape(&s.gw).await;
    let failed = |labels: &str| series(&m, "failed_checks_total", labels);
    assert_eq!(failed("class=\"credential\",key_kind=\"credential\""), 30.0);
    assert_eq!(failed("class=\"credential\",key_kind=\"client_ip\""), 30.0);
    assert_eq!(failed("class=\"token\",key_kind=\"credential\""), 0.0);
    let rejected = |labels: &str| series(&m, "failed_checks_rejected_total", labels);
    assert_eq!(
        rejected("class=\"credential\",key_kind=\"credential\"")
            + rejected("class=\"credential\",key_kind=\"client_ip\""),
        31.0
    );
    assert_eq!(series(&m, "failed_checks_verified_credentials", ""), 1.0);
    let dep = |action: &str| {
        series(
            &m,
            "deprecated_calls_total",
            &format!("action=\"{action}\",operation=\"check\""),
        )
    };
    assert_eq!((dep("rewritten"), dep("limited")), (90.0, 31.0));
}

#[tokio::test]
async fn the_same_wrong_secret_spends_its_credential_quota_and_recovers() {
    let s = setup(|c| {
        c.failed_checks.credential = per_minute(3);
    })
    .await;
    for _ in 0..3 {
        let a = check(&s, ATTACKER_ADDR, CLIENT_ID, "stale-secret", "gho_t").await;
        assert_eq!(a.status, 401);
    }
    let a = check(&s, ATTACKER_ADDR, CLIENT_ID, "stale-secret", "gho_t").await;
    assert_eq!(
        (a.status.as_u16(), &a.headers["retry-after"]),
        (429, &"60".parse().unwrap())
    );
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("client credentials")
    );
    // The new form and other calls of the app carrying the same credential are held too.
    let auth = basic(CLIENT_ID, "stale-secret");
    let a = call(
        &http1_client_from(ATTACKER_ADDR),
        Method::POST,
        &format!("{}/applications/{CLIENT_ID}/token", s.gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        r#"{"access_token":"gho_t"}"#,
    )
    .await;
    assert_eq!(a.status, 429);
    assert_eq!(s.gh.request_count(), 3);
    // Calls that are not OAuth Applications calls pass, spent key or not.
    assert_eq!(get(&format!("{}/headers", s.gw.url())).await.status, 200);
    s.clock.advance(Duration::from_millis(59_500));
    let a = check(&s, ATTACKER_ADDR, CLIENT_ID, "stale-secret", "gho_t").await;
    assert_eq!(a.headers["retry-after"], "1", "half a second rounds up");
    s.clock.advance(Duration::from_millis(500));
    let a = check(&s, ATTACKER_ADDR, CLIENT_ID, "stale-secret", "gho_t").await;
    assert_eq!(a.status, 401, "one failure regained");
}

#[tokio::test]
async fn a_batch_job_checking_revoked_tokens_is_never_limited_under_the_defaults() {
    let s = setup(|_| {}).await;
    // 300 stored tokens, a third of them revoked by their users (unknown to GitHub now).
    let tokens: Vec<(String, bool)> = (0..300)
        .map(|i| {
            if i % 3 == 0 {
                (format!("gho_revoked_{i:032}"), false)
            } else {
                (s.gh.issue_token(CLIENT_ID, &format!("user{i}")), true)
            }
        })
        .collect();
    // At full speed: eight checks in flight at all times.
    let client = http1_client_from(APP_ADDR);
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let base = format!("{}/applications/{CLIENT_ID}/tokens", s.gw.url());
    let mut statuses = HashMap::<u16, usize>::new();
    for chunk in tokens.chunks(8) {
        let mut batch = tokio::task::JoinSet::new();
        for (token, valid) in chunk.iter().cloned() {
            let (client, auth, url) = (client.clone(), auth.clone(), format!("{base}/{token}"));
            batch.spawn(async move {
                let a = call(
                    &client,
                    Method::GET,
                    &url,
                    &[("authorization", auth.as_str())],
                    Bytes::new(),
                )
                .await;
                (a.status.as_u16(), valid)
            });
        }
        while let Some(r) = batch.join_next().await {
            let (status, valid) = r.unwrap();
            assert_eq!(status, if valid { 200 } else { 404 });
            *statuses.entry(status).or_default() += 1;
        }
    }
    assert_eq!(statuses, HashMap::from([(200, 200), (404, 100)]));
    let m = scrape(&s.gw).await;
    assert_eq!(
        series(
            &m,
            "failed_checks_total",
            "class=\"token\",key_kind=\"credential\""
        ),
        100.0,
        "the revoked tokens were charged as token failures"
    );
}

#[tokio::test]
async fn token_failures_past_their_quota_are_refused_to_that_credential_only() {
    let s = setup(|c| {
        c.failed_checks.token = per_minute(5);
    })
    .await;
    for i in 0..5 {
        let a = check(
            &s,
            APP_ADDR,
            CLIENT_ID,
            CLIENT_SECRET,
            &format!("gho_gone_{i}"),
        )
        .await;
        assert_eq!(a.status, 404);
    }
    let good = s.gh.issue_token(CLIENT_ID, "octocat");
    let a = check(&s, APP_ADDR, CLIENT_ID, CLIENT_SECRET, &good).await;
    assert_eq!(a.status, 429);
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("invalid tokens")
    );
    // Another app at the same address is not touched.
    let other = s.gh.issue_token("Iv1.other", "octocat");
    let a = check(&s, APP_ADDR, "Iv1.other", "other-secret", &other).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn parallel_guesses_reach_the_upstream_at_most_burst_times() {
    // An upstream that takes a while to say 401: every guess is in flight at once.
    let (url, reached) = support::upstream_counting(401, Duration::from_millis(200)).await;
    let clock = LimiterClock::manual();
    let gw = Gateway::start_with_clock(config_for(&url), clock).await;
    let defaults = Config::default().failed_checks;
    let client = http1_client_from("127.0.0.3");
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        let auth = basic(CLIENT_ID, &format!("guess-{i}"));
        let url = format!("{}/applications/{CLIENT_ID}/tokens/gho_t", gw.url());
        guesses.spawn(async move {
            let a = call(
                &client,
                Method::GET,
                &url,
                &[("authorization", auth.as_str())],
                Bytes::new(),
            )
            .await;
            a.status.as_u16()
        });
    }
    let mut statuses = HashMap::<u16, usize>::new();
    while let Some(status) = guesses.join_next().await {
        *statuses.entry(status.unwrap()).or_default() += 1;
    }
    let bound = (defaults.client_ip.burst + IN_FLIGHT_ALLOWANCE) as usize;
    let reached = reached.load(Ordering::SeqCst);
    assert!(reached <= bound, "{reached} guesses reached the upstream");
    assert_eq!(statuses.get(&401).copied().unwrap_or(0), reached);
    assert_eq!(statuses.get(&429).copied().unwrap_or(0), 200 - reached);
    let m = scrape(&gw).await;
    assert!(
        series(&m, "failed_checks_waits_total", "") > 0.0,
        "guesses waited"
    );
}

#[tokio::test]
async fn parallel_checks_of_a_verified_app_are_never_held_back() {
    let s = setup(|c| c.failed_checks.client_ip.burst = 2).await;
    let tokens: Vec<String> = (0..64)
        .map(|i| s.gh.issue_token(CLIENT_ID, &format!("u{i}")))
        .collect();
    let first = check(&s, APP_ADDR, CLIENT_ID, CLIENT_SECRET, &tokens[0]).await;
    assert_eq!(first.status, 200);
    let mut all = tokio::task::JoinSet::new();
    let client = http1_client_from(APP_ADDR);
    for t in tokens {
        let client = client.clone();
        let url = format!("{}/applications/{CLIENT_ID}/tokens/{t}", s.gw.url());
        let auth = basic(CLIENT_ID, CLIENT_SECRET);
        all.spawn(async move {
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
    while let Some(status) = all.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let m = scrape(&s.gw).await;
    assert_eq!(series(&m, "failed_checks_waits_total", ""), 0.0);
}

#[tokio::test]
async fn shadow_mode_forwards_counts_and_logs_what_enforce_refuses() {
    let s = setup(|c| {
        c.failed_checks.mode = FailedChecksMode::Shadow;
        c.failed_checks.credential.burst = 3;
    })
    .await;
    for _ in 0..6 {
        let a = check(&s, ATTACKER_ADDR, CLIENT_ID, "stale-secret", "gho_t").await;
        assert_eq!(a.status, 401, "shadow mode never refuses");
        assert!(a.headers.get("retry-after").is_none());
    }
    assert_eq!(s.gh.request_count(), 6, "every call reached the upstream");
    let m = scrape(&s.gw).await;
    assert_eq!(
        series(
            &m,
            "failed_checks_shadow_rejected_total",
            "class=\"credential\",key_kind=\"credential\""
        ),
        3.0
    );
    assert_eq!(
        series(
            &m,
            "failed_checks_rejected_total",
            "class=\"credential\",key_kind=\"credential\""
        ),
        0.0
    );
    // As enforcement would have left it: only the three forwarded failures were charged.
    assert_eq!(
        series(
            &m,
            "failed_checks_total",
            "class=\"credential\",key_kind=\"credential\""
        ),
        3.0
    );
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let s = setup(|c| c.failed_checks.client_ip.burst = 5).await;
    // Each guess claims a new address, but the peer is 127.0.0.2: its quota applies.
    for i in 0..7 {
        let auth = basic(CLIENT_ID, &format!("guess-{i}"));
        let xff = format!("198.51.100.{i}");
        let a = call(
            &http1_client_from(ATTACKER_ADDR),
            Method::GET,
            &format!("{}/applications/{CLIENT_ID}/tokens/gho_t", s.gw.url()),
            &[
                ("authorization", auth.as_str()),
                ("x-forwarded-for", xff.as_str()),
            ],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.status, if i < 5 { 401 } else { 429 }, "guess {i}");
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_the_key() {
    let s = setup(|c| {
        c.failed_checks.client_ip.burst = 2;
        c.failed_checks.trusted_proxies = vec!["127.0.0.9/32".parse().unwrap()];
    })
    .await;
    let via_proxy = |i: usize, client: &'static str| {
        let auth = basic(CLIENT_ID, &format!("guess-{i}"));
        let url = format!("{}/applications/{CLIENT_ID}/tokens/gho_t", s.gw.url());
        async move {
            call(
                &http1_client_from("127.0.0.9"),
                Method::GET,
                &url,
                &[
                    ("authorization", auth.as_str()),
                    ("x-forwarded-for", client),
                ],
                Bytes::new(),
            )
            .await
            .status
        }
    };
    assert_eq!(via_proxy(0, "203.0.113.1").await, 401);
    assert_eq!(via_proxy(1, "203.0.113.1").await, 401);
    assert_eq!(via_proxy(2, "203.0.113.1").await, 429);
    assert_eq!(
        via_proxy(3, "203.0.113.2").await,
        401,
        "another client behind the proxy"
    );
}

#[tokio::test]
async fn sprayed_credentials_stay_within_the_cap_and_the_address_still_limits() {
    let s = setup(|c| {
        c.failed_checks.max_tracked_keys = 50;
        c.failed_checks.client_ip.burst = 80;
    })
    .await;
    let mut statuses = HashMap::<u16, usize>::new();
    for i in 0..120 {
        let a = check(&s, ATTACKER_ADDR, CLIENT_ID, &format!("spray-{i}"), "gho_t").await;
        *statuses.entry(a.status.as_u16()).or_default() += 1;
    }
    assert_eq!(statuses, HashMap::from([(401, 80), (429, 40)]));
    let m = scrape(&s.gw).await;
    let tracked = series(
        &m,
        "failed_checks_tracked_keys",
        "class=\"credential\",key_kind=\"credential\"",
    );
    assert_eq!(tracked, 50.0);
    assert_eq!(
        series(
            &m,
            "failed_checks_untracked_total",
            "class=\"credential\",key_kind=\"credential\""
        ),
        30.0
    );
    // A full table blocks nobody else: the real app goes on.
    let good = s.gh.issue_token(CLIENT_ID, "octocat");
    assert_eq!(
        check(&s, APP_ADDR, CLIENT_ID, CLIENT_SECRET, &good)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn disabled_limiter_never_answers_429() {
    let s = setup(|c| c.failed_checks.enabled = false).await;
    for i in 0..40 {
        let a = check(&s, ATTACKER_ADDR, CLIENT_ID, "stale", &format!("gho_{i}")).await;
        assert_eq!(a.status, 401);
    }
    assert_eq!(s.gh.request_count(), 40);
}
