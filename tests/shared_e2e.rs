//! `[shared]` against a real Redis (Debian's redis-server on 127.0.0.1, started per test):
//! replicas share one failed-check quota instead of one each, a spent key is answered from the
//! local cache, Redis going away costs at most one timeout and never a 5xx, it is used again
//! once it is back, the legacy-caller report merges the replicas, nothing secret is written to
//! Redis, and key expiry keeps its memory bounded. Every test needs redis-server.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::Config;
use oauth_apps_gateway::limiter::IN_FLIGHT_ALLOWANCE;
use support::redis::RedisServer;
use support::{
    Answer, CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic, call, get, http1_client_from,
    scrape,
};

const ATTACKER: &str = "127.0.0.2";
const BURST: u32 = 5;

/// A gateway config forwarding to `upstream`: credential failures `BURST` then one an hour,
/// addresses far looser, and `extra` TOML appended (e.g. a `[shared]` section).
fn config(upstream: &str, extra: &str) -> Config {
    config_with(upstream, 1000, extra)
}

/// As [`config`], with `client_ip_burst` credential failures per address (then one an hour).
fn config_with(upstream: &str, client_ip_burst: u32, extra: &str) -> Config {
    Config::from_toml_str(&format!(
        "[upstream]\nurl = {upstream:?}\n\
         [failed_checks]\ncredential_burst = {BURST}\ncredential_replenish = \"1h\"\n\
         client_ip_burst = {client_ip_burst}\nclient_ip_replenish = \"1h\"\n{extra}"
    ))
    .expect("test config")
}

/// `[shared]` on `redis` with a timeout generous enough for a loaded test machine.
fn shared(redis: &RedisServer, timeout: &str) -> String {
    format!(
        "[shared]\nredis_url = {:?}\ntimeout = {timeout:?}\n",
        redis.url()
    )
}

/// A wrong-secret check through `gw`, from the attacker's address.
async fn guess(gw: &Gateway) -> Answer {
    guess_with(gw, "wrong-secret").await
}

/// As [`guess`], with `secret`.
async fn guess_with(gw: &Gateway, secret: &str) -> Answer {
    let auth = basic(CLIENT_ID, secret);
    call(
        &http1_client_from(ATTACKER),
        Method::POST,
        &format!("{}/applications/{CLIENT_ID}/token", gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        Bytes::from_static(br#"{"access_token":"gho_guessed0000000000000000000000000000"}"#),
    )
    .await
}

/// `/legacy-clients` of `gw` once `done` holds for it (within 5 s: every replica flushes its
/// calls every second).
async fn fleet_report(
    gw: &Gateway,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let report = get(&format!("{}/legacy-clients", gw.admin_url()))
            .await
            .json();
        if done(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet's report never got there: {report}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn statuses(answers: &[Answer]) -> HashMap<u16, usize> {
    let mut out = HashMap::new();
    for a in answers {
        *out.entry(a.status.as_u16()).or_default() += 1;
    }
    out
}

fn series(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("{key} missing"))
}

async fn fake_github() -> FakeGithub {
    let gh = FakeGithub::start().await;
    gh.add_app(CLIENT_ID, CLIENT_SECRET);
    gh.add_app("Iv1.other", "other-secret");
    gh
}

/// Twelve guesses alternating between two replicas: with one Redis, the credential's quota is
/// spent once for both (`BURST` reach the upstream); without, each replica allows its own.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn two_replicas_share_one_quota_and_without_redis_allow_twice_as_much() {
    let redis = RedisServer::start();
    for (shared_store, upstream_sees) in [(true, BURST), (false, 2 * BURST)] {
        let gh = fake_github().await;
        let extra = match shared_store {
            true => shared(&redis, "500ms"),
            false => String::new(),
        };
        let a = Gateway::start(config(&gh.url(), &extra)).await;
        let b = Gateway::start(config(&gh.url(), &extra)).await;
        let mut answers = Vec::new();
        for i in 0..12 {
            answers.push(guess(if i % 2 == 0 { &a } else { &b }).await);
        }
        let seen = statuses(&answers);
        assert_eq!(
            gh.request_count(),
            upstream_sees as usize,
            "shared={shared_store}: {seen:?}"
        );
        assert_eq!(seen.get(&401).copied(), Some(upstream_sees as usize));
        assert_eq!(seen.get(&429).copied(), Some(12 - upstream_sees as usize));
        redis.cli(&["FLUSHALL"]);
    }
}

/// Twenty guesses at once, half through each replica, to an upstream that takes 300 ms to
/// answer: the reservations in Redis let no more reach the upstream than the key may fail.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn concurrent_guesses_across_replicas_stay_within_the_burst() {
    let redis = RedisServer::start();
    let (upstream, reached) = support::upstream_counting(401, Duration::from_millis(300)).await;
    let a = Arc::new(Gateway::start(config(&upstream, &shared(&redis, "500ms"))).await);
    let b = Arc::new(Gateway::start(config(&upstream, &shared(&redis, "500ms"))).await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { guess(&gw).await }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let seen = statuses(&answers);
    let allowed = (BURST + IN_FLIGHT_ALLOWANCE) as usize;
    let upstream = reached.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        upstream <= allowed,
        "{upstream} reached the upstream, at most {allowed} may: {seen:?}"
    );
    assert_eq!(seen.get(&401).copied().unwrap_or(0), upstream);
    assert_eq!(seen.get(&429).copied().unwrap_or(0), 20 - upstream);
}

/// Once Redis said a key is spent, its calls are answered 429 from memory: no admit call.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn a_spent_key_is_answered_from_the_local_cache() {
    let redis = RedisServer::start();
    let gh = fake_github().await;
    let gw = Gateway::start(config(&gh.url(), &shared(&redis, "500ms"))).await;
    for _ in 0..=BURST {
        guess(&gw).await;
    }
    let admits = |m: &HashMap<String, f64>| {
        series(
            m,
            "oauth_apps_gateway_shared_store_calls_total{call=\"admit\",result=\"ok\"}",
        )
    };
    let before = admits(&scrape(&gw).await);
    for _ in 0..50 {
        assert_eq!(guess(&gw).await.status, 429);
    }
    let after = admits(&scrape(&gw).await);
    assert_eq!(after, before, "a cached spent key still asked Redis");
    assert_eq!(gh.request_count(), BURST as usize);
}

/// Redis killed while calls flow: every answer is the upstream's or the gate's own 429, none
/// waits much longer than one timeout, the gauge says degraded; once Redis is back (empty, on
/// the same port) the gateway uses it again without a restart.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn redis_down_falls_back_within_one_timeout_and_recovers() {
    let mut redis = RedisServer::start();
    let gh = fake_github().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let timeout = Duration::from_millis(50);
    let gw = Gateway::start(config(&gh.url(), &shared(&redis, "50ms"))).await;
    let check = |gw: &Gateway| {
        let url = format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url());
        let auth = basic(CLIENT_ID, CLIENT_SECRET);
        async move {
            let start = Instant::now();
            let a = call(
                &http1_client_from("127.0.0.1"),
                Method::GET,
                &url,
                &[("authorization", auth.as_str())],
                Bytes::new(),
            )
            .await;
            (a, start.elapsed())
        }
    };
    let degraded = |m: &HashMap<String, f64>| series(m, "oauth_apps_gateway_shared_store_degraded");
    assert_eq!(degraded(&scrape(&gw).await), 0.0);

    let mut slowest = Duration::ZERO;
    let mut seen = HashMap::<u16, usize>::new();
    let mut record = |a: &Answer, took: Duration, seen: &mut HashMap<u16, usize>| {
        *seen.entry(a.status.as_u16()).or_default() += 1;
        slowest = slowest.max(took);
    };
    for _ in 0..20 {
        let (a, took) = check(&gw).await;
        record(&a, took, &mut seen);
        let g = guess(&gw).await;
        record(&g, Duration::ZERO, &mut seen);
    }
    redis.kill();
    let down_at = Instant::now();
    for _ in 0..40 {
        let (a, took) = check(&gw).await;
        record(&a, took, &mut seen);
        let g = guess(&gw).await;
        record(&g, Duration::ZERO, &mut seen);
    }
    assert_eq!(
        degraded(&scrape(&gw).await),
        1.0,
        "down for {:?}",
        down_at.elapsed()
    );
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    while degraded(&scrape(&gw).await) != 0.0 {
        assert!(Instant::now() < deadline, "Redis not used again within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        let (a, took) = check(&gw).await;
        record(&a, took, &mut seen);
    }
    // Only the upstream's answers (200, 401) and the gate's 429.
    assert!(
        seen.keys().all(|s| [200, 401, 429].contains(s)),
        "an answer that is neither the upstream's nor the gate's: {seen:?}"
    );
    assert_eq!(seen.get(&200).copied(), Some(70), "{seen:?}");
    // A check takes about a millisecond here; the outage adds one timeout at most (slack for
    // a loaded two-core machine).
    assert!(
        slowest < timeout + Duration::from_millis(400),
        "a call took {slowest:?} (timeout {timeout:?})"
    );
    // Back in use: Redis holds the quota keys of a new guesser (the first one's spent key is
    // answered from the local cache).
    assert_eq!(guess_with(&gw, "another-wrong-secret").await.status, 401);
    let deadline = Instant::now() + Duration::from_secs(2);
    while redis
        .cli(&["--scan", "--pattern", "oauth-apps-gateway:gcra:*"])
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "no quota key written after recovery"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With `on_redis_error = "allow"` and Redis down, nothing is limited.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn allow_forwards_unlimited_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let gh = fake_github().await;
    let extra = format!("{}on_redis_error = \"allow\"\n", shared(&redis, "50ms"));
    let gw = Gateway::start(config(&gh.url(), &extra)).await;
    redis.kill();
    let mut answers = Vec::new();
    for _ in 0..(3 * BURST) {
        answers.push(guess(&gw).await);
    }
    assert_eq!(
        statuses(&answers).get(&401).copied(),
        Some(3 * BURST as usize)
    );
}

/// Legacy calls through two replicas, for two apps: `/legacy-clients` on either shows both,
/// with the fleet's counts.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn the_legacy_caller_report_merges_the_replicas() {
    let redis = RedisServer::start();
    let gh = fake_github().await;
    let t1 = gh.issue_token(CLIENT_ID, "octocat");
    let t2 = gh.issue_token("Iv1.other", "hubot");
    let a = Gateway::start(config(&gh.url(), &shared(&redis, "500ms"))).await;
    let b = Gateway::start(config(&gh.url(), &shared(&redis, "500ms"))).await;
    let legacy_check = |gw: &Gateway, id: &str, secret: &str, token: &str| {
        let url = format!("{}/applications/{id}/tokens/{token}", gw.url());
        let auth = basic(id, secret);
        async move {
            call(
                &http1_client_from("127.0.0.1"),
                Method::GET,
                &url,
                &[
                    ("authorization", auth.as_str()),
                    ("user-agent", "octokit.js/16.43.2 Node.js/20.20.2"),
                ],
                Bytes::new(),
            )
            .await
        }
    };
    for _ in 0..2 {
        assert_eq!(
            legacy_check(&a, CLIENT_ID, CLIENT_SECRET, &t1).await.status,
            200
        );
    }
    assert_eq!(
        legacy_check(&b, CLIENT_ID, CLIENT_SECRET, &t1).await.status,
        200
    );
    assert_eq!(
        legacy_check(&b, "Iv1.other", "other-secret", &t2)
            .await
            .status,
        200
    );
    for gw in [&a, &b] {
        // The other replica adds its calls within `FLUSH_EVERY`.
        let report = fleet_report(gw, |r| {
            r["clients"].as_array().is_some_and(|c| c.len() == 2) && r["clients"][0]["total"] == 3
        })
        .await;
        assert_eq!(report["scope"], "fleet", "{report}");
        let total = |id: &str| {
            report["clients"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["client_id"] == id)
                .map(|c| {
                    (
                        c["total"].as_u64().unwrap(),
                        c["calls"]["check"].as_u64().unwrap(),
                    )
                })
        };
        assert_eq!(total(CLIENT_ID), Some((3, 3)), "{report}");
        assert_eq!(total("Iv1.other"), Some((1, 1)), "{report}");
        let advice = &report["clients"][0]["advice"][0]["advice"];
        assert!(
            advice.as_str().is_some_and(|s| s.contains("17.0.0")),
            "{report}"
        );
    }
    let text = get(&format!("{}/legacy-clients?format=text", b.admin_url())).await;
    assert!(String::from_utf8_lossy(&text.body).contains("Iv1.other"));
}

/// The fleet-wide client_id cap: with `metrics.max_client_ids = 1`, the second app of the
/// fleet is counted under `other` even though each replica saw only one.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn the_client_id_cap_applies_to_the_fleet() {
    let redis = RedisServer::start();
    let gh = fake_github().await;
    let extra = format!("{}[metrics]\nmax_client_ids = 1\n", shared(&redis, "500ms"));
    let a = Gateway::start(config(&gh.url(), &extra)).await;
    let b = Gateway::start(config(&gh.url(), &extra)).await;
    let legacy = |gw: &Gateway, id: &str| {
        let url = format!("{}/applications/{id}/tokens/gho_nothing", gw.url());
        async move { get(&url).await }
    };
    legacy(&a, CLIENT_ID).await;
    // Flushed before the second app is seen, so the order is known.
    let _ = get(&format!("{}/legacy-clients", a.admin_url())).await;
    legacy(&b, "Iv1.other").await;
    let report = fleet_report(&a, |r| !r["other"].is_null()).await;
    let ids: Vec<&str> = report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["client_id"].as_str())
        .collect();
    assert_eq!(ids, [CLIENT_ID], "{report}");
    assert_eq!(report["other"]["total"], 1, "{report}");
}

/// After every kind of call, Redis holds keyed hashes only: no secret, token, Authorization
/// value or client address.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn nothing_secret_is_written_to_redis() {
    let redis = RedisServer::start();
    let gh = fake_github().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let gw = Gateway::start(config(&gh.url(), &shared(&redis, "500ms"))).await;
    for _ in 0..3 {
        guess(&gw).await;
    }
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    for op in [Method::GET, Method::POST, Method::DELETE] {
        call(
            &http1_client_from(ATTACKER),
            op,
            &format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url()),
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await;
    }
    let _ = get(&format!("{}/legacy-clients", gw.admin_url())).await;
    let dump = redis.dump();
    assert!(dump.contains("oauth-apps-gateway:gcra:"), "{dump}");
    let auth_b64 = auth.trim_start_matches("Basic ");
    for secret in [
        CLIENT_SECRET,
        "wrong-secret",
        token.as_str(),
        auth_b64,
        ATTACKER,
    ] {
        assert!(!dump.contains(secret), "Redis holds {secret:?}");
    }
}

/// The store itself (no gateway) on `redis`, answering.
async fn store_on(redis: &RedisServer) -> Arc<oauth_apps_gateway::shared::Store> {
    use oauth_apps_gateway::metrics::{Metrics, Registry};
    let cfg = Config::from_toml_str(&shared(redis, "1s")).expect("config");
    let metrics = Metrics::new(Registry::new(), 10).expect("metrics");
    let store = oauth_apps_gateway::shared::Store::new(
        cfg.shared.as_ref().unwrap(),
        metrics.shared_store(),
    )
    .expect("store");
    assert!(store.probe().await, "Redis answers");
    Arc::new(store)
}

/// Charges one credential failure for each of `n` distinct callers through the store's own
/// script, from `tasks` tasks at once (one multiplexed connection); caller `i`'s credential and
/// address hashes are `keys(i)`, its quotas `period_us` and a burst of 10. Returns the charges
/// Redis did not take (each followed by a probe that must find Redis answering).
async fn charge_callers(
    store: &Arc<oauth_apps_gateway::shared::Store>,
    n: usize,
    tasks: usize,
    period_us: u64,
    keys: fn(usize) -> (String, String),
) -> usize {
    use oauth_apps_gateway::shared::{Outcome, QuotaSpec};
    let specs = [QuotaSpec {
        period_us,
        burst: 10,
    }; 3];
    let mut running = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        running.push(tokio::spawn(async move {
            let mut failed = 0usize;
            for i in (t..n).step_by(tasks) {
                let (credential, address) = keys(i);
                let names = store.quota_keys(&credential, &address);
                let charged = store
                    .settle(
                        &names,
                        Outcome::Credential,
                        true,
                        &specs,
                        "",
                        Duration::from_secs(3600),
                    )
                    .await;
                if charged.is_err() {
                    failed += 1;
                    assert!(store.probe().await, "Redis stopped answering");
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in running {
        failed += t.await.expect("charging task");
    }
    failed
}

/// A spray of 1,000,000 distinct failing keys through the store's own charge script: every key
/// expires when its quota is whole again, so Redis ends near where it started, and peaks far
/// below what a million kept keys take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn key_expiry_keeps_redis_memory_bounded_under_a_spray_of_a_million_keys() {
    const KEYS: usize = 1_000_000;
    let redis = RedisServer::start();
    let store = store_on(&redis).await;
    let baseline = redis.info("used_memory");
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let port = redis.port;
        let peak = peak.clone();
        std::thread::spawn(move || {
            let probe = RedisServer::observer(port);
            for _ in 0..600 {
                let used = probe.info("used_memory");
                peak.fetch_max(used, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
                if probe.cli(&["GET", "spray-done"]) == "1" {
                    break;
                }
            }
        })
    };
    let started = Instant::now();
    // Credential failures with a 200 ms replenish: each key is whole again (and gone) 200 ms
    // after its one failure.
    let failed = charge_callers(&store, KEYS, 256, 200_000, |i| {
        (format!("{i:032x}"), format!("{i:032x}"))
    })
    .await;
    let took = started.elapsed();
    redis.cli(&["SET", "spray-done", "1", "EX", "60"]);
    watcher.join().expect("watcher");
    assert!(failed < KEYS / 1000, "{failed} charges failed");
    // Whole again after 200 ms: gone after at most a second more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let left = redis.cli(&["DBSIZE"]).parse::<u64>().unwrap();
    let after = redis.info("used_memory");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "spray: {KEYS} keys in {took:?}; used_memory baseline {baseline} B, peak {peak} B, after {after} B, {left} keys left"
    );
    assert!(
        left <= 2,
        "{left} keys left (the hashing key and the marker at most)"
    );
    // A million kept keys (two per failure) would take well over 100 MB.
    assert!(peak < baseline + 64 * 1024 * 1024, "peak {peak} B");
    assert!(after < baseline + 4 * 1024 * 1024, "after {after} B");
}

/// What one failing caller costs Redis: 10,000 distinct credentials each fail once (a credential
/// failure: a key for the credential and one for the address) under a one-hour replenish, so
/// every key stays; the growth of `used_memory` per caller sizes Redis (docs/failed-checks.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn one_failing_caller_costs_redis_a_few_hundred_bytes() {
    const CALLERS: usize = 10_000;
    let redis = RedisServer::start();
    let store = store_on(&redis).await;
    let before = redis.info("used_memory");
    // A one-hour replenish: every key stays for the measurement.
    let failed = charge_callers(&store, CALLERS, 16, 3_600_000_000, |i| {
        (format!("{i:032x}"), format!("{:032x}", i + CALLERS))
    })
    .await;
    assert_eq!(failed, 0, "Redis took every charge");
    let keys = redis.cli(&["DBSIZE"]).parse::<usize>().unwrap();
    let per_caller = (redis.info("used_memory") - before) / CALLERS as u64;
    eprintln!("{CALLERS} failing callers: {keys} keys, {per_caller} bytes of used_memory each");
    assert_eq!(
        keys,
        2 * CALLERS,
        "a key per credential and per address, nothing else"
    );
    assert!(per_caller < 1024, "{per_caller} bytes per failing caller");
}

/// An app the fleet has verified is not refused by another replica because someone at its
/// address spent the address quota there: the address quota is never answered from the cache.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn a_verified_app_is_not_refused_for_an_address_another_caller_spent() {
    let redis = RedisServer::start();
    let gh = fake_github().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let a = Gateway::start(config_with(&gh.url(), 3, &shared(&redis, "500ms"))).await;
    let b = Gateway::start(config_with(&gh.url(), 3, &shared(&redis, "500ms"))).await;
    let app_check = |gw: &Gateway| {
        let url = format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url());
        let auth = basic(CLIENT_ID, CLIENT_SECRET);
        async move {
            call(
                &http1_client_from(ATTACKER),
                Method::GET,
                &url,
                &[("authorization", auth.as_str())],
                Bytes::new(),
            )
            .await
        }
    };
    // Verified through A (the fleet's word, in Redis).
    assert_eq!(app_check(&a).await.status, 200);
    // Someone at the same address spends the address quota through B with new secrets.
    let mut refused = 0;
    for i in 0..6 {
        if guess_with(&b, &format!("guess-{i}")).await.status == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 3, "the address quota (3) is spent");
    // The app's first call through B: held to no address quota, so it passes.
    for _ in 0..3 {
        assert_eq!(app_check(&b).await.status, 200);
    }
}

/// Whatever a caller puts in a client_id, the fleet's report keeps working: ids that would name
/// each other's keys (`x` and `x:agents`) get entries of their own.
#[tokio::test]
#[ignore = "needs redis-server (Debian package redis-server; .ci/run installs it)"]
async fn hostile_client_ids_cannot_break_the_fleet_report() {
    let redis = RedisServer::start();
    let gh = fake_github().await;
    let gw = Gateway::start(config(&gh.url(), &shared(&redis, "500ms"))).await;
    for id in ["Iv1.x", "Iv1.x:agents", "Iv1.x%3Aagents"] {
        let url = format!("{}/applications/{id}/tokens/gho_nothing", gw.url());
        call(
            &http1_client_from("127.0.0.1"),
            Method::GET,
            &url,
            &[("user-agent", "octokit.js/16.43.2")],
            Bytes::new(),
        )
        .await;
    }
    let report = fleet_report(&gw, |r| {
        r["clients"].as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    assert_eq!(report["scope"], "fleet", "{report}");
    let ids: Vec<&str> = report["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["client_id"].as_str())
        .collect();
    assert!(
        ids.contains(&"Iv1.x") && ids.contains(&"Iv1.x:agents"),
        "{report}"
    );
    let m = scrape(&gw).await;
    assert_eq!(
        series(
            &m,
            "oauth_apps_gateway_shared_store_calls_total{call=\"report_add\",result=\"error\"}"
        ),
        0.0
    );
    assert_eq!(series(&m, "oauth_apps_gateway_shared_store_degraded"), 0.0);
}
