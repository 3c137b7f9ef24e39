//! The upstream exchange: builds the upstream request from the plan, sends it, and settles the
//! answer (failed-check charge, status compatibility, deprecation headers, observation). Once a
//! request has been handed to the upstream it is seen through to the answer even when its client
//! goes away: the exchange is then detached into a task of its own, and charged, counted and
//! logged there. Also owns the drain bookkeeping: which requests are still open, and the cut-off
//! at the end of the shutdown grace period.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::access::REQUEST_ID;
use crate::body::{DeadlineBody, Metered, Prefixed, ProxyBody, ReadBody};
use crate::headers::{add_accept_media_type, remove_hop_by_hop};
use crate::limiter::Permit;
use crate::metrics::LegacyAction;
use crate::proxy::error::ProxyError;
use crate::proxy::gate;
use crate::proxy::observe::{Observation, Outcome};
use crate::proxy::plan::Forward;
use crate::proxy::{Inner, ProxySettings, ResponseBody};
use crate::server::ConnectionControl;
use crate::upstream::{Upstream, UpstreamError, UpstreamRequestBody};

/// Requests not yet accounted for, the room left for detached exchanges, and the cut-off
/// signal. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    shared: Arc<LifecycleShared>,
}

struct LifecycleShared {
    open: AtomicUsize,
    idle: Notify,
    cut_off: watch::Sender<bool>,
    detached: Arc<Semaphore>,
    /// The permits `detached` is meant to have in all (`server.max_detached_exchanges`).
    max_detached: std::sync::Mutex<usize>,
}

impl Lifecycle {
    /// Bookkeeping for a proxy that sees at most `max_detached` exchanges through after their
    /// clients went away (`server.max_detached_exchanges`).
    pub fn new(max_detached: usize) -> Self {
        Lifecycle {
            shared: Arc::new(LifecycleShared {
                open: AtomicUsize::new(0),
                idle: Notify::new(),
                cut_off: watch::Sender::new(false),
                detached: Arc::new(Semaphore::new(max_detached)),
                max_detached: std::sync::Mutex::new(max_detached),
            }),
        }
    }

    /// Changes how many exchanges may be seen through after their clients went away (a reload
    /// of `server.max_detached_exchanges`). Raised, the room is there at once; lowered, free
    /// room goes at once and room in use goes as those exchanges end (a task takes it back),
    /// so none already running is cut.
    pub fn set_max_detached(&self, max_detached: usize) {
        let shared = &self.shared;
        let mut max = shared
            .max_detached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if max_detached > *max {
            shared.detached.add_permits(max_detached - *max);
        } else if max_detached < *max {
            let excess = *max - max_detached;
            let rest = excess - shared.detached.forget_permits(excess);
            if let (Ok(rest), Ok(rt)) = (u32::try_from(rest), tokio::runtime::Handle::try_current())
                && rest > 0
            {
                let detached = shared.detached.clone();
                rt.spawn(async move {
                    if let Ok(permits) = detached.acquire_many_owned(rest).await {
                        permits.forget();
                    }
                });
            }
        }
        *max = max_detached;
    }
}

/// Marks one request open until dropped.
pub struct Open(Arc<LifecycleShared>);

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    /// Marks a request open until the returned guard drops.
    pub fn open(&self) -> Open {
        self.shared.open.fetch_add(1, Ordering::AcqRel);
        Open(self.shared.clone())
    }

    /// Requests open now, detached exchanges included.
    pub fn open_count(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Resolves once no request is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open_count() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends every open request now: each is answered 503 (when its client is still there) and
    /// recorded with outcome `shutdown`.
    pub fn cut_off(&self) {
        self.shared.cut_off.send_replace(true);
    }

    /// Resolves when [`Lifecycle::cut_off`] is called (at once if it was).
    pub fn cut_off_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shared.cut_off.subscribe();
        async move {
            // An error means the sender is gone: the gateway is stopping anyway.
            let _ = rx.wait_for(|&cut| cut).await;
        }
    }
}

/// Builds the upstream request: the plan's method, path, body and `Authorization`; the client's
/// other headers less hop-by-hop fields, `Host` and `Expect`; the client's body as far as it was
/// read ([`crate::body::read_request_body`]), then the rest streamed under the size limit, its
/// bytes added to `received` when given.
pub fn build(
    mut parts: Parts,
    body: ReadBody<Incoming>,
    forward: Forward,
    upstream: &Upstream,
    settings: &ProxySettings,
    received: Option<Arc<AtomicU64>>,
) -> Request<UpstreamRequestBody> {
    if let Some(method) = forward.method {
        parts.method = method;
    }
    if let Some(auth) = forward.authorization {
        parts.headers.insert(header::AUTHORIZATION, auth);
    }
    parts.uri = upstream.uri(forward.path_and_query);
    parts.version = Version::HTTP_11; // let ALPN pick the upstream protocol
    prepare_request_headers(&mut parts.headers);
    let body = match forward.json_body {
        Some(json) => {
            set_json_body_headers(&mut parts.headers, json.len());
            if let Some(media_type) = &settings.preview_accept {
                add_accept_media_type(&mut parts.headers, media_type);
            }
            // The legacy request's own body (octokit sends none) is discarded.
            drop(body);
            Either::Left(Full::new(json))
        }
        None => match body {
            ReadBody::Whole(bytes) => Either::Left(Full::new(bytes)),
            ReadBody::Started(prefix, rest) => {
                let limit = usize::try_from(settings.max_request_body_bytes).unwrap_or(usize::MAX);
                let left = limit.saturating_sub(prefix.len());
                let body = Prefixed::new(prefix, Limited::new(rest, left));
                Either::Right(match received {
                    Some(received) => body.counted(received),
                    None => body,
                })
            }
        },
    };
    Request::from_parts(parts, body)
}

/// What one request still needs once forwarded.
pub struct Pending {
    /// Its observation.
    pub obs: Observation,
    /// Its failed-check permit, if it is held to a quota.
    pub permit: Option<Permit>,
    /// The whole-exchange deadline.
    pub deadline: Instant,
    /// The client's HTTP version, for the response.
    pub version: Version,
    /// The client connection's control, to have the response finished by the deadline.
    pub connection: Option<ConnectionControl>,
}

/// How the exchange ended.
enum Exchanged {
    Answered(Response<Incoming>, std::time::Duration),
    Failed(UpstreamError, std::time::Duration),
    CutOff,
}

/// Sends `req` upstream and settles the answer. Dropped before the answer (the client went
/// away), a call to the OAuth Applications API goes on in a task of its own and is settled there
/// with outcome `client_gone`, so its answer is charged and its status logged (reset and revoke do
/// their damage whether or not anyone reads the answer; neither is ever sent twice). Any other
/// call is abandoned and recorded with status 499. A detached exchange holds its failed-check
/// slots, so a caller who hangs up has no more exchanges running than its keys have failures
/// left, each for `server.request_timeout` at most.
pub async fn run(
    inner: Arc<Inner>,
    req: Request<UpstreamRequestBody>,
    pending: Pending,
) -> Response<ResponseBody> {
    let upstream = inner.upstream.clone();
    let deadline = pending.deadline;
    let cut_off = inner.lifecycle.cut_off_signal();
    let exchange = async move {
        let sent = Instant::now();
        tokio::select! {
            r = upstream.send(req, deadline) => match r {
                Ok(resp) => Exchanged::Answered(resp, sent.elapsed()),
                Err(e) => Exchanged::Failed(e, sent.elapsed()),
            },
            () = cut_off => Exchanged::CutOff,
        }
    };
    if !pending.obs.call().is_app_call() {
        // Nothing to charge: dropped with its client, it is recorded by its observation.
        let exchanged = exchange.await;
        return settle(&inner, pending, exchanged, Outcome::Answered);
    }
    let mut detached = DetachOnDrop {
        exchange: Some(Box::pin(exchange)),
        rest: Some((inner, pending)),
    };
    let exchanged = match detached.exchange.as_mut() {
        Some(exchange) => exchange.await,
        None => Exchanged::CutOff, // not reached: set just above
    };
    detached.exchange = None;
    match detached.rest.take() {
        Some((inner, pending)) => settle(&inner, pending, exchanged, Outcome::Answered),
        None => ProxyError::ShutDown { forwarded: true }
            .into_response()
            .map(|b| Metered::new(b, None)),
    }
}

/// Holds an exchange while its client waits; on drop, finishes it in a task of its own.
struct DetachOnDrop<F: Future<Output = Exchanged> + Send + 'static> {
    exchange: Option<Pin<Box<F>>>,
    rest: Option<(Arc<Inner>, Pending)>,
}

impl<F: Future<Output = Exchanged> + Send + 'static> Drop for DetachOnDrop<F> {
    fn drop(&mut self) {
        let (Some(exchange), Some((inner, mut pending))) = (self.exchange.take(), self.rest.take())
        else {
            return;
        };
        let room = inner.lifecycle.shared.detached.clone().try_acquire_owned();
        match (room, tokio::runtime::Handle::try_current()) {
            (Ok(room), Ok(rt)) => {
                let _detached = inner.metrics.detached_started();
                rt.spawn(async move {
                    let exchanged = exchange.await;
                    settle(&inner, pending, exchanged, Outcome::ClientGone);
                    drop((room, _detached));
                });
            }
            // No room (or no runtime: the process is ending). The exchange goes; its answer
            // will never be known, so it is charged as the worst it could have been, and its
            // observation records it as it drops (status 499).
            (room, _) => {
                drop(room);
                drop(exchange);
                inner.metrics.detached_refused();
                if let Some(permit) = pending.permit.take() {
                    pending.obs.gate.charges = permit.abandon();
                }
            }
        }
    }
}

/// Settles an exchange: charges the answer to the failed-check quotas, shapes the response for
/// the client, and records it.
fn settle(
    inner: &Inner,
    mut pending: Pending,
    exchanged: Exchanged,
    outcome: Outcome,
) -> Response<ResponseBody> {
    let settings = &inner.settings;
    match exchanged {
        Exchanged::Answered(resp, elapsed) => {
            pending.obs.upstream_answered(elapsed);
            if let Some(permit) = pending.permit.take() {
                let settle = gate::settle_for(pending.obs.call(), resp.status());
                pending.obs.gate.charges = permit.settle(settle);
                if pending.obs.gate.charges.iter().any(Option::is_some) {
                    pending.obs.gate.tracked = inner.limiter.as_ref().map(|l| l.tracked());
                }
            }
            let (mut parts, body) = resp.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            parts.version = pending.version;
            let resp = Response::from_parts(
                parts,
                Either::Right(
                    DeadlineBody::new(body, pending.deadline).watched(
                        pending
                            .connection
                            .as_ref()
                            .map(|c| c.finish_by(pending.deadline)),
                    ),
                ),
            );
            answer(settings, pending.obs, resp, outcome)
        }
        Exchanged::Failed(e, elapsed) => {
            let origin = inner.upstream.origin();
            pending
                .obs
                .upstream_failed(&e, elapsed, origin, settings.request_timeout);
            let err = ProxyError::from_upstream(&e, settings.max_request_body_bytes);
            answer(settings, pending.obs, err.into_response(), outcome)
        }
        Exchanged::CutOff => answer(
            settings,
            pending.obs,
            ProxyError::ShutDown { forwarded: true }.into_response(),
            Outcome::ShutDown,
        ),
    }
}

/// The last step of every request, forwarded or not: status compatibility and deprecation
/// headers for a legacy call, no body for a `HEAD` request (RFC 9110 §9.3.2; a rewritten `HEAD`
/// check is a `POST` upstream, whose answer has one), the request id as `X-Request-Id` (in
/// place of any the upstream sent), then the observation, whose access event the body carries.
pub fn answer(
    settings: &ProxySettings,
    mut obs: Observation,
    mut resp: Response<ProxyBody>,
    outcome: Outcome,
) -> Response<ResponseBody> {
    if let Some((_, action)) = obs.call().legacy {
        if action == LegacyAction::Rewritten
            && settings.status_compat
            && resp.status() == StatusCode::UNPROCESSABLE_ENTITY
        {
            // The legacy contract never lists 422 and promises 404 for a bad token.
            *resp.status_mut() = StatusCode::NOT_FOUND;
            obs.status_compat();
        }
        if let Some(d) = &settings.deprecation {
            d.apply(resp.headers_mut());
        }
    }
    if obs.method() == Method::HEAD {
        *resp.body_mut() = Either::Left(Full::new(Bytes::new()));
    }
    resp.headers_mut()
        .insert(REQUEST_ID, obs.request_id().clone());
    let event = obs.finish(resp.status(), outcome);
    resp.map(|b| Metered::new(b, Some(event)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_every_open_request() {
        let l = Lifecycle::new(1);
        let a = l.open();
        let b = l.open();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one request is still open");
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("idle once the last one is done")
            .unwrap();
    }

    #[tokio::test]
    async fn cut_off_reaches_signals_taken_before_and_after() {
        let l = Lifecycle::new(1);
        let early = l.cut_off_signal();
        l.cut_off();
        let late = l.cut_off_signal();
        tokio::time::timeout(Duration::from_secs(1), async {
            early.await;
            late.await;
        })
        .await
        .expect("both resolve");
    }
}
