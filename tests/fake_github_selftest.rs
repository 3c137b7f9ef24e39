//! Self-test of the fake GitHub upstream (tests/support/fake_github.rs) and the test PKI
//! (tests/support/tls.rs) over plain HTTP/1.1, h2c and TLS. Tests the fake, not the gateway.
#![forbid(unsafe_code)]

#[path = "support/fake_github.rs"]
mod fake_github;
#[path = "support/tls.rs"]
mod tls;

use base64::Engine as _;
use bytes::Bytes;
use fake_github::FakeGithub;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const CID: &str = "Iv1.selftest000001";
const SECRET: &str = "s3cret";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn basic(user: &str, pass: &str) -> String {
    let raw = format!("{user}:{pass}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = client.request(req).await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// A new-API call with proper Basic auth and a JSON `access_token` body.
async fn oauth(fake: &FakeGithub, method: Method, path: &str, token: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", fake.url()))
        .header("authorization", basic(CID, SECRET))
        .header("content-type", "application/json")
        .body(Full::from(json!({ "access_token": token }).to_string()))
        .expect("request");
    send(&client(), req).await
}

async fn started() -> FakeGithub {
    let fake = FakeGithub::start().await;
    fake.add_app(CID, SECRET);
    fake
}

#[tokio::test]
async fn check_reset_delete_and_grant_semantics() {
    let fake = started().await;
    let path = format!("/applications/{CID}/token");
    let t1 = fake.issue_token(CID, "octocat");
    let t2 = fake.issue_token(CID, "octocat");
    let other = fake.issue_token(CID, "hubot");
    assert_ne!(t1, t2);
    assert!(t1.starts_with("gho_") && t1.len() == 40, "{t1}");

    let r = oauth(&fake, Method::POST, &path, &t1).await;
    assert_eq!(r.status, StatusCode::OK);
    let auth = r.json();
    assert_eq!(auth["token"], t1.as_str());
    assert_eq!(auth["token_last_eight"], &t1[32..]);
    assert_eq!(auth["app"]["client_id"], CID);
    assert_eq!(auth["user"]["login"], "octocat");
    assert!(auth["expires_at"].is_null());

    // Same routes under the GHES prefix.
    let r = oauth(&fake, Method::POST, &format!("/api/v3{path}"), &t1).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = oauth(&fake, Method::PATCH, &path, &t1).await;
    assert_eq!(r.status, StatusCode::OK);
    let reset = r.json()["token"].as_str().expect("token").to_owned();
    assert_ne!(reset, t1);
    assert!(!fake.token_is_valid(CID, &t1));
    assert!(fake.token_is_valid(CID, &reset));
    let r = oauth(&fake, Method::POST, &path, &t1).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = oauth(&fake, Method::POST, &format!("{path}/scoped"), &reset).await;
    assert_eq!(r.status, StatusCode::OK);
    let scoped = r.json()["token"].as_str().expect("token").to_owned();
    assert!(fake.token_is_valid(CID, &scoped));

    let r = oauth(&fake, Method::DELETE, &path, &reset).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    assert!(!fake.token_is_valid(CID, &reset));

    // Deleting the grant takes every octocat token for the app with it, and nobody else's.
    let r = oauth(
        &fake,
        Method::DELETE,
        &format!("/applications/{CID}/grant"),
        &t2,
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(!fake.token_is_valid(CID, &t2));
    assert!(!fake.token_is_valid(CID, &scoped));
    assert!(fake.token_is_valid(CID, &other));

    let recorded = fake.requests();
    assert_eq!(recorded.len(), fake.request_count());
    assert_eq!(recorded[0].method, Method::POST);
    assert_eq!(recorded[0].path_and_query, path);
    assert_eq!(recorded[0].version, Version::HTTP_11);
    assert_eq!(
        serde_json::from_slice::<Value>(&recorded[0].body).expect("json"),
        json!({ "access_token": t1 })
    );
}

#[tokio::test]
async fn auth_validation_and_legacy_errors() {
    let fake = started().await;
    let token = fake.issue_token(CID, "octocat");
    let url = format!("{}/applications/{CID}/token", fake.url());
    let body = json!({ "access_token": token }).to_string();
    let c = client();

    let build = |auth: Option<String>, ct: Option<&str>, body: String| {
        let mut b = Request::post(&url);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(Full::from(body)).expect("request")
    };

    let r = send(&c, build(None, Some("application/json"), body.clone())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.json(),
        json!({"message": "Requires authentication", "documentation_url": "https://docs.github.com/rest"})
    );
    let wrong = Some(basic(CID, "nope"));
    let r = send(&c, build(wrong, Some("application/json"), body.clone())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let good = || Some(basic(CID, SECRET));
    let r = send(&c, build(good(), Some("text/plain"), body.clone())).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = send(&c, build(good(), Some("application/json"), "{}".into())).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let v = r.json();
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("access_token")
    );
    assert_eq!(v["errors"][0]["code"], "missing_field");
    let r = send(
        &c,
        build(
            good(),
            Some("application/json; charset=utf-8"),
            body.clone(),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    // Unknown app, then the legacy token-in-path forms, which GitHub no longer serves.
    let req = Request::post(format!("{}/applications/Iv1.unknown/token", fake.url()))
        .header("authorization", basic("Iv1.unknown", SECRET))
        .header("content-type", "application/json")
        .body(Full::from(body.clone()))
        .expect("request");
    assert_eq!(send(&c, req).await.status, StatusCode::NOT_FOUND);
    for (method, kind) in [
        (Method::GET, "tokens"),
        (Method::POST, "tokens"),
        (Method::DELETE, "tokens"),
        (Method::DELETE, "grants"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}/applications/{CID}/{kind}/{token}", fake.url()))
            .header("authorization", basic(CID, SECRET))
            .body(Full::default())
            .expect("request");
        let r = send(&c, req).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            r.json(),
            json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest"})
        );
    }
    assert!(fake.token_is_valid(CID, &token));
}

#[tokio::test]
async fn echo_stream_and_headers() {
    let fake = FakeGithub::start().await;
    let c = client();

    let req = Request::put(format!("{}/echo", fake.url()))
        .header("content-type", "application/x-test")
        .body(Full::from("hello echo"))
        .expect("request");
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "hello echo");
    assert_eq!(r.headers["content-type"], "application/x-test");
    assert_eq!(r.headers["x-echo-len"], "10");

    let req = Request::get(format!(
        "{}/stream?chunks=5&size=300&delay_ms=5",
        fake.url()
    ))
    .body(Full::default())
    .expect("request");
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("content-length").is_none());
    assert_eq!(r.headers["transfer-encoding"], "chunked");
    let expected: Vec<u8> = (0..1500usize).map(|i| (i % 251) as u8).collect();
    assert_eq!(&r.body[..], &expected[..]);

    let req = Request::get(format!("{}/headers", fake.url()))
        .header("x-probe", "a")
        .header("x-probe", "b")
        .body(Full::default())
        .expect("request");
    let r = send(&c, req).await;
    assert_eq!(r.json()["x-probe"], json!(["a", "b"]));
    assert_eq!(r.headers["x-remove-me"], "1");
    assert_eq!(r.headers["x-kept"], "yes");

    // h2c with prior knowledge: no connection-specific headers in the answer.
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(format!("{}/headers", fake.url()))
        .body(Full::default())
        .expect("request");
    let r = send(&h2, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("x-remove-me").is_none());
    assert_eq!(r.headers["x-kept"], "yes");
    let last = fake.requests().pop().expect("recorded");
    assert_eq!(last.version, Version::HTTP_2);
    assert_eq!(fake.request_count(), 4);
}

#[tokio::test]
async fn slow_routes_stall_and_shutdown_stops_the_server() {
    use std::time::Duration;
    let fake = FakeGithub::start().await;
    let c = client();

    let req = Request::get(format!("{}/slow", fake.url()))
        .body(Full::default())
        .expect("request");
    let slow = tokio::time::timeout(Duration::from_millis(200), c.request(req)).await;
    assert!(slow.is_err(), "/slow answered");
    assert_eq!(fake.request_count(), 1);

    let req = Request::get(format!("{}/slow-body", fake.url()))
        .body(Full::default())
        .expect("request");
    let resp = c.request(req).await.expect("slow-body head");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("frame").expect("ok");
    assert_eq!(first.into_data().expect("data"), "first chunk\n");
    let stalled = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
    assert!(stalled.is_err(), "/slow-body finished");

    let addr = fake.addr();
    fake.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn tls_with_alpn_h2_and_http11() {
    let pki = tls::TestPki::new(&[b"h2", b"http/1.1"]);
    let fake = FakeGithub::start_tls(pki.server_config.clone()).await;
    fake.add_app(CID, SECRET);
    let token = fake.issue_token(CID, "octocat");
    assert!(fake.url().starts_with("https://127.0.0.1:"));

    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = pki.write_ca(dir.path());
    assert_eq!(
        std::fs::read_to_string(ca_path).expect("read CA"),
        pki.ca_pem
    );

    for (h2, version) in [(true, Version::HTTP_2), (false, Version::HTTP_11)] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(pki.client_config())
            .https_only();
        let connector = if h2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        for host in ["127.0.0.1", "localhost"] {
            let req = Request::post(format!(
                "https://{host}:{}/applications/{CID}/token",
                fake.addr().port()
            ))
            .header("authorization", basic(CID, SECRET))
            .header("content-type", "application/json")
            .body(Full::from(json!({ "access_token": token }).to_string()))
            .expect("request");
            let resp = c.request(req).await.expect("TLS request");
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.version(), version);
        }
        assert_eq!(fake.requests().pop().expect("recorded").version, version);
    }
}

/// What examples/fake-github.rs seeds: each legacy operation that uses its token up has a token
/// (and a user) of its own, so trying reset, revoke_token and revoke_grant by hand, in any order,
/// leaves the token to check, and every other, valid: no restart between operations.
#[tokio::test]
async fn demo_seed_gives_each_operation_a_token_of_its_own() {
    use fake_github::DEMO_OPERATION_TOKENS;
    let fake = FakeGithub::start().await;
    let check = "gho_demo00000000000000000000000000000000";
    fake.seed_demo(CID, SECRET, check, "octocat");
    let tokens: Vec<&str> = DEMO_OPERATION_TOKENS.iter().map(|(_, t, _)| *t).collect();
    let mut users: Vec<&str> = DEMO_OPERATION_TOKENS.iter().map(|(_, _, u)| *u).collect();
    users.push("octocat");
    users.sort_unstable();
    users.dedup();
    assert_eq!(
        users.len(),
        DEMO_OPERATION_TOKENS.len() + 1,
        "a user per token"
    );
    for t in tokens.iter().chain([&check]) {
        assert_eq!(t.len(), 40, "{t}");
        assert!(t.starts_with("gho_"), "{t}");
        assert!(fake.token_is_valid(CID, t), "{t} seeded");
    }

    let path = format!("/applications/{CID}/token");
    for (i, (operation, token, _)) in DEMO_OPERATION_TOKENS.into_iter().enumerate() {
        let (method, path, status) = match operation {
            "reset" => (Method::PATCH, path.clone(), StatusCode::OK),
            "revoke_token" => (Method::DELETE, path.clone(), StatusCode::NO_CONTENT),
            "revoke_grant" => (
                Method::DELETE,
                format!("/applications/{CID}/grant"),
                StatusCode::NO_CONTENT,
            ),
            other => panic!("no replacement call known for {other}"),
        };
        let r = oauth(&fake, method, &path, token).await;
        assert_eq!(r.status, status, "{operation}");
        assert!(!fake.token_is_valid(CID, token), "{operation} used it up");
        for later in &tokens[i + 1..] {
            assert!(fake.token_is_valid(CID, later), "{operation} took {later}");
        }
        let r = oauth(
            &fake,
            Method::POST,
            &format!("/applications/{CID}/token"),
            check,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "check token after {operation}");
    }
}
