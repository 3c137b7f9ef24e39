//! In-process fake of GitHub's *new* OAuth Applications API (token in the JSON body) plus a few
//! pass-through helper routes (/echo, /stream, /slow, /slow-body, /headers), served by hyper on a
//! caller-chosen listener (tests use 127.0.0.1:0). Owns app/token state and the request log.
//! Must not panic on the request path: every failure becomes a GitHub-shaped response.
#![allow(dead_code)]

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

const DOCS_REST: &str = "https://docs.github.com/rest";
const DOCS_OAUTH_APPS: &str = "https://docs.github.com/rest/apps/oauth-applications";
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough to outlast any gateway timeout under test.
const STALL: Duration = Duration::from_secs(3600);

type RespBody = BoxBody<Bytes, Infallible>;

/// The example binary's tokens besides its `--token` (the one to check): `(operation, token,
/// user)`. Each operation here replaces or removes its token, and revoking a grant removes every
/// token of its user, so each token has a user of its own and none touches another. 40
/// characters, like GitHub's.
pub const DEMO_OPERATION_TOKENS: [(&str, &str, &str); 3] = [
    (
        "reset",
        "gho_reset0000000000000000000000000000000",
        "octocat-reset",
    ),
    (
        "revoke_token",
        "gho_revoke000000000000000000000000000000",
        "octocat-revoke",
    ),
    (
        "revoke_grant",
        "gho_grant0000000000000000000000000000000",
        "octocat-grant",
    ),
];

/// One request as the fake received it, body fully read.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub path_and_query: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A running fake; dropping it (or `shutdown`) stops the accept loop and every open connection.
pub struct FakeGithub {
    addr: SocketAddr,
    tls: bool,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl FakeGithub {
    /// Plain HTTP/1.1 and h2c (prior knowledge) on 127.0.0.1:0.
    pub async fn start() -> FakeGithub {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for fake GitHub");
        Self::serve(listener, None)
    }

    /// TLS on 127.0.0.1:0; HTTP/1.1 or h2 according to the ALPN the caller put in `cfg`.
    pub async fn start_tls(cfg: Arc<rustls::ServerConfig>) -> FakeGithub {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for fake GitHub");
        Self::serve(listener, Some(cfg))
    }

    /// Serve on an already-bound listener (the example binary binds its `--listen` address).
    pub fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> FakeGithub {
        let addr = listener
            .local_addr()
            .expect("local_addr of fake GitHub listener");
        let state = Arc::new(Mutex::new(State::default()));
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(accept_loop(listener, acceptor, state.clone()));
        FakeGithub {
            addr,
            tls: is_tls,
            state,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://…` when started with TLS. No trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Register (or replace) an OAuth app.
    pub fn add_app(&self, client_id: &str, client_secret: &str) {
        self.lock().apps.insert(
            client_id.to_owned(),
            App {
                secret: client_secret.to_owned(),
                name: format!("fake app {client_id}"),
            },
        );
    }

    /// Issue a fresh token for `user` on `client_id`, like `gho_0001<hex>` (40 chars).
    pub fn issue_token(&self, client_id: &str, user: &str) -> String {
        self.lock().issue(client_id, user, None).token
    }

    /// Seed a token with a fixed value (the example binary uses this for its demo token).
    pub fn add_token(&self, client_id: &str, user: &str, token: &str) {
        self.lock().issue(client_id, user, Some(token));
    }

    /// Seeds what `examples/fake-github.rs` serves: the app, `token` for `user` (the one to
    /// check), and one more token per legacy operation that uses its token up
    /// ([`DEMO_OPERATION_TOKENS`]), so each can be tried once by hand without a restart.
    pub fn seed_demo(&self, client_id: &str, client_secret: &str, token: &str, user: &str) {
        self.add_app(client_id, client_secret);
        self.add_token(client_id, user, token);
        for (_, op_token, op_user) in DEMO_OPERATION_TOKENS {
            self.add_token(client_id, op_user, op_token);
        }
    }

    pub fn token_is_valid(&self, client_id: &str, token: &str) -> bool {
        self.lock()
            .tokens
            .get(token)
            .is_some_and(|t| t.client_id == client_id)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.lock().requests.len()
    }

    /// Stop accepting and drop every connection; waits until the listener is closed.
    pub async fn shutdown(mut self) {
        self.task.abort();
        // The result is always Cancelled (or a panic we have nothing to do with).
        let _ = (&mut self.task).await;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not take the fake down with it.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// State

struct App {
    secret: String,
    name: String,
}

#[derive(Clone)]
struct TokenRecord {
    token: String,
    id: u64,
    client_id: String,
    user: String,
    user_id: u64,
    created_at: String,
    updated_at: String,
}

#[derive(Default)]
struct State {
    apps: HashMap<String, App>,
    tokens: HashMap<String, TokenRecord>,
    user_ids: HashMap<String, u64>,
    next_id: u64,
    requests: Vec<RecordedRequest>,
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn user_id(&mut self, user: &str) -> u64 {
        let next = self.user_ids.len() as u64 + 1;
        *self.user_ids.entry(user.to_owned()).or_insert(next)
    }

    fn new_token_value(&mut self) -> String {
        let n = self.next_id();
        let mut token = format!("gho_{n:04}{:016x}{:016x}", random_u64(n), random_u64(!n));
        // The counter prefix (at most 20 digits) keeps it unique; cut to GitHub's 40 chars.
        token.truncate(40);
        token
    }

    fn issue(&mut self, client_id: &str, user: &str, fixed: Option<&str>) -> TokenRecord {
        let token = match fixed {
            Some(t) => t.to_owned(),
            None => self.new_token_value(),
        };
        let now = now_rfc3339();
        let record = TokenRecord {
            token: token.clone(),
            id: self.next_id(),
            client_id: client_id.to_owned(),
            user: user.to_owned(),
            user_id: self.user_id(user),
            created_at: now.clone(),
            updated_at: now,
        };
        self.tokens.insert(token, record.clone());
        record
    }

    /// Replace `old` by a new token value under the same authorization id.
    fn reset(&mut self, old: &str) -> Option<TokenRecord> {
        let mut record = self.tokens.remove(old)?;
        record.token = self.new_token_value();
        record.updated_at = now_rfc3339();
        self.tokens.insert(record.token.clone(), record.clone());
        Some(record)
    }

    fn authorization_json(&self, r: &TokenRecord) -> Value {
        let app_name = self
            .apps
            .get(&r.client_id)
            .map_or_else(|| format!("fake app {}", r.client_id), |a| a.name.clone());
        let last_eight = &r.token[r.token.len().saturating_sub(8)..];
        json!({
            "id": r.id,
            "url": format!("https://api.github.com/authorizations/{}", r.id),
            "scopes": ["repo", "user"],
            "token": r.token,
            "token_last_eight": last_eight,
            "hashed_token": pseudo_hash(&r.token),
            "app": {
                "client_id": r.client_id,
                "name": app_name,
                "url": "https://example.com",
            },
            "note": null,
            "note_url": null,
            "updated_at": r.updated_at,
            "created_at": r.created_at,
            "fingerprint": null,
            "expires_at": null,
            "user": simple_user(&r.user, r.user_id),
        })
    }
}

fn simple_user(login: &str, id: u64) -> Value {
    let base = format!("https://api.github.com/users/{login}");
    json!({
        "login": login,
        "id": id,
        "node_id": format!("MDQ6VXNlcj{id}"),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
        "gravatar_id": "",
        "url": base,
        "html_url": format!("https://github.com/{login}"),
        "followers_url": format!("{base}/followers"),
        "following_url": format!("{base}/following{{/other_user}}"),
        "gists_url": format!("{base}/gists{{/gist_id}}"),
        "starred_url": format!("{base}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{base}/subscriptions"),
        "organizations_url": format!("{base}/orgs"),
        "repos_url": format!("{base}/repos"),
        "events_url": format!("{base}/events{{/privacy}}"),
        "received_events_url": format!("{base}/received_events"),
        "type": "User",
        "site_admin": false,
        "user_view_type": "public",
    })
}

fn random_u64(salt: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(salt);
    h.finish()
}

/// Deterministic 64-hex stand-in for GitHub's SHA-256 `hashed_token`.
fn pseudo_hash(token: &str) -> String {
    (0..4u8)
        .map(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            h.write_u8(i);
            h.write(token.as_bytes());
            format!("{:016x}", h.finish())
        })
        .collect()
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Connections

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<Mutex<State>>,
) {
    // Owning the connection tasks here means aborting this task closes every connection.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((stream, _peer)) = listener.accept().await else {
            // Transient accept errors (e.g. EMFILE): back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        conns.spawn(serve_connection(stream, tls.clone(), state.clone()));
    }
}

async fn serve_connection(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<Mutex<State>>,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    // Connection errors (client went away, bad preface, …) are part of what tests provoke.
    match tls {
        None => {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Some(acceptor) => {
            let Ok(Ok(tls_stream)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let _ = builder
                .serve_connection(TokioIo::new(tls_stream), service)
                .await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            record(&state, &parts, Bytes::new());
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"message": "Problems reading body", "documentation_url": DOCS_REST}),
            );
        }
    };
    record(&state, &parts, body.clone());

    let path = parts.uri.path();
    let path = match path.strip_prefix("/api/v3") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => path,
    };
    let segments: Vec<&str> = path.split('/').skip(1).collect();

    match segments.as_slice() {
        ["applications", cid, rest @ ..] => {
            let client_id = percent_encoding::percent_decode_str(cid)
                .decode_utf8_lossy()
                .into_owned();
            let op = match (&parts.method, rest) {
                (&Method::POST, ["token"]) => Op::Check,
                (&Method::PATCH, ["token"]) => Op::Reset,
                (&Method::DELETE, ["token"]) => Op::DeleteToken,
                (&Method::DELETE, ["grant"]) => Op::DeleteGrant,
                (&Method::POST, ["token", "scoped"]) => Op::Scoped,
                // Legacy `tokens/{t}` and `grants/{t}` are gone from api.github.com: plain 404.
                _ => return not_found(),
            };
            oauth_op(&state, op, &client_id, &parts.headers, &body)
        }
        ["echo"] => echo(&parts.headers, body),
        ["stream"] => stream(parts.uri.query().unwrap_or("")),
        ["slow"] => {
            tokio::time::sleep(STALL).await;
            not_found()
        }
        ["slow-body"] => slow_body(),
        ["headers"] => headers(&parts.headers, parts.version),
        _ => not_found(),
    }
}

fn record(state: &Mutex<State>, parts: &http::request::Parts, body: Bytes) {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    lock(state).requests.push(RecordedRequest {
        method: parts.method.clone(),
        path_and_query,
        version: parts.version,
        headers: parts.headers.clone(),
        body,
    });
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Check,
    Reset,
    DeleteToken,
    DeleteGrant,
    Scoped,
}

impl Op {
    fn docs_anchor(self) -> &'static str {
        match self {
            Op::Check => "check-a-token",
            Op::Reset => "reset-a-token",
            Op::DeleteToken => "delete-an-app-token",
            Op::DeleteGrant => "delete-an-app-authorization",
            Op::Scoped => "create-a-scoped-access-token",
        }
    }
}

fn oauth_op(
    state: &Mutex<State>,
    op: Op,
    client_id: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<RespBody> {
    let Some((user, pass)) = basic_credentials(headers) else {
        return requires_authentication();
    };
    {
        let st = lock(state);
        let Some(app) = st.apps.get(client_id) else {
            return not_found();
        };
        if user != client_id || pass != app.secret {
            return requires_authentication();
        }
    }
    if let Some(cl) = headers.get(header::CONTENT_LENGTH) {
        let declared = cl
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        if declared != Some(body.len()) {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"message": "Content-Length does not match the body", "documentation_url": DOCS_REST}),
            );
        }
    }
    let token = match access_token(headers, body) {
        Ok(t) => t,
        Err(problem) => return validation_failed(op, problem),
    };

    let mut st = lock(state);
    let Some(record) = st
        .tokens
        .get(&token)
        .filter(|r| r.client_id == client_id)
        .cloned()
    else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({
                "message": "Not Found",
                "documentation_url": format!("{DOCS_OAUTH_APPS}#check-a-token"),
            }),
        );
    };
    match op {
        Op::Check => {
            let auth = st.authorization_json(&record);
            json_response(StatusCode::OK, auth)
        }
        Op::Reset => match st.reset(&token) {
            Some(new) => {
                let auth = st.authorization_json(&new);
                json_response(StatusCode::OK, auth)
            }
            None => not_found(),
        },
        Op::DeleteToken => {
            st.tokens.remove(&token);
            no_content()
        }
        Op::DeleteGrant => {
            st.tokens
                .retain(|_, r| !(r.client_id == record.client_id && r.user == record.user));
            no_content()
        }
        Op::Scoped => {
            let scoped = st.issue(&record.client_id, &record.user, None);
            let auth = st.authorization_json(&scoped);
            json_response(StatusCode::OK, auth)
        }
    }
}

/// `Authorization: Basic base64(user:pass)`, scheme case-insensitive.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// Why a body was rejected: (human message, `errors[].code`).
type BodyProblem = (String, &'static str);

fn access_token(headers: &HeaderMap, body: &[u8]) -> Result<String, BodyProblem> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mt| mt.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err((
            "Content-Type must be application/json".to_owned(),
            "invalid",
        ));
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Err(("Body is not valid JSON".to_owned(), "invalid"));
    };
    match value.get("access_token") {
        Some(Value::String(t)) if !t.is_empty() => Ok(t.clone()),
        None | Some(Value::Null) => Err((
            "\"access_token\" wasn't supplied.".to_owned(),
            "missing_field",
        )),
        Some(Value::String(_)) => Err(("\"access_token\" is empty.".to_owned(), "missing_field")),
        Some(other) => Err((
            format!("For 'properties/access_token', {other} is not a string."),
            "invalid",
        )),
    }
}

fn validation_failed(op: Op, (message, code): BodyProblem) -> Response<RespBody> {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({
            "message": format!("Invalid request.\n\n{message}"),
            "errors": [{"resource": "Authorization", "field": "access_token", "code": code}],
            "documentation_url": format!("{DOCS_OAUTH_APPS}#{}", op.docs_anchor()),
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Helper routes

fn echo(req_headers: &HeaderMap, body: Bytes) -> Response<RespBody> {
    let len = body.len();
    let mut resp = Response::new(Full::new(body).boxed());
    if let Some(ct) = req_headers.get(header::CONTENT_TYPE) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
    }
    resp.headers_mut()
        .insert("x-echo-len", HeaderValue::from(len));
    resp
}

/// `chunks` × `size` bytes, byte i of the whole stream = i % 251, `delay_ms` between chunks.
fn stream(query: &str) -> Response<RespBody> {
    let mut chunks = 4usize;
    let mut size = 1024usize;
    let mut delay_ms = 0u64;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "chunks" => chunks = v.parse().unwrap_or(chunks),
            "size" => size = v.parse().unwrap_or(size),
            "delay_ms" => delay_ms = v.parse().unwrap_or(delay_ms),
            _ => {}
        }
    }
    let (tx, body) = ChannelBody::new();
    tokio::spawn(async move {
        let mut offset = 0usize;
        for i in 0..chunks {
            if i > 0 && delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            let chunk: Vec<u8> = (offset..offset + size).map(|b| (b % 251) as u8).collect();
            offset += size;
            if tx.send(Bytes::from(chunk)).await.is_err() {
                return; // receiver gone: client disconnected
            }
        }
    });
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

fn slow_body() -> Response<RespBody> {
    let (tx, body) = ChannelBody::new();
    tokio::spawn(async move {
        if tx.send(Bytes::from_static(b"first chunk\n")).await.is_ok() {
            // Hold the sender open until the client goes away; no end-of-stream ever.
            tx.closed().await;
        }
    });
    let mut resp = Response::new(body.boxed());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn headers(req_headers: &HeaderMap, version: Version) -> Response<RespBody> {
    let mut map = serde_json::Map::new();
    for name in req_headers.keys() {
        let values: Vec<Value> = req_headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        map.insert(name.as_str().to_owned(), Value::Array(values));
    }
    let mut resp = json_response(StatusCode::OK, Value::Object(map));
    let h = resp.headers_mut();
    if version < Version::HTTP_2 {
        // Hop-by-hop headers a proxy must strip; HTTP/2 forbids sending them at all.
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-remove-me, keep-alive"),
        );
        h.insert("x-remove-me", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic"),
        );
    }
    h.insert("x-kept", HeaderValue::from_static("yes"));
    resp
}

/// Response body fed by an mpsc channel: no size hint, so HTTP/1.1 uses chunked encoding.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    fn new() -> (mpsc::Sender<Bytes>, ChannelBody) {
        // Capacity 1 keeps the producer in step with the client's reads.
        let (tx, rx) = mpsc::channel(1);
        (tx, ChannelBody { rx })
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

fn json_response(status: StatusCode, value: Value) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(
        "x-github-media-type",
        HeaderValue::from_static("github.v3; format=json"),
    );
    resp
}

fn no_content() -> Response<RespBody> {
    let mut resp = Response::new(Empty::new().boxed());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

fn not_found() -> Response<RespBody> {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"message": "Not Found", "documentation_url": DOCS_REST}),
    )
}

fn requires_authentication() -> Response<RespBody> {
    json_response(
        StatusCode::UNAUTHORIZED,
        json!({"message": "Requires authentication", "documentation_url": DOCS_REST}),
    )
}
