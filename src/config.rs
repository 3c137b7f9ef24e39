//! The validated configuration: typed values (`SocketAddr`, `Uri`, `Duration`) built once from
//! config.toml, so nothing after loading re-parses a string. Loading is two stages: serde reads
//! `raw::RawConfig` (unknown keys rejected), then `Config::from_raw` checks every value. Every
//! error names the dotted key, the value found, what was expected and where the value is
//! (`error::ConfigError`). No I/O beyond reading the file; runtime objects (listeners, TLS,
//! clients) are built from this by `app`.

mod error;
mod raw;

pub use error::{ConfigError, Location};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Uri};
use tracing::level_filters::LevelFilter;

use raw::RawConfig;

/// The whole validated configuration. Plain data: cheap to clone, safe to rebuild on reload.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`: the proxy listener.
    pub server: ServerConfig,
    /// `[upstream]`: where calls are forwarded.
    pub upstream: UpstreamConfig,
    /// `[migration]`: what is done with legacy calls.
    pub migration: MigrationConfig,
    /// `[admin]`: the admin listener (metrics, health, legacy-client report).
    pub admin: AdminConfig,
    /// `[metrics]`: Prometheus series limits.
    pub metrics: MetricsConfig,
    /// `[failed_checks]`: the limiter of failed token checks.
    pub failed_checks: FailedChecksConfig,
    /// `[shared]`: state shared by replicas in Redis; `None` (no `shared.redis_url`) keeps
    /// every replica's state its own.
    pub shared: Option<SharedConfig>,
    /// `[log]`: tracing output.
    pub log: LogConfig,
}

/// `[server]`: the proxy listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address the proxy listens on (`server.listen`).
    pub listen: SocketAddr,
    /// Longest wait for a complete HTTP/1 request head, from the first byte (`server.header_read_timeout`).
    pub header_read_timeout: Duration,
    /// Longest a whole upstream exchange may take, from forwarding the request to the last byte
    /// of the response body (`server.request_timeout`). A 504 is answered when the response
    /// head has not arrived by then; a body still streaming is cut.
    pub request_timeout: Duration,
    /// Largest request body forwarded, in bytes (`server.max_request_body_bytes`); larger gets 413.
    pub max_request_body_bytes: u64,
    /// Longest wait for in-flight requests after SIGTERM/SIGINT (`server.shutdown_grace`).
    pub shutdown_grace: Duration,
    /// After SIGTERM/SIGINT, how long the gateway keeps accepting and serving while `/readyz`
    /// already answers 503, before the drain starts (`server.shutdown_delay`, 0 by default):
    /// time for a load balancer or Kubernetes to take it out of rotation. A second signal ends
    /// the delay.
    pub shutdown_delay: Duration,
    /// Calls to the OAuth Applications API seen through to the upstream's answer after their
    /// client went away, at most at once (`server.max_detached_exchanges`). Past it, such a call
    /// is dropped at once and charged as a failure of each quota it was held to.
    pub max_detached_exchanges: usize,
    /// Worker threads serving client connections (`server.worker_threads`), each a
    /// single-threaded runtime with its own upstream pool; `None`: one per CPU the process may
    /// run on, at most 64. From 1 to 1024.
    pub worker_threads: Option<usize>,
    /// A client connection with no request in flight this long is closed gracefully
    /// (`server.idle_timeout`; HTTP/2: GOAWAY, RFC 9113 §6.8). HTTP/1.1 keep-alive connections
    /// are also closed by `header_read_timeout` while they wait for the next request head.
    pub idle_timeout: Duration,
    /// Longest wait for a request body of at most 64 KiB, read completely before anything is
    /// sent upstream (`server.body_read_timeout`); past it the client gets 408 and nothing was
    /// forwarded.
    pub body_read_timeout: Duration,
    /// Longest time a response may wait for the client to take its next part
    /// (`server.send_timeout`): a client that reads nothing for this long while a response is
    /// being sent is cut off (HTTP/1.1: the connection is closed; HTTP/2: the connection, every
    /// stream), and the upstream connection behind it released. nginx's `send_timeout`.
    pub send_timeout: Duration,
    /// Memory for request bodies being read before forwarding, in bytes, for all clients
    /// together (`server.max_buffered_body_bytes`); past it a body gets 503. From 131,072 to
    /// 4 GiB.
    pub max_buffered_body_bytes: usize,
    /// The same for one client address, an IPv6 address by its /64
    /// (`server.max_buffered_body_bytes_per_ip`); past it a body gets 429. From 131,072 to
    /// `max_buffered_body_bytes`.
    pub max_buffered_body_bytes_per_ip: usize,
    /// Client connections open at once on the proxy listener (`server.max_connections`); past
    /// it a new connection is closed at once. From 1 to 1,000,000.
    pub max_connections: usize,
    /// Client connections open at once from one TCP peer address, an IPv6 address by its /64
    /// (`server.max_connections_per_ip`); past it a new connection from that address is closed
    /// at once. From 1 to `max_connections`.
    pub max_connections_per_ip: usize,
    /// Largest request head, in bytes (`server.max_request_head_bytes`): HTTP/1.1 request line
    /// and fields, HTTP/2 header list. Past it: 431 (RFC 6585 §5). From 8192 to 1 MiB.
    pub max_request_head_bytes: usize,
    /// Most header fields in an HTTP/1.1 request (`server.max_request_headers`); past it: 431.
    /// From 1 to 1000.
    pub max_request_headers: usize,
    /// Streams a client may open at once on one HTTP/2 connection
    /// (`server.http2_max_concurrent_streams`, RFC 9113 §6.5.2). From 1 to 1000.
    pub http2_max_concurrent_streams: u32,
    /// Inbound TLS (`server.tls_cert_file`, `server.tls_key_file`): when set, the proxy
    /// listener speaks HTTPS only (ALPN h2 and http/1.1).
    pub tls: Option<TlsFiles>,
    /// Longest a client may take to complete its TLS handshake, in seconds, counted from its
    /// first byte (`server.tls_handshake_timeout`).
    pub tls_handshake_timeout: Duration,
}

/// The PEM files of the proxy listener's certificate. Relative paths in the file are resolved
/// against the config file's directory by [`Config::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`server.tls_cert_file`).
    pub cert: PathBuf,
    /// Its private key: PKCS#8, PKCS#1 or SEC1 (`server.tls_key_file`).
    pub key: PathBuf,
}

/// `[upstream]`: where calls are forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Scheme and authority of the upstream (`upstream.url`), `http` or `https`, no path.
    pub url: Uri,
    /// Extra PEM CA bundle trusted besides the webpki roots (`upstream.ca_file`), e.g. the
    /// private CA of a GitHub Enterprise Server.
    pub ca_file: Option<PathBuf>,
    /// Longest wait for a TCP connection to the upstream (`upstream.connect_timeout`).
    pub connect_timeout: Duration,
    /// Idle keep-alive connections kept to the upstream, in all, shared out between the
    /// worker threads (`upstream.pool_max_idle_per_host`). Below the number of requests in
    /// flight at once, the pool closes and reopens connections under load.
    pub pool_max_idle_per_host: usize,
}

/// `[migration]`: what is done with legacy calls.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// The mode of each legacy operation (`migration.mode`, overridden per operation by
    /// `[migration.operations]`).
    pub modes: OperationModes,
    /// Whether a 422 answered to a rewritten call reaches the legacy client as 404
    /// (`migration.status_compat`): the legacy contract never lists 422 and promises 404 for an
    /// invalid token (GitHub REST: Check an authorization, Reset an authorization).
    pub status_compat: bool,
    /// Whether responses to legacy calls carry `Deprecation`, `Link` and `Sunset`
    /// (`migration.deprecation_headers`).
    pub deprecation_headers: bool,
    /// Dates and link those headers carry.
    pub deprecation: Deprecation,
    /// Scheduled brownouts (`[[migration.brownouts]]`): windows in which legacy operations are
    /// answered as in mode `reject`, whatever their mode, so app owners notice before the
    /// removal (as GitHub did before removing these endpoints on 2021-05-05).
    pub brownouts: Vec<Brownout>,
    /// Media type added to `Accept` on rewritten calls (`migration.preview_accept`); `None` when
    /// the key is the empty string. GitHub Enterprise Server 2.20 requires
    /// `application/vnd.github.doctor-strange-preview+json` (GitHub REST: API previews).
    pub preview_accept: Option<HeaderValue>,
}

/// What the gateway does with one legacy operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rewrite into the replacement form and forward.
    Rewrite,
    /// Forward unchanged (for an upstream that still serves the legacy form, such as GitHub
    /// Enterprise Server up to 3.1) and count it.
    Observe,
    /// Answer 410 Gone from the gateway, naming the replacement; never forwarded.
    Reject,
}

impl Mode {
    /// The mode's name as written in the config file and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Rewrite => "rewrite",
            Mode::Observe => "observe",
            Mode::Reject => "reject",
        }
    }
}

/// The mode of each legacy operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationModes {
    /// Legacy `GET .../tokens/{t}`.
    pub check: Mode,
    /// Legacy `POST .../tokens/{t}`.
    pub reset: Mode,
    /// Legacy `DELETE .../tokens/{t}`.
    pub revoke_token: Mode,
    /// Legacy `DELETE .../grants/{t}`.
    pub revoke_grant: Mode,
    /// Legacy `DELETE .../tokens` (revoke every token; removed by GitHub, no replacement):
    /// `rewrite` and `reject` both answer 410, `observe` forwards it.
    pub revoke_all: Mode,
}

/// One brownout window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brownout {
    /// When it starts (inclusive).
    pub start: SystemTime,
    /// When it ends (exclusive); after `start`.
    pub end: SystemTime,
    /// The legacy operations it switches off (all of them unless `operations` names some).
    pub operations: OperationSet,
    /// `true`: answer 503 with `Retry-After` until `end`; `false`: answer 410.
    pub unavailable: bool,
}

/// A set of legacy operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationSet {
    /// `check`.
    pub check: bool,
    /// `reset`.
    pub reset: bool,
    /// `revoke_token`.
    pub revoke_token: bool,
    /// `revoke_grant`.
    pub revoke_grant: bool,
    /// `revoke_all`.
    pub revoke_all: bool,
}

impl OperationSet {
    /// Every legacy operation.
    pub const ALL: OperationSet = OperationSet {
        check: true,
        reset: true,
        revoke_token: true,
        revoke_grant: true,
        revoke_all: true,
    };

    fn intersects(&self, o: &OperationSet) -> bool {
        (self.check && o.check)
            || (self.reset && o.reset)
            || (self.revoke_token && o.revoke_token)
            || (self.revoke_grant && o.revoke_grant)
            || (self.revoke_all && o.revoke_all)
    }
}

/// The deprecation metadata sent on responses to legacy calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprecation {
    /// When the legacy endpoints were deprecated (`migration.deprecation_date`, default
    /// 2020-02-14T00:00:00Z, GitHub's announcement); sent as `Deprecation: @<unix seconds>`
    /// (RFC 9745 §2).
    pub date: SystemTime,
    /// Where the deprecation is explained (`migration.deprecation_link`); sent as
    /// `Link: <...>; rel="deprecation"; type="text/html"` (RFC 9745 §3).
    pub link: Uri,
    /// When the legacy endpoints stop working (`migration.sunset_date`); sent as
    /// `Sunset: <IMF-fixdate>` (RFC 8594) when set. Never before `date`.
    pub sunset: Option<SystemTime>,
}

/// `[admin]`: the admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the admin listener (`admin.listen`), separate from the proxy listener.
    pub listen: SocketAddr,
}

/// `[metrics]`: Prometheus series limits.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Distinct client_ids that get their own series and report entry
    /// (`metrics.max_client_ids`); later ones count under `client_id="other"`.
    pub max_client_ids: usize,
}

/// `[failed_checks]`: GCRA quotas on failed calls to the OAuth Applications API, keyed to the
/// caller. GitHub lets the token-check endpoint be called "without exceeding the normal rate
/// limits for failed login attempts" (GitHub REST: Check a token), so the gateway limits failures
/// itself: credential failures (401) per credential and per client address, token failures (404
/// or 422 to a token operation) per credential.
#[derive(Debug, Clone)]
pub struct FailedChecksConfig {
    /// Whether failures are limited at all (`failed_checks.enabled`).
    pub enabled: bool,
    /// Refuse, or only report, what a spent quota would refuse (`failed_checks.mode`).
    pub mode: FailedChecksMode,
    /// Credential failures per credential (`failed_checks.credential_burst`,
    /// `failed_checks.credential_replenish`).
    pub credential: QuotaConfig,
    /// Credential failures per client address (`failed_checks.client_ip_burst`,
    /// `failed_checks.client_ip_replenish`).
    pub client_ip: QuotaConfig,
    /// Token failures per credential (`failed_checks.token_burst`,
    /// `failed_checks.token_replenish`). The default, a burst of 5,000 and one more every 720 ms
    /// (5,000 per hour), is no tighter than GitHub's primary rate limit for an app (GitHub REST:
    /// Rate limits for the REST API), so a legitimate job meets GitHub's limit first.
    pub token: QuotaConfig,
    /// Keys tracked per quota, at most (`failed_checks.max_tracked_keys`); a key that first fails
    /// while its table is full is not tracked (and counted as untracked).
    pub max_tracked_keys: usize,
    /// Peers whose `X-Forwarded-For` is believed (`failed_checks.trusted_proxies`): CIDRs, or
    /// single addresses.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// One GCRA quota: `burst` failures back to back, then one more per `replenish`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaConfig {
    /// Failures a key may make back to back, at least 1.
    pub burst: u32,
    /// Time to regain one failure, greater than zero.
    pub replenish: Duration,
}

/// What the failed-check limiter does with a request one of whose keys is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedChecksMode {
    /// Answer 429 with `Retry-After`; the request never reaches the upstream.
    Enforce,
    /// Forward it, and count and log that it would have been answered 429 (Envoy's rate-limit
    /// shadow mode), so quotas can be sized on real traffic before they are enforced.
    Shadow,
}

impl FailedChecksMode {
    /// The mode's name as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            FailedChecksMode::Enforce => "enforce",
            FailedChecksMode::Shadow => "shadow",
        }
    }
}

/// `[shared]`: the failed-check quotas and the legacy-caller report kept in one Redis for every
/// replica, so N replicas allow one quota, not N, and `/legacy-clients` on any of them shows the
/// whole fleet. Present only when `shared.redis_url` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConfig {
    /// `shared.redis_url`: `redis://` or `rediss://` (TLS), host, port and database, e.g.
    /// `redis://127.0.0.1:6379/0`; may carry a user and password (never logged).
    pub redis_url: RedisUrl,
    /// `shared.redis_password_file`: a file whose first line is the Redis password (it wins over
    /// a password in the URL); relative to the config file.
    pub redis_password_file: Option<PathBuf>,
    /// `shared.redis_ca_file`: a PEM bundle trusted for `rediss://` instead of the Mozilla roots
    /// compiled in; relative to the config file.
    pub redis_ca_file: Option<PathBuf>,
    /// `shared.key_prefix`: the start of every Redis key the gateway writes.
    pub key_prefix: String,
    /// `shared.timeout`: the longest one Redis call may take before the gateway goes on without
    /// it (see `on_redis_error`).
    pub timeout: Duration,
    /// `shared.on_redis_error`: what the gate does while Redis is slow or down.
    pub on_redis_error: OnRedisError,
}

/// A Redis URL whose `Debug` never shows a password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL as written, password included: for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its user and password, for logs.
    pub fn redacted(&self) -> String {
        error::without_userinfo(&self.0)
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// What the failed-check gate does while Redis is slow or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Each replica limits on its own, as without `[shared]`, until Redis answers again.
    Local,
    /// Calls are forwarded without failed-check limiting until Redis answers again.
    Allow,
}

impl OnRedisError {
    /// The value as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Allow => "allow",
        }
    }
}

/// `[log]`: tracing output.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Line format (`log.format`).
    pub format: LogFormat,
    /// Most verbose level written (`log.level`); the `RUST_LOG` environment variable overrides it.
    pub level: LevelFilter,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable lines.
    Text,
}

impl Config {
    /// Reads and validates the TOML file at `path`. A relative path in it (`upstream.ca_file`) is
    /// resolved against the directory of `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Syntax`] for bad TOML,
    /// a wrong type or an unknown key, [`ConfigError::Invalid`] for a value out of range,
    /// [`ConfigError::Replaced`] for a key of an earlier release; each names the file and the
    /// dotted key, and says where the value is: line and column, or that it is a default.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text).map_err(|e| e.with_path(path))?;
        // Absolute, so that an error about a file it names shows where that file was looked for.
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        config.resolve_relative_paths(file.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Makes every relative path the file names relative to `dir`, the file's directory, not to
    /// the working directory. A key that names a file is added to the list here.
    fn resolve_relative_paths(&mut self, dir: &Path) {
        let tls = self.server.tls.as_mut();
        let (cert, key) = match tls {
            Some(t) => (Some(&mut t.cert), Some(&mut t.key)),
            None => (None, None),
        };
        let (password, ca) = match self.shared.as_mut() {
            Some(s) => (s.redis_password_file.as_mut(), s.redis_ca_file.as_mut()),
            None => (None, None),
        };
        let files = [self.upstream.ca_file.as_mut(), cert, key, password, ca];
        for file in files.into_iter().flatten() {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
    }

    /// Parses and validates TOML text: no file name in errors, relative paths left as written.
    ///
    /// # Errors
    /// As [`Config::load`], without [`ConfigError::Read`].
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::syntax(text, "", e))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::syntax(text, &key, e.into_inner())
        })?;
        Self::from_raw(raw).map_err(|e| e.located(text))
    }

    /// Validates the serde mirror of the file.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let server = ServerConfig {
            listen: parse_socket_addr("server.listen", &raw.server.listen)?,
            header_read_timeout: parse_duration(
                "server.header_read_timeout",
                &raw.server.header_read_timeout,
                false,
            )?,
            request_timeout: parse_duration(
                "server.request_timeout",
                &raw.server.request_timeout,
                false,
            )?,
            max_request_body_bytes: positive(
                "server.max_request_body_bytes",
                raw.server.max_request_body_bytes,
            )?,
            shutdown_grace: parse_duration(
                "server.shutdown_grace",
                &raw.server.shutdown_grace,
                true,
            )?,
            shutdown_delay: parse_duration(
                "server.shutdown_delay",
                &raw.server.shutdown_delay,
                true,
            )?,
            max_detached_exchanges: at_most(
                "server.max_detached_exchanges",
                raw.server.max_detached_exchanges,
                MAX_DETACHED_EXCHANGES_LIMIT,
            )?,
            worker_threads: match raw.server.worker_threads {
                Some(n) if n == 0 || n > MAX_WORKER_THREADS => {
                    return Err(invalid(
                        "server.worker_threads",
                        n.to_string(),
                        format!(
                            "a number from 1 to {MAX_WORKER_THREADS}, or the key left out (one per CPU)"
                        ),
                    ));
                }
                n => n,
            },
            idle_timeout: parse_duration("server.idle_timeout", &raw.server.idle_timeout, false)?,
            body_read_timeout: parse_duration(
                "server.body_read_timeout",
                &raw.server.body_read_timeout,
                false,
            )?,
            send_timeout: parse_duration("server.send_timeout", &raw.server.send_timeout, false)?,
            max_buffered_body_bytes: in_range(
                "server.max_buffered_body_bytes",
                raw.server.max_buffered_body_bytes,
                MIN_BUFFERED_BODY_BYTES,
                MAX_BUFFERED_BODY_BYTES,
            )?,
            max_buffered_body_bytes_per_ip: up_to_key(
                "server.max_buffered_body_bytes_per_ip",
                raw.server.max_buffered_body_bytes_per_ip,
                MIN_BUFFERED_BODY_BYTES,
                (
                    "server.max_buffered_body_bytes",
                    raw.server.max_buffered_body_bytes,
                ),
            )?,
            max_connections: in_range(
                "server.max_connections",
                raw.server.max_connections,
                1,
                MAX_CONNECTIONS_LIMIT,
            )?,
            max_connections_per_ip: up_to_key(
                "server.max_connections_per_ip",
                raw.server.max_connections_per_ip,
                1,
                ("server.max_connections", raw.server.max_connections.max(1)),
            )?,
            max_request_head_bytes: in_range(
                "server.max_request_head_bytes",
                raw.server.max_request_head_bytes,
                8192,
                1024 * 1024,
            )?,
            max_request_headers: in_range(
                "server.max_request_headers",
                raw.server.max_request_headers,
                1,
                1000,
            )?,
            http2_max_concurrent_streams: in_range(
                "server.http2_max_concurrent_streams",
                raw.server.http2_max_concurrent_streams as usize,
                1,
                1000,
            )? as u32,
            tls: parse_tls_files(
                raw.server.tls_cert_file.as_deref(),
                raw.server.tls_key_file.as_deref(),
            )?,
            tls_handshake_timeout: parse_duration(
                "server.tls_handshake_timeout",
                &raw.server.tls_handshake_timeout,
                false,
            )?,
        };
        let upstream = UpstreamConfig {
            url: parse_upstream_url(&raw.upstream.url)?,
            ca_file: match raw.upstream.ca_file {
                Some(f) if f.is_empty() => {
                    return Err(invalid(
                        "upstream.ca_file",
                        quoted(&f),
                        "a path to a PEM file, or the key left out",
                    ));
                }
                f => f.map(PathBuf::from),
            },
            connect_timeout: parse_duration(
                "upstream.connect_timeout",
                &raw.upstream.connect_timeout,
                false,
            )?,
            pool_max_idle_per_host: raw.upstream.pool_max_idle_per_host,
        };
        let m = &raw.migration;
        let mode = parse_mode("migration.mode", &m.mode)?;
        let over = |key: &'static str, v: &Option<String>| match v {
            Some(v) => parse_mode(key, v),
            None => Ok(mode),
        };
        let modes = OperationModes {
            check: over("migration.operations.check", &m.operations.check)?,
            reset: over("migration.operations.reset", &m.operations.reset)?,
            revoke_token: over(
                "migration.operations.revoke_token",
                &m.operations.revoke_token,
            )?,
            revoke_grant: over(
                "migration.operations.revoke_grant",
                &m.operations.revoke_grant,
            )?,
            revoke_all: over("migration.operations.revoke_all", &m.operations.revoke_all)?,
        };
        let date = parse_date("migration.deprecation_date", &m.deprecation_date)?;
        let sunset = m
            .sunset_date
            .as_deref()
            .map(|v| parse_date("migration.sunset_date", v))
            .transpose()?;
        if let (Some(s), Some(raw_sunset)) = (sunset, &m.sunset_date)
            && s < date
        {
            return Err(invalid(
                "migration.sunset_date",
                quoted(raw_sunset),
                format!(
                    "a date on or after migration.deprecation_date ({:?}): a sunset cannot come before the deprecation (RFC 8594 §3)",
                    m.deprecation_date
                ),
            ));
        }
        let migration = MigrationConfig {
            modes,
            status_compat: m.status_compat,
            deprecation_headers: m.deprecation_headers,
            deprecation: Deprecation {
                date,
                link: parse_link("migration.deprecation_link", &m.deprecation_link)?,
                sunset,
            },
            preview_accept: parse_media_type("migration.preview_accept", &m.preview_accept)?,
            brownouts: parse_brownouts(&m.brownouts)?,
        };
        let admin = AdminConfig {
            listen: parse_socket_addr("admin.listen", &raw.admin.listen)?,
        };
        let overlaps = admin.listen.port() == server.listen.port()
            && (admin.listen.ip() == server.listen.ip()
                || admin.listen.ip().is_unspecified()
                || server.listen.ip().is_unspecified());
        if overlaps {
            return Err(invalid(
                "admin.listen",
                quoted(&raw.admin.listen),
                "an address that does not overlap server.listen (another port, or another IP when neither is 0.0.0.0/[::]): the admin endpoints are never served on the proxy listener",
            ));
        }
        let metrics = MetricsConfig {
            max_client_ids: at_most(
                "metrics.max_client_ids",
                raw.metrics.max_client_ids,
                MAX_CLIENT_IDS_LIMIT,
            )?,
        };
        let f = &raw.failed_checks;
        for (old, new, value) in [
            (
                "failed_checks.client_id_burst",
                "failed_checks.credential_burst",
                &f.client_id_burst,
            ),
            (
                "failed_checks.client_id_replenish",
                "failed_checks.credential_replenish",
                &f.client_id_replenish,
            ),
        ] {
            if value.is_some() {
                return Err(ConfigError::Replaced {
                    path: None,
                    key: old,
                    replacement: new,
                    why: "failures are charged to the credential the caller presents, never to the client_id it names, so nobody can spend another app's quota",
                    at: Location::Default,
                });
            }
        }
        let quota =
            |burst_key: &'static str, burst: u32, replenish_key: &'static str, replenish: &str| {
                Ok::<_, ConfigError>(QuotaConfig {
                    burst: at_least_one(burst_key, burst)?,
                    replenish: parse_duration(replenish_key, replenish, false)?,
                })
            };
        let failed_checks = FailedChecksConfig {
            enabled: f.enabled,
            mode: match f.mode.as_str() {
                "enforce" => FailedChecksMode::Enforce,
                "shadow" => FailedChecksMode::Shadow,
                other => {
                    return Err(invalid(
                        "failed_checks.mode",
                        quoted(other),
                        "\"enforce\" or \"shadow\"",
                    ));
                }
            },
            credential: quota(
                "failed_checks.credential_burst",
                f.credential_burst,
                "failed_checks.credential_replenish",
                &f.credential_replenish,
            )?,
            client_ip: quota(
                "failed_checks.client_ip_burst",
                f.client_ip_burst,
                "failed_checks.client_ip_replenish",
                &f.client_ip_replenish,
            )?,
            token: quota(
                "failed_checks.token_burst",
                f.token_burst,
                "failed_checks.token_replenish",
                &f.token_replenish,
            )?,
            max_tracked_keys: positive("failed_checks.max_tracked_keys", f.max_tracked_keys as u64)?
                as usize,
            trusted_proxies: f
                .trusted_proxies
                .iter()
                .enumerate()
                .map(|(i, v)| parse_cidr(&format!("failed_checks.trusted_proxies[{i}]"), v))
                .collect::<Result<_, _>>()?,
        };
        let shared = parse_shared(&raw.shared)?;
        let log = LogConfig {
            format: match raw.log.format.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                other => return Err(invalid("log.format", quoted(other), "\"json\" or \"text\"")),
            },
            level: raw.log.level.parse().map_err(|_| {
                invalid(
                    "log.level",
                    quoted(&raw.log.level),
                    "one of \"off\", \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
                )
            })?,
        };
        Ok(Config {
            server,
            upstream,
            migration,
            admin,
            metrics,
            failed_checks,
            shared,
            log,
        })
    }
}

impl Default for Config {
    /// The documented defaults, as in the shipped config.toml.
    fn default() -> Self {
        // The raw defaults are constants checked by the unit tests; they always validate.
        match Self::from_raw(RawConfig::default()) {
            Ok(config) => config,
            Err(e) => unreachable!("built-in defaults are invalid: {e}"),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        })
    }
}

/// `server.tls_cert_file` and `server.tls_key_file`: both, or neither.
fn parse_tls_files(cert: Option<&str>, key: Option<&str>) -> Result<Option<TlsFiles>, ConfigError> {
    const EXPECTED: &str = "a path to a PEM file; tls_cert_file and tls_key_file are set together";
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), _) if c.is_empty() => Err(invalid("server.tls_cert_file", quoted(c), EXPECTED)),
        (_, Some(k)) if k.is_empty() => Err(invalid("server.tls_key_file", quoted(k), EXPECTED)),
        (Some(c), None) => Err(invalid(
            "server.tls_key_file",
            "(not set)".into(),
            format!("{EXPECTED} (server.tls_cert_file is {})", quoted(c)),
        )),
        (None, Some(k)) => Err(invalid(
            "server.tls_cert_file",
            "(not set)".into(),
            format!("{EXPECTED} (server.tls_key_file is {})", quoted(k)),
        )),
        (Some(c), Some(k)) => Ok(Some(TlsFiles {
            cert: c.into(),
            key: k.into(),
        })),
    }
}

fn invalid(key: &str, value: String, expected: impl Into<String>) -> ConfigError {
    ConfigError::invalid(key, value, expected)
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn parse_socket_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            quoted(value),
            "an IP address and port such as \"127.0.0.1:8080\" or \"[::1]:8080\"",
        )
    })
}

fn parse_duration(key: &'static str, value: &str, zero_ok: bool) -> Result<Duration, ConfigError> {
    const EXPECTED: &str = "a duration such as \"30s\", \"500ms\" or \"2m\"";
    let d = humantime::parse_duration(value)
        .map_err(|e| invalid(key, quoted(value), format!("{EXPECTED}: {e}")))?;
    if d.is_zero() && !zero_ok {
        return Err(invalid(key, quoted(value), "a duration greater than zero"));
    }
    Ok(d)
}

/// Upper bound of `server.max_detached_exchanges`: each is a task and an upstream connection for
/// up to `server.request_timeout`.
const MAX_DETACHED_EXCHANGES_LIMIT: usize = 100_000;

/// Largest `server.worker_threads`.
const MAX_WORKER_THREADS: usize = 1024;

/// Upper bound of `metrics.max_client_ids`: each tracked id costs a series and a report entry.
const MAX_CLIENT_IDS_LIMIT: usize = 100_000;

/// Largest `server.max_connections`.
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
/// Bounds of `server.max_buffered_body_bytes` (and the per-address share): at least twice the
/// 64 KiB read whole before forwarding (a longer body is charged until more than 64 KiB has
/// arrived, then streamed), 4 GiB at most.
const MIN_BUFFERED_BODY_BYTES: usize = 2 * crate::body::BUFFERED_BODY_BYTES;
const MAX_BUFFERED_BODY_BYTES: usize = 4 << 30;

fn in_range(key: &'static str, value: usize, min: usize, max: usize) -> Result<usize, ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            value.to_string(),
            format!("a number from {min} to {max}"),
        ));
    }
    Ok(value)
}

/// As [`in_range`], up to the value of another key, which the message names: the key checked
/// may be absent from the file, its default being what does not fit.
fn up_to_key(
    key: &'static str,
    value: usize,
    min: usize,
    (bound_key, max): (&str, usize),
) -> Result<usize, ConfigError> {
    in_range(key, value, min, max).map_err(|_| {
        invalid(
            key,
            value.to_string(),
            format!("a number from {min} to {max}, the value of `{bound_key}`"),
        )
    })
}

fn at_most(key: &'static str, value: usize, limit: usize) -> Result<usize, ConfigError> {
    if value > limit {
        return Err(invalid(
            key,
            value.to_string(),
            format!("a number from 0 to {limit}"),
        ));
    }
    Ok(value)
}

fn at_least_one(key: &'static str, value: u32) -> Result<u32, ConfigError> {
    if value == 0 {
        return Err(invalid(key, value.to_string(), "a number of at least 1"));
    }
    Ok(value)
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address (taken as /32 or /128). IPv4-mapped
/// IPv6 forms (`::ffff:10.0.0.0/104`) become IPv4, as peers are compared in IPv4 form.
fn parse_cidr(key: &str, value: &str) -> Result<ipnet::IpNet, ConfigError> {
    value
        .parse::<ipnet::IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| match n {
            ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                    .map(ipnet::IpNet::V4)
                    .unwrap_or(n),
                None => n,
            },
            other => other,
        })
        .map(|n| n.trunc())
        .map_err(|_| {
            invalid(
                key,
                quoted(value),
                "a CIDR such as \"10.0.0.0/8\" or \"fd00::/8\", or a single IP address",
            )
        })
}

fn parse_mode(key: &'static str, value: &str) -> Result<Mode, ConfigError> {
    match value {
        "rewrite" => Ok(Mode::Rewrite),
        "observe" => Ok(Mode::Observe),
        "reject" => Ok(Mode::Reject),
        _ => Err(invalid(
            key,
            quoted(value),
            "\"rewrite\", \"observe\" or \"reject\"",
        )),
    }
}

/// A calendar date (`2020-02-14`, midnight UTC) or an RFC 3339 UTC time.
fn parse_date(key: &'static str, value: &str) -> Result<SystemTime, ConfigError> {
    let full = if value.len() == 10 {
        format!("{value}T00:00:00Z")
    } else {
        value.to_owned()
    };
    humantime::parse_rfc3339(&full).map_err(|e| {
        invalid(
            key,
            quoted(value),
            format!(
                "a date such as \"2020-02-14\" or a UTC time such as \"2020-02-14T00:00:00Z\": {e}"
            ),
        )
    })
}

/// `[[migration.brownouts]]`: each window valid, and no two overlapping windows that switch off
/// the same operation with different answers.
fn parse_brownouts(raw: &[raw::RawBrownout]) -> Result<Vec<Brownout>, ConfigError> {
    let mut out: Vec<Brownout> = Vec::with_capacity(raw.len());
    for (i, b) in raw.iter().enumerate() {
        // Keys name the entry by its index, as serde's type errors do, so it can be located.
        let key = |name: &str| format!("migration.brownouts[{i}]{name}");
        let time = |name: &str, v: &toml::Value| {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Datetime(d) => d.to_string(),
                other => other.to_string(),
            };
            // UTC only: the parser reads every time as UTC, so an offset or a local time would
            // silently move the window.
            humantime::parse_rfc3339_weak(&text)
                .ok()
                .filter(|_| text.len() > 10 && text.ends_with(['Z', 'z']))
                .ok_or_else(|| {
                    invalid(
                        &key(name),
                        other_quoted(v),
                        "an RFC 3339 UTC time ending in Z, such as 2027-03-01T14:00:00Z (no offset, no local time)",
                    )
                })
        };
        let start = time(".start", &b.start)?;
        let end = time(".end", &b.end)?;
        if end <= start {
            return Err(invalid(
                &key(".end"),
                other_quoted(&b.end),
                "a time after the window's start",
            ));
        }
        let operations = match &b.operations {
            None => OperationSet::ALL,
            Some(names) => {
                let mut set = OperationSet {
                    check: false,
                    reset: false,
                    revoke_token: false,
                    revoke_grant: false,
                    revoke_all: false,
                };
                for (k, name) in names.iter().enumerate() {
                    let slot = match name.as_str() {
                        "check" => &mut set.check,
                        "reset" => &mut set.reset,
                        "revoke_token" => &mut set.revoke_token,
                        "revoke_grant" => &mut set.revoke_grant,
                        "revoke_all" => &mut set.revoke_all,
                        other => {
                            return Err(invalid(
                                &key(&format!(".operations[{k}]")),
                                quoted(other),
                                "\"check\", \"reset\", \"revoke_token\", \"revoke_grant\" or \"revoke_all\"",
                            ));
                        }
                    };
                    *slot = true;
                }
                set
            }
        };
        let unavailable = match b.status {
            410 => false,
            503 => true,
            other => {
                return Err(invalid(
                    &key(".status"),
                    other.to_string(),
                    "410 (Gone) or 503 (Service Unavailable, with Retry-After until the end)",
                ));
            }
        };
        let window = Brownout {
            start,
            end,
            operations,
            unavailable,
        };
        if let Some(j) = out.iter().position(|w| {
            w.start < window.end
                && window.start < w.end
                && w.operations.intersects(&window.operations)
                && w.unavailable != window.unavailable
        }) {
            return Err(invalid(
                &key(""),
                format!("a window overlapping migration.brownouts[{j}]"),
                "windows that, where they overlap for the same operation, give the same status",
            ));
        }
        out.push(window);
    }
    Ok(out)
}

/// A TOML value as written: strings quoted, date-times as they are.
fn other_quoted(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => quoted(s),
        other => other.to_string(),
    }
}

fn parse_link(key: &'static str, value: &str) -> Result<Uri, ConfigError> {
    let uri: Option<Uri> = value.parse().ok();
    match uri {
        Some(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => Ok(u),
        _ => Err(invalid(
            key,
            quoted(value),
            "an absolute http:// or https:// URL",
        )),
    }
}

fn positive(key: &'static str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 {
        return Err(invalid(
            key,
            value.to_string(),
            "a number greater than zero",
        ));
    }
    Ok(value)
}

fn parse_upstream_url(value: &str) -> Result<Uri, ConfigError> {
    const KEY: &str = "upstream.url";
    const EXPECTED: &str =
        "an http:// or https:// URL with a host and no path, such as \"https://api.github.com\"";
    let uri: Uri = value
        .parse()
        .map_err(|_| invalid(KEY, quoted(value), EXPECTED))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    let no_userinfo = uri.authority().is_some_and(|a| !a.as_str().contains('@'));
    let no_path = matches!(uri.path(), "" | "/") && uri.query().is_none();
    if !(scheme_ok && host_ok && no_userinfo && no_path) {
        return Err(invalid(KEY, quoted(value), EXPECTED));
    }
    Ok(uri)
}

/// `[shared]`: `None` without `shared.redis_url`.
fn parse_shared(raw: &raw::RawShared) -> Result<Option<SharedConfig>, ConfigError> {
    const URL_EXPECTED: &str = "a redis:// or rediss:// URL with a host, such as \"redis://127.0.0.1:6379/0\", or the key left out (each replica keeps its own state)";
    let Some(url) = raw.redis_url.as_deref() else {
        return Ok(None);
    };
    let uri: Result<Uri, _> = url.parse();
    let valid = uri.as_ref().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("redis" | "rediss"))
            && u.host().is_some_and(|h| !h.is_empty())
            && u.query().is_none()
    });
    if !valid {
        return Err(invalid("shared.redis_url", quoted(url), URL_EXPECTED));
    }
    let file = |key: &'static str, v: &Option<String>| match v {
        Some(f) if f.is_empty() => Err(invalid(
            key,
            quoted(f),
            "a path to a file, or the key left out",
        )),
        f => Ok(f.as_ref().map(PathBuf::from)),
    };
    let redis_ca_file = file("shared.redis_ca_file", &raw.redis_ca_file)?;
    if redis_ca_file.is_some() && !url.starts_with("rediss://") {
        return Err(invalid(
            "shared.redis_ca_file",
            quoted(raw.redis_ca_file.as_deref().unwrap_or_default()),
            "left out unless shared.redis_url is a rediss:// (TLS) URL",
        ));
    }
    let prefix_ok = !raw.key_prefix.is_empty()
        && raw.key_prefix.len() <= 64
        && raw
            .key_prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
    if !prefix_ok {
        return Err(invalid(
            "shared.key_prefix",
            quoted(&raw.key_prefix),
            "1 to 64 printable ASCII characters without spaces or braces, such as \"oauth-apps-gateway:\"",
        ));
    }
    let timeout = parse_duration("shared.timeout", &raw.timeout, false)?;
    if timeout > Duration::from_secs(1) {
        return Err(invalid(
            "shared.timeout",
            quoted(&raw.timeout),
            "at most \"1s\": every gated call may wait this long for Redis (a few milliseconds is usual)",
        ));
    }
    Ok(Some(SharedConfig {
        redis_url: RedisUrl(url.to_owned()),
        redis_password_file: file("shared.redis_password_file", &raw.redis_password_file)?,
        redis_ca_file,
        key_prefix: raw.key_prefix.clone(),
        timeout,
        on_redis_error: match raw.on_redis_error.as_str() {
            "local" => OnRedisError::Local,
            "allow" => OnRedisError::Allow,
            other => {
                return Err(invalid(
                    "shared.on_redis_error",
                    quoted(other),
                    "\"local\" (each replica limits on its own while Redis is unreachable) or \"allow\" (no limiting while it is)",
                ));
            }
        },
    }))
}

fn parse_media_type(key: &'static str, value: &str) -> Result<Option<HeaderValue>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    let looks_like_media_type = value
        .split_once('/')
        .is_some_and(|(t, s)| !t.trim().is_empty() && !s.trim().is_empty() && !value.contains(','));
    match HeaderValue::from_str(value) {
        Ok(v) if looks_like_media_type => Ok(Some(v)),
        _ => Err(invalid(
            key,
            quoted(value),
            "one media type such as \"application/vnd.github.doctor-strange-preview+json\", or \"\" to send none",
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_credential_in_a_url_is_never_echoed_in_an_error() {
        for text in [
            "[upstream]\nurl = \"https://octo:ghp_s3cr3tT0ken@ghe.example/api\"\n",
            "[migration]\ndeprecation_link = \"ftp://octo:ghp_s3cr3tT0ken@ghe.example/\"\n",
            "[server]\nmax_connections = \"https://octo:ghp_s3cr3tT0ken@ghe.example\"\n",
            "[shared]\nredis_url = \"http://octo:ghp_s3cr3tT0ken@ghe.example/0\"\n",
            "[shared]\nredis_url = \"http://octo:ghp_s3cr3t/T0ken@ghe.example/0\"\n",
        ] {
            let e = Config::from_toml_str(text).unwrap_err().to_string();
            assert!(!e.contains("T0ken") && !e.contains("octo:"), "{e}");
            assert!(e.contains("://***@ghe.example"), "{e}");
        }
    }

    use super::*;

    fn err(text: &str) -> String {
        match Config::from_toml_str(text) {
            Ok(_) => panic!("config unexpectedly valid:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::from_toml_str("").expect("defaults");
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.request_timeout, Duration::from_secs(30));
        assert_eq!(c.server.max_request_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.server.max_detached_exchanges, 1000);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.upstream.url, "https://api.github.com");
        assert!(c.upstream.ca_file.is_none());
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.pool_max_idle_per_host, 256);
        assert_eq!(c.server.worker_threads, None);
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.send_timeout, Duration::from_secs(10));
        assert_eq!(c.server.shutdown_delay, Duration::ZERO);
        assert_eq!(c.server.max_connections, 2048);
        assert_eq!(c.server.max_buffered_body_bytes, 16 << 20);
        assert_eq!(c.server.max_buffered_body_bytes_per_ip, 1 << 20);
        assert_eq!(c.server.max_connections_per_ip, 256);
        assert_eq!(c.server.max_request_head_bytes, 16384);
        assert_eq!(c.server.max_request_headers, 100);
        assert_eq!(c.server.http2_max_concurrent_streams, 100);
        assert_eq!(
            c.migration.preview_accept.unwrap(),
            "application/vnd.github.doctor-strange-preview+json"
        );
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, LevelFilter::INFO);
        let all = |m| OperationModes {
            check: m,
            reset: m,
            revoke_token: m,
            revoke_grant: m,
            revoke_all: m,
        };
        assert_eq!(c.migration.modes, all(Mode::Rewrite));
        assert!(c.migration.status_compat);
        assert!(
            !c.migration.deprecation_headers,
            "off: @octokit/request logs legacy URLs"
        );
        assert_eq!(
            c.migration.deprecation.date,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_581_638_400)
        );
        assert_eq!(
            c.migration.deprecation.link,
            "https://developer.github.com/changes/2020-02-14-deprecating-oauth-app-endpoint/"
        );
        assert_eq!(c.migration.deprecation.sunset, None);
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.metrics.max_client_ids, 1000);
        let f = &c.failed_checks;
        assert!(f.enabled);
        assert_eq!(f.mode, FailedChecksMode::Enforce);
        let q = |burst, ms| QuotaConfig {
            burst,
            replenish: Duration::from_millis(ms),
        };
        assert_eq!(f.credential, q(10, 6_000));
        assert_eq!(f.client_ip, q(30, 2_000));
        // 5,000 failures an hour, GitHub's own primary rate limit for an app.
        assert_eq!(f.token, q(5000, 720));
        assert_eq!(f.token.replenish * f.token.burst, Duration::from_secs(3600));
        assert_eq!(f.max_tracked_keys, 100_000);
        assert!(f.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_accept_cidrs_and_addresses() {
        let c = Config::from_toml_str(
            "[failed_checks]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::1/8\", \"::ffff:172.16.0.0/108\", \"::ffff:10.1.1.1\"]\n",
        )
        .unwrap();
        let nets: Vec<String> = c
            .failed_checks
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            nets,
            [
                "10.0.0.0/8",
                "192.168.1.7/32",
                "fd00::/8",
                "172.16.0.0/12",
                "10.1.1.1/32"
            ]
        );
    }

    #[test]
    fn modes_and_overrides() {
        let c = Config::from_toml_str(
            "[migration]\nmode = \"observe\"\n[migration.operations]\nreset = \"reject\"\nrevoke_grant = \"rewrite\"\n",
        )
        .unwrap();
        assert_eq!(
            c.migration.modes,
            OperationModes {
                check: Mode::Observe,
                reset: Mode::Reject,
                revoke_token: Mode::Observe,
                revoke_grant: Mode::Rewrite,
                revoke_all: Mode::Observe,
            }
        );
    }

    #[test]
    fn dates_and_sunset_validation() {
        let c = Config::from_toml_str(
            "[migration]\ndeprecation_date = \"2020-02-14T12:00:00Z\"\nsunset_date = \"2021-05-05\"\n",
        )
        .unwrap();
        let d = &c.migration.deprecation;
        assert_eq!(
            d.date,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_581_681_600)
        );
        assert_eq!(
            d.sunset,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_620_172_800))
        );
        // Sunset on the deprecation day is allowed; before it is not.
        assert!(Config::from_toml_str("[migration]\nsunset_date = \"2020-02-14\"\n").is_ok());
        let msg = err("[migration]\nsunset_date = \"2020-02-13\"\n");
        assert!(
            msg.contains("migration.sunset_date") && msg.contains("\"2020-02-13\""),
            "{msg}"
        );
        assert!(
            msg.contains("on or after migration.deprecation_date"),
            "{msg}"
        );
    }

    #[test]
    fn brownout_windows() {
        let c = Config::from_toml_str(
            r#"
            [[migration.brownouts]]
            start = 2027-03-01T14:00:00Z
            end = "2027-03-01T15:00:00Z"
            [[migration.brownouts]]
            start = "2027-03-08T14:00:00Z"
            end = "2027-03-08T20:00:00Z"
            operations = ["check", "revoke_all"]
            status = 503
            [[migration.brownouts]]
            start = "2027-03-01T14:30:00Z"
            end = "2027-03-01T16:00:00Z"
            operations = ["reset"]
            "#,
        )
        .expect("valid");
        let b = &c.migration.brownouts;
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[0].start,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_803_909_600)
        );
        assert_eq!(b[0].operations, OperationSet::ALL);
        assert!(!b[0].unavailable && b[1].unavailable);
        assert!(b[1].operations.check && b[1].operations.revoke_all && !b[1].operations.reset);
        assert!(Config::default().migration.brownouts.is_empty());
    }

    #[test]
    fn brownout_errors_name_the_entry_its_position_and_the_fix() {
        let w = |body: &str| format!("[[migration.brownouts]]\n{body}\n");
        let cases: &[(String, &[&str])] = &[
            (
                w("start = \"2027-03-01T15:00:00Z\"\nend = \"2027-03-01T14:00:00Z\""),
                &[
                    "`migration.brownouts[0].end`",
                    "after the window's start",
                    "(line 3, column 7)",
                ],
            ),
            (
                w("start = \"tomorrow\"\nend = \"2027-03-01T14:00:00Z\""),
                &[
                    "`migration.brownouts[0].start`",
                    "\"tomorrow\"",
                    "RFC 3339",
                    "(line 2, column 9)",
                ],
            ),
            (
                w("start = \"2027-03-01\"\nend = \"2027-03-02\""),
                &["`migration.brownouts[0].start`", "RFC 3339"],
            ),
            (
                w("start = 2027-03-01T14:00:00+02:00\nend = 2027-03-01T18:00:00Z"),
                &[
                    "`migration.brownouts[0].start`",
                    "2027-03-01T14:00:00+02:00",
                    "ending in Z",
                ],
            ),
            (
                w("start = 2027-03-01T14:00:00.5+02:00\nend = 2027-03-01T18:00:00Z"),
                &["`migration.brownouts[0].start`", "ending in Z"],
            ),
            (
                w("start = 2027-03-01T14:00:00\nend = 2027-03-01T18:00:00Z"),
                &["`migration.brownouts[0].start`", "no local time"],
            ),
            (
                w("start = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\nstatus = 404"),
                &[
                    "`migration.brownouts[0].status`",
                    "404",
                    "410",
                    "503",
                    "(line 4, column 10)",
                ],
            ),
            (
                w(
                    "start = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\noperations = [\"scope_token\"]",
                ),
                &[
                    "`migration.brownouts[0].operations[0]`",
                    "(line 4, column 15)",
                    "\"scope_token\"",
                    "revoke_all",
                ],
            ),
            (
                w("start = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z")
                    + &w("start = 2027-03-01T14:30:00Z\nend = 2027-03-01T16:00:00Z\nstatus = 503"),
                &[
                    "`migration.brownouts[1]`",
                    "overlapping migration.brownouts[0]",
                    "same status",
                    "(line 4, column 1)",
                ],
            ),
        ];
        for (text, wanted) in cases {
            let msg = err(text);
            for want in *wanted {
                assert!(msg.contains(want), "{text}: {msg} lacks {want:?}");
            }
        }
    }

    #[test]
    fn values_are_parsed() {
        let c = Config::from_toml_str(
            r#"
            [server]
            listen = "[::1]:9999"
            request_timeout = "500ms"
            shutdown_grace = "0s"
            [upstream]
            url = "http://127.0.0.1:3000"
            ca_file = "/etc/ghe-ca.pem"
            [migration]
            preview_accept = ""
            [log]
            format = "json"
            level = "trace"
            "#,
        )
        .expect("valid");
        assert_eq!(c.server.listen, "[::1]:9999".parse().unwrap());
        assert_eq!(c.server.request_timeout, Duration::from_millis(500));
        assert_eq!(c.server.shutdown_grace, Duration::ZERO);
        assert_eq!(c.upstream.url.scheme_str(), Some("http"));
        assert_eq!(
            c.upstream.ca_file.as_deref(),
            Some(Path::new("/etc/ghe-ca.pem"))
        );
        assert!(c.migration.preview_accept.is_none());
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, LevelFilter::TRACE);
    }

    #[test]
    fn each_bad_value_names_key_value_and_expectation() {
        let cases: &[(&str, &[&str])] = &[
            (
                "[server]\nlisten = \"localhost\"",
                &["server.listen", "\"localhost\"", "IP address and port"],
            ),
            (
                "[server]\nrequest_timeout = \"ten\"",
                &["server.request_timeout", "\"ten\"", "duration"],
            ),
            (
                "[server]\nheader_read_timeout = \"0s\"",
                &["server.header_read_timeout", "\"0s\"", "greater than zero"],
            ),
            (
                "[server]\nmax_connections = 10\nmax_connections_per_ip = 11",
                &["server.max_connections_per_ip", "11", "from 1 to 10"],
            ),
            (
                "[server]\nmax_request_head_bytes = 4096",
                &[
                    "server.max_request_head_bytes",
                    "4096",
                    "from 8192 to 1048576",
                ],
            ),
            (
                "[server]\nhttp2_max_concurrent_streams = 0",
                &["server.http2_max_concurrent_streams", "0", "from 1 to 1000"],
            ),
            (
                "[server]\nidle_timeout = \"0s\"",
                &["server.idle_timeout", "\"0s\"", "greater than zero"],
            ),
            (
                "[server]\nsend_timeout = \"0s\"",
                &["server.send_timeout", "\"0s\"", "greater than zero"],
            ),
            (
                "[server]\nmax_buffered_body_bytes = 1000000\nmax_buffered_body_bytes_per_ip = 2000000",
                &[
                    "server.max_buffered_body_bytes_per_ip",
                    "2000000",
                    "from 131072 to 1000000",
                ],
            ),
            (
                "[server]\nworker_threads = 0",
                &["server.worker_threads", "0", "from 1 to 1024"],
            ),
            (
                "[server]\nworker_threads = 5000",
                &["server.worker_threads", "5000", "from 1 to 1024"],
            ),
            (
                "[server]\nmax_request_body_bytes = 0",
                &["server.max_request_body_bytes", "0", "greater than zero"],
            ),
            (
                "[server]\nmax_detached_exchanges = 100001",
                &["server.max_detached_exchanges", "100001", "0 to 100000"],
            ),
            (
                "[upstream]\nurl = \"ftp://example.com\"",
                &[
                    "upstream.url",
                    "\"ftp://example.com\"",
                    "http:// or https://",
                ],
            ),
            (
                "[upstream]\nurl = \"https://ghe.example/api/v3\"",
                &["upstream.url", "no path"],
            ),
            (
                "[upstream]\nurl = \"https://user:pw@ghe.example\"",
                &["upstream.url"],
            ),
            ("[upstream]\nca_file = \"\"", &["upstream.ca_file", "PEM"]),
            (
                "[upstream]\nconnect_timeout = \"5 parsecs\"",
                &["upstream.connect_timeout", "\"5 parsecs\""],
            ),
            (
                "[migration]\npreview_accept = \"json\"",
                &["migration.preview_accept", "\"json\"", "media type"],
            ),
            (
                "[migration]\nmode = \"block\"",
                &["migration.mode", "\"block\"", "\"observe\""],
            ),
            (
                "[migration.operations]\nreset = \"drop\"",
                &["migration.operations.reset", "\"drop\"", "\"reject\""],
            ),
            (
                "[migration]\ndeprecation_date = \"14/02/2020\"",
                &["migration.deprecation_date", "\"14/02/2020\"", "2020-02-14"],
            ),
            (
                "[migration]\ndeprecation_link = \"not a url\"",
                &["migration.deprecation_link", "absolute http"],
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:8080\"",
                &["admin.listen", "does not overlap server.listen"],
            ),
            (
                "[admin]\nlisten = \"0.0.0.0:8080\"",
                &[
                    "admin.listen",
                    "\"0.0.0.0:8080\"",
                    "does not overlap server.listen",
                ],
            ),
            (
                "[server]\nlisten = \"[::]:9090\"",
                &["admin.listen", "\"127.0.0.1:9090\""],
            ),
            (
                "[metrics]\nmax_client_ids = 100001",
                &["metrics.max_client_ids", "100001", "0 to 100000"],
            ),
            (
                "[failed_checks]\ncredential_burst = 0",
                &["failed_checks.credential_burst", "0", "at least 1"],
            ),
            (
                "[failed_checks]\ntoken_replenish = \"soon\"",
                &["failed_checks.token_replenish", "\"soon\"", "duration"],
            ),
            (
                "[failed_checks]\nmode = \"audit\"",
                &["failed_checks.mode", "\"audit\"", "\"shadow\""],
            ),
            (
                "[failed_checks]\nclient_id_burst = 10",
                &[
                    "`failed_checks.client_id_burst` is no longer read",
                    "use `failed_checks.credential_burst`",
                    "never to the client_id",
                ],
            ),
            (
                "[failed_checks]\nclient_id_replenish = \"6s\"",
                &[
                    "failed_checks.client_id_replenish",
                    "use `failed_checks.credential_replenish`",
                ],
            ),
            (
                "[failed_checks]\nclient_ip_replenish = \"0s\"",
                &[
                    "failed_checks.client_ip_replenish",
                    "\"0s\"",
                    "greater than zero",
                ],
            ),
            (
                "[failed_checks]\nmax_tracked_keys = 0",
                &["failed_checks.max_tracked_keys", "0"],
            ),
            (
                "[failed_checks]\ntrusted_proxies = [\"10.0.0.0/33\"]",
                &["failed_checks.trusted_proxies", "\"10.0.0.0/33\"", "CIDR"],
            ),
            (
                "[log]\nformat = \"xml\"",
                &["log.format", "\"xml\"", "\"json\" or \"text\""],
            ),
            (
                "[log]\nlevel = \"loud\"",
                &["log.level", "\"loud\"", "\"debug\""],
            ),
        ];
        for (text, wanted) in cases {
            let msg = err(text);
            for w in *wanted {
                assert!(msg.contains(w), "{text:?}: {msg:?} lacks {w:?}");
            }
            // Every bad value in the file is located; only a default has no position.
            let located = msg.contains(" (line ") || msg.ends_with("(default; not in the file)");
            assert!(located, "{text:?}: {msg:?} has no position");
        }
    }

    #[test]
    fn unknown_keys_and_sections_are_rejected_with_position() {
        let msg = err("[server]\nlisten = \"127.0.0.1:1\"\nlisten_port = 8080\n");
        assert!(msg.contains("server"), "{msg}");
        assert!(msg.contains("listen_port"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");

        let msg = err("[servers]\nlisten = \"127.0.0.1:1\"\n");
        assert!(msg.contains("servers"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn wrong_types_name_the_key_and_position() {
        let msg = err("[server]\n\nmax_request_body_bytes = \"big\"\n");
        assert!(msg.contains("server.max_request_body_bytes"), "{msg}");
        assert!(msg.contains("line 3, column 26"), "{msg}");
    }

    #[test]
    fn wrong_types_are_named_in_the_files_terms() {
        // The issue's wording for its two examples.
        let msg = err("[server]\nmax_request_headers = -5\n");
        assert_eq!(
            msg,
            "`server.max_request_headers` must be a non-negative whole number, not -5 (line 2, column 23)"
        );
        let msg = err("[migration]\nsunset_date = 2027-06-30\n");
        assert_eq!(
            msg,
            "`migration.sunset_date` must be a quoted string like \"2027-06-30\", not the unquoted date 2027-06-30 (line 2, column 15)"
        );
        // Every kind of value where each kind of key is expected: the message names the key,
        // what it takes and what was found in TOML's words, never serde's or Rust's.
        const FORBIDDEN: &[&str] = &[
            "u8",
            "u16",
            "u32",
            "u64",
            "usize",
            "i64",
            "i128",
            "f64",
            "map",
            "sequence",
            "struct",
            "Raw",
            "enum",
            "variant",
            "Option",
            "String",
            "Vec",
            "floating point",
            "invalid type",
            "invalid value",
            "borrowed",
        ];
        let cases: &[(&str, &str, &str)] = &[
            // (text, key, what it must be)
            (
                "[server]\nmax_request_body_bytes = \"big\"",
                "server.max_request_body_bytes",
                "a non-negative whole number, not the string \"big\"",
            ),
            (
                "[server]\nmax_request_body_bytes = 1.5",
                "server.max_request_body_bytes",
                "a non-negative whole number, not 1.5",
            ),
            (
                "[server]\nmax_request_body_bytes = 1e3",
                "server.max_request_body_bytes",
                "a non-negative whole number, not 1e3",
            ),
            (
                "[server]\nmax_request_body_bytes = nan",
                "server.max_request_body_bytes",
                "not nan",
            ),
            (
                "[server]\nmax_request_body_bytes = true",
                "server.max_request_body_bytes",
                "a non-negative whole number, not true",
            ),
            (
                "[server]\nmax_request_body_bytes = [1]",
                "server.max_request_body_bytes",
                "not an array",
            ),
            (
                "[server]\nmax_request_body_bytes = {a = 1}",
                "server.max_request_body_bytes",
                "not a table",
            ),
            (
                "[server]\nmax_request_body_bytes = 2027-06-30",
                "server.max_request_body_bytes",
                "not the unquoted date 2027-06-30",
            ),
            (
                "[server]\nmax_request_body_bytes = 99999999999999999999",
                "server.max_request_body_bytes",
                "a whole number from 0 to 18446744073709551615",
            ),
            (
                "[server]\nmax_request_headers = -1",
                "server.max_request_headers",
                "a non-negative whole number, not -1",
            ),
            (
                "[server]\nhttp2_max_concurrent_streams = 5000000000",
                "server.http2_max_concurrent_streams",
                "a whole number from 0 to 4294967295, not 5000000000",
            ),
            (
                "[server]\nworker_threads = \"4\"",
                "server.worker_threads",
                "a non-negative whole number",
            ),
            (
                "[server]\nworker_threads = -4",
                "server.worker_threads",
                "a non-negative whole number, not -4",
            ),
            (
                "[failed_checks]\ncredential_burst = -5",
                "failed_checks.credential_burst",
                "a non-negative whole number, not -5",
            ),
            (
                "[server]\nlisten = 8080",
                "server.listen",
                "a quoted string, not 8080",
            ),
            (
                "[server]\nlisten = 1.5",
                "server.listen",
                "a quoted string, not 1.5",
            ),
            (
                "[server]\nlisten = false",
                "server.listen",
                "a quoted string, not false",
            ),
            (
                "[server]\nlisten = [\"127.0.0.1:1\"]",
                "server.listen",
                "a quoted string, not an array",
            ),
            (
                "[server]\nlisten = {ip = \"127.0.0.1\"}",
                "server.listen",
                "a quoted string, not a table",
            ),
            (
                "[server.listen]\nip = \"127.0.0.1\"",
                "server.listen",
                "a quoted string, not a table",
            ),
            (
                "[server]\nrequest_timeout = 30",
                "server.request_timeout",
                "a quoted string, not 30",
            ),
            (
                "[server]\nrequest_timeout = 00:00:30",
                "server.request_timeout",
                "a quoted string like \"00:00:30\", not the unquoted time 00:00:30",
            ),
            (
                "[migration]\ndeprecation_date = 2020-02-14T00:00:00Z",
                "migration.deprecation_date",
                "a quoted string like \"2020-02-14T00:00:00Z\", not the unquoted date-time",
            ),
            (
                "[upstream]\nca_file = 1",
                "upstream.ca_file",
                "a quoted string, not 1",
            ),
            (
                "[migration]\nstatus_compat = \"yes\"",
                "migration.status_compat",
                "true or false, not the string \"yes\"",
            ),
            (
                "[migration]\nstatus_compat = 1",
                "migration.status_compat",
                "true or false, not 1",
            ),
            (
                "[failed_checks]\nenabled = \"false\"",
                "failed_checks.enabled",
                "true or false",
            ),
            (
                "[failed_checks]\ntrusted_proxies = \"10.0.0.0/8\"",
                "failed_checks.trusted_proxies",
                "an array, not the string \"10.0.0.0/8\"",
            ),
            (
                "[failed_checks]\ntrusted_proxies = [\"10.0.0.0/8\", 10]",
                "failed_checks.trusted_proxies[1]",
                "a quoted string, not 10",
            ),
            ("server = 5", "server", "a table, not 5"),
            (
                "migration = \"observe\"",
                "migration",
                "a table, not the string \"observe\"",
            ),
            (
                "[migration]\noperations = \"reject\"",
                "migration.operations",
                "a table, not the string \"reject\"",
            ),
            (
                "[migration]\nbrownouts = 5",
                "migration.brownouts",
                "an array, not 5",
            ),
            (
                "[migration.brownouts]\nstart = 2027-03-01T14:00:00Z",
                "migration.brownouts",
                "[[migration.brownouts]]), not a table",
            ),
            (
                "[migration]\nbrownouts = [1]",
                "migration.brownouts[0]",
                "a table, not 1",
            ),
            (
                "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\nstatus = \"503\"",
                "migration.brownouts[0].status",
                "a non-negative whole number, not the string \"503\"",
            ),
            (
                "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\nstatus = 70000",
                "migration.brownouts[0].status",
                "a whole number from 0 to 65535, not 70000",
            ),
            (
                "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\noperations = \"check\"",
                "migration.brownouts[0].operations",
                "an array, not the string \"check\"",
            ),
            (
                "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\noperations = [true]",
                "migration.brownouts[0].operations[0]",
                "a quoted string, not true",
            ),
        ];
        for (text, key, wanted) in cases {
            let msg = err(text);
            let want = format!("`{key}` must be ");
            assert!(msg.starts_with(&want), "{text:?}: {msg:?} lacks {want:?}");
            assert!(msg.contains(wanted), "{text:?}: {msg:?} lacks {wanted:?}");
            assert!(msg.contains("(line "), "{text:?}: {msg:?}");
            for word in FORBIDDEN {
                assert!(!msg.contains(word), "{text:?}: {msg:?} says {word:?}");
            }
        }
    }

    #[test]
    fn value_errors_point_at_the_value() {
        // (text, key, line, column): each value error ends with the position of the value.
        let cases: &[(&str, &str, usize, usize)] = &[
            ("[server]\nlisten = \"nonsense\"", "server.listen", 2, 10),
            (
                "\n\n[server]\n  request_timeout   =  \"ten\"",
                "server.request_timeout",
                4,
                24,
            ),
            (
                "[server]\nmax_connections = 10\nmax_connections_per_ip = 11",
                "server.max_connections_per_ip",
                3,
                26,
            ),
            (
                "[failed_checks]\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"lb.internal\",\n]",
                "failed_checks.trusted_proxies[1]",
                4,
                3,
            ),
            (
                "[failed_checks]\nmode = \"audit\"",
                "failed_checks.mode",
                2,
                8,
            ),
            // A nested table, written three ways.
            (
                "[migration.operations]\ncheck = \"rewrite\"\nreset = \"drop\"",
                "migration.operations.reset",
                3,
                9,
            ),
            (
                "[migration]\noperations.reset = \"drop\"",
                "migration.operations.reset",
                2,
                20,
            ),
            (
                "migration = { operations = { reset = \"drop\" } }",
                "migration.operations.reset",
                1,
                38,
            ),
            (
                "[migration]\nsunset_date = \"2020-01-01\"",
                "migration.sunset_date",
                2,
                15,
            ),
            (
                "[migration]\ndeprecation_date = \"14/02/2020\"",
                "migration.deprecation_date",
                2,
                20,
            ),
            ("[upstream]\nca_file = \"\"", "upstream.ca_file", 2, 11),
            (
                "[admin]\nlisten = \"127.0.0.1:8080\"",
                "admin.listen",
                2,
                10,
            ),
            ("[log]\nlevel = \"loud\"", "log.level", 2, 9),
            // Entries of an array of tables, by index; the second window's fields.
            (
                "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\n\n[[migration.brownouts]]\nstart = 2027-03-08T14:00:00Z\nend = 2027-03-08T13:00:00Z",
                "migration.brownouts[1].end",
                7,
                7,
            ),
            (
                "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\n[[migration.brownouts]]\nstart = 2027-03-08T14:00:00Z\nend = 2027-03-08T15:00:00Z\noperations = [\"check\", \"nope\"]",
                "migration.brownouts[1].operations[1]",
                7,
                24,
            ),
            // An overlap points at the later window's header.
            (
                "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\n\n[[migration.brownouts]]\nstart = 2027-03-01T14:30:00Z\nend = 2027-03-01T16:00:00Z\nstatus = 503",
                "migration.brownouts[1]",
                5,
                1,
            ),
        ];
        for (text, key, line, column) in cases {
            let msg = err(text);
            assert!(
                msg.starts_with(&format!("invalid value for `{key}`: ")),
                "{text:?}: {msg:?} does not name {key:?}"
            );
            let at = format!("(line {line}, column {column})");
            assert!(
                msg.ends_with(&at),
                "{text:?}: {msg:?} does not end with {at:?}"
            );
        }
        // A replaced key too.
        let msg = err("[failed_checks]\n\nclient_id_burst = 10");
        assert!(msg.ends_with("(line 3, column 19)"), "{msg}");
        // The position, as data, for callers that point an editor at it.
        match Config::from_toml_str("[log]\nformat = \"xml\"") {
            Err(ConfigError::Invalid { key, at, .. }) => {
                assert_eq!(key, "log.format");
                assert_eq!(
                    at,
                    Location::At {
                        line: 2,
                        column: 10
                    }
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_default_that_conflicts_says_so_and_names_the_other_key() {
        let msg = err("[server]\nmax_connections = 10\n");
        assert_eq!(
            msg,
            "invalid value for `server.max_connections_per_ip`: 256 (expected a number from 1 to 10, the value of `server.max_connections`) (default; not in the file)"
        );
        let msg = err("[server]\nmax_buffered_body_bytes = 200000\n");
        assert!(
            msg.contains("`server.max_buffered_body_bytes_per_ip`"),
            "{msg}"
        );
        assert!(
            msg.contains("the value of `server.max_buffered_body_bytes`"),
            "{msg}"
        );
        assert!(msg.ends_with("(default; not in the file)"), "{msg}");
        let msg = err("[server]\nlisten = \"[::]:9090\"\n");
        assert!(msg.contains("`admin.listen`"), "{msg}");
        assert!(msg.contains("server.listen"), "{msg}");
        assert!(msg.ends_with("(default; not in the file)"), "{msg}");
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let msg = err("[server]\nlisten = \"127.0.0.1:1\n");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn shared_is_off_by_default_and_every_bad_value_names_its_key() {
        assert_eq!(Config::default().shared, None);
        let c = Config::from_toml_str(
            "[shared]\nredis_url = \"rediss://:pw@redis.internal:6380/2\"\nredis_ca_file = \"ca.pem\"\n",
        )
        .unwrap();
        let s = c.shared.unwrap();
        assert_eq!(s.redis_url.expose(), "rediss://:pw@redis.internal:6380/2");
        assert_eq!(
            format!("{:?}", s.redis_url),
            "rediss://***@redis.internal:6380/2"
        );
        assert_eq!(s.timeout, Duration::from_millis(10));
        assert_eq!(s.on_redis_error, OnRedisError::Local);
        assert_eq!(s.key_prefix, "oauth-apps-gateway:");
        for (text, key, value) in [
            (
                "redis_url = \"http://127.0.0.1:6379\"",
                "shared.redis_url",
                "\"http://127.0.0.1:6379\"",
            ),
            (
                "redis_url = \"redis://\"",
                "shared.redis_url",
                "\"redis://\"",
            ),
            (
                "redis_url = \"redis://h:1\"\nredis_ca_file = \"ca.pem\"",
                "shared.redis_ca_file",
                "\"ca.pem\"",
            ),
            (
                "redis_url = \"redis://h:1\"\nkey_prefix = \"{gw}\"",
                "shared.key_prefix",
                "\"{gw}\"",
            ),
            (
                "redis_url = \"redis://h:1\"\nkey_prefix = \"\"",
                "shared.key_prefix",
                "\"\"",
            ),
            (
                "redis_url = \"redis://h:1\"\ntimeout = \"2s\"",
                "shared.timeout",
                "\"2s\"",
            ),
            (
                "redis_url = \"redis://h:1\"\ntimeout = \"0s\"",
                "shared.timeout",
                "\"0s\"",
            ),
            (
                "redis_url = \"redis://h:1\"\non_redis_error = \"deny\"",
                "shared.on_redis_error",
                "\"deny\"",
            ),
            (
                "redis_url = \"redis://h:1\"\nredis_password_file = \"\"",
                "shared.redis_password_file",
                "\"\"",
            ),
        ] {
            let e = Config::from_toml_str(&format!("[shared]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(value),
                "{text}: {e}"
            );
            assert!(e.contains("line 2") || e.contains("line 3"), "{text}: {e}");
        }
    }

    #[test]
    fn a_relative_ca_file_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "[upstream]\nca_file = \"certs/ghe.pem\"\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(
            c.upstream.ca_file.as_deref(),
            Some(dir.path().join("certs/ghe.pem").as_path())
        );
        std::fs::write(&path, "[upstream]\nca_file = \"/etc/ghe.pem\"\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(
            c.upstream.ca_file.as_deref(),
            Some(Path::new("/etc/ghe.pem"))
        );
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("gw.toml"), "{e}");
        std::fs::write(&path, "[log]\nformat = \"xml\"\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains("log.format"), "{e}");
    }
}
