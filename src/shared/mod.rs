//! State shared by replicas in one Redis (`[shared]`): the failed-check quotas and the
//! legacy-caller report. The only user of the redis crate (redis-rs: a multiplexed connection
//! behind its `ConnectionManager`, which reconnects on its own).
//!
//! Every call on the request path is one atomic Lua script ([`scripts`]) bounded by
//! `shared.timeout`. When a call fails or times out the store is marked *down*: from then on
//! callers go on without it at once (the limiter falls back as `shared.on_redis_error` says)
//! and a probe asks Redis every [`PROBE_INTERVAL`] until it answers, so an outage costs each
//! request at most one timeout, and recovery needs nobody. Being down is logged (at most once
//! per [`WARN_EVERY`]) and shown by the gauge `shared_store_degraded`.
//!
//! Redis Cluster is not supported: a quota script touches the keys of several callers at once.

mod scripts;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation};
use tokio::time::Instant;

use crate::config::{OnRedisError, SharedConfig};
use crate::metrics::SharedStoreMetrics;

/// How often a down store is asked whether it answers again.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The shortest time between two "Redis unreachable" log lines.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The timeout of calls off the request path (the report's flush and read, the probe's first
/// contact), in seconds: they carry more data and nobody waits on them but an operator.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `shared.redis_url` (or the password file, or the CA file) is not usable.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// The config key.
        key: &'static str,
        /// Why, in words (never the password).
        reason: String,
    },
}

/// Redis did not answer in time, or answered with an error: go on without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// The script calls of the store, as metric labels say them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// The gate before forwarding ([`scripts::ADMIT`]).
    Admit = 0,
    /// The charge after the answer ([`scripts::SETTLE`]).
    Settle = 1,
    /// A flush of the legacy-caller report.
    ReportAdd = 2,
    /// A read of the fleet's legacy-caller report.
    ReportRead = 3,
    /// The probe of a down store, and the first contact (`PING`, the hashing key).
    Probe = 4,
}

impl Call {
    /// Every call, in label order.
    pub const ALL: [Call; 5] = [
        Call::Admit,
        Call::Settle,
        Call::ReportAdd,
        Call::ReportRead,
        Call::Probe,
    ];

    /// The call's name for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Admit => "admit",
            Call::Settle => "settle",
            Call::ReportAdd => "report_add",
            Call::ReportRead => "report_read",
            Call::Probe => "probe",
        }
    }
}

/// One quota's parameters for the scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSpec {
    /// One replenish interval, in microseconds.
    pub period_us: u64,
    /// Failures a key may make back to back.
    pub burst: u32,
}

/// The Redis keys of one call's quotas, in the scripts' `KEYS` order (see [`scripts`]).
#[derive(Debug, Clone)]
pub struct QuotaKeys(pub [String; 7]);

/// What the admit script decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// One slot reserved in each quota held.
    Reserved,
    /// Quota `0..3` (credential, client_ip, token) is spent; it may fail again after the wait.
    Spent(usize, Duration),
    /// Quota `0..3` has as many reservations in flight as failures left.
    Busy(usize),
}

/// The admit script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmitAnswer {
    /// Whether the credential is verified (fleet-wide).
    pub verified: bool,
    /// The decision.
    pub admitted: Admitted,
}

/// What a settled call teaches the quotas, as the settle script takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A credential failure.
    Credential,
    /// A token failure.
    Token,
    /// Both: the answer will never be known (the worst it could have been).
    Both,
    /// A 2xx.
    Accepted,
    /// Nothing learnt; only the reservation is given back.
    Neutral,
}

impl Outcome {
    fn code(self) -> &'static str {
        match self {
            Outcome::Credential => "c",
            Outcome::Token => "t",
            Outcome::Both => "ct",
            Outcome::Accepted => "a",
            Outcome::Neutral => "n",
        }
    }
}

/// What the settle script did with each quota (credential, client_ip, token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charged {
    /// Not charged.
    No,
    /// Charged; the key may still fail.
    Yes,
    /// Charged, and the key's quota is now spent.
    Spent,
}

/// The store: one Redis connection (multiplexed, reconnecting), the scripts, and whether Redis
/// answers.
pub struct Store {
    conn: ConnectionManager,
    prefix: Box<str>,
    timeout: Duration,
    on_error: OnRedisError,
    url: String,
    admit: Script,
    settle: Script,
    report_add: Script,
    report_read: Script,
    hash_key: Script,
    up: AtomicBool,
    warnings: Mutex<Warnings>,
    metrics: SharedStoreMetrics,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Sets up the connection (established lazily, on the first call) from `[shared]`, reading
    /// the password file and the CA file. Must be called inside a tokio runtime, which then runs
    /// the connection for the life of the process. The store starts *down*; [`Store::probe`]
    /// makes the first contact.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] naming the key when the URL does not parse, or a file cannot be
    /// read or holds no certificate.
    pub fn new(cfg: &SharedConfig, metrics: SharedStoreMetrics) -> Result<Self, StoreError> {
        let client = client(cfg)?;
        // One attempt per call: the caller's timeout bounds every wait, and a down store is
        // probed rather than retried on the request path.
        let manager = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(PROBE_INTERVAL)
            .set_connection_timeout(Some(BACKGROUND_TIMEOUT))
            .set_response_timeout(Some(BACKGROUND_TIMEOUT));
        let conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(|e| {
            StoreError::Invalid {
                key: "shared.redis_url",
                reason: format!("{}: {}", cfg.redis_url.redacted(), redis_kind(&e)),
            }
        })?;
        metrics.degraded(true);
        Ok(Store {
            conn,
            prefix: cfg.key_prefix.clone().into(),
            timeout: cfg.timeout,
            on_error: cfg.on_redis_error,
            url: cfg.redis_url.redacted(),
            admit: Script::new(scripts::ADMIT),
            settle: Script::new(scripts::SETTLE),
            report_add: Script::new(scripts::REPORT_ADD),
            report_read: Script::new(scripts::REPORT_READ),
            hash_key: Script::new(
                "redis.call('SET', KEYS[1], ARGV[1], 'NX') return redis.call('GET', KEYS[1])",
            ),
            up: AtomicBool::new(false),
            warnings: Mutex::new(Warnings::default()),
            metrics,
        })
    }

    /// What the gate does while Redis is down (`shared.on_redis_error`).
    pub fn on_error(&self) -> OnRedisError {
        self.on_error
    }

    /// Whether the last call (or probe) was answered.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// `name` under the key prefix.
    pub fn key(&self, name: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + name.len());
        k.push_str(&self.prefix);
        k.push_str(name);
        k
    }

    /// The keys of one call's quotas: `credential` and `client_ip` are keyed hashes in hex.
    pub fn quota_keys(&self, credential: &str, client_ip: &str) -> QuotaKeys {
        QuotaKeys([
            self.key(&format!("verified:{credential}")),
            self.key(&format!("gcra:credential:{credential}")),
            self.key(&format!("gcra:client_ip:{client_ip}")),
            self.key(&format!("gcra:token:{credential}")),
            self.key(&format!("flight:credential:{credential}")),
            self.key(&format!("flight:client_ip:{client_ip}")),
            self.key(&format!("flight:token:{credential}")),
        ])
    }

    /// The fleet's hashing key for credentials and addresses: the one already in Redis, or
    /// `candidate` when there is none yet (the first replica's own random key wins; `SET NX`).
    /// Anyone who can read Redis can read it: keep Redis as private as the gateway's own memory.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis does not answer within [`BACKGROUND_TIMEOUT`].
    pub async fn hashing_key(&self, candidate: &[u8]) -> Result<Vec<u8>, Unavailable> {
        let mut inv = self.hash_key.prepare_invoke();
        inv.key(self.key("hash-key")).arg(candidate);
        self.run(Call::Probe, &inv, BACKGROUND_TIMEOUT, true).await
    }

    /// The gate: one round trip, bounded by `shared.timeout`.
    ///
    /// `held`: the call is held to the credential and client_ip quotas unless its credential is
    /// verified; `token`: to the token quota. `reservation`: an id unique to this call; `life`:
    /// how long its reservation lasts if it is never given back (its replica died).
    ///
    /// # Errors
    /// [`Unavailable`] when the store is down, Redis errs or the timeout passes.
    pub async fn admit(
        &self,
        keys: &QuotaKeys,
        held: bool,
        token: bool,
        specs: &[QuotaSpec; 3],
        reservation: &str,
        life: Duration,
    ) -> Result<AdmitAnswer, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut inv = self.admit.prepare_invoke();
        for k in &keys.0 {
            inv.key(k);
        }
        inv.arg(u8::from(held)).arg(u8::from(token));
        for s in specs {
            inv.arg(s.period_us).arg(s.burst);
        }
        inv.arg(reservation)
            .arg(u64::try_from(life.as_millis()).unwrap_or(u64::MAX).max(1));
        let (verified, outcome, quota, wait_us): (u8, u8, usize, u64) =
            self.run(Call::Admit, &inv, self.timeout, false).await?;
        let quota = quota.saturating_sub(1).min(2);
        Ok(AdmitAnswer {
            verified: verified == 1,
            admitted: match outcome {
                0 => Admitted::Reserved,
                1 => Admitted::Spent(quota, Duration::from_micros(wait_us)),
                _ => Admitted::Busy(quota),
            },
        })
    }

    /// After the answer: gives back `reservation` (when not empty) and records `outcome`. Run
    /// off the request path, bounded by [`BACKGROUND_TIMEOUT`].
    ///
    /// # Errors
    /// [`Unavailable`] when the store is down, Redis errs or the timeout passes.
    pub async fn settle(
        &self,
        keys: &QuotaKeys,
        outcome: Outcome,
        basic: bool,
        specs: &[QuotaSpec; 3],
        reservation: &str,
        verified_for: Duration,
    ) -> Result<[Charged; 3], Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut inv = self.settle.prepare_invoke();
        for k in &keys.0 {
            inv.key(k);
        }
        inv.arg(outcome.code()).arg(u8::from(basic));
        for s in specs {
            inv.arg(s.period_us).arg(s.burst);
        }
        inv.arg(reservation)
            .arg(u64::try_from(verified_for.as_millis()).unwrap_or(u64::MAX));
        // Off the request path (a task of its own): the longer timeout, so a slow moment does
        // not lose a charge.
        let out: [u8; 3] = self
            .run(Call::Settle, &inv, BACKGROUND_TIMEOUT, false)
            .await?;
        Ok(out.map(|c| match c {
            0 => Charged::No,
            1 => Charged::Yes,
            _ => Charged::Spent,
        }))
    }

    /// Adds a batch of the legacy-caller report (JSON, see [`scripts::REPORT_ADD`]).
    ///
    /// # Errors
    /// [`Unavailable`] when the store is down, Redis errs or [`BACKGROUND_TIMEOUT`] passes.
    pub async fn report_add(
        &self,
        batch_json: &str,
        max_client_ids: usize,
        keep: Duration,
        max_agents: usize,
    ) -> Result<(), Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut inv = self.report_add.prepare_invoke();
        inv.key(self.key("report:clients"))
            .key(self.key("report:other"))
            .arg(&*self.prefix)
            .arg(max_client_ids)
            .arg(keep.as_secs().max(1))
            .arg(max_agents)
            .arg(batch_json);
        let _: u64 = self
            .run(Call::ReportAdd, &inv, BACKGROUND_TIMEOUT, false)
            .await?;
        Ok(())
    }

    /// The fleet's legacy-caller report as JSON (see [`scripts::REPORT_READ`]).
    ///
    /// # Errors
    /// [`Unavailable`] when the store is down, Redis errs or [`BACKGROUND_TIMEOUT`] passes.
    pub async fn report_read(
        &self,
        max_client_ids: usize,
        keep: Duration,
    ) -> Result<String, Unavailable> {
        if !self.is_up() {
            return Err(Unavailable);
        }
        let mut inv = self.report_read.prepare_invoke();
        inv.key(self.key("report:clients"))
            .key(self.key("report:other"))
            .arg(&*self.prefix)
            .arg(max_client_ids)
            .arg(keep.as_secs().max(1));
        self.run(Call::ReportRead, &inv, BACKGROUND_TIMEOUT, false)
            .await
    }

    /// Asks a down store whether Redis answers (`PING`); marks it up when it does.
    pub async fn probe(&self) -> bool {
        let mut conn = self.conn.clone();
        let start = Instant::now();
        let ping = redis::cmd("PING");
        let answer =
            tokio::time::timeout(BACKGROUND_TIMEOUT, ping.query_async::<String>(&mut conn)).await;
        let ok = matches!(answer, Ok(Ok(_)));
        self.metrics.call(Call::Probe, start.elapsed(), ok);
        if ok {
            self.mark_up();
        }
        ok
    }

    /// Runs one script with `timeout`. No answer in time, or a lost connection, marks the store
    /// down; an error Redis answered (out of memory, a script error) fails only this call. An
    /// answer marks a down store up only for `probe` (the probe's own call).
    async fn run<T: redis::FromRedisValue>(
        &self,
        call: Call,
        inv: &ScriptInvocation<'_>,
        timeout: Duration,
        probe: bool,
    ) -> Result<T, Unavailable> {
        if !probe && !self.is_up() {
            return Err(Unavailable);
        }
        let mut conn = self.conn.clone();
        let start = Instant::now();
        let answer = tokio::time::timeout(timeout, inv.invoke_async::<T>(&mut conn)).await;
        let elapsed = start.elapsed();
        self.metrics
            .call(call, elapsed, matches!(answer, Ok(Ok(_))));
        match answer {
            Ok(Ok(v)) => {
                if probe {
                    self.mark_up();
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                let unreachable = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error();
                self.failed(call, &redis_failure(&e), unreachable);
                Err(Unavailable)
            }
            Err(_) => {
                let failure = format!("no answer within {}", humantime::format_duration(timeout));
                self.failed(call, &failure, true);
                Err(Unavailable)
            }
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.degraded(false);
            let mut w = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
            // Said once for each warning said: a flapping store writes no more than the
            // warnings' rate.
            if std::mem::take(&mut w.unanswered) {
                tracing::info!(redis = %self.url, "Redis answers again: failed-check quotas and the legacy-caller report are shared again");
            }
        }
    }

    /// A call failed; `down`: Redis is unreachable (marks the store down until a probe
    /// answers). Logged at most once per [`WARN_EVERY`].
    fn failed(&self, call: Call, failure: &str, down: bool) {
        if down {
            self.up.store(false, Ordering::Relaxed);
            self.metrics.degraded(true);
        }
        let now = Instant::now();
        let mut w = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
        if w.last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return;
        }
        w.last = Some(now);
        w.unanswered |= down;
        let fallback = match self.on_error {
            OnRedisError::Local => "each replica limits failed checks on its own",
            OnRedisError::Allow => "failed checks are not limited",
        };
        match down {
            true => tracing::warn!(
                redis = %self.url,
                call = call.as_str(),
                failure,
                on_redis_error = self.on_error.as_str(),
                "Redis unreachable: {fallback} until it answers (probed every {} ms)",
                PROBE_INTERVAL.as_millis()
            ),
            false => tracing::warn!(
                redis = %self.url,
                call = call.as_str(),
                failure,
                on_redis_error = self.on_error.as_str(),
                "Redis refused a call: for this call, {fallback}"
            ),
        }
    }
}

/// The store's warnings: when the last was written, and whether one said Redis was unreachable
/// and no line has said since that it answers.
#[derive(Debug, Default)]
struct Warnings {
    last: Option<Instant>,
    unanswered: bool,
}

/// Checks `[shared]` as far as it can without connecting: the URL parses, the password and CA
/// files are read (`--check-config`).
///
/// # Errors
/// As [`Store::new`].
pub fn check(cfg: &SharedConfig) -> Result<(), StoreError> {
    client(cfg).map(drop)
}

/// The Redis client `[shared]` describes (no connection yet).
fn client(cfg: &SharedConfig) -> Result<redis::Client, StoreError> {
    let invalid = |key, reason: String| StoreError::Invalid { key, reason };
    let mut info: redis::ConnectionInfo =
        redis::IntoConnectionInfo::into_connection_info(cfg.redis_url.expose()).map_err(|e| {
            invalid(
                "shared.redis_url",
                format!("{}: {}", cfg.redis_url.redacted(), redis_kind(&e)),
            )
        })?;
    if let Some(file) = &cfg.redis_password_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            invalid(
                "shared.redis_password_file",
                format!("{}: {e}", file.display()),
            )
        })?;
        let password = text.lines().next().unwrap_or_default().trim_end();
        if password.is_empty() {
            return Err(invalid(
                "shared.redis_password_file",
                format!("{}: the first line is empty", file.display()),
            ));
        }
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    match &cfg.redis_ca_file {
        Some(file) => {
            let pem = std::fs::read(file)
                .map_err(|e| invalid("shared.redis_ca_file", format!("{}: {e}", file.display())))?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(|e| {
                invalid(
                    "shared.redis_ca_file",
                    format!("{}: {}", file.display(), redis_kind(&e)),
                )
            })
        }
        None => redis::Client::open(info).map_err(|e| {
            invalid(
                "shared.redis_url",
                format!("{}: {}", cfg.redis_url.redacted(), redis_kind(&e)),
            )
        }),
    }
}

/// A Redis error in words, without anything the server echoed back (a script error could quote
/// an argument).
fn redis_failure(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_connection_dropped() {
        "connection dropped".into()
    } else if e.is_io_error() {
        "I/O error".into()
    } else {
        format!("Redis error ({})", redis_kind(e))
    }
}

/// The kind of a Redis error in words, without its detail (which may quote the URL).
fn redis_kind(e: &redis::RedisError) -> String {
    let kind = format!("{:?}", e.kind());
    match e.code() {
        Some(code) => format!("{kind}, {code}"),
        None => kind,
    }
}
