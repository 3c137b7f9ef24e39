//! `cargo bench`: nanoseconds per call of the gateway's own work on the request path, without
//! I/O: planning a legacy call (classify plus rewrite), planning a pass-through call, moving
//! deprecated query credentials into `Authorization`, the failed-check gate for a verified
//! app, and the access event's request facts (a new request id; the user agent checked for the
//! request's credentials). The target (issue 9) is under 1 µs for classify plus rewrite; the figures are read from
//! criterion's report, never asserted in a timed test.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue, USER_AGENT};
use http::{Method, Uri};
use oauth_apps_gateway::access::{LoggedUserAgent, new_request_id, request_id};
use oauth_apps_gateway::classify::{Route, classify};
use oauth_apps_gateway::config::Config;
use oauth_apps_gateway::limiter::{Admission, FailedChecks, LimiterClock, Settle};
use oauth_apps_gateway::proxy::ProxySettings;
use oauth_apps_gateway::proxy::plan::{Plan, plan};
use oauth_apps_gateway::rewrite::{replace_legacy, take_query_credentials};

const CLIENT_ID: &str = "Iv1.bench00000000000";
/// A 40-character token shaped like GitHub's.
const LEGACY_PATH: &str =
    "/applications/Iv1.bench00000000000/tokens/gho_bench0000000000000000000000000000000";
/// `Basic base64("Iv1.bench00000000000:bench-secret-0000")`.
const BASIC: &str = "Basic SXYxLmJlbmNoMDAwMDAwMDAwMDA6YmVuY2gtc2VjcmV0LTAwMDA=";

fn settings() -> ProxySettings {
    let config = Config::from_toml_str("[upstream]\nurl = \"http://127.0.0.1:1\"\n")
        .expect("a minimal config loads");
    ProxySettings::from(&config)
}

fn head() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_static(BASIC));
    headers.insert(USER_AGENT, HeaderValue::from_static("octokit.js/16.43.2"));
    headers
}

fn rewrite(c: &mut Criterion) {
    let settings = settings();
    let headers = head();
    let legacy: Uri = LEGACY_PATH.parse().expect("a valid URI");
    let pass: Uri = "/repos/octocat/hello-world/issues?page=2"
        .parse()
        .expect("a valid URI");
    let now = SystemTime::now();

    c.bench_function("classify + rewrite (legacy check)", |b| {
        b.iter(|| {
            let route = classify(&Method::GET, black_box(LEGACY_PATH));
            match route {
                Ok(Route::Legacy(call)) => replace_legacy(&call, None),
                _ => None,
            }
        })
    });
    c.bench_function("plan: legacy check", |b| {
        b.iter(|| {
            let p = plan(&Method::GET, black_box(&legacy), &headers, &settings, now);
            assert!(matches!(p, Plan::Forward(..)));
            p
        })
    });
    c.bench_function("plan: pass-through GET", |b| {
        b.iter(|| {
            let p = plan(&Method::GET, black_box(&pass), &headers, &settings, now);
            assert!(matches!(p, Plan::Forward(..)));
            p
        })
    });
    c.bench_function("classify: pass-through GET", |b| {
        b.iter(|| classify(&Method::GET, black_box("/repos/octocat/hello-world/issues")).is_ok())
    });
    c.bench_function("query credentials -> Authorization", |b| {
        b.iter(|| {
            let taken = take_query_credentials(black_box(
                "page=2&client_id=Iv1.bench00000000000&client_secret=bench-secret-0000",
            ));
            taken.authorization(true)
        })
    });
}

fn gate(c: &mut Criterion) {
    let config = Config::from_toml_str("[upstream]\nurl = \"http://127.0.0.1:1\"\n")
        .expect("a minimal config loads");
    let limiter = Arc::new(
        FailedChecks::new(&config.failed_checks, LimiterClock::monotonic())
            .expect("the OS gives randomness"),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let authorization = HeaderValue::from_static(BASIC);
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    // Verify the credential once, as the first 2xx does in production.
    runtime.block_on(async {
        let keys = limiter.keys(Some(&authorization), CLIENT_ID, peer);
        match limiter.admit(keys, true, far()).await {
            Admission::Pass(p) => {
                p.settle(Settle::Accepted);
            }
            other => panic!("a fresh limiter admits: {other:?}"),
        }
    });
    c.bench_function("gate: keys + admit + settle (verified app)", |b| {
        b.to_async(&runtime).iter(|| async {
            let keys = limiter.keys(Some(&authorization), CLIENT_ID, peer);
            match limiter.admit(keys, true, far()).await {
                Admission::Pass(p) => p.settle(Settle::Accepted),
                other => panic!("a verified app is admitted: {other:?}"),
            }
        })
    });
}

fn access_facts(c: &mut Criterion) {
    let headers = head();
    c.bench_function("access: new request id", |b| b.iter(new_request_id));
    c.bench_function("access: user agent (legacy check, Basic)", |b| {
        b.iter(|| LoggedUserAgent::of(&headers, black_box(LEGACY_PATH)))
    });
    c.bench_function(
        "access: request id + user agent (legacy check, Basic)",
        |b| {
            b.iter(|| {
                let target = black_box(LEGACY_PATH);
                (
                    request_id(&headers, target),
                    LoggedUserAgent::of(&headers, target),
                )
            })
        },
    );
}

criterion_group!(benches, rewrite, gate, access_facts);
criterion_main!(benches);
