//! The serde mirror of config.toml: every section and key as the operator writes it, with its
//! default. Nothing here is validated beyond TOML types; `config::Config::from_raw` turns this
//! into typed values. Unknown keys are rejected (`deny_unknown_fields`) so a typo never passes
//! silently. New sections are added here and in `Config` together.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub upstream: RawUpstream,
    pub migration: RawMigration,
    pub admin: RawAdmin,
    pub metrics: RawMetrics,
    pub failed_checks: RawFailedChecks,
    pub shared: RawShared,
    pub log: RawLog,
}

/// `[server]`: the proxy listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub header_read_timeout: String,
    pub request_timeout: String,
    pub max_request_body_bytes: u64,
    pub shutdown_grace: String,
    pub shutdown_delay: String,
    pub max_detached_exchanges: usize,
    pub worker_threads: Option<usize>,
    pub idle_timeout: String,
    pub body_read_timeout: String,
    pub send_timeout: String,
    pub max_buffered_body_bytes: usize,
    pub max_buffered_body_bytes_per_ip: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_request_head_bytes: usize,
    pub max_request_headers: usize,
    pub http2_max_concurrent_streams: u32,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_handshake_timeout: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            header_read_timeout: "10s".into(),
            request_timeout: "30s".into(),
            max_request_body_bytes: 10 * 1024 * 1024,
            shutdown_grace: "30s".into(),
            shutdown_delay: "0s".into(),
            max_detached_exchanges: 1000,
            worker_threads: None,
            idle_timeout: "60s".into(),
            body_read_timeout: "10s".into(),
            send_timeout: "10s".into(),
            max_buffered_body_bytes: 16 * 1024 * 1024,
            max_buffered_body_bytes_per_ip: 1024 * 1024,
            max_connections: 2048,
            max_connections_per_ip: 256,
            max_request_head_bytes: 16 * 1024,
            max_request_headers: 100,
            http2_max_concurrent_streams: 100,
            tls_cert_file: None,
            tls_key_file: None,
            tls_handshake_timeout: "10s".into(),
        }
    }
}

/// `[upstream]`: where calls are forwarded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub url: String,
    pub ca_file: Option<String>,
    pub connect_timeout: String,
    pub pool_max_idle_per_host: usize,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            url: "https://api.github.com".into(),
            ca_file: None,
            connect_timeout: "5s".into(),
            pool_max_idle_per_host: 256,
        }
    }
}

/// `[migration]`: how legacy calls are rewritten.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMigration {
    pub mode: String,
    pub operations: RawOperations,
    pub status_compat: bool,
    pub preview_accept: String,
    pub deprecation_headers: bool,
    pub deprecation_date: String,
    pub deprecation_link: String,
    pub sunset_date: Option<String>,
    pub brownouts: Vec<RawBrownout>,
}

impl Default for RawMigration {
    fn default() -> Self {
        Self {
            mode: "rewrite".into(),
            operations: RawOperations::default(),
            status_compat: true,
            preview_accept: "application/vnd.github.doctor-strange-preview+json".into(),
            deprecation_headers: false,
            deprecation_date: "2020-02-14".into(),
            deprecation_link:
                "https://developer.github.com/changes/2020-02-14-deprecating-oauth-app-endpoint/"
                    .into(),
            sunset_date: None,
            brownouts: Vec::new(),
        }
    }
}

/// One `[[migration.brownouts]]` window. `start` and `end` may be TOML date-times or strings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBrownout {
    pub start: toml::Value,
    pub end: toml::Value,
    #[serde(default)]
    pub operations: Option<Vec<String>>,
    #[serde(default = "brownout_status")]
    pub status: u16,
}

fn brownout_status() -> u16 {
    410
}

/// `[migration.operations]`: per-operation mode overrides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOperations {
    pub check: Option<String>,
    pub reset: Option<String>,
    pub revoke_token: Option<String>,
    pub revoke_grant: Option<String>,
    pub revoke_all: Option<String>,
}

/// `[admin]`: the admin listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

/// `[metrics]`: Prometheus series limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    pub max_client_ids: usize,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            max_client_ids: 1000,
        }
    }
}

/// `[failed_checks]`: the limiter of failed calls to the OAuth Applications API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFailedChecks {
    pub enabled: bool,
    pub mode: String,
    pub credential_burst: u32,
    pub credential_replenish: String,
    pub client_ip_burst: u32,
    pub client_ip_replenish: String,
    pub token_burst: u32,
    pub token_replenish: String,
    pub max_tracked_keys: usize,
    pub trusted_proxies: Vec<String>,
    /// Replaced by `credential_burst`: read only to say so.
    pub client_id_burst: Option<toml::Value>,
    /// Replaced by `credential_replenish`: read only to say so.
    pub client_id_replenish: Option<toml::Value>,
}

impl Default for RawFailedChecks {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: "enforce".into(),
            credential_burst: 10,
            credential_replenish: "6s".into(),
            client_ip_burst: 30,
            client_ip_replenish: "2s".into(),
            // GitHub's primary rate limit for an app: 5,000 requests per hour.
            token_burst: 5000,
            token_replenish: "720ms".into(),
            max_tracked_keys: 100_000,
            trusted_proxies: Vec::new(),
            client_id_burst: None,
            client_id_replenish: None,
        }
    }
}

/// `[shared]`: state shared by replicas in Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawShared {
    pub redis_url: Option<String>,
    pub redis_password_file: Option<String>,
    pub redis_ca_file: Option<String>,
    pub key_prefix: String,
    pub timeout: String,
    pub on_redis_error: String,
}

impl Default for RawShared {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_password_file: None,
            redis_ca_file: None,
            key_prefix: "oauth-apps-gateway:".into(),
            timeout: "10ms".into(),
            on_redis_error: "local".into(),
        }
    }
}

/// `[log]`: tracing output.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: String,
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}
