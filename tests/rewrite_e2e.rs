//! End to end through a real gateway in front of the in-process fake GitHub, which serves only
//! the replacement endpoints (and 404s the legacy ones, as api.github.com does): each legacy
//! operation with and without `/api/v3`, query-credential migration, malformed legacy paths,
//! header handling, and HTTP/2 from the client side.

mod support;

use bytes::Bytes;
use http::Method;
use support::{
    CLIENT_ID, CLIENT_SECRET, basic_auth, call, call_as_app, get, h2c_client, http1_client, setup,
    setup_with,
};

const PREVIEW: &str = "application/vnd.github.doctor-strange-preview+json";

#[tokio::test]
async fn legacy_path_is_404_upstream_without_the_gateway() {
    // The premise of the product: the fake, like api.github.com today, has no legacy forms.
    let (gh, _gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let a = call_as_app(
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/tokens/{token}", gh.url()),
    )
    .await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn check_is_rewritten_with_and_without_enterprise_prefix() {
    for prefix in ["", "/api/v3"] {
        let (gh, gw) = setup().await;
        let token = gh.issue_token(CLIENT_ID, "octocat");
        let url = format!(
            "{}{prefix}/applications/{CLIENT_ID}/tokens/{token}?page=1",
            gw.url()
        );
        let a = call_as_app(Method::GET, &url).await;
        assert_eq!(a.status, 200, "{prefix}: {:?}", a.body);
        let body = a.json();
        assert_eq!(body["token"], token.as_str());
        assert_eq!(body["app"]["client_id"], CLIENT_ID);

        let reqs = gh.requests();
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.method, Method::POST);
        assert_eq!(
            r.path_and_query,
            format!("{prefix}/applications/{CLIENT_ID}/token?page=1")
        );
        assert!(!r.path_and_query.contains(&token), "token left in the path");
        let sent: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(sent, serde_json::json!({"access_token": token}));
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["content-length"], r.body.len().to_string());
        assert_eq!(r.headers["authorization"], basic_auth().as_str());
        assert_eq!(
            r.headers["accept"],
            format!("application/vnd.github.v3+json, {PREVIEW}").as_str()
        );
        assert_eq!(r.headers["host"], gh.addr().to_string().as_str());
    }
}

#[tokio::test]
async fn reset_invalidates_the_old_token() {
    for prefix in ["", "/api/v3"] {
        let (gh, gw) = setup().await;
        let old = gh.issue_token(CLIENT_ID, "octocat");
        let url = format!("{}{prefix}/applications/{CLIENT_ID}/tokens/{old}", gw.url());
        let a = call_as_app(Method::POST, &url).await;
        assert_eq!(a.status, 200, "{prefix}");
        let new = a.json()["token"].as_str().unwrap().to_owned();
        assert_ne!(new, old);
        assert!(!gh.token_is_valid(CLIENT_ID, &old));
        assert!(gh.token_is_valid(CLIENT_ID, &new));
        let r = &gh.requests()[0];
        assert_eq!(r.method, Method::PATCH);
        assert_eq!(
            r.path_and_query,
            format!("{prefix}/applications/{CLIENT_ID}/token")
        );

        // The old token now checks as invalid: 404, as the legacy contract promises.
        let a = call_as_app(Method::GET, &url).await;
        assert_eq!(a.status, 404);
    }
}

#[tokio::test]
async fn revoke_token_deletes_only_that_token() {
    for prefix in ["", "/api/v3"] {
        let (gh, gw) = setup().await;
        let t1 = gh.issue_token(CLIENT_ID, "octocat");
        let t2 = gh.issue_token(CLIENT_ID, "octocat");
        let url = format!("{}{prefix}/applications/{CLIENT_ID}/tokens/{t1}", gw.url());
        let a = call_as_app(Method::DELETE, &url).await;
        assert_eq!(a.status, 204, "{prefix}");
        assert!(a.body.is_empty());
        assert!(!gh.token_is_valid(CLIENT_ID, &t1));
        assert!(gh.token_is_valid(CLIENT_ID, &t2));
        let r = &gh.requests()[0];
        assert_eq!(r.method, Method::DELETE);
        assert_eq!(
            r.path_and_query,
            format!("{prefix}/applications/{CLIENT_ID}/token")
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap(),
            serde_json::json!({"access_token": t1})
        );
    }
}

#[tokio::test]
async fn revoke_grant_deletes_all_of_the_users_tokens() {
    for prefix in ["", "/api/v3"] {
        let (gh, gw) = setup().await;
        let t1 = gh.issue_token(CLIENT_ID, "octocat");
        let t2 = gh.issue_token(CLIENT_ID, "octocat");
        let other = gh.issue_token(CLIENT_ID, "hubot");
        let url = format!("{}{prefix}/applications/{CLIENT_ID}/grants/{t1}", gw.url());
        let a = call_as_app(Method::DELETE, &url).await;
        assert_eq!(a.status, 204, "{prefix}");
        assert!(!gh.token_is_valid(CLIENT_ID, &t1));
        assert!(!gh.token_is_valid(CLIENT_ID, &t2));
        assert!(gh.token_is_valid(CLIENT_ID, &other));
        let r = &gh.requests()[0];
        assert_eq!(r.method, Method::DELETE);
        assert_eq!(
            r.path_and_query,
            format!("{prefix}/applications/{CLIENT_ID}/grant")
        );
    }
}

#[tokio::test]
async fn invalid_token_gives_404_with_githubs_body() {
    let (_gh, gw) = setup().await;
    let a = call_as_app(
        Method::GET,
        &format!(
            "{}/applications/{CLIENT_ID}/tokens/gho_not_a_real_token",
            gw.url()
        ),
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["message"], "Not Found");
}

#[tokio::test]
async fn percent_encoded_token_is_decoded_into_the_body() {
    let (gh, gw) = setup().await;
    gh.add_token(CLIENT_ID, "octocat", "tok/with space+plus");
    let url = format!(
        "{}/applications/{CLIENT_ID}/tokens/tok%2Fwith%20space+plus",
        gw.url()
    );
    let a = call_as_app(Method::GET, &url).await;
    assert_eq!(a.status, 200);
    let sent: serde_json::Value = serde_json::from_slice(&gh.requests()[0].body).unwrap();
    assert_eq!(sent["access_token"], "tok/with space+plus");
}

#[tokio::test]
async fn legacy_request_body_is_discarded() {
    let (gh, gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let auth = basic_auth();
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "text/plain"),
            ("content-encoding", "gzip"),
        ],
        Bytes::from_static(b"legacy clients sometimes send a body"),
    )
    .await;
    assert_eq!(a.status, 200);
    let r = &gh.requests()[0];
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.headers.get("content-encoding").is_none());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap(),
        serde_json::json!({"access_token": token})
    );
}

#[tokio::test]
async fn preview_accept_is_configurable_and_can_be_off() {
    let (gh, gw) = setup_with(|c| c.migration.preview_accept = None).await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let a = call_as_app(
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url()),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        gh.requests()[0].headers["accept"],
        "application/vnd.github.v3+json"
    );

    // Without any Accept from the client, the preview alone is sent.
    let (gh, gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let auth = basic_auth();
    let a = call(
        &http1_client(),
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/tokens/{token}", gw.url()),
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(gh.requests()[0].headers["accept"], PREVIEW);
}

#[tokio::test]
async fn query_credentials_become_basic_auth_and_leave_the_url() {
    // @octokit/rest 16 sends revokeGrantForApplication this way (auth style 1).
    let (gh, gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let url = format!(
        "{}/applications/{CLIENT_ID}/grants/{token}?client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}&keep=1",
        gw.url()
    );
    let a = call(&http1_client(), Method::DELETE, &url, &[], Bytes::new()).await;
    assert_eq!(a.status, 204, "{:?}", a.body);
    let r = &gh.requests()[0];
    assert_eq!(
        r.path_and_query,
        format!("/applications/{CLIENT_ID}/grant?keep=1")
    );
    assert_eq!(r.headers["authorization"], basic_auth().as_str());
    assert!(!gh.token_is_valid(CLIENT_ID, &token));
}

#[tokio::test]
async fn authorization_header_wins_over_query_credentials() {
    let (gh, gw) = setup().await;
    let auth = basic_auth();
    let url = format!(
        "{}/headers?client_id=other&client_secret=wrong&access_token=zzz",
        gw.url()
    );
    let a = call(
        &http1_client(),
        Method::GET,
        &url,
        &[("authorization", auth.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200);
    let r = &gh.requests()[0];
    assert_eq!(r.path_and_query, "/headers");
    assert_eq!(r.headers["authorization"], auth.as_str());
}

#[tokio::test]
async fn access_token_query_parameter_becomes_token_auth_on_pass_through() {
    let (gh, gw) = setup().await;
    let url = format!(
        "{}/headers?per_page=5&access_token=gho_abc&client_id=Iv1.x",
        gw.url()
    );
    let a = get(&url).await;
    assert_eq!(a.status, 200);
    let r = &gh.requests()[0];
    // A lone client_id is no credential and stays; the token moves into the header.
    assert_eq!(r.path_and_query, "/headers?per_page=5&client_id=Iv1.x");
    assert_eq!(r.headers["authorization"], "token gho_abc");
}

#[tokio::test]
async fn malformed_legacy_paths_get_400_and_are_not_forwarded() {
    let (gh, gw) = setup().await;
    for path in [
        format!("/applications/{CLIENT_ID}/tokens/"),
        format!("/applications/{CLIENT_ID}/tokens/%FF%FE"),
        format!("/api/v3/applications/{CLIENT_ID}/grants/"),
        "/applications//tokens/abc".to_owned(),
    ] {
        let method = if path.contains("grants") {
            Method::DELETE
        } else {
            Method::GET
        };
        let a = call_as_app(method, &format!("{}{path}", gw.url())).await;
        assert_eq!(a.status, 400, "{path}");
        let body = a.json();
        assert!(
            body["message"].as_str().unwrap().starts_with("Bad request"),
            "{body}"
        );
        assert!(
            body["documentation_url"]
                .as_str()
                .unwrap()
                .starts_with("https://docs.github.com/")
        );
        assert_eq!(a.headers["content-type"], "application/json; charset=utf-8");
    }
    assert_eq!(gh.request_count(), 0);
}

#[tokio::test]
async fn new_forms_and_other_calls_pass_through_unchanged() {
    let (gh, gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let auth = basic_auth();
    let body = serde_json::to_vec(&serde_json::json!({"access_token": token})).unwrap();
    for path in [
        "/applications/{id}/token",
        "/api/v3/applications/{id}/token",
    ] {
        let path = path.replace("{id}", CLIENT_ID);
        let a = call(
            &http1_client(),
            Method::POST,
            &format!("{}{path}", gw.url()),
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(a.status, 200, "{path}");
        let r = gh.requests().pop().unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path_and_query, path);
        assert_eq!(r.body, body);
        // No preview media type is added to calls the client already makes in the new form.
        assert!(r.headers.get("accept").is_none());
    }
    let scoped =
        serde_json::to_vec(&serde_json::json!({"access_token": token, "target": "octocat"}))
            .unwrap();
    let a = call(
        &http1_client(),
        Method::POST,
        &format!("{}/applications/{CLIENT_ID}/token/scoped", gw.url()),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        scoped.clone(),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(gh.requests().pop().unwrap().body, scoped);

    // GET .../grants/{t} never existed: it passes through, and the upstream says 404.
    let a = call_as_app(
        Method::GET,
        &format!("{}/applications/{CLIENT_ID}/grants/{token}", gw.url()),
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(
        gh.requests().pop().unwrap().path_and_query,
        format!("/applications/{CLIENT_ID}/grants/{token}")
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let (gh, gw) = setup().await;
    let a = call(
        &http1_client(),
        Method::GET,
        &format!("{}/headers", gw.url()),
        &[
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=1"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("te", "trailers"),
            ("x-end-to-end", "kept"),
            ("host", "attacker.example"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(a.status, 200);
    let r = &gh.requests()[0];
    for gone in ["x-hop", "keep-alive", "proxy-authorization", "te"] {
        assert!(r.headers.get(gone).is_none(), "{gone} forwarded");
    }
    assert_eq!(r.headers["x-end-to-end"], "kept");
    // Host names the upstream, never what the client asked for.
    assert_eq!(r.headers["host"], gh.addr().to_string().as_str());

    // The fake answers with Connection: x-remove-me, X-Remove-Me, Keep-Alive, Proxy-Authenticate.
    assert!(a.headers.get("x-remove-me").is_none());
    assert!(a.headers.get("proxy-authenticate").is_none());
    assert!(a.headers.get("keep-alive").is_none());
    assert_eq!(a.headers["x-kept"], "yes");
}

#[tokio::test]
async fn http2_clients_are_served_and_forwarded_over_http1() {
    let (gh, gw) = setup().await;
    let token = gh.issue_token(CLIENT_ID, "octocat");
    let auth = basic_auth();
    for op in [Method::GET, Method::DELETE] {
        let url = format!(
            "{}/api/v3/applications/{CLIENT_ID}/tokens/{token}",
            gw.url()
        );
        let a = call(
            &h2c_client(),
            op.clone(),
            &url,
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await;
        assert_eq!(a.version, http::Version::HTTP_2);
        let want = if op == Method::GET { 200 } else { 204 };
        assert_eq!(a.status, want, "{op}");
    }
    let reqs = gh.requests();
    assert_eq!(reqs.len(), 2);
    // The upstream here speaks HTTP/1.1 only (plain http, no ALPN): the request was downgraded.
    assert!(reqs.iter().all(|r| r.version == http::Version::HTTP_11));
    assert_eq!(reqs[0].method, Method::POST);
    assert_eq!(reqs[1].method, Method::DELETE);
    assert!(!gh.token_is_valid(CLIENT_ID, &token));
}
