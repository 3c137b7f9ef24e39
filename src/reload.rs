//! Live reload: the configuration file is read and validated again (on SIGHUP or `POST /reload`
//! on the admin listener) and what it says is put in force for new requests, without closing a
//! connection or failing a request in flight. A file that does not validate changes nothing.
//!
//! What carries over: the failed-check limiter's keys and their state (a changed quota applies
//! to them at once; nothing is refilled), the hashing key, the legacy-caller report, every
//! counter, the open connections and the requests in flight (each finishes with the settings
//! it started with). What needs a restart, and is reported as such while the rest applies:
//! `server.listen`, `admin.listen`, `server.worker_threads`, `log.format`, and switching TLS on
//! or off (`server.tls_cert_file`; new files or new content under the same names apply).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use crate::app;
use crate::config::{Config, ConfigError};
use crate::limiter::{FailedChecks, LimiterClock, NoRandomness, SharedQuotas, sha256};
use crate::logging::LogLevel;
use crate::metrics::{Metrics, ReloadResult};
use crate::proxy::{Proxy, ProxySettings};
use crate::server::ServeOptions;
use crate::tls::{self, Certificates, TlsError};
use crate::upstream::UpstreamBuildError;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read or did not validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The upstream client could not be built (e.g. `upstream.ca_file` unreadable).
    #[error("{path}: {source}")]
    Upstream {
        /// The configuration file.
        path: PathBuf,
        /// What was wrong.
        source: UpstreamBuildError,
    },
    /// The failed-check limiter found no randomness for its hashing key.
    #[error(transparent)]
    Limiter(#[from] NoRandomness),
    /// The proxy listener's TLS certificate or key could not be loaded.
    #[error("{path}: {source}")]
    Tls {
        /// The configuration file.
        path: PathBuf,
        /// What was wrong.
        source: TlsError,
    },
    /// The reload task did not finish (the process is ending).
    #[error("the reload was interrupted")]
    Interrupted,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sections whose settings changed and are now in force (`server`, `upstream`, ...).
    pub changed: Vec<&'static str>,
    /// Keys that changed but only take effect after a restart; the running value stays.
    pub needs_restart: Vec<&'static str>,
    /// Hex SHA-256 of the file now in force.
    pub sha256: String,
}

/// What is in force now.
struct Applied {
    config: Config,
    /// SHA-256 of `upstream.ca_file` as last read (`None`: no file, or unreadable): the
    /// upstream pools are kept over a reload unless `[upstream]` or this changed.
    ca_digest: Option<[u8; 32]>,
    /// The last limiter built, kept while `failed_checks.enabled` is false so that turning it
    /// back on finds every key as it was.
    limiter: Option<Arc<FailedChecks>>,
}

/// Reloads one configuration file into the running parts. Reloads run one at a time.
pub struct Reloader {
    path: PathBuf,
    applied: Mutex<Applied>,
    proxies: Arc<[Proxy]>,
    serve_options: watch::Sender<ServeOptions>,
    log_level: Option<LogLevel>,
    metrics: Arc<Metrics>,
    clock: LimiterClock,
    shared: Option<SharedQuotas>,
    tls: Option<Arc<Certificates>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The running parts a [`Reloader`] puts a new configuration into.
pub struct Parts {
    /// One proxy per worker.
    pub proxies: Arc<[Proxy]>,
    /// The proxy listener's connection settings.
    pub serve_options: watch::Sender<ServeOptions>,
    /// The log level control (`None` when logging is not the gateway's own, as in tests).
    pub log_level: Option<LogLevel>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The limiter's clock.
    pub clock: LimiterClock,
    /// The limiter in force (`None` when disabled).
    pub limiter: Option<Arc<FailedChecks>>,
    /// The quotas in the shared store (`[shared]`), for a limiter a reload turns on.
    pub shared: Option<SharedQuotas>,
    /// The proxy listener's certificate (`None` without TLS).
    pub tls: Option<Arc<Certificates>>,
}

impl Reloader {
    /// A reloader of the file at `path`, whose content `config` is in force in `parts`.
    pub fn new(path: PathBuf, config: Config, parts: Parts) -> Self {
        Reloader {
            path,
            applied: Mutex::new(Applied {
                ca_digest: ca_digest(&config),
                config,
                limiter: parts.limiter,
            }),
            proxies: parts.proxies,
            serve_options: parts.serve_options,
            log_level: parts.log_level,
            metrics: parts.metrics,
            clock: parts.clock,
            shared: parts.shared,
            tls: parts.tls,
        }
    }

    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration in force now.
    pub async fn config(&self) -> Config {
        self.applied.lock().await.config.clone()
    }

    /// Reads the file again and puts it in force; logs and counts the result
    /// (`config_reloads_total{result}`). `trigger` names what asked (`SIGHUP`, `admin`).
    ///
    /// # Errors
    /// [`ReloadError`] when the file cannot be read, does not validate, or names a file that
    /// cannot be used; then the running configuration stays in force, unchanged.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, ReloadError> {
        let result = self.try_reload().await;
        match &result {
            Ok(report) => {
                self.metrics.config_reload(ReloadResult::Success);
                tracing::info!(
                    trigger,
                    file = %self.path.display(),
                    sha256 = %report.sha256,
                    changed = ?report.changed,
                    "configuration reloaded"
                );
                if !report.needs_restart.is_empty() {
                    tracing::warn!(
                        keys = ?report.needs_restart,
                        "configuration reloaded, but these keys only change with a restart; their running values stay"
                    );
                }
            }
            Err(e) => {
                self.metrics.config_reload(ReloadResult::Error);
                tracing::error!(
                    trigger,
                    error = %e,
                    "configuration reload failed; the running configuration stays in force"
                );
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<ReloadReport, ReloadError> {
        let mut applied = self.applied.lock().await;
        let path = self.path.clone();
        let workers = self.proxies.len();
        let upstream_in_force = (applied.config.upstream.clone(), applied.ca_digest);
        // Files are read off the serving threads.
        let serving_tls = self.tls.is_some();
        let built = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            let digest = std::fs::read(&path).map(|b| sha256(&b)).unwrap_or_default();
            // New pools only for a new upstream (or new CA content): otherwise every reload
            // would make each worker connect to the upstream afresh.
            let ca = ca_digest(&config);
            let upstreams = if (config.upstream.clone(), ca) == upstream_in_force {
                None
            } else {
                Some(
                    app::upstreams(&config, workers).map_err(|source| ReloadError::Upstream {
                        path: path.clone(),
                        source,
                    })?,
                )
            };
            // The certificate is loaded again too (files may have new content under the same
            // names); switching TLS on or off needs a restart.
            let certificate = match (&config.server.tls, serving_tls) {
                (Some(files), true) => {
                    Some(tls::prepare(files).map_err(|source| ReloadError::Tls {
                        path: path.clone(),
                        source,
                    })?)
                }
                _ => None,
            };
            Ok::<_, ReloadError>((config, digest, ca, upstreams, certificate))
        })
        .await
        .map_err(|_| ReloadError::Interrupted)?;
        let (config, digest, ca, upstreams, certificate) = built?;

        let fc = &config.failed_checks;
        let limiter = match (&applied.limiter, fc.enabled) {
            (Some(old), _) => Some(Arc::new(old.reconfigured(fc))),
            (None, true) => Some(Arc::new(
                FailedChecks::new(fc, self.clock.clone())?.with_shared_opt(self.shared.clone()),
            )),
            (None, false) => None,
        };
        let in_force = limiter.clone().filter(|_| fc.enabled);
        let mut settings = ProxySettings::from(&config);
        // One body budget for the life of the process: bytes held now stay counted.
        if let Some(first) = self.proxies.first() {
            let budget = first.settings().body_budget;
            budget.set_limits(
                config.server.max_buffered_body_bytes,
                config.server.max_buffered_body_bytes_per_ip,
            );
            settings.body_budget = budget;
        }
        let mut upstreams = upstreams.map(Vec::into_iter);
        for proxy in self.proxies.iter() {
            let upstream = match upstreams.as_mut().and_then(Iterator::next) {
                Some(new) => new,
                None => proxy.upstream(),
            };
            proxy.reload(upstream, settings.clone(), in_force.clone());
        }
        self.serve_options
            .send_replace(app::serve_options(&config.server));
        if let (Some(certs), Some(loaded)) = (&self.tls, certificate) {
            certs.install(loaded);
        }
        if let Some(level) = &self.log_level
            && let Err(e) = level.set(config.log.level)
        {
            tracing::warn!(error = %e, "log.level could not be changed");
        }
        self.metrics
            .set_max_client_ids(config.metrics.max_client_ids);
        self.metrics.config_loaded(digest_number(&digest));

        let needs_restart = needs_restart(&applied.config, &config);
        // The values that need a restart stay as they run.
        let mut config = config;
        config.server.listen = applied.config.server.listen;
        config.admin.listen = applied.config.admin.listen;
        config.server.worker_threads = applied.config.server.worker_threads;
        config.log.format = applied.config.log.format;
        if config.server.tls.is_some() != applied.config.server.tls.is_some() {
            config.server.tls = applied.config.server.tls.clone();
        }
        let report = ReloadReport {
            changed: changed_sections(&applied.config, &config),
            needs_restart,
            sha256: crate::limiter::hex(&digest),
        };
        *applied = Applied {
            config,
            ca_digest: ca,
            limiter,
        };
        Ok(report)
    }
}

/// The SHA-256 of the CA bundle `config` names, when it names one and it can be read.
fn ca_digest(config: &Config) -> Option<[u8; 32]> {
    let path = config.upstream.ca_file.as_ref()?;
    std::fs::read(path).ok().map(|b| sha256(&b))
}

/// The first 48 bits of a digest as a number (exact in a Prometheus float).
pub fn digest_number(digest: &[u8; 32]) -> u64 {
    digest[..6]
        .iter()
        .fold(0u64, |n, b| (n << 8) | u64::from(*b))
}

/// The sections of `new` that differ from `old`.
fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    // Config is plain data with no secret in it; its Debug form compares every field.
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut out = Vec::new();
    for (name, a, b) in [
        (
            "server",
            &old.server as &dyn std::fmt::Debug,
            &new.server as &dyn std::fmt::Debug,
        ),
        ("upstream", &old.upstream, &new.upstream),
        ("migration", &old.migration, &new.migration),
        ("admin", &old.admin, &new.admin),
        ("metrics", &old.metrics, &new.metrics),
        ("failed_checks", &old.failed_checks, &new.failed_checks),
        ("shared", &old.shared, &new.shared),
        ("log", &old.log, &new.log),
    ] {
        if differs(a, b) {
            out.push(name);
        }
    }
    out
}

/// The keys that changed from `old` to `new` but need a restart.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.server.listen != new.server.listen {
        out.push("server.listen");
    }
    if old.admin.listen != new.admin.listen {
        out.push("admin.listen");
    }
    if old.server.worker_threads != new.server.worker_threads {
        out.push("server.worker_threads");
    }
    if old.log.format != new.log.format {
        out.push("log.format");
    }
    if old.server.tls.is_some() != new.server.tls.is_some() {
        out.push("server.tls_cert_file");
    }
    // One Redis connection and its fallback state for the life of the process.
    if old.shared != new.shared {
        out.push("shared");
    }
    out
}
