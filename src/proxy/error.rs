//! The gateway's own answers: `ProxyError`, its one mapping to statuses
//! (`impl From<&ProxyError> for StatusCode`), and its GitHub-shaped JSON body
//! `{"message", "documentation_url"}` (GitHub REST: basic-error). A body never holds a token,
//! a client secret, an Authorization value or a credential hash.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use crate::body::{BudgetExceeded, ProxyBody};
use crate::classify::{ClassifyError, LegacyCall, Operation};
use crate::limiter::{BlockReason, Blocked, FailureClass, KeyKind};
use crate::rewrite::InvalidCredential;
use crate::upstream::{FailureKind, UpstreamError};

/// GitHub's documentation of the OAuth Applications API, for errors about legacy calls.
const OAUTH_APPS_DOCS: &str = "https://docs.github.com/rest/apps/oauth-applications";
/// GitHub's REST documentation root, for errors not specific to one endpoint.
const REST_DOCS: &str = "https://docs.github.com/rest";

/// The methods the gateway forwards, for `Allow` (RFC 9110 §10.2.1).
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

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
    /// A request target or `Host` the gateway will not forward (RFC 9112 §3.2: an HTTP/1.1
    /// request without exactly one valid `Host`; RFC 9112 §3.2.4: the asterisk form with a
    /// method other than `OPTIONS`): 400.
    #[error("bad request target: {0}")]
    BadTarget(&'static str),
    /// A request body of at most 64 KiB not received within `server.body_read_timeout`: 408
    /// (RFC 9110 §15.5.9), nothing forwarded. The client is slow, not the upstream.
    #[error("request body not received in time")]
    RequestTimeout,
    /// `OPTIONS *` (RFC 9110 §9.3.7): a question about the gateway itself, answered 204 with
    /// `Allow`, never forwarded.
    #[error("OPTIONS * answered by the gateway")]
    ServerOptions,
    /// `CONNECT`: the gateway is no tunnel or forward proxy: 405.
    #[error("CONNECT is not supported")]
    MethodNotAllowed,
    /// A path that is a token operation only once an encoded or other separator (`%2F`, `%5C`,
    /// `\`) or a `;` parameter is read as some servers read it: 400, never forwarded.
    #[error("ambiguous path")]
    AmbiguousPath,
    /// A case variant of a standard method (`get`) on the path of a token operation: 400.
    /// Methods are case-sensitive (RFC 9110 §9.1).
    #[error("method name in the wrong case")]
    MethodCase,
    /// Reading the request body would go past the memory for bodies being read
    /// (`server.max_buffered_body_bytes_per_ip`: 429; `server.max_buffered_body_bytes`: 503),
    /// both with `Retry-After: 1`; nothing forwarded.
    #[error("no memory left for request bodies")]
    BodyBudget(BudgetExceeded),
    /// The client's request body could not be read: 400.
    #[error("request body could not be read")]
    RequestBody,
    /// A call one of whose failed-check keys is spent, or has as many calls in flight as
    /// failures left: 429 with `Retry-After`.
    #[error("too many failed calls ({} {})", .0.class.as_str(), .0.kind.as_str())]
    TooManyFailures(Blocked),
    /// A legacy operation switched off by mode `reject`: 410, naming the replacement.
    #[error("legacy {operation} rejected by configuration")]
    Gone {
        /// The rejected operation.
        operation: Operation,
        /// `METHOD /path` of the replacement endpoint, with the client_id (never the token).
        replacement: String,
    },
    /// A legacy operation inside a scheduled brownout window: 410, or 503 with `Retry-After`
    /// until the window ends.
    #[error("legacy {operation} in a scheduled brownout")]
    Brownout {
        /// The switched-off operation.
        operation: Operation,
        /// `METHOD /path` of the replacement endpoint, with the client_id (never the token).
        replacement: String,
        /// When the window ends.
        until: std::time::SystemTime,
        /// `Some(seconds until the end, rounded up)` for a 503; `None` for a 410.
        retry_after_secs: Option<u64>,
    },
    /// The upstream failed: 502, or 504 for a timeout.
    #[error("upstream {0} failure")]
    Upstream(FailureKind),
    /// The shutdown grace period ended before the call was answered: 503.
    #[error("cut off by the end of the shutdown grace period")]
    ShutDown {
        /// Whether the call had been sent upstream (it may have taken effect there).
        forwarded: bool,
    },
}

impl From<&ProxyError> for StatusCode {
    fn from(e: &ProxyError) -> Self {
        match e {
            ProxyError::MalformedLegacy(_)
            | ProxyError::InvalidQueryCredential(_)
            | ProxyError::MethodCase
            | ProxyError::AmbiguousPath
            | ProxyError::BadTarget(_)
            | ProxyError::RequestBody => StatusCode::BAD_REQUEST,
            ProxyError::ServerOptions => StatusCode::NO_CONTENT,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Gone { .. } => StatusCode::GONE,
            ProxyError::Brownout {
                retry_after_secs: None,
                ..
            } => StatusCode::GONE,
            ProxyError::Brownout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TooManyFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyBudget(BudgetExceeded::Address) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyBudget(BudgetExceeded::Total) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(FailureKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ShutDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl ProxyError {
    /// The client's answer for a failed upstream exchange; `limit` is
    /// `server.max_request_body_bytes`, for a body that grew past it while streaming.
    pub fn from_upstream(e: &UpstreamError, limit: u64) -> Self {
        match e {
            UpstreamError::Failed { kind, .. } => ProxyError::Upstream(*kind),
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
            ProxyError::BodyBudget(BudgetExceeded::Address) => {
                "Too many requests: this client address is sending too many request bodies at once; nothing was sent upstream. Retry after 1 second.".into()
            }
            ProxyError::BodyBudget(BudgetExceeded::Total) => {
                "Service unavailable: the gateway is reading too many request bodies at once; nothing was sent upstream. Retry after 1 second.".into()
            }
            ProxyError::BadTarget(why) => format!("Bad request: {why}."),
            ProxyError::ServerOptions => String::new(),
            ProxyError::RequestTimeout => {
                "Request timeout: the request body did not arrive in time; nothing was sent upstream.".into()
            }
            ProxyError::AmbiguousPath => {
                "Bad request: this path names an OAuth Applications token operation only if an encoded separator (%2F, %5C), a backslash or a ';' parameter is read as some servers read it; send the plain path.".into()
            }
            ProxyError::MethodCase => {
                "Bad request: HTTP method names are case-sensitive (RFC 9110 §9.1); use GET, HEAD, POST, PATCH or DELETE in upper case.".into()
            }
            ProxyError::MethodNotAllowed => {
                "Method not allowed: this gateway forwards API calls to one upstream; it is not a tunnel.".into()
            }
            ProxyError::TooManyFailures(b) => {
                let whose = match b.kind {
                    KeyKind::Credential => "these client credentials",
                    KeyKind::ClientIp => "this client address",
                };
                let what = match b.class {
                    FailureClass::Credential => "calls with a wrong or missing client secret",
                    FailureClass::Token => "token operations on invalid tokens",
                };
                let secs = b.retry_after_secs();
                let unit = if secs == 1 { "second" } else { "seconds" };
                match b.reason {
                    BlockReason::Spent => {
                        format!("Too many failed {what} from {whose}. Retry after {secs} {unit}.")
                    }
                    BlockReason::InFlight => format!(
                        "Too many calls in flight from {whose} for the failures it has left. Retry after {secs} {unit}."
                    ),
                }
            }
            ProxyError::Gone {
                operation: Operation::RevokeAll,
                replacement,
            } => format!(
                "Gone: GitHub removed this endpoint (revoke every token of an application) and it has no replacement. Revoke each token with {replacement} and the token in a JSON body: {{\"access_token\": \"...\"}}."
            ),
            ProxyError::Brownout {
                replacement, until, ..
            } => format!(
                "This deprecated endpoint is switched off during a scheduled brownout until {}, ahead of its removal. Use {replacement} with the token in a JSON body: {{\"access_token\": \"...\"}}.",
                httpdate::fmt_http_date(*until)
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
            ProxyError::ShutDown { forwarded: true } => {
                "Service unavailable: the gateway shut down before the upstream answered; the call may have taken effect there.".into()
            }
            ProxyError::ShutDown { forwarded: false } => {
                "Service unavailable: the gateway shut down before forwarding the call; it was not sent.".into()
            }
        }
    }

    fn documentation_url(&self) -> &'static str {
        match self {
            ProxyError::MalformedLegacy(_) | ProxyError::MethodCase | ProxyError::AmbiguousPath => {
                OAUTH_APPS_DOCS
            }
            ProxyError::Gone { operation, .. } | ProxyError::Brownout { operation, .. } => {
                replacement_docs(*operation)
            }
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
        if let ProxyError::ServerOptions = &self {
            let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            return resp;
        }
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
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        }
        if let ProxyError::BodyBudget(_) = &self {
            // RFC 6585 §4 (429), RFC 9110 §15.6.4 (503): when to try again.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ProxyError::Brownout {
            retry_after_secs: Some(secs),
            ..
        } = &self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
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

/// `METHOD /path` of the replacement of a legacy call, for the 410 message. Holds the client_id
/// segment as sent, never the token.
pub fn replacement_of(call: &LegacyCall<'_>) -> String {
    replacement_path(call.operation, call.prefix, call.client_id_segment)
}

/// `METHOD [prefix]/applications/{client_id_segment}/{tail}` of the replacement of `op`.
pub fn replacement_path(op: Operation, prefix: &str, client_id_segment: &str) -> String {
    let (method, tail) = op.replacement();
    format!("{method} {prefix}/applications/{client_id_segment}/{tail}")
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
        // Removed with no replacement: each token is revoked on its own.
        Operation::RevokeAll => {
            "https://docs.github.com/rest/apps/oauth-applications#delete-an-app-token"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Malformed;
    use http_body_util::BodyExt;
    use std::time::Duration;

    #[test]
    fn one_status_per_error() {
        let malformed = ProxyError::MalformedLegacy(ClassifyError {
            operation: Operation::Check,
            problem: Malformed::EmptyToken,
        });
        let blocked = Blocked {
            class: FailureClass::Credential,
            kind: KeyKind::ClientIp,
            reason: BlockReason::Spent,
            retry_after: Duration::from_millis(1500),
        };
        let cases = [
            (malformed, 400),
            (ProxyError::InvalidQueryCredential(InvalidCredential), 400),
            (ProxyError::RequestBody, 400),
            (ProxyError::MethodCase, 400),
            (ProxyError::AmbiguousPath, 400),
            (ProxyError::MethodNotAllowed, 405),
            (ProxyError::PayloadTooLarge { limit: 10 }, 413),
            (
                ProxyError::Gone {
                    operation: Operation::Reset,
                    replacement: "PATCH /applications/x/token".into(),
                },
                410,
            ),
            (ProxyError::TooManyFailures(blocked), 429),
            (ProxyError::Upstream(FailureKind::Connect), 502),
            (ProxyError::Upstream(FailureKind::Tls), 502),
            (ProxyError::Upstream(FailureKind::Protocol), 502),
            (ProxyError::Upstream(FailureKind::Timeout), 504),
            (ProxyError::ShutDown { forwarded: true }, 503),
            (ProxyError::ShutDown { forwarded: false }, 503),
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

    #[tokio::test]
    async fn a_429_names_the_key_kind_and_when_to_retry() {
        let resp = ProxyError::TooManyFailures(Blocked {
            class: FailureClass::Credential,
            kind: KeyKind::ClientIp,
            reason: BlockReason::Spent,
            retry_after: Duration::from_millis(1500),
        })
        .into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains("client address") && msg.contains("2 seconds"),
            "{msg}"
        );
    }
}
