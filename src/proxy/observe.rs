//! The one place where the outcome of a request becomes its metrics, its log lines and its
//! access event (target `oauth_apps_gateway::access`). An [`Observation`] is opened when a
//! request arrives and travels with it, into a detached exchange too; if it is dropped unfinished
//! (the client went away before anything was forwarded) its drop still records the request.
//! Metrics are recorded with the response head; the access event ([`AccessEvent`]) rides on the
//! response body and is written when the body ends or is dropped, with the bytes sent. Nothing
//! recorded here holds a token, a client secret, an Authorization value, a credential hash, a
//! query string or a raw path; the client address is in the access event only.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Method, StatusCode, Version};

use crate::access::{self, LoggedUserAgent, Seconds};
use crate::body::BodyEnd;
use crate::classify::Operation;
use crate::limiter::{BlockReason, Blocked, Charge, Charged, Tracked};
use crate::limiter::{FailureClass, Settle};
use crate::metrics::{
    CallOutcome, CredentialKind, GaugeGuard, Interruption, LegacyAction, Metrics,
};
use crate::proxy::exchange::Open;
use crate::proxy::gate;
use crate::proxy::plan::Call;
use crate::upstream::UpstreamError;

/// Status recorded for a request whose client went away before it was forwarded: nginx's
/// "client closed request", as access-log readers know it.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// How a request ended, the access event's `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response head was handed to the client's connection.
    Answered,
    /// The client went away first. A request already forwarded was seen through to the
    /// upstream's answer and accounted for all the same.
    ClientGone,
    /// The end of the shutdown grace period cut it off.
    ShutDown,
}

impl Outcome {
    /// The value in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::ClientGone => "client_gone",
            Outcome::ShutDown => "shutdown",
        }
    }
}

/// What the failed-check gate did, for the record.
#[derive(Debug, Clone, Copy, Default)]
pub struct GateRecord {
    /// Answered 429.
    pub limited: Option<Blocked>,
    /// Shadow mode: would have been answered 429.
    pub would_limit: Option<Blocked>,
    /// Waited for another call of its key to finish.
    pub waited: bool,
    /// The failures charged for its answer.
    pub charges: [Option<Charge>; 3],
    /// What the limiter tracked after charging, when something was charged.
    pub tracked: Option<Tracked>,
}

/// What the access event tells of a request's head, taken once when it arrives.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// The client address: the peer, or behind a trusted proxy the address it names.
    pub client: IpAddr,
    /// The client's HTTP version.
    pub version: Version,
    /// The user agent as logged.
    pub user_agent: LoggedUserAgent,
    /// The request id: the client's `X-Request-Id` or a new one.
    pub request_id: HeaderValue,
}

impl Default for RequestFacts {
    fn default() -> Self {
        RequestFacts {
            client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            version: Version::HTTP_11,
            user_agent: LoggedUserAgent::Absent,
            request_id: HeaderValue::from_static(""),
        }
    }
}

/// The request body bytes received from the client.
#[derive(Debug, Clone, Default)]
pub enum RequestBytes {
    /// None: no body, or a rewritten call's (not read).
    #[default]
    None,
    /// All there will be, in bytes: read whole before forwarding, or as far as it was read when
    /// the request was answered without forwarding it.
    Read(u64),
    /// `read` bytes read before forwarding, and the rest counted as it streams upstream.
    Streamed {
        /// Bytes read before forwarding.
        read: u64,
        /// Bytes streamed since, as counted so far.
        rest: Arc<AtomicU64>,
    },
}

impl RequestBytes {
    fn total(&self) -> u64 {
        match self {
            RequestBytes::None => 0,
            RequestBytes::Read(n) => *n,
            RequestBytes::Streamed { read, rest } => read + rest.load(Ordering::Relaxed),
        }
    }
}

/// One request being observed.
pub struct Observation {
    metrics: Arc<Metrics>,
    started: Instant,
    method: Method,
    /// What the request is.
    call: Call,
    facts: RequestFacts,
    request_bytes: RequestBytes,
    /// The gate's record.
    pub gate: GateRecord,
    upstream: Option<UpstreamRecord>,
    status_compat: bool,
    done: bool,
    _in_flight: GaugeGuard,
    _open: Open,
}

#[derive(Debug, Clone, Copy)]
enum UpstreamRecord {
    Answered(Duration),
    Failed(Duration),
}

impl UpstreamRecord {
    fn elapsed(self) -> Duration {
        match self {
            UpstreamRecord::Answered(d) | UpstreamRecord::Failed(d) => d,
        }
    }
}

/// The access event of one request, recorded with its response head and written (target
/// `oauth_apps_gateway::access`, level INFO) once the response body ended or was dropped, or at
/// once for a request that got no response.
pub struct AccessEvent {
    started: Instant,
    method: Method,
    route: &'static str,
    operation: &'static str,
    action: Option<&'static str>,
    status: u16,
    outcome: Outcome,
    upstream: Option<Duration>,
    client_id: Option<Box<str>>,
    facts: RequestFacts,
    request_bytes: RequestBytes,
}

impl AccessEvent {
    /// Writes the event: `response_bytes` of body were handed to the client's connection;
    /// `complete` says whether the whole body was.
    fn write(self, response_bytes: u64, complete: bool) {
        let f = &self.facts;
        tracing::info!(
            target: "oauth_apps_gateway::access",
            request_id = f.request_id.to_str().unwrap_or(""),
            client_addr = %f.client,
            protocol = access::protocol(f.version),
            method = %self.method,
            route = self.route,
            operation = self.operation,
            action = self.action,
            status = self.status,
            outcome = self.outcome.as_str(),
            request_bytes = self.request_bytes.total(),
            response_bytes,
            response_complete = complete,
            duration_seconds = %Seconds(self.started.elapsed()),
            upstream_duration_seconds = self.upstream.map(|d| tracing::field::display(Seconds(d))),
            user_agent = f.user_agent.as_str(),
            client_id = %Escaped(self.client_id.as_deref().unwrap_or("")),
        );
    }
}

impl BodyEnd for AccessEvent {
    fn ended(self, sent_bytes: u64, complete: bool) {
        self.write(sent_bytes, complete);
    }
}

impl Observation {
    /// Opens the record of `call`, a request with `method` and head `facts` that arrived at
    /// `started`. `open` keeps the drain waiting until the request is accounted for.
    pub fn start(
        metrics: Arc<Metrics>,
        started: Instant,
        method: Method,
        call: Call,
        facts: RequestFacts,
        open: Open,
    ) -> Self {
        Observation {
            _in_flight: metrics.request_started(),
            metrics,
            started,
            method,
            call,
            facts,
            request_bytes: RequestBytes::None,
            gate: GateRecord::default(),
            upstream: None,
            status_compat: false,
            done: false,
            _open: open,
        }
    }

    /// What the request is.
    pub fn call(&self) -> &Call {
        &self.call
    }

    /// The request's method, as the client sent it.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request id, returned to the client as `X-Request-Id`.
    pub fn request_id(&self) -> &HeaderValue {
        &self.facts.request_id
    }

    /// Records the request body bytes received from the client.
    pub fn request_bytes(&mut self, bytes: RequestBytes) {
        self.request_bytes = bytes;
    }

    /// Records the upstream's response head, `elapsed` after forwarding.
    pub fn upstream_answered(&mut self, elapsed: Duration) {
        self.upstream = Some(UpstreamRecord::Answered(elapsed));
    }

    /// Records a failed upstream exchange, `elapsed` after forwarding, and logs why: the
    /// upstream's `origin` (`scheme://host:port`, never a path or credential), the failure in
    /// plain words, and which timeout fired with its value (`request_timeout` is
    /// `server.request_timeout`). Never a URL path, header or body.
    pub fn upstream_failed(
        &mut self,
        e: &UpstreamError,
        elapsed: Duration,
        origin: &str,
        request_timeout: Duration,
    ) {
        self.upstream = Some(UpstreamRecord::Failed(elapsed));
        if let UpstreamError::Failed { kind, .. } = e {
            self.metrics.upstream_failure(*kind);
        }
        let operation = self.operation_label();
        match e {
            UpstreamError::Failed {
                kind,
                detail,
                source,
            } => {
                let cause = source
                    .as_deref()
                    .map(|s| ErrorChain(s as &(dyn std::error::Error + 'static)));
                let timeout = detail.timeout(request_timeout);
                // A string, so the text format quotes it (it has spaces); failures are rare.
                let failure = detail.describe(request_timeout).to_string();
                tracing::warn!(
                    upstream = origin,
                    kind = kind.as_str(),
                    failure = failure.as_str(),
                    timeout = timeout.map(|(key, _)| key),
                    timeout_seconds = timeout.map(|(_, d)| tracing::field::display(Seconds(d))),
                    operation,
                    request_id = self.facts.request_id.to_str().unwrap_or(""),
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

    /// Records that a 422 was passed to the legacy client as 404.
    pub fn status_compat(&mut self) {
        self.status_compat = true;
    }

    /// Records the request's end: the status sent (or that would have been sent) and how it
    /// ended; writes its metrics and gate log lines. Returns its access event, to be written
    /// when the response body ends ([`crate::body::Metered`]).
    #[must_use = "the access event is written when it is told the body ended"]
    pub fn finish(mut self, status: StatusCode, outcome: Outcome) -> AccessEvent {
        self.record(status.as_u16(), outcome)
    }

    fn operation_label(&self) -> &'static str {
        self.call
            .operation
            .map_or("pass_through", Operation::as_str)
    }

    fn record(&mut self, status: u16, outcome: Outcome) -> AccessEvent {
        self.done = true;
        let m = &*self.metrics;
        let elapsed = self.started.elapsed();
        let call = &self.call;
        let client_id = call.client_id.as_deref();
        let (had_secret, had_token) = call.query_credentials;
        if had_secret {
            m.query_credential(CredentialKind::ClientSecret);
        }
        if had_token {
            m.query_credential(CredentialKind::AccessToken);
        }
        if let Some(UpstreamRecord::Answered(d)) = self.upstream {
            m.upstream_answered(call.class, d);
        }
        // A call the limiter answered was neither rewritten nor observed.
        let legacy = call.legacy.map(|(op, action)| match self.gate.limited {
            Some(_) => (op, LegacyAction::Limited),
            None => (op, action),
        });
        if let Some((op, action)) = legacy {
            if self.status_compat {
                m.status_compat(op);
            }
            let outcome = match self.upstream {
                Some(UpstreamRecord::Answered(_)) => {
                    match gate::settle_for(call, StatusCode::from_u16(status).unwrap_or_default()) {
                        Settle::Accepted => CallOutcome::Success,
                        Settle::Failure(FailureClass::Token) => CallOutcome::TokenFailure,
                        Settle::Failure(FailureClass::Credential) => CallOutcome::CredentialFailure,
                        Settle::Neutral => CallOutcome::Other,
                    }
                }
                _ => CallOutcome::Gateway,
            };
            // The user agent as the access event has it: cut, escaped, never a credential.
            let user_agent = Some(self.facts.user_agent.as_str()).filter(|ua| !ua.is_empty());
            m.deprecated_call(op, action, client_id, user_agent, outcome);
        }
        self.record_gate(client_id);
        if let Ok(status) = StatusCode::from_u16(status) {
            m.response(call.class, status, elapsed);
        }
        match outcome {
            Outcome::Answered => {}
            Outcome::ClientGone => m.interrupted(call.class, Interruption::ClientGone),
            Outcome::ShutDown => m.interrupted(call.class, Interruption::ShutDown),
        }
        AccessEvent {
            started: self.started,
            method: self.method.clone(),
            route: call.class.as_str(),
            operation: self.operation_label(),
            action: legacy.map(|(_, a)| a.as_str()),
            status,
            outcome,
            upstream: self.upstream.map(UpstreamRecord::elapsed),
            client_id: self.call.client_id.take(),
            facts: std::mem::take(&mut self.facts),
            request_bytes: std::mem::take(&mut self.request_bytes),
        }
    }

    fn record_gate(&self, client_id: Option<&str>) {
        let m = &*self.metrics;
        let g = &self.gate;
        let client_id = Escaped(client_id.unwrap_or(""));
        if let Some(b) = g.limited {
            m.failed_check_rejected(b.class, b.kind);
            tracing::info!(
                class = b.class.as_str(),
                key_kind = b.kind.as_str(),
                reason = reason(b),
                %client_id,
                retry_after_seconds = b.retry_after_secs(),
                "failed-check quota: answered 429"
            );
        }
        if let Some(b) = g.would_limit {
            m.failed_check_shadow(b.class, b.kind);
            tracing::info!(
                class = b.class.as_str(),
                key_kind = b.kind.as_str(),
                %client_id,
                retry_after_seconds = b.retry_after_secs(),
                "failed-check quota spent; forwarded (shadow mode), enforce would answer 429"
            );
        }
        if g.waited {
            m.failed_check_waited();
        }
        for c in g.charges.iter().flatten() {
            match c.result {
                Charged::Untracked => m.failed_check_untracked(c.class, c.kind),
                Charged::Recorded => m.failed_check(c.class, c.kind),
                Charged::Spent => {
                    m.failed_check(c.class, c.kind);
                    tracing::info!(
                        class = c.class.as_str(),
                        key_kind = c.kind.as_str(),
                        %client_id,
                        "failed-check quota spent"
                    );
                }
            }
        }
        if let Some(t) = g.tracked {
            m.failed_checks_tracked(t);
        }
    }
}

fn reason(b: Blocked) -> &'static str {
    match b.reason {
        BlockReason::Spent => "spent",
        BlockReason::InFlight => "in_flight",
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        if !self.done {
            // No response will carry the event: written now.
            self.record(CLIENT_CLOSED_REQUEST, Outcome::ClientGone)
                .write(0, false);
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

    #[test]
    fn escaped_neutralises_control_characters() {
        assert_eq!(Escaped("Iv1.abc").to_string(), "Iv1.abc");
        assert_eq!(Escaped("a\nb\x1b[31m").to_string(), "a\\nb\\u{1b}[31m");
    }
}
