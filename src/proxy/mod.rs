//! The request path, as named stages, each in its own file:
//! - [`plan`]: PURE; what to do with a request (answer it, or forward it rewritten or as is);
//! - [`gate`]: the failed-check gate before forwarding, and the PURE rule of which answer is
//!   which failure after it;
//! - [`exchange`]: the upstream exchange, seen through even when the client goes away, and the
//!   drain bookkeeping;
//! - [`observe`]: the one place an outcome becomes metrics, log lines and an access event;
//! - [`error`]: the gateway's own answers and the one error -> status mapping.
//!
//! Nothing on this path unwraps, and nothing it logs holds a token, secret, Authorization value,
//! query string or raw path. Every request gets a request id (`X-Request-Id`), forwarded
//! upstream and returned to the client.

mod error;
mod exchange;
mod gate;
mod observe;
pub mod plan;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::access::{self, LoggedUserAgent};
use crate::body::{self, Metered, ProxyBody, ReadBody, ReadBodyError};
use crate::classify::Operation;
use crate::config::{Brownout, Config, Mode, OperationModes};
use crate::headers::DeprecationHeaders;
use crate::limiter::{ClientAddress, FailedChecks, LimiterClock};
use crate::metrics::Metrics;
use crate::server::ConnectionControl;
use crate::upstream::Upstream;

pub use error::ProxyError;
use exchange::{Lifecycle, Pending};
use gate::Verdict;
pub use observe::AccessEvent;
use observe::{Observation, Outcome, RequestBytes, RequestFacts};

/// The body of every response on the proxy listener: the gateway's own or the upstream's, with
/// the request's access event, written when it ends.
pub type ResponseBody = Metered<ProxyBody, AccessEvent>;
use plan::Plan;

/// The parts of the configuration the request path reads. Built once per (re)load.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Whole-exchange deadline after forwarding starts (`server.request_timeout`); also the
    /// longest a call waits at the failed-check gate.
    pub request_timeout: std::time::Duration,
    /// Largest request body forwarded, in bytes (`server.max_request_body_bytes`).
    pub max_request_body_bytes: u64,
    /// Longest wait for a small request body, read whole before forwarding
    /// (`server.body_read_timeout`).
    pub body_read_timeout: std::time::Duration,
    /// Media type added to `Accept` on rewritten calls (`migration.preview_accept`).
    pub preview_accept: Option<HeaderValue>,
    /// What is done with each legacy operation (`migration.mode`, `[migration.operations]`).
    pub modes: OperationModes,
    /// 422 to a rewritten call becomes 404 (`migration.status_compat`).
    pub status_compat: bool,
    /// Headers added to every response to a legacy call; `None` when
    /// `migration.deprecation_headers` is false.
    pub deprecation: Option<DeprecationHeaders>,
    /// Exchanges seen through after their client went away, at most at once
    /// (`server.max_detached_exchanges`).
    pub max_detached_exchanges: usize,
    /// Scheduled brownout windows (`[[migration.brownouts]]`).
    pub brownouts: Vec<Brownout>,
    /// Memory for request bodies being read before forwarding, shared by every worker
    /// (`server.max_buffered_body_bytes`, `server.max_buffered_body_bytes_per_ip`).
    pub body_budget: Arc<body::BodyBudget>,
    /// Finds the client address behind trusted proxies (`failed_checks.trusted_proxies`), for
    /// the failed-check limiter and the access log.
    pub client_address: ClientAddress,
}

impl From<&Config> for ProxySettings {
    fn from(c: &Config) -> Self {
        let m = &c.migration;
        Self {
            request_timeout: c.server.request_timeout,
            max_request_body_bytes: c.server.max_request_body_bytes,
            body_read_timeout: c.server.body_read_timeout,
            preview_accept: m.preview_accept.clone(),
            modes: m.modes,
            status_compat: m.status_compat,
            deprecation: m
                .deprecation_headers
                .then(|| DeprecationHeaders::new(&m.deprecation)),
            max_detached_exchanges: c.server.max_detached_exchanges,
            brownouts: m.brownouts.clone(),
            body_budget: body::BodyBudget::new(
                c.server.max_buffered_body_bytes,
                c.server.max_buffered_body_bytes_per_ip,
            ),
            client_address: ClientAddress::new(c.failed_checks.trusted_proxies.clone()),
        }
    }
}

impl ProxySettings {
    /// The brownout that switches `op` off at `now`, if any: whether it answers 503, and when
    /// the last window overlapping or touching it ends (so `Retry-After` never points into
    /// another window).
    pub fn brownout(&self, op: Operation, now: SystemTime) -> Option<(bool, SystemTime)> {
        let first = self.brownout_window(op, now)?;
        let mut end = first.end;
        while let Some(next) = self.brownout_window(op, end) {
            if next.end <= end {
                break;
            }
            end = next.end;
        }
        Some((first.unavailable, end))
    }

    /// The brownout window that switches `op` off at `now`, if any.
    fn brownout_window(&self, op: Operation, now: SystemTime) -> Option<&Brownout> {
        let named = |w: &Brownout| match op {
            Operation::Check => w.operations.check,
            Operation::Reset => w.operations.reset,
            Operation::RevokeToken => w.operations.revoke_token,
            Operation::RevokeGrant => w.operations.revoke_grant,
            Operation::RevokeAll => w.operations.revoke_all,
            Operation::ScopeToken => false,
        };
        self.brownouts
            .iter()
            .find(|w| w.start <= now && now < w.end && named(w))
    }

    /// The mode of a legacy operation.
    pub fn mode(&self, op: Operation) -> Mode {
        match op {
            Operation::Check => self.modes.check,
            Operation::Reset => self.modes.reset,
            Operation::RevokeToken => self.modes.revoke_token,
            Operation::RevokeGrant => self.modes.revoke_grant,
            Operation::RevokeAll => self.modes.revoke_all,
            // Never a legacy operation; forwarded as is if it ever were.
            Operation::ScopeToken => Mode::Observe,
        }
    }
}

/// The proxy service: cheap to clone (one `Arc`), shared by every connection of a worker. Its
/// upstream, settings and limiter are swapped whole by [`Proxy::reload`]: each request takes
/// the ones current when it arrives and keeps them to its end, so a reload fails no request in
/// flight.
#[derive(Clone)]
pub struct Proxy {
    current: Arc<ArcSwap<Inner>>,
}

/// One generation of the proxy's parts. The metrics, drain bookkeeping and clock are the same
/// in every generation.
struct Inner {
    upstream: Upstream,
    settings: ProxySettings,
    metrics: Arc<Metrics>,
    limiter: Option<Arc<FailedChecks>>,
    lifecycle: Lifecycle,
    clock: LimiterClock,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.current.load();
        f.debug_struct("Proxy")
            .field("upstream", &inner.upstream)
            .field("settings", &inner.settings)
            .finish()
    }
}

impl Proxy {
    /// A proxy forwarding to `upstream` with `settings`, recording into `metrics`, limiting
    /// failed calls with `limiter` (`None` when `failed_checks.enabled` is false), and reading
    /// the wall-clock time for brownout windows from `clock`.
    pub fn new(
        upstream: Upstream,
        settings: ProxySettings,
        metrics: Arc<Metrics>,
        limiter: Option<Arc<FailedChecks>>,
        clock: LimiterClock,
    ) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(Inner {
                lifecycle: Lifecycle::new(settings.max_detached_exchanges),
                clock,
                upstream,
                settings,
                metrics,
                limiter,
            })),
        }
    }

    /// The same proxy (settings, metrics, limiter, drain bookkeeping: all shared) forwarding
    /// through `upstream`: each worker thread has its own upstream pool.
    pub fn with_upstream(&self, upstream: Upstream) -> Self {
        let inner = self.current.load();
        Self {
            current: Arc::new(ArcSwap::from_pointee(Inner {
                upstream,
                settings: inner.settings.clone(),
                metrics: inner.metrics.clone(),
                limiter: inner.limiter.clone(),
                lifecycle: inner.lifecycle.clone(),
                clock: inner.clock.clone(),
            })),
        }
    }

    /// Puts a reloaded configuration in place for requests that arrive from now on: they
    /// forward through `upstream` with `settings`, gated by `limiter`. Requests in flight
    /// finish with the parts they started with; the metrics, the drain bookkeeping and the
    /// clock carry over (the room for detached exchanges is resized to the new settings).
    pub fn reload(
        &self,
        upstream: Upstream,
        settings: ProxySettings,
        limiter: Option<Arc<FailedChecks>>,
    ) {
        let old = self.current.load();
        old.lifecycle
            .set_max_detached(settings.max_detached_exchanges);
        self.current.store(Arc::new(Inner {
            upstream,
            settings,
            metrics: old.metrics.clone(),
            limiter,
            lifecycle: old.lifecycle.clone(),
            clock: old.clock.clone(),
        }));
    }

    /// The upstream client requests are forwarded through now.
    pub fn upstream(&self) -> Upstream {
        self.current.load().upstream.clone()
    }

    /// The failed-check limiter requests are gated by now (`None` when disabled).
    pub fn limiter(&self) -> Option<Arc<FailedChecks>> {
        self.current.load().limiter.clone()
    }

    /// The settings requests are served with now.
    pub fn settings(&self) -> ProxySettings {
        self.current.load().settings.clone()
    }

    /// Serves one request. Never fails: errors become the gateway's own GitHub-shaped answers.
    /// Every request is recorded once (metrics and an access event, target
    /// `oauth_apps_gateway::access`), also when its client goes away: a request already
    /// forwarded is then seen through to the upstream's answer, and charged by it. `peer` is the
    /// TCP peer: the client, unless a trusted proxy forwarded the call.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ResponseBody> {
        let current = self.current.load_full();
        let inner = &current;
        let settings = &inner.settings;
        let started = std::time::Instant::now();
        let open = inner.lifecycle.open();
        let (mut parts, body) = req.into_parts();
        let client = settings.client_address.resolve(peer.ip(), &parts.headers);
        let facts = {
            let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
            RequestFacts {
                client,
                version: parts.version,
                user_agent: LoggedUserAgent::of(&parts.headers, target),
                request_id: access::request_id(&parts.headers, target),
            }
        };
        // Forwarded upstream in place of whatever the client sent.
        parts
            .headers
            .insert(access::REQUEST_ID, facts.request_id.clone());
        let now = inner.clock.wall_now();
        let plan =
            match plan::target_refusal(parts.version, &parts.method, &parts.uri, &parts.headers) {
                Some(e) => Plan::Answer(plan::unrouted(), e),
                None => plan::plan(&parts.method, &parts.uri, &parts.headers, settings, now),
            };
        let observe = |call| {
            let method = parts.method.clone();
            Observation::start(inner.metrics.clone(), started, method, call, facts, open)
        };
        let (mut obs, forward) = match plan {
            Plan::Answer(call, e) => {
                tracing::debug!(error = %e, "answered by the gateway");
                let resp = e.into_response();
                return exchange::answer(settings, observe(call), resp, Outcome::Answered);
            }
            Plan::Forward(call, forward) => (observe(call), forward),
        };
        // A body small enough is read whole before the gate and the upstream, so a client that
        // sends slowly holds neither a gate slot nor an upstream connection; a rewritten call's
        // own body is discarded unread. What is read is held against the body budget until
        // this call is answered.
        let mut body_charge = None;
        let body = match forward.json_body {
            Some(_) => ReadBody::Whole(bytes::Bytes::new()),
            None if http_body::Body::is_end_stream(&body) => ReadBody::Whole(bytes::Bytes::new()),
            None => {
                let charge = body_charge.insert(settings.body_budget.charge(peer.ip()));
                let read = body::read_request_body(
                    body,
                    body::BUFFERED_BODY_BYTES,
                    settings.max_request_body_bytes,
                    Instant::now() + settings.body_read_timeout,
                    charge,
                );
                let read = tokio::select! {
                    r = read => Some(r),
                    () = inner.lifecycle.cut_off_signal() => None,
                };
                obs.request_bytes(RequestBytes::Read(charge.bytes()));
                let refused = match read {
                    Some(Ok(body)) => Ok(body),
                    Some(Err(ReadBodyError::TimedOut)) => {
                        Err((ProxyError::RequestTimeout, Outcome::Answered))
                    }
                    Some(Err(ReadBodyError::TooLarge)) => Err((
                        ProxyError::PayloadTooLarge {
                            limit: settings.max_request_body_bytes,
                        },
                        Outcome::Answered,
                    )),
                    Some(Err(ReadBodyError::OverBudget(share))) => {
                        tracing::debug!(?share, "no memory left for request bodies");
                        Err((ProxyError::BodyBudget(share), Outcome::Answered))
                    }
                    Some(Err(ReadBodyError::Broken(e))) => {
                        tracing::debug!(error = %e, "request body could not be read");
                        Err((ProxyError::RequestBody, Outcome::Answered))
                    }
                    None => Err((ProxyError::ShutDown { forwarded: false }, Outcome::ShutDown)),
                };
                match refused {
                    Ok(body) => body,
                    Err((e, outcome)) => {
                        return exchange::answer(settings, obs, e.into_response(), outcome);
                    }
                }
            }
        };
        let verdict = match inner.limiter.as_ref().filter(|_| obs.call().is_app_call()) {
            None => Some(Verdict::Open),
            Some(limiter) => tokio::select! {
                v = gate::admit(
                    limiter,
                    obs.call(),
                    forward.authorization.as_ref(),
                    client,
                    &parts.headers,
                    Instant::now() + settings.request_timeout,
                ) => Some(v),
                () = inner.lifecycle.cut_off_signal() => None,
            },
        };
        let Some(verdict) = verdict else {
            let resp = ProxyError::ShutDown { forwarded: false }.into_response();
            return exchange::answer(settings, obs, resp, Outcome::ShutDown);
        };
        match &verdict {
            Verdict::Limited(b, waited) => {
                obs.gate.limited = Some(*b);
                obs.gate.waited = *waited;
                let resp = ProxyError::TooManyFailures(*b).into_response();
                return exchange::answer(settings, obs, resp, Outcome::Answered);
            }
            Verdict::WouldLimit(b, _) => obs.gate.would_limit = Some(*b),
            Verdict::Pass(p) => obs.gate.waited = p.waited(),
            Verdict::Open => {}
        }
        let received = match &body {
            ReadBody::Started(..) => {
                let rest = Arc::new(AtomicU64::new(0));
                obs.request_bytes(RequestBytes::Streamed {
                    read: body_charge.as_ref().map_or(0, body::BodyCharge::bytes),
                    rest: rest.clone(),
                });
                Some(rest)
            }
            ReadBody::Whole(_) => None,
        };
        let pending = Pending {
            obs,
            permit: verdict.into_permit(),
            deadline: Instant::now() + settings.request_timeout,
            version: parts.version,
            connection: parts.extensions.get::<ConnectionControl>().cloned(),
        };
        let upstream_req =
            exchange::build(parts, body, forward, &inner.upstream, settings, received);
        let answered = exchange::run(inner.clone(), upstream_req, pending).await;
        drop(body_charge);
        answered
    }

    /// Ends every request still open: each is answered 503 (when its client is still there) and
    /// recorded with outcome `shutdown`. For the end of the shutdown grace period.
    pub fn cut_off(&self) {
        self.current.load().lifecycle.cut_off();
    }

    /// Resolves once every request is accounted for, exchanges whose client went away included.
    pub async fn idle(&self) {
        let lifecycle = self.current.load().lifecycle.clone();
        lifecycle.idle().await;
    }

    /// Requests not yet accounted for.
    pub fn open_requests(&self) -> usize {
        self.current.load().lifecycle.open_count()
    }
}
