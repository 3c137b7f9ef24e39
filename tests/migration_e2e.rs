//! The migration lifecycle end to end: modes (rewrite, observe, reject) and per-operation
//! overrides, deprecation signalling on every response to a legacy call, status compatibility,
//! and what the admin listener reports (exact metric values, the client_id cap, readiness
//! during drain, promtool's lint).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::{Config, Mode};
use support::{
    CLIENT_ID, Gateway, basic_auth, call, call_as_app, config_for, get, http1_client, open_stream,
    scrape, setup, setup_with, upstream_answering,
};

const DEPRECATION: &str = "@1581638400";
const LINK: &str = "<https://developer.github.com/changes/2020-02-14-deprecating-oauth-app-endpoint/>; rel=\"deprecation\"; type=\"text/html\"";

fn legacy_url(gw: &Gateway, method: &Method, token: &str) -> String {
    let kind = if method == Method::DELETE && token.starts_with("grant:") {
        "grants"
    } else {
        "tokens"
    };
    let token = token.trim_start_matches("grant:");
    format!("{}/applications/{CLIENT_ID}/{kind}/{token}", gw.url())
}

fn assert_deprecation_headers(a: &support::Answer, what: &str) {
    assert_eq!(
        a.headers.get("deprecation").map(|v| v.to_str().unwrap()),
        Some(DEPRECATION),
        "{what}"
    );
    let links: Vec<_> = a
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(links.contains(&LINK), "{what}: {links:?}");
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} not in scrape"))
}

#[tokio::test]
async fn reject_mode_answers_410_naming_the_replacement_and_forwards_nothing() {
    let (gh, gw) = setup_with(|c| {
        set_all_modes(c, Mode::Reject);
        c.migration.deprecation_headers = true;
    })
    .await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let cases = [
        (
            Method::GET,
            token.clone(),
            "POST /applications/",
            "/token",
            "#check-a-token",
        ),
        (
            Method::POST,
            token.clone(),
            "PATCH /applications/",
            "/token",
            "#reset-a-token",
        ),
        (
            Method::DELETE,
            token.clone(),
            "DELETE /applications/",
            "/token",
            "#delete-an-app-token",
        ),
        (
            Method::DELETE,
            format!("grant:{token}"),
            "DELETE /applications/",
            "/grant",
            "#delete-an-app-authorization",
        ),
    ];
    for (method, t, want_method_path, tail, anchor) in cases {
        let a = call_as_app(method.clone(), &legacy_url(&gw, &method, &t)).await;
        assert_eq!(a.status, 410, "{method} {t}");
        let body = a.json();
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("{want_method_path}{CLIENT_ID}{tail} ")),
            "{msg}"
        );
        assert!(!msg.contains(&token), "410 body leaks the token");
        assert!(
            body["documentation_url"]
                .as_str()
                .unwrap()
                .ends_with(anchor)
        );
        assert_deprecation_headers(&a, "410");
    }
    assert_eq!(
        gh.request_count(),
        0,
        "a rejected call reached the upstream"
    );
    assert!(gh.token_is_valid(CLIENT_ID, &token));
}

fn set_all_modes(c: &mut Config, mode: Mode) {
    let m = &mut c.migration.modes;
    m.check = mode;
    m.reset = mode;
    m.revoke_token = mode;
    m.revoke_grant = mode;
}

#[tokio::test]
async fn observe_mode_forwards_the_legacy_call_unchanged() {
    let (gh, gw) = setup_with(|c| {
        set_all_modes(c, Mode::Observe);
        c.migration.deprecation_headers = true;
    })
    .await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let a = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, &token)).await;
    // The fake, like api.github.com, no longer serves the legacy form: its 404 comes through.
    assert_eq!(a.status, 404);
    assert_deprecation_headers(&a, "observe");
    let r = &gh.requests()[0];
    assert_eq!(r.method, Method::GET);
    assert_eq!(
        r.path_and_query,
        format!("/applications/{CLIENT_ID}/tokens/{token}")
    );
    assert!(r.body.is_empty());
    let m = scrape(&gw).await;
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_deprecated_calls_total{action=\"observed\",operation=\"check\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn per_operation_overrides_win_over_the_mode() {
    let mut config = Config::from_toml_str(
        "[migration]\nmode = \"reject\"\n[migration.operations]\ncheck = \"rewrite\"\nrevoke_grant = \"observe\"\n",
    )
    .unwrap();
    let gh = support::FakeGithub::start().await;
    gh.add_app(CLIENT_ID, support::CLIENT_SECRET);
    config.upstream = config_for(&gh.url()).upstream;
    let gw = Gateway::start(config).await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let check = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, &token)).await;
    assert_eq!(check.status, 200);
    let reset = call_as_app(Method::POST, &legacy_url(&gw, &Method::POST, &token)).await;
    assert_eq!(reset.status, 410);
    let grant = call_as_app(
        Method::DELETE,
        &legacy_url(&gw, &Method::DELETE, &format!("grant:{token}")),
    )
    .await;
    assert_eq!(grant.status, 404); // observed: forwarded as is, the upstream has no legacy form
    let paths: Vec<_> = gh
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path_and_query))
        .collect();
    assert_eq!(
        paths,
        vec![
            (Method::POST, format!("/applications/{CLIENT_ID}/token")),
            (
                Method::DELETE,
                format!("/applications/{CLIENT_ID}/grants/{token}")
            ),
        ]
    );
}

#[tokio::test]
async fn every_response_to_a_legacy_call_is_signalled_and_others_are_not() {
    let (gh, gw) = setup_with(|c| {
        c.migration.deprecation_headers = true;
        c.migration.deprecation.sunset =
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_620_172_800));
    })
    .await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let ok = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, &token)).await;
    let not_found = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, "gho_unknown")).await;
    let malformed = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, "")).await;
    for (a, what) in [(&ok, "200"), (&not_found, "404"), (&malformed, "400")] {
        assert_deprecation_headers(a, what);
        assert_eq!(
            a.headers["sunset"], "Wed, 05 May 2021 00:00:00 GMT",
            "{what}"
        );
    }
    assert_eq!(
        (
            ok.status.as_u16(),
            not_found.status.as_u16(),
            malformed.status.as_u16()
        ),
        (200, 404, 400)
    );

    // Not on pass-through, nor on the new forms.
    let pass = call_as_app(Method::GET, &format!("{}/headers", gw.url())).await;
    let new_form = call_as_app(
        Method::DELETE,
        &format!("{}/applications/{CLIENT_ID}/token", gw.url()),
    )
    .await;
    for a in [&pass, &new_form] {
        assert!(a.headers.get("deprecation").is_none());
        assert!(a.headers.get("sunset").is_none());
    }

    // An upstream failure on a legacy call is signalled too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut config = config_for(&dead);
    config.migration.deprecation_headers = true;
    let gw = Gateway::start(config).await;
    let a = call_as_app(Method::DELETE, &legacy_url(&gw, &Method::DELETE, "gho_x")).await;
    assert_eq!(a.status, 502);
    assert_deprecation_headers(&a, "502");
    assert!(
        a.headers.get("sunset").is_none(),
        "no sunset unless configured"
    );
    let m = scrape(&gw).await;
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_upstream_failures_total{kind=\"connect\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_responses_total{route=\"legacy\",status=\"502\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn deprecation_headers_are_off_by_default() {
    // On, they make @octokit/request (in @octokit/rest 16) log every legacy URL, token included.
    let (gh, gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let ok = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, &token)).await;
    let not_found = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, "gho_unknown")).await;
    let malformed = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, "")).await;
    assert_eq!(
        (
            ok.status.as_u16(),
            not_found.status.as_u16(),
            malformed.status.as_u16()
        ),
        (200, 404, 400)
    );
    for a in [&ok, &not_found, &malformed] {
        assert!(a.headers.get("deprecation").is_none());
        assert!(a.headers.get("link").is_none());
        assert!(a.headers.get("sunset").is_none());
    }
}

#[tokio::test]
async fn status_compat_turns_422_into_404_for_rewritten_calls_only() {
    let upstream = upstream_answering(422, Duration::ZERO).await;
    let gw = Gateway::start(config_for(&upstream)).await;
    let a = call_as_app(Method::GET, &legacy_url(&gw, &Method::GET, "gho_x")).await;
    assert_eq!(a.status, 404);
    // The upstream's body is kept.
    assert_eq!(a.json()["message"], "Validation Failed");
    // A caller already on the new form gets GitHub's status untouched.
    let auth = basic_auth();
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/applications/{CLIENT_ID}/token", gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        r#"{"access_token":"gho_x"}"#,
    )
    .await;
    assert_eq!(a.status, 422);
    let m = scrape(&gw).await;
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_status_compat_rewrites_total{operation=\"check\"}"
        ),
        1.0
    );

    let mut config = config_for(&upstream);
    config.migration.status_compat = false;
    let gw = Gateway::start(config).await;
    let a = call_as_app(Method::DELETE, &legacy_url(&gw, &Method::DELETE, "gho_x")).await;
    assert_eq!(a.status, 422);
}

#[tokio::test]
async fn metrics_after_a_known_mix_of_traffic() {
    let (gh, gw) = setup_with(|c| c.migration.modes.revoke_grant = Mode::Reject).await;
    let t1 = gh.issue_token(CLIENT_ID, "octocat");
    let base = format!("{}/applications/{CLIENT_ID}", gw.url());
    // 2 checks (200, 404), 1 reset (200), 1 malformed (400), 1 rejected grant (410),
    // 1 new-form check (200), 2 pass-through (/headers 200 with query credentials, /nope 404).
    for (method, path, status) in [
        (Method::GET, format!("{base}/tokens/{t1}"), 200),
        (Method::GET, format!("{base}/tokens/gho_bad"), 404),
        (Method::POST, format!("{base}/tokens/{t1}"), 200),
        (Method::GET, format!("{base}/tokens/"), 400),
        (Method::DELETE, format!("{base}/grants/{t1}"), 410),
    ] {
        assert_eq!(call_as_app(method, &path).await.status, status, "{path}");
    }
    let auth = basic_auth();
    let t2 = gh.issue_token(CLIENT_ID, "hubot");
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{base}/token"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        format!(r#"{{"access_token":"{t2}"}}"#),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = get(&format!(
        "{}/headers?client_id=a&client_secret=b&access_token=c",
        gw.url()
    ))
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        call_as_app(Method::GET, &format!("{}/nope", gw.url()))
            .await
            .status,
        404
    );

    let m = scrape(&gw).await;
    let dep = |op: &str, action: &str| {
        value(
            &m,
            &format!(
                "oauth_apps_gateway_deprecated_calls_total{{action=\"{action}\",operation=\"{op}\"}}"
            ),
        )
    };
    assert_eq!(dep("check", "rewritten"), 2.0);
    assert_eq!(dep("reset", "rewritten"), 1.0);
    assert_eq!(dep("check", "malformed"), 1.0);
    assert_eq!(dep("revoke_grant", "rejected"), 1.0);
    assert_eq!(dep("revoke_token", "rewritten"), 0.0);
    assert_eq!(dep("check", "observed"), 0.0);
    let resp = |route: &str, status: u16| {
        m.get(&format!(
            "oauth_apps_gateway_responses_total{{route=\"{route}\",status=\"{status}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(resp("legacy", 200), 2.0);
    assert_eq!(resp("legacy", 404), 1.0);
    assert_eq!(resp("legacy", 400), 1.0);
    assert_eq!(resp("legacy", 410), 1.0);
    assert_eq!(resp("token_api", 200), 1.0);
    assert_eq!(resp("pass_through", 200), 1.0);
    assert_eq!(resp("pass_through", 404), 1.0);
    // Per client: the four well-formed legacy calls (a malformed path has no client_id read).
    assert_eq!(
        value(
            &m,
            &format!(
                "oauth_apps_gateway_deprecated_calls_by_client_total{{client_id=\"{CLIENT_ID}\"}}"
            )
        ),
        4.0
    );
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_query_credentials_total{kind=\"client_secret\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_query_credentials_total{kind=\"access_token\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_request_duration_seconds_count{route=\"legacy\"}"
        ),
        5.0
    );
    // Forwarded legacy calls: 2 checks + 1 reset reached the upstream.
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_upstream_duration_seconds_count{route=\"legacy\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_upstream_failures_total{kind=\"connect\"}"
        ),
        0.0
    );
    assert_eq!(value(&m, "oauth_apps_gateway_in_flight_requests"), 0.0);
    assert_eq!(
        value(&m, "oauth_apps_gateway_build_info{version=\"0.1.0\"}"),
        1.0
    );
    assert!(value(&m, "process_resident_memory_bytes") > 0.0);
    // Nothing secret in any label.
    let text: String = m.keys().cloned().collect::<Vec<_>>().join("\n");
    for secret in [t1.as_str(), t2.as_str(), "gho_bad", support::CLIENT_SECRET] {
        assert!(!text.contains(secret), "metrics carry a secret");
    }

    // The legacy-client report agrees.
    let a = get(&format!("{}/legacy-clients", gw.admin_url())).await;
    let report = a.json();
    let c = &report["clients"][0];
    assert_eq!(c["client_id"], CLIENT_ID);
    assert_eq!(c["calls"]["check"], 2);
    assert_eq!(c["calls"]["reset"], 1);
    assert_eq!(c["calls"]["revoke_grant"], 1);
    // RFC 3339 UTC, whole seconds.
    let first = c["first_seen"].as_str().unwrap();
    assert!(
        first.len() == 20 && first.ends_with('Z') && first.as_bytes()[10] == b'T',
        "{first}"
    );
}

#[tokio::test]
async fn five_thousand_made_up_client_ids_stay_within_the_cap() {
    // Rejected calls never reach an upstream, so this is fast; the cap is the default 1000.
    let (gh, gw) = setup_with(|c| set_all_modes(c, Mode::Reject)).await;
    let client = http1_client();
    let mut pending = futures_lite_join::Set::new();
    for i in 0..5000 {
        let url = format!("{}/applications/made-up-{i}/tokens/gho_x", gw.url());
        let client = client.clone();
        pending.spawn(async move {
            call(&client, Method::GET, &url, &[], Bytes::new())
                .await
                .status
        });
        pending.limit(16).await;
    }
    pending.drain().await;
    assert_eq!(gh.request_count(), 0);
    let m = scrape(&gw).await;
    let per_client: Vec<_> = m
        .keys()
        .filter(|k| k.starts_with("oauth_apps_gateway_deprecated_calls_by_client_total{"))
        .collect();
    assert_eq!(per_client.len(), 1001, "1000 ids plus other");
    assert_eq!(
        value(
            &m,
            "oauth_apps_gateway_deprecated_calls_by_client_total{client_id=\"other\"}"
        ),
        4000.0
    );
    let a = get(&format!("{}/legacy-clients", gw.admin_url())).await;
    let report = a.json();
    assert_eq!(report["clients"].as_array().unwrap().len(), 1000);
    assert_eq!(report["other"]["total"], 4000);
    assert_eq!(report["max_client_ids"], 1000);
}

/// A tiny bounded task set, so the spray test keeps at most N requests in flight.
mod futures_lite_join {
    use tokio::task::JoinSet;

    pub struct Set(JoinSet<http::StatusCode>);

    impl Set {
        pub fn new() -> Self {
            Set(JoinSet::new())
        }
        pub fn spawn(
            &mut self,
            f: impl std::future::Future<Output = http::StatusCode> + Send + 'static,
        ) {
            self.0.spawn(f);
        }
        pub async fn limit(&mut self, n: usize) {
            while self.0.len() >= n {
                assert_eq!(self.0.join_next().await.unwrap().unwrap(), 410);
            }
        }
        pub async fn drain(&mut self) {
            self.limit(1).await;
        }
    }
}

#[tokio::test]
async fn readyz_turns_503_while_draining_and_admin_is_not_on_the_proxy_listener() {
    let (gh, mut gw) = setup_with(|c| c.server.shutdown_grace = Duration::from_secs(20)).await;
    let admin = gw.admin_url();
    let ready = get(&format!("{admin}/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(get(&format!("{admin}/livez")).await.status, 200);

    // /metrics on the proxy listener is an ordinary pass-through call.
    let a = call_as_app(Method::GET, &format!("{}/metrics", gw.url())).await;
    assert_eq!(a.status, 404);
    assert_eq!(gh.requests()[0].path_and_query, "/metrics");

    // Keep a request in flight so the drain lasts, then shut down.
    let resp = open_stream(&format!(
        "{}/stream?chunks=10&size=10&delay_ms=100",
        gw.url()
    ))
    .await;
    let outcome = gw.begin_shutdown().unwrap();
    let mut saw_503 = false;
    for _ in 0..50 {
        let r = get(&format!("{admin}/readyz")).await;
        if r.status == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503, "/readyz never reported draining");
    use http_body_util::BodyExt;
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes().len(),
        100
    );
    outcome.await.unwrap();
}

#[tokio::test]
#[ignore = "needs promtool: apt-get install prometheus"]
async fn promtool_finds_nothing_to_lint_after_every_operation() {
    let promtool = support::tools::require("promtool", support::tools::PROMETHEUS_INSTALL);
    let (gh, gw) = setup().await;
    let base = format!("{}/applications/{CLIENT_ID}", gw.url());
    for prefix_base in [
        base.clone(),
        base.replace("/applications", "/api/v3/applications"),
    ] {
        let t = gh.issue_token(CLIENT_ID, "octocat");
        call_as_app(Method::GET, &format!("{prefix_base}/tokens/{t}")).await;
        let reset = call_as_app(Method::POST, &format!("{prefix_base}/tokens/{t}")).await;
        let t = reset.json()["token"].as_str().unwrap().to_owned();
        call_as_app(Method::DELETE, &format!("{prefix_base}/tokens/{t}")).await;
        let t = gh.issue_token(CLIENT_ID, "octocat");
        call_as_app(Method::DELETE, &format!("{prefix_base}/grants/{t}")).await;
        call_as_app(Method::GET, &format!("{prefix_base}/tokens/")).await;
    }
    call_as_app(Method::GET, &format!("{}/user?access_token=x", gw.url())).await;
    let text = get(&format!("{}/metrics", gw.admin_url())).await;
    if let Err(report) = support::prometheus::lint_metrics(&promtool, &text.body) {
        panic!("{report}");
    }
}

#[tokio::test]
async fn brownout_windows_switch_legacy_calls_off_on_schedule() {
    use oauth_apps_gateway::limiter::LimiterClock;
    let gh = support::FakeGithub::start().await;
    gh.add_app(CLIENT_ID, support::CLIENT_SECRET);
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let config = Config::from_toml_str(&format!(
        r#"
        [upstream]
        url = "{}"
        [[migration.brownouts]]
        start = 2027-03-01T14:00:00Z
        end = 2027-03-01T15:00:00Z
        status = 503
        "#,
        gh.url()
    ))
    .unwrap();
    // Ten minutes before the window.
    let start = std::time::UNIX_EPOCH + Duration::from_secs(1_803_909_600);
    let clock = LimiterClock::manual_at(start - Duration::from_secs(600));
    let gw = Gateway::start_with_clock(config, clock.clone()).await;
    let url = legacy_url(&gw, &Method::GET, &token);
    assert_eq!(call_as_app(Method::GET, &url).await.status, 200);

    clock.advance(Duration::from_secs(600 + 1800));
    let a = call_as_app(Method::GET, &url).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.headers["retry-after"], "1800");
    let msg = a.json()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("brownout") && msg.contains("POST /applications/"),
        "{msg}"
    );
    assert!(!msg.contains(&token));
    assert_eq!(gh.request_count(), 1, "nothing forwarded during the window");

    clock.advance(Duration::from_secs(1800));
    assert_eq!(
        call_as_app(Method::GET, &url).await.status,
        200,
        "the window ended"
    );
    let m = scrape(&gw).await;
    let v = |action: &str| {
        value(
            &m,
            &format!(
                "oauth_apps_gateway_deprecated_calls_total{{action=\"{action}\",operation=\"check\"}}"
            ),
        )
    };
    assert_eq!((v("rewritten"), v("brownout")), (2.0, 1.0));
}
