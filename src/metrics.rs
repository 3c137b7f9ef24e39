//! Prometheus metrics: names, help texts and label sets in one place, registered once into a
//! registry the composition root creates and injects (no global registry). Label children are
//! created up front, so recording on the request path is atomic increments, with no lock or
//! allocation. The one exception is the per-client_id table for deprecated calls, a short
//! mutex section taken only for legacy calls and bounded by `metrics.max_client_ids`. Labels
//! never carry a token, an IP address or a raw path. The only user of the prometheus crate.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    TextEncoder,
};

/// The registry every metric is registered into; the composition root creates one and hands
/// it to [`Metrics::new`].
pub use prometheus::Registry;
use serde::Serialize;

use crate::classify::{LEGACY_OPERATIONS, Operation, RouteClass};
use crate::limiter::{FailureClass, KeyKind, QUOTAS, Tracked};
use crate::server::Refusal;
use crate::upstream::FailureKind;

mod fleet;

pub use fleet::{FLUSH_EVERY, KEEP as FLEET_REPORT_KEEP};

/// Every application metric name starts with this.
pub const PREFIX: &str = "oauth_apps_gateway_";

/// `Content-Type` of the text exposition format served at `/metrics`.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The label value under which client_ids past the cap are counted.
pub const OTHER_CLIENT_ID: &str = "other";

/// Longest client_id, in bytes, that gets its own series; GitHub's are 20 characters. Longer
/// ones count as `other`, so a made-up id cannot make a huge label.
const MAX_CLIENT_ID_BYTES: usize = 64;

/// Latency buckets in seconds, up to the default request timeout (30 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// What the gateway did with a deprecated call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyAction {
    /// Rewritten into the replacement form and forwarded (mode rewrite).
    Rewritten,
    /// Forwarded unchanged (mode observe).
    Observed,
    /// Answered 410 Gone by the gateway (mode reject).
    Rejected,
    /// Answered 400: empty or undecodable client_id or token in the path.
    Malformed,
    /// Answered 429 by the failed-check limiter; never forwarded.
    Limited,
    /// Answered 410 or 503 inside a scheduled brownout window; never forwarded.
    Brownout,
}

impl LegacyAction {
    const ALL: [LegacyAction; 6] = [
        LegacyAction::Rewritten,
        LegacyAction::Observed,
        LegacyAction::Rejected,
        LegacyAction::Malformed,
        LegacyAction::Limited,
        LegacyAction::Brownout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LegacyAction::Rewritten => "rewritten",
            LegacyAction::Observed => "observed",
            LegacyAction::Rejected => "rejected",
            LegacyAction::Malformed => "malformed",
            LegacyAction::Limited => "limited",
            LegacyAction::Brownout => "brownout",
        }
    }
}

/// How a deprecated call ended, for the legacy-client report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The upstream answered 2xx.
    Success,
    /// The upstream answered a token failure (404 or 422 to a token operation).
    TokenFailure,
    /// The upstream answered 401.
    CredentialFailure,
    /// The gateway answered itself (400, 410, 429, a brownout, 502, 503, 504) or the client left
    /// before it was forwarded.
    Gateway,
    /// Any other answer of the upstream.
    Other,
}

impl CallOutcome {
    const ALL: [CallOutcome; 5] = [
        CallOutcome::Success,
        CallOutcome::TokenFailure,
        CallOutcome::CredentialFailure,
        CallOutcome::Gateway,
        CallOutcome::Other,
    ];

    /// The name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Success => "success",
            CallOutcome::TokenFailure => "token_failure",
            CallOutcome::CredentialFailure => "credential_failure",
            CallOutcome::Gateway => "gateway",
            CallOutcome::Other => "other",
        }
    }
}

/// Distinct user agents kept per client_id in the report.
const MAX_AGENTS: usize = 4;
/// Longest user agent kept, in bytes (cut at a character boundary).
const MAX_AGENT_BYTES: usize = 128;

/// How a request ended without its answer reaching the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// The client went away first.
    ClientGone,
    /// The end of the shutdown grace period cut it off.
    ShutDown,
}

impl Interruption {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Interruption::ClientGone => "client_gone",
            Interruption::ShutDown => "shutdown",
        }
    }
}

/// A kind of deprecated query-parameter credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// `client_id` + `client_secret` (or a lone `client_secret`).
    ClientSecret,
    /// `access_token`.
    AccessToken,
}

impl CredentialKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ClientSecret => "client_secret",
            CredentialKind::AccessToken => "access_token",
        }
    }
}

/// Why the metrics could not be set up or encoded.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// All gateway metrics. Shared behind an `Arc`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    deprecated_calls: [[IntCounter; LegacyAction::ALL.len()]; LEGACY_OPERATIONS.len()],
    query_credentials: [IntCounter; 2],
    responses: IntCounterVec,
    response_children: [Box<[OnceLock<IntCounter>]>; 3],
    request_duration: [Histogram; 3],
    upstream_duration: [Histogram; 3],
    upstream_failures: [IntCounter; 4],
    upstream_consecutive_failures: IntGauge,
    status_compat: [IntCounter; LEGACY_OPERATIONS.len()],
    in_flight: IntGauge,
    open_connections: IntGauge,
    connections_refused: [IntCounter; 2],
    failed_checks: [IntCounter; 3],
    failed_checks_rejected: [IntCounter; 3],
    failed_checks_shadow: [IntCounter; 3],
    failed_checks_untracked: [IntCounter; 3],
    failed_checks_tracked: [IntGauge; 3],
    failed_checks_waits: IntCounter,
    detached: IntGauge,
    detached_refused: IntCounter,
    verified_credentials: IntGauge,
    interrupted: [[IntCounter; 2]; 3],
    clients: LegacyClients,
    config: ConfigMetrics,
    shared: SharedStoreMetrics,
    /// One flush of the report to the shared store at a time.
    flush: tokio::sync::Mutex<()>,
}

/// The metrics of the shared store (`[shared]`, src/shared/): registered whether or not a store
/// is configured, so dashboards and alerts see zeros rather than nothing.
#[derive(Clone)]
pub struct SharedStoreMetrics {
    degraded: IntGauge,
    calls: [[IntCounter; 2]; crate::shared::Call::ALL.len()],
    durations: [prometheus::Histogram; crate::shared::Call::ALL.len()],
}

impl std::fmt::Debug for SharedStoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStoreMetrics").finish_non_exhaustive()
    }
}

/// Buckets of one Redis call, in seconds: 50 us to 1 s.
const SHARED_STORE_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.25, 1.0,
];

impl SharedStoreMetrics {
    fn new(r: &Registry) -> Result<Self, MetricsError> {
        let degraded = register(
            r,
            IntGauge::new(
                name("shared_store_degraded"),
                "1 while the shared store ([shared] redis_url) does not answer and the gateway goes on without it (shared.on_redis_error), else 0 (also when no store is configured).",
            )?,
        )?;
        let calls = counter_vec(
            r,
            "shared_store_calls_total",
            "Calls to the shared store (Redis), by call (admit, settle, report_add, report_read, probe) and result (ok, or error: an error or no answer within the timeout).",
            &["call", "result"],
        )?;
        let opts = HistogramOpts::new(
            name("shared_store_call_duration_seconds"),
            "Time one call to the shared store (Redis) took, answered or not, in seconds, by call.",
        )
        .buckets(SHARED_STORE_BUCKETS.to_vec());
        let durations = register(r, HistogramVec::new(opts, &["call"])?)?;
        use crate::shared::Call;
        Ok(SharedStoreMetrics {
            degraded,
            calls: Call::ALL
                .map(|c| ["ok", "error"].map(|res| calls.with_label_values(&[c.as_str(), res]))),
            durations: Call::ALL.map(|c| durations.with_label_values(&[c.as_str()])),
        })
    }

    /// One call to the store: how long it took and whether it was answered.
    pub fn call(&self, call: crate::shared::Call, took: Duration, ok: bool) {
        self.calls[call as usize][usize::from(!ok)].inc();
        self.durations[call as usize].observe(took.as_secs_f64());
    }

    /// Whether the gateway is going on without the store.
    pub fn degraded(&self, degraded: bool) {
        self.degraded.set(i64::from(degraded));
    }
}

/// What a configuration reload did (`reloads_total{result}`), and the configuration in force.
struct ConfigMetrics {
    reloads: [IntCounter; 2],
    tls_reloads: [IntCounter; 2],
    last_successful: IntGauge,
    last_success_timestamp: prometheus::Gauge,
    hash: prometheus::Gauge,
}

/// How a configuration (or certificate) reload ended, as metric labels say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new file was read, validated and put in force.
    Success = 0,
    /// The new file was refused; the running configuration stays in force.
    Error = 1,
}

impl ReloadResult {
    /// The result's name for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Error => "error",
        }
    }
}

impl ConfigMetrics {
    fn new(r: &Registry) -> Result<Self, MetricsError> {
        let reloads = counter_vec(
            r,
            "config_reloads_total",
            "Configuration reloads (SIGHUP or POST /reload on the admin listener), by result; an error keeps the running configuration.",
            &["result"],
        )?;
        let gauge = |suffix: &str, help: &str| -> Result<prometheus::Gauge, MetricsError> {
            register(r, prometheus::Gauge::new(name(suffix), help)?)
        };
        let tls_reloads = counter_vec(
            r,
            "tls_certificate_reloads_total",
            "Loads of the proxy listener's TLS certificate after start (files changed, or a configuration reload), by result; an error keeps the certificate in service.",
            &["result"],
        )?;
        Ok(ConfigMetrics {
            reloads: [ReloadResult::Success, ReloadResult::Error]
                .map(|res| reloads.with_label_values(&[res.as_str()])),
            tls_reloads: [ReloadResult::Success, ReloadResult::Error]
                .map(|res| tls_reloads.with_label_values(&[res.as_str()])),
            last_successful: register(
                r,
                IntGauge::new(
                    name("config_last_reload_successful"),
                    "1 when the last configuration reload (or the start) succeeded, 0 when it failed.",
                )?,
            )?,
            last_success_timestamp: gauge(
                "config_last_reload_success_timestamp_seconds",
                "Unix time in seconds the configuration in force was loaded.",
            )?,
            hash: gauge(
                "config_hash",
                "The first 48 bits of the SHA-256 of the configuration file in force, as a number.",
            )?,
        })
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const ROUTES: [RouteClass; 3] = [
    RouteClass::Legacy,
    RouteClass::TokenApi,
    RouteClass::PassThrough,
];
const FAILURES: [FailureKind; 4] = [
    FailureKind::Connect,
    FailureKind::Tls,
    FailureKind::Timeout,
    FailureKind::Protocol,
];
/// Status codes below this get a cached counter child; others (never seen from GitHub) are
/// looked up in the vector.
const CACHED_STATUS_END: u16 = 600;

fn name(suffix: &str) -> String {
    format!("{PREFIX}{suffix}")
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> Result<C, MetricsError> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    r: &Registry,
    suffix: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    register(
        r,
        IntCounterVec::new(Opts::new(name(suffix), help), labels)?,
    )
}

fn histogram_vec(r: &Registry, suffix: &str, help: &str) -> Result<HistogramVec, MetricsError> {
    let opts = HistogramOpts::new(name(suffix), help).buckets(LATENCY_BUCKETS.to_vec());
    register(r, HistogramVec::new(opts, &["route"])?)
}

impl Metrics {
    /// Creates every metric and registers it, with the process collector (CPU seconds,
    /// resident memory bytes, open fds) and `build_info`, into `registry`.
    ///
    /// # Errors
    /// [`MetricsError`] when a name is already registered in `registry`.
    pub fn new(registry: Registry, max_client_ids: usize) -> Result<Self, MetricsError> {
        let r = &registry;
        let deprecated = counter_vec(
            r,
            "deprecated_calls_total",
            "Calls to the deprecated token-in-path OAuth Applications endpoints, by operation and what the gateway did.",
            &["operation", "action"],
        )?;
        let deprecated_calls = LEGACY_OPERATIONS.map(|op| {
            LegacyAction::ALL.map(|a| deprecated.with_label_values(&[op.as_str(), a.as_str()]))
        });
        let creds = counter_vec(
            r,
            "query_credentials_total",
            "Deprecated query-parameter credentials removed from forwarded URLs (moved into Authorization unless the request had one), by kind.",
            &["kind"],
        )?;
        let query_credentials = [CredentialKind::ClientSecret, CredentialKind::AccessToken]
            .map(|k| creds.with_label_values(&[k.as_str()]));
        let responses = counter_vec(
            r,
            "responses_total",
            "Responses sent to clients, by route class (legacy, token_api, pass_through) and status code.",
            &["route", "status"],
        )?;
        let cache = || {
            (100..CACHED_STATUS_END)
                .map(|_| OnceLock::new())
                .collect::<Vec<_>>()
                .into_boxed_slice()
        };
        let request = histogram_vec(
            r,
            "request_duration_seconds",
            "Time from receiving a request to sending the response head, in seconds, by route class.",
        )?;
        let upstream = histogram_vec(
            r,
            "upstream_duration_seconds",
            "Time from forwarding a request to receiving the upstream's response head, in seconds, by route class.",
        )?;
        let upstream_failures = counter_vec(
            r,
            "upstream_failures_total",
            "Upstream exchanges that failed, by kind (connect, tls, timeout, protocol).",
            &["kind"],
        )?;
        let upstream_consecutive_failures = register(
            r,
            IntGauge::new(
                name("upstream_consecutive_failures"),
                "Upstream exchanges that failed since the upstream last answered (any status); 0 after any answer. What to alert on: /readyz does not depend on the upstream.",
            )?,
        )?;
        let compat = counter_vec(
            r,
            "status_compat_rewrites_total",
            "422 answers to rewritten calls passed to the legacy client as 404 (migration.status_compat), by operation.",
            &["operation"],
        )?;
        let in_flight = register(
            r,
            IntGauge::new(
                name("in_flight_requests"),
                "Requests being handled on the proxy listener.",
            )?,
        )?;
        let open_connections = register(
            r,
            IntGauge::new(
                name("open_connections"),
                "Client connections open on the proxy listener.",
            )?,
        )?;
        let connections_refused = counter_vec(
            r,
            "connections_refused_total",
            "Client connections closed at once on the proxy listener, by reason: max_connections (server.max_connections open) or max_connections_per_ip (server.max_connections_per_ip open from the same address).",
            &["reason"],
        )?;
        let quota_counter = |suffix: &str, help: &str| {
            counter_vec(r, suffix, help, &["class", "key_kind"])
                .map(|v| QUOTAS.map(|(c, k)| v.with_label_values(&[c.as_str(), k.as_str()])))
        };
        let failed_checks = quota_counter(
            "failed_checks_total",
            "Failures charged to the failed-check quotas, by class (credential: 401 to an /applications/{client_id}/... call; token: 404 or 422 to a token operation) and key kind (credential, client_ip).",
        )?;
        let failed_checks_rejected = quota_counter(
            "failed_checks_rejected_total",
            "Calls answered 429 by the gateway because a key's quota was spent or it had as many calls in flight as failures left, by class and key kind.",
        )?;
        let failed_checks_shadow = quota_counter(
            "failed_checks_shadow_rejected_total",
            "Calls forwarded in failed_checks.mode = \"shadow\" that enforce mode would have answered 429, by class and key kind.",
        )?;
        let failed_checks_untracked = quota_counter(
            "failed_checks_untracked_total",
            "Failures not tracked because the quota's key table was full (failed_checks.max_tracked_keys), by class and key kind.",
        )?;
        let tracked = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    name("failed_checks_tracked_keys"),
                    "Keys each failed-check quota tracks, by class and key kind.",
                ),
                &["class", "key_kind"],
            )?,
        )?;
        let failed_checks_waits = register(
            r,
            IntCounter::new(
                name("failed_checks_waits_total"),
                "Calls held at the failed-check gate until another call of the same key finished.",
            )?,
        )?;
        let verified_credentials = register(
            r,
            IntGauge::new(
                name("failed_checks_verified_credentials"),
                "App credentials the upstream accepted in the last hour, which the credential-failure quotas do not hold.",
            )?,
        )?;
        let detached = register(
            r,
            IntGauge::new(
                name("detached_exchanges"),
                "Calls to the OAuth Applications API being seen through to the upstream's answer after their client went away.",
            )?,
        )?;
        let detached_refused = register(
            r,
            IntCounter::new(
                name("detached_exchanges_refused_total"),
                "Calls whose client went away after they were forwarded that could not be seen through (server.max_detached_exchanges reached), charged as failures instead.",
            )?,
        )?;
        let interrupted = counter_vec(
            r,
            "interrupted_requests_total",
            "Requests whose client went away before the answer (outcome client_gone; a forwarded one is still seen through) or that the end of the shutdown grace period cut off (outcome shutdown), by route class.",
            &["route", "outcome"],
        )?;
        let build = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    name("build_info"),
                    "Always 1; the version label names the running build.",
                ),
                &["version"],
            )?,
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let by_client = counter_vec(
            r,
            "deprecated_calls_by_client_total",
            "Calls to the deprecated endpoints by client_id; ids beyond metrics.max_client_ids count as client_id=\"other\".",
            &["client_id"],
        )?;
        Ok(Metrics {
            deprecated_calls,
            query_credentials,
            responses,
            response_children: [cache(), cache(), cache()],
            request_duration: ROUTES.map(|c| request.with_label_values(&[c.as_str()])),
            upstream_duration: ROUTES.map(|c| upstream.with_label_values(&[c.as_str()])),
            upstream_failures: FAILURES.map(|k| upstream_failures.with_label_values(&[k.as_str()])),
            upstream_consecutive_failures,
            status_compat: LEGACY_OPERATIONS.map(|op| compat.with_label_values(&[op.as_str()])),
            in_flight,
            open_connections,
            connections_refused: Refusal::ALL
                .map(|r| connections_refused.with_label_values(&[r.as_str()])),
            failed_checks,
            failed_checks_rejected,
            failed_checks_shadow,
            failed_checks_untracked,
            failed_checks_tracked: QUOTAS
                .map(|(c, k)| tracked.with_label_values(&[c.as_str(), k.as_str()])),
            failed_checks_waits,
            detached,
            detached_refused,
            verified_credentials,
            interrupted: ROUTES.map(|c| {
                [Interruption::ClientGone, Interruption::ShutDown]
                    .map(|o| interrupted.with_label_values(&[c.as_str(), o.as_str()]))
            }),
            clients: LegacyClients::new(by_client, max_client_ids),
            config: ConfigMetrics::new(r)?,
            shared: SharedStoreMetrics::new(r)?,
            flush: tokio::sync::Mutex::new(()),
            registry,
        })
    }

    /// Counts one deprecated call: by operation and action, and by client_id (bounded), with the
    /// user agent that made it and how it ended, for the report. `client_id` is `None` for a
    /// malformed call whose client_id could not be read.
    pub fn deprecated_call(
        &self,
        op: Operation,
        action: LegacyAction,
        client_id: Option<&str>,
        user_agent: Option<&str>,
        outcome: CallOutcome,
    ) {
        let Some(i) = op.legacy_index() else { return };
        self.deprecated_calls[i][action as usize].inc();
        if let Some(id) = client_id {
            let seen = Seen {
                op_index: i,
                user_agent,
                outcome,
                now: SystemTime::now(),
            };
            self.clients.record(id, &seen);
        }
    }

    /// Records a configuration put in force (at start or by a reload): `hash` identifies the
    /// file's content (the first 48 bits of its SHA-256, as Alertmanager's `config_hash`), and
    /// the success time is now.
    pub fn config_loaded(&self, hash: u64) {
        let c = &self.config;
        c.last_successful.set(1);
        c.hash.set(hash as f64);
        c.last_success_timestamp.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
    }

    /// Counts a configuration reload by how it ended; an error also sets
    /// `config_last_reload_successful` to 0 until the next success.
    pub fn config_reload(&self, result: ReloadResult) {
        self.config.reloads[result as usize].inc();
        if result == ReloadResult::Error {
            self.config.last_successful.set(0);
        }
    }

    /// Counts a load of the proxy listener's TLS certificate after start, by how it ended.
    pub fn tls_certificate_reload(&self, result: ReloadResult) {
        self.config.tls_reloads[result as usize].inc();
    }

    /// Changes how many client_ids get a series of their own (a reload of
    /// `metrics.max_client_ids`): ids already counted keep theirs; past the new number, new ids
    /// count as `other`.
    pub fn set_max_client_ids(&self, max: usize) {
        self.clients
            .max
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a deprecated query-parameter credential removed from a URL.
    pub fn query_credential(&self, kind: CredentialKind) {
        self.query_credentials[kind as usize].inc();
    }

    /// Records a response sent: its route class, status and time to the response head.
    pub fn response(&self, route: RouteClass, status: http::StatusCode, elapsed: Duration) {
        let code = status.as_u16();
        let counter = if (100..CACHED_STATUS_END).contains(&code) {
            self.response_children[route as usize][usize::from(code - 100)].get_or_init(|| {
                self.responses
                    .with_label_values(&[route.as_str(), status.as_str()])
            })
        } else {
            &self
                .responses
                .with_label_values(&[route.as_str(), status.as_str()])
        };
        counter.inc();
        self.request_duration[route as usize].observe(elapsed.as_secs_f64());
    }

    /// Records the time the upstream took to answer with a response head; the upstream
    /// answered, so its consecutive failures are back to 0.
    pub fn upstream_answered(&self, route: RouteClass, elapsed: Duration) {
        self.upstream_duration[route as usize].observe(elapsed.as_secs_f64());
        // A read first: the common case writes nothing to a line every worker shares.
        if self.upstream_consecutive_failures.get() != 0 {
            self.upstream_consecutive_failures.set(0);
        }
    }

    /// Counts a failed upstream exchange, and one more consecutive failure.
    pub fn upstream_failure(&self, kind: FailureKind) {
        self.upstream_failures[kind as usize].inc();
        self.upstream_consecutive_failures.inc();
    }

    /// Counts a 422 turned into 404 for a legacy client.
    pub fn status_compat(&self, op: Operation) {
        if let Some(i) = op.legacy_index() {
            self.status_compat[i].inc();
        }
    }

    /// Counts a failure charged to the quota of `class` and `kind`.
    pub fn failed_check(&self, class: FailureClass, kind: KeyKind) {
        self.failed_checks[quota_index(class, kind)].inc();
    }

    /// Counts a 429 answered by the quota of `class` and `kind`.
    pub fn failed_check_rejected(&self, class: FailureClass, kind: KeyKind) {
        self.failed_checks_rejected[quota_index(class, kind)].inc();
    }

    /// Counts a call shadow mode forwarded that enforce mode would have answered 429.
    pub fn failed_check_shadow(&self, class: FailureClass, kind: KeyKind) {
        self.failed_checks_shadow[quota_index(class, kind)].inc();
    }

    /// Counts a failure the quota of `class` and `kind` could not track (its table was full).
    pub fn failed_check_untracked(&self, class: FailureClass, kind: KeyKind) {
        self.failed_checks_untracked[quota_index(class, kind)].inc();
    }

    /// Counts a call held at the gate until another call of its key finished.
    pub fn failed_check_waited(&self) {
        self.failed_checks_waits.inc();
    }

    /// Sets how many keys each quota tracks and how many credentials are verified.
    pub fn failed_checks_tracked(&self, t: Tracked) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        for (gauge, v) in self.failed_checks_tracked.iter().zip(t.quotas) {
            gauge.set(n(v));
        }
        self.verified_credentials.set(n(t.verified));
    }

    /// Counts a request that did not end with its answer handed to the client.
    pub fn interrupted(&self, route: RouteClass, how: Interruption) {
        self.interrupted[route as usize][how as usize].inc();
    }

    /// Marks an exchange seen through after its client went away, until the guard drops.
    pub fn detached_started(&self) -> GaugeGuard {
        GaugeGuard::new(&self.detached)
    }

    /// Counts an exchange that could not be seen through after its client went away.
    pub fn detached_refused(&self) {
        self.detached_refused.inc();
    }

    /// Marks a request in flight until the guard drops.
    pub fn request_started(&self) -> GaugeGuard {
        GaugeGuard::new(&self.in_flight)
    }

    /// Marks a proxy connection open until the guard drops.
    pub fn connection_opened(&self) -> GaugeGuard {
        GaugeGuard::new(&self.open_connections)
    }

    /// Counts a client connection closed at once because of a connection limit.
    pub fn connection_refused(&self, reason: Refusal) {
        self.connections_refused[reason as usize].inc();
    }

    /// Every registered metric in the Prometheus text format 0.0.4.
    ///
    /// # Errors
    /// [`MetricsError`] when a collector yields an unencodable family (not expected).
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)?;
        Ok(out)
    }

    /// The shared store's metrics, for [`crate::shared::Store::new`].
    pub fn shared_store(&self) -> SharedStoreMetrics {
        self.shared.clone()
    }

    /// The client_ids seen making deprecated calls, as JSON for `/legacy-clients`.
    pub fn legacy_clients_json(&self) -> Vec<u8> {
        self.clients.report_json()
    }

    /// The same report as an aligned text table, for `/legacy-clients?format=text`.
    pub fn legacy_clients_text(&self) -> String {
        self.clients.report_text()
    }
}

/// Position of a (class, key kind) pair in [`QUOTAS`]; a pair that is no quota (token failures
/// are never charged to an address) counts with the nearest one, the token quota.
fn quota_index(class: FailureClass, kind: KeyKind) -> usize {
    QUOTAS
        .iter()
        .position(|&q| q == (class, kind))
        .unwrap_or(QUOTAS.len() - 1)
}

/// Keeps a gauge incremented while alive.
#[derive(Debug)]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(g: &IntGauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Deprecated calls per client_id, bounded: the first `max` distinct ids get their own series
/// and report entry; the rest share `other`.
struct LegacyClients {
    max: std::sync::atomic::AtomicUsize,
    series: IntCounterVec,
    table: Mutex<ClientTable>,
}

struct ClientTable {
    by_id: HashMap<Box<str>, ClientEntry>,
    other: Option<ClientEntry>,
}

struct ClientEntry {
    calls: [u64; LEGACY_OPERATIONS.len()],
    outcomes: [[u64; CallOutcome::ALL.len()]; LEGACY_OPERATIONS.len()],
    agents: Vec<Box<str>>,
    first_seen: SystemTime,
    last_seen: SystemTime,
    /// This replica's series (`None` for an entry of the fleet's report).
    series: Option<IntCounter>,
    /// What of it the fleet's report has (`[shared]`; see `fleet`).
    flushed: fleet::Flushed,
}

/// One deprecated call, as the report records it.
struct Seen<'a> {
    op_index: usize,
    user_agent: Option<&'a str>,
    outcome: CallOutcome,
    now: SystemTime,
}

impl ClientEntry {
    fn new(series: Option<IntCounter>, now: SystemTime) -> Self {
        ClientEntry {
            calls: [0; LEGACY_OPERATIONS.len()],
            outcomes: [[0; CallOutcome::ALL.len()]; LEGACY_OPERATIONS.len()],
            agents: Vec::new(),
            first_seen: now,
            last_seen: now,
            series,
            flushed: fleet::Flushed::default(),
        }
    }

    fn record(&mut self, seen: &Seen<'_>) {
        self.calls[seen.op_index] += 1;
        self.outcomes[seen.op_index][seen.outcome as usize] += 1;
        self.last_seen = self.last_seen.max(seen.now);
        self.flushed.dirty = true;
        if let Some(s) = &self.series {
            s.inc();
        }
        if let Some(ua) = seen.user_agent
            && self.agents.len() < MAX_AGENTS
        {
            let ua = crate::report::shown(ua, MAX_AGENT_BYTES);
            if !self.agents.iter().any(|a| **a == *ua) {
                self.agents.push(ua.into());
            }
        }
    }

    fn advice(&self) -> Vec<AdviceReport> {
        let mut out: Vec<AdviceReport> = Vec::new();
        for a in self
            .agents
            .iter()
            .filter_map(|ua| crate::report::advice(ua))
        {
            if !out.iter().any(|o| o.advice == a.text) {
                out.push(AdviceReport {
                    library: a.library,
                    advice: a.text,
                    source: a.source,
                });
            }
        }
        out
    }
}

#[derive(Serialize)]
struct AdviceReport {
    library: &'static str,
    advice: String,
    source: &'static str,
}

#[derive(Serialize)]
struct ClientReport<'a> {
    client_id: &'a str,
    calls: HashMap<&'static str, u64>,
    total: u64,
    outcomes: HashMap<&'static str, HashMap<&'static str, u64>>,
    user_agents: &'a [Box<str>],
    advice: Vec<AdviceReport>,
    first_seen: String,
    last_seen: String,
}

#[derive(Serialize)]
struct Report<'a> {
    scope: &'static str,
    max_client_ids: usize,
    clients: Vec<ClientReport<'a>>,
    other: Option<ClientReport<'a>>,
}

/// One entry of the JSON report.
fn client_report<'a>(id: &'a str, e: &'a ClientEntry) -> ClientReport<'a> {
    ClientReport {
        client_id: id,
        calls: LEGACY_OPERATIONS
            .iter()
            .zip(e.calls)
            .map(|(op, n)| (op.as_str(), n))
            .collect(),
        total: e.calls.iter().sum(),
        outcomes: LEGACY_OPERATIONS
            .iter()
            .zip(&e.outcomes)
            .map(|(op, counts)| {
                let by = CallOutcome::ALL
                    .iter()
                    .zip(counts)
                    .map(|(o, n)| (o.as_str(), *n))
                    .collect();
                (op.as_str(), by)
            })
            .collect(),
        user_agents: &e.agents,
        advice: e.advice(),
        first_seen: humantime::format_rfc3339_seconds(e.first_seen).to_string(),
        last_seen: humantime::format_rfc3339_seconds(e.last_seen).to_string(),
    }
}

impl LegacyClients {
    fn new(series: IntCounterVec, max: usize) -> Self {
        LegacyClients {
            max: max.into(),
            series,
            table: Mutex::new(ClientTable {
                by_id: HashMap::new(),
                other: None,
            }),
        }
    }

    fn record(&self, client_id: &str, seen: &Seen<'_>) {
        let now = seen.now;
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = t.by_id.get_mut(client_id) {
            e.record(seen);
            return;
        }
        let admit = t.by_id.len() < self.max.load(std::sync::atomic::Ordering::Relaxed)
            && client_id.len() <= MAX_CLIENT_ID_BYTES
            && client_id != OTHER_CLIENT_ID;
        let entry = if admit {
            let series = self.series.with_label_values(&[client_id]);
            t.by_id
                .entry(client_id.into())
                .or_insert_with(|| ClientEntry::new(Some(series), now))
        } else {
            let series = &self.series;
            t.other.get_or_insert_with(|| {
                ClientEntry::new(Some(series.with_label_values(&[OTHER_CLIENT_ID])), now)
            })
        };
        entry.record(seen);
    }

    fn report_json(&self) -> Vec<u8> {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = t.by_id.iter().map(|(id, e)| (&**id, e)).collect();
        report_json(entries, t.other.as_ref(), self.max(), "replica")
    }

    fn report_text(&self) -> String {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = t.by_id.iter().map(|(id, e)| (&**id, e)).collect();
        report_text(entries, t.other.as_ref())
    }

    fn max(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The report as JSON: `scope` says whose calls it counts (`replica`: this one's since it
/// started; `fleet`: every replica's, from the shared store).
fn report_json<'a>(
    entries: Vec<(&'a str, &'a ClientEntry)>,
    other: Option<&'a ClientEntry>,
    max_client_ids: usize,
    scope: &'static str,
) -> Vec<u8> {
    let mut clients: Vec<_> = entries
        .into_iter()
        .map(|(id, e)| client_report(id, e))
        .collect();
    clients.sort_by(|a, b| b.total.cmp(&a.total).then(a.client_id.cmp(b.client_id)));
    let report = Report {
        scope,
        max_client_ids,
        clients,
        other: other.map(|e| client_report(OTHER_CLIENT_ID, e)),
    };
    serde_json::to_vec_pretty(&report).unwrap_or_default()
}

/// The report as an aligned text table.
fn report_text<'a>(
    mut entries: Vec<(&'a str, &'a ClientEntry)>,
    other: Option<&'a ClientEntry>,
) -> String {
    entries.sort_by(|a, b| {
        let total = |e: &ClientEntry| e.calls.iter().sum::<u64>();
        total(b.1).cmp(&total(a.1)).then(a.0.cmp(b.0))
    });
    if let Some(other) = other {
        entries.push((OTHER_CLIENT_ID, other));
    }
    let mut header: Vec<String> = vec!["client_id".into(), "calls".into()];
    header.extend(LEGACY_OPERATIONS.iter().map(|op| op.as_str().to_owned()));
    header.extend(["last_seen".into(), "user_agent".into(), "advice".into()]);
    let mut rows = vec![header];
    for (id, e) in entries {
        let mut row = vec![
            crate::report::shown(id, MAX_CLIENT_ID_BYTES),
            e.calls.iter().sum::<u64>().to_string(),
        ];
        row.extend(e.calls.iter().map(u64::to_string));
        row.push(humantime::format_rfc3339_seconds(e.last_seen).to_string());
        row.push(e.agents.first().map_or("-".into(), |a| a.to_string()));
        let advice = e.advice();
        row.push(match advice.first() {
            Some(a) => a.advice.clone(),
            None => "-".into(),
        });
        rows.push(row);
    }
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let last = row.len().saturating_sub(1);
        for (c, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if c < last {
                let pad = widths[c] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(max: usize) -> Metrics {
        Metrics::new(Registry::new(), max).unwrap()
    }

    fn line_value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn counts_show_up_with_their_labels() {
        let m = metrics(10);
        m.deprecated_call(
            Operation::Check,
            LegacyAction::Rewritten,
            Some("Iv1.a"),
            None,
            CallOutcome::Success,
        );
        m.deprecated_call(
            Operation::Check,
            LegacyAction::Rewritten,
            Some("Iv1.a"),
            None,
            CallOutcome::Success,
        );
        m.deprecated_call(
            Operation::RevokeGrant,
            LegacyAction::Rejected,
            Some("Iv1.b"),
            None,
            CallOutcome::Gateway,
        );
        m.response(
            RouteClass::Legacy,
            http::StatusCode::OK,
            Duration::from_millis(3),
        );
        m.response(
            RouteClass::Legacy,
            http::StatusCode::OK,
            Duration::from_millis(3),
        );
        m.response(
            RouteClass::PassThrough,
            http::StatusCode::from_u16(799).unwrap(),
            Duration::ZERO,
        );
        m.upstream_failure(FailureKind::Tls);
        m.query_credential(CredentialKind::AccessToken);
        let text = m.encode().unwrap();
        let v = |s: &str| line_value(&text, s).unwrap_or_else(|| panic!("{s} missing:\n{text}"));
        assert_eq!(
            v(
                "oauth_apps_gateway_deprecated_calls_total{action=\"rewritten\",operation=\"check\"}"
            ),
            2.0
        );
        assert_eq!(
            v(
                "oauth_apps_gateway_deprecated_calls_total{action=\"rejected\",operation=\"revoke_grant\"}"
            ),
            1.0
        );
        assert_eq!(
            v("oauth_apps_gateway_deprecated_calls_total{action=\"observed\",operation=\"reset\"}"),
            0.0
        );
        assert_eq!(
            v("oauth_apps_gateway_deprecated_calls_by_client_total{client_id=\"Iv1.a\"}"),
            2.0
        );
        assert_eq!(
            v("oauth_apps_gateway_responses_total{route=\"legacy\",status=\"200\"}"),
            2.0
        );
        assert_eq!(
            v("oauth_apps_gateway_responses_total{route=\"pass_through\",status=\"799\"}"),
            1.0
        );
        assert_eq!(
            v("oauth_apps_gateway_request_duration_seconds_count{route=\"legacy\"}"),
            2.0
        );
        assert_eq!(
            v("oauth_apps_gateway_upstream_failures_total{kind=\"tls\"}"),
            1.0
        );
        assert_eq!(
            v("oauth_apps_gateway_query_credentials_total{kind=\"access_token\"}"),
            1.0
        );
        assert_eq!(v("oauth_apps_gateway_build_info{version=\"0.1.0\"}"), 1.0);
    }

    #[test]
    fn client_ids_past_the_cap_share_other() {
        let m = metrics(2);
        for id in ["a", "b", "c", "d", "a", &"x".repeat(65), "other"] {
            m.deprecated_call(
                Operation::Reset,
                LegacyAction::Rewritten,
                Some(id),
                None,
                CallOutcome::Success,
            );
        }
        let text = m.encode().unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("oauth_apps_gateway_deprecated_calls_by_client_total{"))
            .count();
        assert_eq!(series, 3, "{text}");
        assert_eq!(
            line_value(
                &text,
                "oauth_apps_gateway_deprecated_calls_by_client_total{client_id=\"other\"}"
            ),
            Some(4.0)
        );
        let report: serde_json::Value = serde_json::from_slice(&m.legacy_clients_json()).unwrap();
        assert_eq!(report["clients"].as_array().unwrap().len(), 2);
        assert_eq!(report["clients"][0]["client_id"], "a");
        assert_eq!(report["clients"][0]["calls"]["reset"], 2);
        assert_eq!(report["other"]["total"], 4);
    }

    #[test]
    fn gauge_guards_restore_the_gauge() {
        let m = metrics(1);
        let g1 = m.request_started();
        let g2 = m.connection_opened();
        let text = m.encode().unwrap();
        assert_eq!(
            line_value(&text, "oauth_apps_gateway_in_flight_requests"),
            Some(1.0)
        );
        drop((g1, g2));
        let text = m.encode().unwrap();
        assert_eq!(
            line_value(&text, "oauth_apps_gateway_in_flight_requests"),
            Some(0.0)
        );
        assert_eq!(
            line_value(&text, "oauth_apps_gateway_open_connections"),
            Some(0.0)
        );
    }
}
