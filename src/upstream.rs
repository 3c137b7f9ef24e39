//! The one HTTP client to the configured upstream: hyper-util's pooled legacy client over
//! hyper-rustls (ring provider, webpki roots plus an optional private CA), HTTP/1.1 and HTTP/2 by
//! ALPN, built once at start-up. It sends a request and sorts failures into kinds, each with a
//! [`Detail`] in plain words (refused, DNS, which timeout, the TLS reason, a scheme that does not
//! match what the server speaks); it never retries a request that was written (reset and revoke
//! are not idempotent), and never sends anywhere but the configured scheme and authority. The
//! only user of hyper_rustls and rustls on the client side.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::time::Instant;

use crate::access::Seconds;
use crate::body::Prefixed;
use crate::config::UpstreamConfig;

/// Largest upstream read buffer of an HTTP/1.1 connection, in bytes: answer heads and body
/// parts are read through it (hyper's minimum is 8 KiB; GitHub's answer heads are a few KiB).
const UPSTREAM_READ_BUF_BYTES: usize = 64 * 1024;

/// Body of a request sent upstream: a body built by the gateway (a rewritten call) or read whole
/// from the client, or the client's own body streamed through under the size limit (after the
/// bytes already read).
pub type UpstreamRequestBody = Either<Full<Bytes>, Prefixed<Limited<Incoming>>>;

/// Idle pooled connections are closed after this long, in seconds; below GitHub's own idle
/// timeouts so the gateway, not the upstream, closes them (fewer races on reuse).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// TCP keep-alive probe interval on upstream connections, in seconds.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why an upstream could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBuildError {
    /// The extra CA file could not be read or holds no usable certificate.
    #[error("upstream.ca_file {path}: {reason}")]
    CaFile {
        /// The file named by `upstream.ca_file`.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// rustls refused the TLS settings (not expected with the ring provider).
    #[error("TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Whose fault an upstream exchange failed, and how. Decides the status the client gets and is a
/// bounded metric label. Never carries a URL, header or body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// No TCP connection could be made (refused, unreachable, DNS).
    Connect,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// The connect timeout or the whole-exchange deadline passed.
    Timeout,
    /// The upstream broke HTTP (closed early, malformed response, h2 reset).
    Protocol,
}

impl FailureKind {
    /// The kind's name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Tls => "tls",
            FailureKind::Timeout => "timeout",
            FailureKind::Protocol => "protocol",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What exactly went wrong with the upstream, for the log line. Never carries a URL, header or
/// body; a TLS reason is rustls's own (a certificate or protocol fault, never data).
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    /// The upstream host refused the TCP connection (nothing listens on the port).
    Refused,
    /// The upstream host name could not be resolved.
    Dns,
    /// No TCP connection for another reason (unreachable, reset during connect).
    Connect,
    /// `upstream.connect_timeout` (the value, in seconds) passed before the TCP connection was
    /// made.
    ConnectTimeout(Duration),
    /// No response head before the whole-exchange deadline (`server.request_timeout`).
    Deadline,
    /// The TLS handshake failed, for this reason.
    Tls(rustls::Error),
    /// `upstream.url` is `https` but the server answered the TLS handshake in plain HTTP.
    PlainHttp,
    /// `upstream.url` is `http` and the answer was not HTTP (a TLS server, or garbage).
    NotHttp,
    /// The upstream broke HTTP (closed early, a malformed or unsolicited answer, a reset).
    Protocol,
}

impl Detail {
    /// The timeout that fired, by its configuration key, and its value: for
    /// [`Detail::Deadline`], `request_timeout` (`server.request_timeout`).
    pub fn timeout(&self, request_timeout: Duration) -> Option<(&'static str, Duration)> {
        match self {
            Detail::ConnectTimeout(d) => Some(("upstream.connect_timeout", *d)),
            Detail::Deadline => Some(("server.request_timeout", request_timeout)),
            _ => None,
        }
    }

    /// The failure in plain words, e.g. `connection refused` or `no response head within
    /// server.request_timeout (30.000000 s)`; `request_timeout` is `server.request_timeout`.
    pub fn describe(&self, request_timeout: Duration) -> Described<'_> {
        Described {
            detail: self,
            request_timeout,
        }
    }
}

/// [`Detail::describe`].
pub struct Described<'a> {
    detail: &'a Detail,
    request_timeout: Duration,
}

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail {
            Detail::Refused => f.write_str("connection refused"),
            Detail::Dns => f.write_str("DNS lookup of the upstream host failed"),
            Detail::Connect => f.write_str("TCP connection failed"),
            Detail::ConnectTimeout(d) => write!(
                f,
                "connect timeout: no TCP connection within upstream.connect_timeout ({} s)",
                Seconds(*d)
            ),
            Detail::Deadline => write!(
                f,
                "request timeout: no response head within server.request_timeout ({} s)",
                Seconds(self.request_timeout)
            ),
            Detail::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Detail::PlainHttp => f.write_str(
                "upstream.url is https but the server spoke plain HTTP (use http://, or the server's TLS port)",
            ),
            Detail::NotHttp => f.write_str(
                "the answer was not HTTP; if the server speaks TLS on this port, upstream.url must be https://",
            ),
            Detail::Protocol => f.write_str("the upstream broke the HTTP exchange"),
        }
    }
}

/// A failed exchange with the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream failed; the client gets 502 or 504.
    #[error("upstream {kind} failure")]
    Failed {
        /// How it failed.
        kind: FailureKind,
        /// What exactly went wrong.
        detail: Detail,
        /// The underlying error, for logs (hyper and rustls errors carry no URL or header).
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },
    /// The client's request body grew past `server.max_request_body_bytes` while it was being
    /// streamed upstream; the client gets 413.
    #[error("request body larger than the configured limit")]
    RequestBodyTooLarge,
    /// The client's request body could not be read (the client went away or broke framing).
    #[error("request body could not be read from the client")]
    RequestBody(#[source] Box<dyn StdError + Send + Sync>),
}

/// The configured upstream and the client that reaches it.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamRequestBody>,
    scheme: Scheme,
    authority: Authority,
    origin: Arc<str>,
    connect_timeout: Duration,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// Installs ring as the process-wide rustls crypto provider. Idempotent. Every TLS config the
/// gateway builds also names ring explicitly, so this only guards third-party code paths.
pub fn install_crypto_provider() {
    // Err means a provider is installed already (ours, from an earlier call): nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Upstream {
    /// Builds the client: TLS roots (webpki plus `ca_file`), ALPN h2 and http/1.1, the connect
    /// timeout and the idle pool. No connection is opened here.
    ///
    /// # Errors
    /// [`UpstreamBuildError::CaFile`] when `ca_file` cannot be read or holds no certificate.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamBuildError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            for cert in read_ca_file(path)? {
                roots.add(cert).map_err(|e| UpstreamBuildError::CaFile {
                    path: path.clone(),
                    reason: format!("certificate rejected: {e}"),
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(TCP_KEEPALIVE));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);

        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            // Retries only requests that were never written to a connection (a pooled
            // connection found closed before use); a written request is never sent twice.
            .retry_canceled_requests(true)
            // An answer is read in parts of at most this much (hyper's default lets a buffer
            // grow to ~400 KiB, and a part waiting for a slow client keeps its whole buffer
            // alive: 200 slow readers took RSS past 128 MiB). Also the largest answer head.
            .http1_max_buf_size(UPSTREAM_READ_BUF_BYTES)
            .build(connector);

        let (scheme, authority) = match (cfg.url.scheme(), cfg.url.authority()) {
            (Some(s), Some(a)) => (s.clone(), a.clone()),
            // Config validation guarantees both; a Uri without them cannot be built there.
            _ => (Scheme::HTTPS, Authority::from_static("api.github.com")),
        };
        let port = authority
            .port_u16()
            .unwrap_or(if scheme == Scheme::HTTP { 80 } else { 443 });
        // The host alone: never a user-info part, a path or a query.
        let origin = Arc::from(format!("{scheme}://{}:{port}", authority.host()));
        Ok(Upstream {
            client,
            scheme,
            authority,
            origin,
            connect_timeout: cfg.connect_timeout,
        })
    }

    /// The upstream's origin, `scheme://host:port` (the port always written), for log lines.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The absolute upstream URI for a path and query: the configured scheme and authority,
    /// whatever the client's request named.
    pub fn uri(&self, path_and_query: PathAndQuery) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        // Scheme, authority and path all come from valid URIs, so this cannot fail; the
        // fallback keeps the request on the configured upstream anyway.
        Uri::from_parts(parts).unwrap_or_else(|_| {
            let mut fallback = http::uri::Parts::default();
            fallback.scheme = Some(self.scheme.clone());
            fallback.authority = Some(self.authority.clone());
            fallback.path_and_query = Some(PathAndQuery::from_static("/"));
            Uri::from_parts(fallback).unwrap_or_default()
        })
    }

    /// Sends `req` (whose URI must come from [`Upstream::uri`]) and waits for the response head
    /// until `deadline`.
    ///
    /// # Errors
    /// [`UpstreamError::Failed`] with the failure kind (a passed deadline is
    /// [`FailureKind::Timeout`]); [`UpstreamError::RequestBodyTooLarge`] or
    /// [`UpstreamError::RequestBody`] when the client's body stream failed.
    pub async fn send(
        &self,
        req: Request<UpstreamRequestBody>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let replay = Replay::of(&req);
        let first = self.send_once(req, deadline).await;
        match (first, replay) {
            (Err(e), Some(replay)) if closed_before_answering(&e) => {
                tracing::debug!(
                    upstream = %self.origin,
                    error = %e,
                    "upstream connection closed before answering a GET or HEAD; retried once"
                );
                self.send_once(replay.request(), deadline).await
            }
            (first, _) => first,
        }
    }

    async fn send_once(
        &self,
        req: Request<UpstreamRequestBody>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_elapsed) => Err(UpstreamError::Failed {
                kind: FailureKind::Timeout,
                detail: Detail::Deadline,
                source: None,
            }),
            // The gateway never forwards `Upgrade` (hop-by-hop), so a 101 (or any other 1xx
            // hyper hands back) answers nothing it asked: the upstream broke the exchange
            // (RFC 9110 §15.2.2: a server sends 101 only in answer to Upgrade).
            Ok(Ok(resp)) if resp.status().is_informational() => Err(UpstreamError::Failed {
                kind: FailureKind::Protocol,
                detail: Detail::Protocol,
                source: Some(format!("unsolicited {} answer", resp.status().as_u16()).into()),
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.sort_error(e)),
        }
    }
}

/// What is needed to send a request again: kept only for GET and HEAD without a body, the
/// methods retried (RFC 9110 §9.2.2: idempotent; POST, PUT, PATCH and DELETE never are here,
/// since reset and revoke must not run twice).
struct Replay {
    method: http::Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl Replay {
    fn of(req: &Request<UpstreamRequestBody>) -> Option<Self> {
        let idempotent = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        let empty = http_body::Body::size_hint(req.body()).exact() == Some(0);
        (idempotent && empty).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> Request<UpstreamRequestBody> {
        let mut req = Request::new(Either::Left(Full::new(Bytes::new())));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Whether the upstream closed or reset the connection before a complete answer head: the
/// stale keep-alive race (the upstream closed an idle pooled connection as the request was
/// written). hyper reports a cut inside the head like one before it (`IncompleteMessage`, or
/// the reset itself), so a partly received head counts too, as in nginx's
/// `proxy_next_upstream error`. Timeouts, TLS and connect failures are not.
fn closed_before_answering(e: &UpstreamError) -> bool {
    let UpstreamError::Failed {
        kind: FailureKind::Protocol,
        source: Some(source),
        ..
    } = e
    else {
        return false;
    };
    let mut cur: Option<&(dyn StdError + 'static)> = Some(source.as_ref());
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_incomplete_message()
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            )
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, UpstreamBuildError> {
    let fail = |reason: String| UpstreamBuildError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(fail("no CERTIFICATE block found (expected PEM)".into()));
    }
    Ok(certs)
}

impl Upstream {
    /// Sorts a client error by walking its source chain.
    fn sort_error(&self, err: hyper_util::client::legacy::Error) -> UpstreamError {
        let is_connect = err.is_connect();
        let mut tls = None;
        let mut timed_out = false;
        let mut refused = false;
        let mut dns = false;
        let mut not_http = false;
        let mut too_large = false;
        let mut user_body = false;
        let mut cur: Option<&(dyn StdError + 'static)> = Some(&err);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<rustls::Error>() {
                tls.get_or_insert_with(|| t.clone());
            }
            too_large |= e.is::<LengthLimitError>();
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                user_body |= h.is_user();
                not_http |= h.is_parse();
            }
            // hyper-util's connect error is not exported; its message names the DNS stage.
            dns |= is_connect && e.to_string() == "dns error";
            cur = match e.downcast_ref::<io::Error>() {
                Some(io) => {
                    timed_out |= io.kind() == io::ErrorKind::TimedOut;
                    refused |= io.kind() == io::ErrorKind::ConnectionRefused;
                    // io::Error::source skips the error it wraps; descend into it instead
                    // (hyper-rustls nests rustls errors two io::Errors deep).
                    match io.get_ref() {
                        Some(inner) => Some(inner as &(dyn StdError + 'static)),
                        None => io.source(),
                    }
                }
                None => e.source(),
            };
        }
        if too_large {
            return UpstreamError::RequestBodyTooLarge;
        }
        if user_body && !is_connect {
            return UpstreamError::RequestBody(Box::new(err));
        }
        let https = self.scheme == Scheme::HTTPS;
        let (kind, detail) = match tls {
            // The server's first bytes were no TLS record: "HTTP/1.1 400 ..." to a ClientHello.
            Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))
                if https =>
            {
                (FailureKind::Tls, Detail::PlainHttp)
            }
            Some(t) => (FailureKind::Tls, Detail::Tls(t)),
            None if is_connect && timed_out => (
                FailureKind::Timeout,
                Detail::ConnectTimeout(self.connect_timeout),
            ),
            None if is_connect && refused => (FailureKind::Connect, Detail::Refused),
            None if is_connect && dns => (FailureKind::Connect, Detail::Dns),
            None if is_connect => (FailureKind::Connect, Detail::Connect),
            None if not_http && !https => (FailureKind::Protocol, Detail::NotHttp),
            None => (FailureKind::Protocol, Detail::Protocol),
        };
        UpstreamError::Failed {
            kind,
            detail,
            source: Some(Box::new(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg_with_ca(path: &Path) -> UpstreamConfig {
        let mut cfg = Config::default().upstream;
        cfg.ca_file = Some(path.to_owned());
        cfg
    }

    #[test]
    fn failures_are_described_in_plain_words() {
        type Timeout = Option<(&'static str, Duration)>;
        let rt = Duration::from_secs(30);
        let cases: &[(Detail, &str, Timeout)] = &[
            (Detail::Refused, "connection refused", None),
            (Detail::Dns, "DNS lookup of the upstream host failed", None),
            (
                Detail::ConnectTimeout(Duration::from_millis(2_500)),
                "connect timeout: no TCP connection within upstream.connect_timeout (2.500000 s)",
                Some(("upstream.connect_timeout", Duration::from_millis(2_500))),
            ),
            (
                Detail::Deadline,
                "request timeout: no response head within server.request_timeout (30.000000 s)",
                Some(("server.request_timeout", rt)),
            ),
            (
                Detail::Tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                "TLS handshake failed: invalid peer certificate: UnknownIssuer",
                None,
            ),
            (
                Detail::PlainHttp,
                "upstream.url is https but the server spoke plain HTTP (use http://, or the server's TLS port)",
                None,
            ),
        ];
        for (detail, words, timeout) in cases {
            assert_eq!(detail.describe(rt).to_string(), *words);
            assert_eq!(detail.timeout(rt), *timeout, "{detail:?}");
        }
    }

    #[test]
    fn the_origin_always_has_a_port_and_never_a_path() {
        let origin = |url: &str| {
            let mut cfg = Config::default().upstream;
            cfg.url = url.parse().unwrap();
            Upstream::new(&cfg).unwrap().origin().to_owned()
        };
        assert_eq!(
            origin("https://api.github.com"),
            "https://api.github.com:443"
        );
        assert_eq!(origin("http://127.0.0.1:4000/"), "http://127.0.0.1:4000");
        assert_eq!(origin("http://ghe.example/api/v3"), "http://ghe.example:80");
    }

    #[test]
    fn uri_always_targets_the_configured_upstream() {
        let mut cfg = Config::default().upstream;
        cfg.url = "http://127.0.0.1:4000".parse().unwrap();
        let up = Upstream::new(&cfg).unwrap();
        let uri = up.uri(PathAndQuery::from_static("/applications/x/token?a=1"));
        assert_eq!(uri, "http://127.0.0.1:4000/applications/x/token?a=1");
        // A path that looks like an absolute URL stays a path on the upstream.
        let uri = up.uri(PathAndQuery::from_static("//evil.example/x"));
        assert_eq!(uri.authority().unwrap(), "127.0.0.1:4000");
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = Upstream::new(&cfg_with_ca(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("upstream.ca_file") && e.contains("missing.pem"),
            "{e}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let e = Upstream::new(&cfg_with_ca(&empty)).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no CERTIFICATE"),
            "{e}"
        );

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = Upstream::new(&cfg_with_ca(&broken))
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.pem"), "{e}");
    }
}
