//! Every spelling of a legacy call is the call (issue 8): doubled slashes, dot segments, a
//! trailing slash and percent-encoded unreserved characters are rewritten, rejected, counted and
//! gated exactly like the canonical path, and never forwarded with the token in the URL; HEAD is a
//! check; a case variant of a method on a token-operation path is refused.

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use http::Method;
use oauth_apps_gateway::config::{Config, Mode};
use support::{
    CLIENT_ID, CLIENT_SECRET, FakeGithub, Gateway, basic, basic_auth, call, h2c_client,
    http1_client, scrape,
};

/// Spellings of `/applications/{CLIENT_ID}/tokens/{token}` that clients and base URLs with a
/// trailing slash really send, or that a router might resolve.
fn variants(token: &str) -> Vec<String> {
    let c = CLIENT_ID;
    vec![
        format!("//applications/{c}/tokens/{token}"),
        format!("/applications/{c}/./tokens/{token}"),
        format!("/applications/{c}/tokens/{token}/"),
        format!("/applications/{c}//tokens/{token}"),
        format!("/applications/{c}/%74okens/{token}"),
        format!("/x/../applications/{c}/tokens/{token}"),
        format!("/api/v3//applications/{c}/tokens/{token}"),
        format!("/api/v3/x/../applications/{c}/tokens/{token}"),
    ]
}

async fn gateway(adjust: impl FnOnce(&mut Config)) -> (FakeGithub, Gateway) {
    support::setup_with(adjust).await
}

#[tokio::test]
async fn every_spelling_of_a_check_is_rewritten_and_counted_as_a_check() {
    let (gh, gw) = gateway(|_| {}).await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let all = variants(&token);
    for path in &all {
        let a = support::call_as_app(Method::GET, &format!("{}{path}", gw.url())).await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.json()["token"], token.as_str(), "{path}");
    }
    // Forwarded in canonical form: the replacement path, the token only in the body.
    for r in gh.requests() {
        assert_eq!(r.method, Method::POST);
        assert!(
            r.path_and_query == format!("/applications/{CLIENT_ID}/token")
                || r.path_and_query == format!("/api/v3/applications/{CLIENT_ID}/token"),
            "{}",
            r.path_and_query
        );
        assert!(!r.path_and_query.contains(&token));
    }
    let m = scrape(&gw).await;
    assert_eq!(
        m["oauth_apps_gateway_deprecated_calls_total{action=\"rewritten\",operation=\"check\"}"],
        all.len() as f64
    );
}

#[tokio::test]
async fn in_reject_mode_no_spelling_reaches_the_upstream() {
    let (gh, gw) = gateway(|c| c.migration.modes.reset = Mode::Reject).await;
    for path in variants("gho_secret_in_the_path") {
        let a = support::call_as_app(Method::POST, &format!("{}{path}", gw.url())).await;
        assert_eq!(a.status, 410, "{path}");
    }
    assert_eq!(
        gh.request_count(),
        0,
        "a token-bearing URL reached the upstream"
    );
}

#[tokio::test]
async fn every_spelling_spends_the_same_quota() {
    let (gh, gw) = gateway(|c| c.failed_checks.credential.burst = 3).await;
    let wrong = basic(CLIENT_ID, "stale-secret");
    let mut statuses = Vec::new();
    for path in variants("gho_t") {
        let a = call(
            &http1_client(),
            Method::GET,
            &format!("{}{path}", gw.url()),
            &[("authorization", wrong.as_str())],
            Bytes::new(),
        )
        .await;
        statuses.push(a.status.as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429, 429, 429, 429]);
    assert_eq!(gh.request_count(), 3);
}

#[tokio::test]
async fn head_is_a_check_answered_without_a_body_over_http1_and_http2() {
    let (gh, gw) = gateway(|_| {}).await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let auth = basic_auth();
    let url = format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url());
    for client in [http1_client(), h2c_client()] {
        let a = call(
            &client,
            Method::HEAD,
            &url,
            &[("authorization", auth.as_str())],
            "",
        )
        .await;
        assert_eq!(a.status, 200);
        assert!(a.body.is_empty(), "{:?}", a.body);
        assert_eq!(a.headers["content-type"], "application/json; charset=utf-8");
        let gone = format!("{}/applications/{CLIENT_ID}/tokens/gho_unknown", gw.url());
        let a = call(
            &client,
            Method::HEAD,
            &gone,
            &[("authorization", auth.as_str())],
            "",
        )
        .await;
        assert_eq!(a.status, 404);
        assert!(a.body.is_empty());
    }
    let requests = gh.requests();
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|r| r.method == Method::POST));
    assert_eq!(
        requests[0].body,
        Bytes::from(format!("{{\"access_token\":\"{token}\"}}"))
    );
}

#[tokio::test]
async fn a_case_variant_of_a_method_on_a_token_path_is_refused() {
    let (gh, gw) = gateway(|_| {}).await;
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let mut seen = HashMap::new();
    for (method, path) in [
        ("get", format!("/applications/{CLIENT_ID}/tokens/gho_t")),
        ("Delete", format!("/applications/{CLIENT_ID}/grants/gho_t")),
        ("pAtch", format!("/applications/{CLIENT_ID}/token")),
    ] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let a = call(
            &http1_client(),
            m,
            &format!("{}{path}", gw.url()),
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await;
        seen.insert(method, a.status.as_u16());
        assert!(
            a.json()["message"]
                .as_str()
                .unwrap()
                .contains("case-sensitive")
        );
    }
    assert_eq!(
        seen,
        HashMap::from([("get", 400), ("Delete", 400), ("pAtch", 400)])
    );
    assert_eq!(gh.request_count(), 0);
}

#[tokio::test]
async fn revoke_all_is_answered_410_naming_the_per_token_revoke_and_counted() {
    // github3.py 4.0.1 `revoke_authorizations`: removed by GitHub, never replaced.
    let (gh, gw) = gateway(|_| {}).await;
    for path in ["/applications", "//applications", "/api/v3/applications"] {
        let url = format!("{}{path}/{CLIENT_ID}/tokens", gw.url());
        let a = support::call_as_app(Method::DELETE, &url).await;
        assert_eq!(a.status, 410, "{path}");
        let msg = a.json()["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("GitHub removed"), "{msg}");
        assert!(
            msg.contains(&format!("/applications/{CLIENT_ID}/token ")),
            "{msg}"
        );
    }
    assert_eq!(gh.request_count(), 0);
    let m = scrape(&gw).await;
    assert_eq!(
        m["oauth_apps_gateway_deprecated_calls_total{action=\"rejected\",operation=\"revoke_all\"}"],
        3.0
    );
    let report = support::get(&format!("{}/legacy-clients", gw.admin_url())).await;
    assert_eq!(report.json()["clients"][0]["calls"]["revoke_all"], 3);
}

#[tokio::test]
async fn observed_revoke_all_is_forwarded_and_its_404_is_no_token_failure() {
    let (gh, gw) = gateway(|c| c.migration.modes.revoke_all = Mode::Observe).await;
    let url = format!("{}/applications/{CLIENT_ID}/./tokens", gw.url());
    let a = support::call_as_app(Method::DELETE, &url).await;
    assert_eq!(a.status, 404, "the fake, like GitHub, no longer has it");
    let requests = gh.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].path_and_query,
        format!("/applications/{CLIENT_ID}/tokens")
    );
    let m = scrape(&gw).await;
    assert_eq!(
        m["oauth_apps_gateway_deprecated_calls_total{action=\"observed\",operation=\"revoke_all\"}"],
        1.0
    );
    assert_eq!(
        m["oauth_apps_gateway_failed_checks_total{class=\"token\",key_kind=\"credential\"}"],
        0.0
    );
}

#[tokio::test]
async fn ambiguous_separators_are_refused_and_never_forwarded() {
    let (gh, gw) = gateway(|_| {}).await;
    let c = CLIENT_ID;
    for path in [
        format!("/applications/{c}/tokens%2Fgho_secret"),
        format!("/applications/{c}%2Ftokens%2Fgho_secret"),
        format!("/applications/{c}/tokens%5cgho_secret"),
        format!("/applications/{c}/tokens;v=1/gho_secret"),
        // A stray `%` never becomes an escape the client did not send.
        format!("/applications/{c}/tokens/gho_secret/x/%%32%65%%32%65"),
    ] {
        let a = support::call_as_app(Method::GET, &format!("{}{path}", gw.url())).await;
        assert!(a.status == 400 || a.status == 404, "{path}: {}", a.status);
        for r in gh.requests() {
            assert!(
                !r.path_and_query.contains("%2e") && !r.path_and_query.contains("tokens%2F"),
                "{path} was forwarded as {}",
                r.path_and_query
            );
        }
    }
    let refused = gh.request_count();
    assert!(
        refused <= 1,
        "only the stray-% path may pass through ({refused})"
    );
}
