//! The request flow: classify -> move query credentials into a header -> rewrite a legacy call ->
//! forward to the upstream -> stream the response back, with one access event per request.
//! `ProxyError` is the only place errors become statuses and GitHub-shaped bodies. Nothing on
//! this path unwraps, and nothing logged here holds a token, secret, Authorization value, query
//! string or raw path.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{DeadlineBody, ProxyBody};
use crate::classify::{
    ClassifyError, LegacyCall, Malformed, Operation, Route, RouteClass, app_client_id, classify,
};
use crate::config::{Config, Mode, OperationModes};
use crate::headers::{DeprecationHeaders, add_accept_media_type, remove_hop_by_hop};
use crate::limiter::{Blocked, FailedChecks, KeyKind};
use crate::metrics::{CredentialKind, LegacyAction, Metrics};
use crate::rewrite::{InvalidCredential, QueryCredentials, replace_legacy, take_query_credentials};
use crate::upstream::{FailureKind, Upstream, UpstreamError};

/// GitHub's documentation of the OAuth Applications API, for errors about legacy calls.
const OAUTH_APPS_DOCS: &str = "https://docs.github.com/rest/apps/oauth-applications";
/// GitHub's REST documentation root, for errors not specific to one endpoint.
const REST_DOCS: &str = "https://docs.github.com/rest";

/// The parts of the configuration the request path reads. Built once per (re)load.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Whole-exchange deadline after forwarding starts (`server.request_timeout`).
    pub request_timeout: std::time::Duration,
    /// Largest request body forwarded, in bytes (`server.max_request_body_bytes`).
    pub max_request_body_bytes: u64,
    /// Media type added to `Accept` on rewritten calls (`migration.preview_accept`).
    pub preview_accept: Option<HeaderValue>,
    /// What is done with each legacy operation (`migration.mode`, `[migration.operations]`).
    pub modes: OperationModes,
    /// 422 to a rewritten call becomes 404 (`migration.status_compat`).
    pub status_compat: bool,
    /// Headers added to every response to a legacy call; `None` when
    /// `migration.deprecation_headers` is false.
    pub deprecation: Option<DeprecationHeaders>,
}

impl From<&Config> for ProxySettings {
    fn from(c: &Config) -> Self {
        let m = &c.migration;
        Self {
            request_timeout: c.server.request_timeout,
            max_request_body_bytes: c.server.max_request_body_bytes,
            preview_accept: m.preview_accept.clone(),
            modes: m.modes,
            status_compat: m.status_compat,
            deprecation: m
                .deprecation_headers
                .then(|| DeprecationHeaders::new(&m.deprecation)),
        }
    }
}

impl ProxySettings {
    fn mode(&self, op: Operation) -> Mode {
        match op {
            Operation::Check => self.modes.check,
            Operation::Reset => self.modes.reset,
            Operation::RevokeToken => self.modes.revoke_token,
            Operation::RevokeGrant => self.modes.revoke_grant,
            // Never a legacy operation; forwarded as is if it ever were.
            Operation::ScopeToken => Mode::Observe,
        }
    }
}

/// The proxy service: cheap to clone (one `Arc`), shared by every connection.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Upstream,
    settings: ProxySettings,
    metrics: Arc<Metrics>,
    limiter: Option<Arc<FailedChecks>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.inner.upstream)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// An error the gateway answers itself. [`StatusCode::from`] is the one mapping to statuses.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A legacy-shaped path with an empty or undecodable client_id or token: 400.
    #[error(transparent)]
    MalformedLegacy(#[from] ClassifyError),
    /// An `access_token` query parameter that no header can carry: 400.
    #[error(transparent)]
    InvalidQueryCredential(#[from] InvalidCredential),
    /// The request body is larger than `server.max_request_body_bytes`: 413.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit, in bytes.
        limit: u64,
    },
    /// `CONNECT`: the gateway is no tunnel or forward proxy: 405.
    #[error("CONNECT is not supported")]
    MethodNotAllowed,
    /// The client's request body could not be read: 400.
    #[error("request body could not be read")]
    RequestBody,
    /// A token operation from a key whose quota of failures is spent: 429 with `Retry-After`.
    #[error("too many failed token operations ({})", .0.kind.as_str())]
    TooManyFailures(Blocked),
    /// A legacy operation switched off by mode `reject`: 410, naming the replacement.
    #[error("legacy {operation} rejected by configuration")]
    Gone {
        /// The rejected operation.
        operation: Operation,
        /// `METHOD /path` of the replacement endpoint, with the client_id (never the token).
        replacement: String,
    },
    /// The upstream failed: 502, or 504 for a timeout.
    #[error("upstream {0} failure")]
    Upstream(FailureKind),
}

impl From<&ProxyError> for StatusCode {
    fn from(e: &ProxyError) -> Self {
        match e {
            ProxyError::MalformedLegacy(_)
            | ProxyError::InvalidQueryCredential(_)
            | ProxyError::RequestBody => StatusCode::BAD_REQUEST,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Gone { .. } => StatusCode::GONE,
            ProxyError::TooManyFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Upstream(FailureKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl ProxyError {
    fn from_upstream(e: UpstreamError, limit: u64) -> Self {
        match e {
            UpstreamError::Failed { kind, .. } => ProxyError::Upstream(kind),
            UpstreamError::RequestBodyTooLarge => ProxyError::PayloadTooLarge { limit },
            UpstreamError::RequestBody(_) => ProxyError::RequestBody,
        }
    }

    fn message(&self) -> String {
        match self {
            ProxyError::MalformedLegacy(e) => format!("Bad request: {e}."),
            ProxyError::InvalidQueryCredential(e) => format!("Bad request: {e}."),
            ProxyError::PayloadTooLarge { limit } => {
                format!("Request body too large: the gateway accepts at most {limit} bytes.")
            }
            ProxyError::RequestBody => "Bad request: the request body could not be read.".into(),
            ProxyError::MethodNotAllowed => {
                "Method not allowed: this gateway forwards API calls to one upstream; it is not a tunnel.".into()
            }
            ProxyError::TooManyFailures(b) => format!(
                "Too many failed token checks from this {}. Retry after {} seconds.",
                match b.kind {
                    KeyKind::ClientId => "client_id",
                    KeyKind::ClientIp => "client address",
                },
                b.retry_after_secs()
            ),
            ProxyError::Gone { replacement, .. } => format!(
                "Gone: this deprecated endpoint is switched off. Use {replacement} with the token in a JSON body: {{\"access_token\": \"...\"}}."
            ),
            ProxyError::Upstream(FailureKind::Timeout) => {
                "Gateway timeout: the upstream did not answer in time.".into()
            }
            ProxyError::Upstream(kind) => {
                format!("Bad gateway: the upstream could not be reached ({kind} failure).")
            }
        }
    }

    fn documentation_url(&self) -> &'static str {
        match self {
            ProxyError::MalformedLegacy(_) => OAUTH_APPS_DOCS,
            ProxyError::Gone { operation, .. } => replacement_docs(*operation),
            _ => REST_DOCS,
        }
    }

    /// The gateway's own answer: the status and a GitHub-shaped JSON body
    /// `{"message", "documentation_url"}` (GitHub REST: basic-error). Never holds a token.
    pub fn into_response(self) -> Response<ProxyBody> {
        #[derive(serde::Serialize)]
        struct BasicError<'a> {
            message: &'a str,
            documentation_url: &'a str,
        }
        let status = StatusCode::from(&self);
        let message = self.message();
        let body = serde_json::to_vec(&BasicError {
            message: &message,
            documentation_url: self.documentation_url(),
        })
        .unwrap_or_default();
        let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if let ProxyError::MethodNotAllowed = &self {
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if let ProxyError::TooManyFailures(b) = &self {
            // Whole seconds (RFC 9110 §10.2.3). No x-ratelimit-* headers: clients read those
            // as GitHub's own quota.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(b.retry_after_secs()));
        }
        resp
    }
}

impl Proxy {
    /// A proxy forwarding to `upstream` with `settings`, recording into `metrics`, and limiting
    /// failed token operations with `limiter` (`None` when `failed_checks.enabled` is false).
    pub fn new(
        upstream: Upstream,
        settings: ProxySettings,
        metrics: Arc<Metrics>,
        limiter: Option<Arc<FailedChecks>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                upstream,
                settings,
                metrics,
                limiter,
            }),
        }
    }

    /// Serves one request. Never fails: errors become the gateway's own GitHub-shaped answers.
    /// Records metrics and emits one access event (target `oauth_apps_gateway::access`) with
    /// method, route class, operation, action, status, duration in seconds and client_id.
    /// `peer` is the TCP peer: the client, unless a trusted proxy forwarded the call.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let Inner {
            settings, metrics, ..
        } = &*self.inner;
        let _in_flight = metrics.request_started();
        let started = StdInstant::now();
        let method = req.method().clone();
        // A Uri clone shares its bytes; the route borrows from it while `req` moves on.
        let uri = req.uri().clone();
        let route = classify(&method, uri.path());

        let (result, legacy) = match &route {
            Err(e) => (
                Err(ProxyError::MalformedLegacy(*e)),
                Some((e.operation, LegacyAction::Malformed)),
            ),
            Ok(r @ Route::Legacy(call)) => {
                let op = call.operation;
                match settings.mode(op) {
                    Mode::Reject => (
                        Err(ProxyError::Gone {
                            operation: op,
                            replacement: replacement_of(call),
                        }),
                        Some((op, LegacyAction::Rejected)),
                    ),
                    Mode::Observe => (
                        self.forward_limited(req, r, None, peer, uri.path()).await,
                        Some((op, LegacyAction::Observed)),
                    ),
                    Mode::Rewrite => (
                        self.forward_limited(req, r, Some(call), peer, uri.path())
                            .await,
                        Some((op, LegacyAction::Rewritten)),
                    ),
                }
            }
            Ok(r) => (
                self.forward_limited(req, r, None, peer, uri.path()).await,
                None,
            ),
        };

        // A call the limiter answered was neither rewritten nor observed.
        let legacy = match (&result, legacy) {
            (Err(ProxyError::TooManyFailures(_)), Some((op, _))) => {
                Some((op, LegacyAction::Limited))
            }
            (_, legacy) => legacy,
        };
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(error = %e, "answered by the gateway");
                e.into_response()
            }
        };
        let client_id = route.as_ref().ok().and_then(Route::client_id);
        if let Some((op, action)) = legacy {
            if action == LegacyAction::Rewritten
                && settings.status_compat
                && resp.status() == StatusCode::UNPROCESSABLE_ENTITY
            {
                // The legacy contract never lists 422 and promises 404 for a bad token.
                *resp.status_mut() = StatusCode::NOT_FOUND;
                metrics.status_compat(op);
            }
            if let Some(d) = &settings.deprecation {
                d.apply(resp.headers_mut());
            }
            metrics.deprecated_call(op, action, client_id);
        }
        let class = route.as_ref().map_or(RouteClass::Legacy, Route::class);
        let elapsed = started.elapsed();
        metrics.response(class, resp.status(), elapsed);
        tracing::info!(
            target: "oauth_apps_gateway::access",
            method = %method,
            route = class.as_str(),
            operation = route_operation(&route),
            action = legacy.map(|(_, a)| a.as_str()),
            status = resp.status().as_u16(),
            duration_seconds = elapsed.as_secs_f64(),
            client_id = %Escaped(client_id.unwrap_or("")),
        );
        resp
    }

    /// Forwards a request under the failed-check limiter: a token operation from a key whose
    /// quota is spent is answered 429 without reaching the upstream; a failure the upstream
    /// answers (404 or 422 to a token operation, 401 to any `/applications/{client_id}/...`
    /// call) is charged to the client_id and the client IP after the fact.
    async fn forward_limited(
        &self,
        req: Request<Incoming>,
        route: &Route<'_>,
        rewrite: Option<&LegacyCall<'_>>,
        peer: SocketAddr,
        path: &str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Inner {
            metrics, limiter, ..
        } = &*self.inner;
        let Some(limiter) = limiter else {
            return self.forward(req, route, rewrite).await;
        };
        let token_operation = route.operation().is_some();
        let app_id = match route {
            Route::PassThrough => app_client_id(path),
            r => r.client_id().map(std::borrow::Cow::Borrowed),
        };
        if !token_operation && app_id.is_none() {
            return self.forward(req, route, rewrite).await;
        }
        let client_ip = limiter.client_ip(peer.ip(), req.headers());
        if token_operation && let Some(blocked) = limiter.check(app_id.as_deref(), client_ip) {
            metrics.failed_check_rejected(blocked.kind);
            tracing::info!(
                key_kind = blocked.kind.as_str(),
                client_id = %Escaped(app_id.as_deref().unwrap_or("")),
                retry_after_seconds = blocked.retry_after_secs(),
                "failed-check quota spent; answered 429"
            );
            return Err(ProxyError::TooManyFailures(blocked));
        }
        let resp = self.forward(req, route, rewrite).await?;
        let status = resp.status();
        let failure = status == StatusCode::UNAUTHORIZED
            || (token_operation
                && (status == StatusCode::NOT_FOUND || status == StatusCode::UNPROCESSABLE_ENTITY));
        if failure {
            let spent = limiter.charge(app_id.as_deref(), client_ip);
            if app_id.is_some() {
                metrics.failed_check(KeyKind::ClientId);
            }
            metrics.failed_check(KeyKind::ClientIp);
            metrics.failed_checks_tracked(limiter.tracked());
            for kind in spent.into_iter().flatten() {
                tracing::info!(
                    key_kind = kind.as_str(),
                    client_id = %Escaped(app_id.as_deref().unwrap_or("")),
                    "failed-check quota spent"
                );
            }
        }
        Ok(resp)
    }

    /// Forwards a request: rewritten when `rewrite` names the legacy call, otherwise unchanged
    /// but for query credentials and hop-by-hop headers.
    async fn forward(
        &self,
        req: Request<Incoming>,
        route: &Route<'_>,
        rewrite: Option<&LegacyCall<'_>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Inner {
            upstream,
            settings,
            metrics,
            ..
        } = &*self.inner;
        let (mut parts, body) = req.into_parts();
        let inbound_version = parts.version;
        // A CONNECT would make the upstream connection a tunnel for the client.
        if parts.method == http::Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }

        let limit = settings.max_request_body_bytes;
        if content_length(&parts.headers).is_some_and(|len| len > limit) {
            return Err(ProxyError::PayloadTooLarge { limit });
        }

        let creds = match parts.uri.query() {
            Some(q) => take_query_credentials(q),
            None => QueryCredentials::default(),
        };
        if creds.removed_any() {
            if creds.had_client_secret {
                metrics.query_credential(CredentialKind::ClientSecret);
            }
            if creds.had_access_token {
                metrics.query_credential(CredentialKind::AccessToken);
            }
            move_query_credentials(&mut parts.headers, &creds, route)?;
        }

        // The new path and body for a legacy call; the original (minus credentials) otherwise.
        let (path_and_query, rewritten_body) = match rewrite {
            Some(call) => {
                let r = replace_legacy(call, creds.remaining.as_deref()).ok_or(
                    ProxyError::MalformedLegacy(ClassifyError {
                        operation: call.operation,
                        problem: Malformed::Unrewritable,
                    }),
                )?;
                parts.method = r.method;
                (r.path_and_query, Some(r.body))
            }
            _ if creds.removed_any() => (
                rebuild_path_and_query(parts.uri.path(), creds.remaining.as_deref()),
                None,
            ),
            _ => (
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
                None,
            ),
        };
        drop(creds);

        parts.uri = upstream.uri(path_and_query);
        parts.version = Version::HTTP_11; // let ALPN pick the upstream protocol
        prepare_request_headers(&mut parts.headers);
        let body = match rewritten_body {
            Some(json) => {
                set_json_body_headers(&mut parts.headers, json.len());
                if let Some(media_type) = &settings.preview_accept {
                    add_accept_media_type(&mut parts.headers, media_type);
                }
                // The legacy request's own body (octokit sends none) is discarded.
                drop(body);
                Either::Left(Full::new(json))
            }
            None => Either::Right(Limited::new(
                body,
                usize::try_from(limit).unwrap_or(usize::MAX),
            )),
        };

        let sent = Instant::now();
        let deadline = sent + settings.request_timeout;
        let upstream_req = Request::from_parts(parts, body);
        let resp = upstream.send(upstream_req, deadline).await.map_err(|e| {
            if let UpstreamError::Failed { kind, .. } = &e {
                metrics.upstream_failure(*kind);
            }
            log_upstream_error(&e, route);
            ProxyError::from_upstream(e, limit)
        })?;
        metrics.upstream_answered(route.class(), sent.elapsed());

        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        parts.version = inbound_version;
        Ok(Response::from_parts(
            parts,
            Either::Right(DeadlineBody::new(body, deadline)),
        ))
    }
}

fn route_operation(route: &Result<Route<'_>, ClassifyError>) -> &'static str {
    match route {
        Ok(r) => r.operation().map_or("pass_through", Operation::as_str),
        Err(e) => e.operation.as_str(),
    }
}

/// `METHOD /path` of the replacement of a legacy call, for the 410 message. Holds the client_id
/// segment as sent, never the token.
fn replacement_of(call: &LegacyCall<'_>) -> String {
    let (method, tail) = call.operation.replacement();
    format!(
        "{method} {}/applications/{}/{tail}",
        call.prefix, call.client_id_segment
    )
}

/// GitHub's documentation of each replacement endpoint.
fn replacement_docs(op: Operation) -> &'static str {
    match op {
        Operation::Check => "https://docs.github.com/rest/apps/oauth-applications#check-a-token",
        Operation::Reset => "https://docs.github.com/rest/apps/oauth-applications#reset-a-token",
        Operation::RevokeToken => {
            "https://docs.github.com/rest/apps/oauth-applications#delete-an-app-token"
        }
        Operation::RevokeGrant => {
            "https://docs.github.com/rest/apps/oauth-applications#delete-an-app-authorization"
        }
        Operation::ScopeToken => {
            "https://docs.github.com/rest/apps/apps#create-a-scoped-access-token"
        }
    }
}

/// Puts an `Authorization` header built from deprecated query credentials on the request,
/// unless the client sent one (the header wins; the parameters are removed either way).
fn move_query_credentials(
    headers: &mut HeaderMap,
    creds: &QueryCredentials<'_>,
    route: &Route<'_>,
) -> Result<(), ProxyError> {
    let kinds = match (creds.had_client_secret, creds.had_access_token) {
        (true, true) => "client_secret,access_token",
        (true, false) => "client_secret",
        _ => "access_token",
    };
    if headers.contains_key(header::AUTHORIZATION) {
        tracing::debug!(
            kinds,
            "removed deprecated query credentials; Authorization header kept"
        );
        return Ok(());
    }
    // The OAuth Applications API authenticates the app (Basic); elsewhere a user token wins.
    let prefer_basic = !matches!(route, Route::PassThrough);
    if let Some(value) = creds.authorization(prefer_basic)? {
        headers.insert(header::AUTHORIZATION, value);
        tracing::debug!(
            kinds,
            "moved deprecated query credentials into Authorization"
        );
    }
    Ok(())
}

fn rebuild_path_and_query(path: &str, query: Option<&str>) -> PathAndQuery {
    let path = if path.is_empty() { "/" } else { path };
    let built = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    };
    // Both pieces come from a valid request URI; "/" is only a guard.
    built.unwrap_or_else(|_| PathAndQuery::from_static("/"))
}

/// Headers that describe the client's connection or were answered by the gateway itself are
/// not forwarded; the upstream's `Host` is set by the client from the upstream URI.
fn prepare_request_headers(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
    headers.remove(header::HOST);
    // hyper answered `Expect: 100-continue` to the client when the body was first read.
    headers.remove(header::EXPECT);
    if let Some(auth) = headers.get_mut(header::AUTHORIZATION) {
        auth.set_sensitive(true);
    }
}

fn set_json_body_headers(headers: &mut HeaderMap, len: usize) {
    headers.remove(header::CONTENT_ENCODING);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn log_upstream_error(e: &UpstreamError, route: &Route<'_>) {
    let operation = route.operation().map_or("pass_through", Operation::as_str);
    match e {
        UpstreamError::Failed { kind, source } => {
            let cause = source
                .as_deref()
                .map(|s| ErrorChain(s as &(dyn std::error::Error + 'static)));
            tracing::warn!(
                kind = kind.as_str(),
                operation,
                cause = cause.map(tracing::field::display),
                "upstream exchange failed"
            );
        }
        UpstreamError::RequestBodyTooLarge => {
            tracing::info!(operation, "request body over the limit while streaming");
        }
        UpstreamError::RequestBody(source) => {
            tracing::info!(operation, cause = %ErrorChain(source.as_ref()), "client request body failed");
        }
    }
}

/// Displays an error and its sources, `a: b: c`. hyper, hyper-util and rustls errors carry no
/// URL, header or body, so this is safe to log.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// Displays client-supplied text with control characters escaped, so a crafted client_id cannot
/// forge log lines in the text format.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn one_status_per_error() {
        let malformed = ProxyError::MalformedLegacy(ClassifyError {
            operation: Operation::Check,
            problem: Malformed::EmptyToken,
        });
        let cases = [
            (malformed, 400),
            (ProxyError::InvalidQueryCredential(InvalidCredential), 400),
            (ProxyError::RequestBody, 400),
            (ProxyError::MethodNotAllowed, 405),
            (ProxyError::PayloadTooLarge { limit: 10 }, 413),
            (
                ProxyError::Gone {
                    operation: Operation::Reset,
                    replacement: "PATCH /applications/x/token".into(),
                },
                410,
            ),
            (ProxyError::Upstream(FailureKind::Connect), 502),
            (ProxyError::Upstream(FailureKind::Tls), 502),
            (ProxyError::Upstream(FailureKind::Protocol), 502),
            (ProxyError::Upstream(FailureKind::Timeout), 504),
        ];
        for (e, status) in cases {
            assert_eq!(StatusCode::from(&e).as_u16(), status, "{e:?}");
        }
    }

    #[tokio::test]
    async fn error_bodies_are_github_shaped() {
        let resp = ProxyError::Upstream(FailureKind::Connect).into_response();
        assert_eq!(resp.status(), 502);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2);
        assert!(obj["message"].as_str().unwrap().contains("connect"));
        assert_eq!(obj["documentation_url"], REST_DOCS);
    }

    #[test]
    fn escaped_neutralises_control_characters() {
        assert_eq!(Escaped("Iv1.abc").to_string(), "Iv1.abc");
        assert_eq!(Escaped("a\nb\x1b[31m").to_string(), "a\\nb\\u{1b}[31m");
    }

    #[test]
    fn path_and_query_rebuilt_without_credentials() {
        assert_eq!(rebuild_path_and_query("/user", Some("a=1")), "/user?a=1");
        assert_eq!(rebuild_path_and_query("/user", None), "/user");
        assert_eq!(rebuild_path_and_query("", None), "/");
    }
}
