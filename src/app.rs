//! The composition root: turns a validated `Config` into running parts (upstream client, proxy
//! service, listener) and runs them until shutdown. The only place that knows how the pieces
//! fit; each piece gets what it needs handed in, so tests assemble the same parts on port 0.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{Admin, Readiness};
use crate::config::{Config, ServerConfig};
use crate::limiter::{FailedChecks, LimiterClock, NoRandomness, SharedQuotas, sha256};
use crate::logging::LogLevel;
use crate::metrics::{Metrics, MetricsError, Registry};
use crate::proxy::{Proxy, ProxySettings};
use crate::reload::{self, Reloader};
use crate::server::{self, DrainOutcome, ServeOptions};
use crate::shared::Store;
use crate::tls::{self, Certificates, TlsError};
use crate::upstream::{self, Upstream, UpstreamBuildError};
use crate::workers::{self, Workers};

/// How often the failed-check limiter drops recovered keys and reports its size, in seconds.
const LIMITER_HOUSEKEEPING: Duration = Duration::from_secs(10);

/// How long the start waits for the first contact with the shared store (`[shared]`), in
/// seconds; without it the gateway starts in the store's fallback and keeps trying.
const FIRST_CONTACT: Duration = Duration::from_secs(2);

/// How long the admin listener waits for its own requests (a scrape) once the proxy has
/// drained, in seconds.
const ADMIN_GRACE: Duration = Duration::from_secs(2);

/// How long requests cut off at the end of the shutdown grace period get to write their 503
/// and their access event, in seconds.
const CUT_OFF_SETTLE: Duration = Duration::from_secs(1);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The upstream client could not be built (e.g. a bad `upstream.ca_file`).
    #[error(transparent)]
    Upstream(#[from] UpstreamBuildError),
    /// The metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The failed-check limiter found no randomness for its hashing key.
    #[error(transparent)]
    Limiter(#[from] NoRandomness),
    /// The proxy listener's TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `[shared]` names a Redis the gateway cannot use (a bad URL, password or CA file).
    #[error(transparent)]
    Shared(#[from] crate::shared::StoreError),
    /// The worker threads could not be started.
    #[error("cannot start the worker threads (`server.worker_threads`): {0}")]
    Workers(#[source] io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (`{key}`): {source}")]
    Bind {
        /// The config key naming the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// The sockets the gateway serves, bound before `run` so tests can bind port 0.
#[derive(Debug)]
pub struct Listeners {
    /// The proxy listener (`server.listen`).
    pub proxy: TcpListener,
    /// The admin listener (`admin.listen`): metrics, health, legacy-client report.
    pub admin: TcpListener,
}

/// Binds every listener named in `config`.
///
/// # Errors
/// [`AppError::Bind`] naming the key and address that failed.
pub async fn bind(config: &Config) -> Result<Listeners, AppError> {
    let bind = |key: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { key, addr, source })
    };
    Ok(Listeners {
        proxy: bind("server.listen", config.server.listen).await?,
        admin: bind("admin.listen", config.admin.listen).await?,
    })
}

/// Builds every runtime object `config` describes without binding or serving: what
/// `--check-config` runs to catch errors that only appear when files are read (the CA file,
/// the TLS certificate and key).
///
/// # Errors
/// [`AppError::Upstream`] when the upstream client cannot be built, [`AppError::Tls`] when the
/// certificate or key cannot be loaded.
pub fn check(config: &Config) -> Result<(), AppError> {
    upstream::install_crypto_provider();
    Upstream::new(&config.upstream)?;
    if let Some(files) = &config.server.tls {
        tls::load(files)?;
    }
    Metrics::new(Registry::new(), config.metrics.max_client_ids)?;
    if let Some(shared) = &config.shared {
        crate::shared::check(shared)?;
    }
    Ok(())
}

/// Runs the gateway on `listeners` until `shutdown` resolves: then `/readyz` turns 503, the
/// proxy listener keeps serving for `server.shutdown_delay` (cut short by a second SIGTERM or
/// SIGINT), then stops accepting and drains within `server.shutdown_grace`, and the admin
/// listener stops last. Reports how the proxy drain ended.
///
/// # Errors
/// [`AppError::Upstream`] when the upstream client cannot be built, [`AppError::Metrics`] when
/// the metrics cannot be registered.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<DrainOutcome, AppError> {
    run_with_clock(config, listeners, shutdown, LimiterClock::monotonic()).await
}

/// [`run`], with the failed-check limiter on `clock` (tests pass a manual clock).
///
/// # Errors
/// As [`run`].
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    clock: LimiterClock,
) -> Result<DrainOutcome, AppError> {
    let options = RunOptions {
        clock,
        ..RunOptions::default()
    };
    run_with(config, listeners, shutdown, options).await
}

/// What [`run_with`] takes besides the configuration.
#[derive(Debug)]
pub struct RunOptions {
    /// The file `config` was loaded from: SIGHUP and `POST /reload` on the admin listener read
    /// it again (see [`crate::reload`]). `None`: no reload (SIGHUP is logged and ignored).
    pub config_path: Option<PathBuf>,
    /// The log level control of the process's subscriber, for reloads of `log.level`.
    pub log_level: Option<LogLevel>,
    /// The failed-check limiter's clock.
    pub clock: LimiterClock,
    /// Whether SIGHUP asks for a reload (the binary); tests reload through the admin listener.
    pub reload_on_sighup: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            config_path: None,
            log_level: None,
            clock: LimiterClock::monotonic(),
            reload_on_sighup: false,
        }
    }
}

/// Builds one upstream client per worker for `config`: each worker has its own pool, and
/// together they keep `upstream.pool_max_idle_per_host` idle connections.
///
/// # Errors
/// [`UpstreamBuildError`] when `upstream.ca_file` cannot be read or holds no certificate.
pub fn upstreams(config: &Config, workers: usize) -> Result<Vec<Upstream>, UpstreamBuildError> {
    let mut per_worker = config.upstream.clone();
    per_worker.pool_max_idle_per_host = config
        .upstream
        .pool_max_idle_per_host
        .div_ceil(workers.max(1));
    (0..workers).map(|_| Upstream::new(&per_worker)).collect()
}

/// The proxy listener's connection settings in `[server]`.
pub fn serve_options(s: &ServerConfig) -> ServeOptions {
    ServeOptions {
        header_read_timeout: s.header_read_timeout,
        shutdown_grace: s.shutdown_grace,
        idle_timeout: s.idle_timeout,
        send_timeout: s.send_timeout,
        max_connections: s.max_connections,
        max_connections_per_ip: s.max_connections_per_ip,
        max_request_head_bytes: s.max_request_head_bytes,
        max_request_headers: s.max_request_headers,
        http2_max_concurrent_streams: s.http2_max_concurrent_streams,
        tls_handshake_timeout: s.tls_handshake_timeout,
    }
}

/// [`run`], with reloading and the limiter's clock as `options` say.
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    options: RunOptions,
) -> Result<DrainOutcome, AppError> {
    upstream::install_crypto_provider();
    let clock = options.clock;
    let workers = config
        .server
        .worker_threads
        .unwrap_or_else(workers::default_count);
    let upstreams = upstreams(&config, workers)?;
    let workers = Workers::start(workers).map_err(AppError::Workers)?;
    let metrics = Arc::new(Metrics::new(
        Registry::new(),
        config.metrics.max_client_ids,
    )?);
    let readiness = Readiness::new();
    // `[shared]`: one Redis connection for the life of the process; the first contact is
    // waited for (bounded), so a reachable store is shared from the first request.
    let shared = match &config.shared {
        Some(cfg) => {
            let store = Arc::new(Store::new(cfg, metrics.shared_store())?);
            let quotas = SharedQuotas::new(store, config.failed_checks.max_tracked_keys);
            if tokio::time::timeout(FIRST_CONTACT, quotas.maintain(true))
                .await
                .is_err()
                || !quotas.store().is_up()
            {
                tracing::warn!(
                    redis = %cfg.redis_url.redacted(),
                    "Redis does not answer at start: going on without it (shared.on_redis_error = {:?}) until it does",
                    cfg.on_redis_error.as_str()
                );
            }
            Some(quotas)
        }
        None => None,
    };
    let _shared_upkeep = shared.clone().map(|quotas| {
        let metrics = metrics.clone();
        AbortOnDrop(tokio::spawn(async move {
            let store = quotas.store().clone();
            let flush = async {
                let mut tick = tokio::time::interval(crate::metrics::FLUSH_EVERY);
                loop {
                    tick.tick().await;
                    let _ = metrics.flush_report(&store).await;
                }
            };
            tokio::join!(quotas.maintain(false), flush);
        }))
    });
    let limiter = match config.failed_checks.enabled {
        true => Some(Arc::new(
            FailedChecks::new(&config.failed_checks, clock.clone())?
                .with_shared_opt(shared.clone()),
        )),
        false => None,
    };
    let mut upstreams = upstreams.into_iter();
    let first = upstreams
        .next()
        .ok_or(AppError::Workers(io::ErrorKind::InvalidInput.into()))?;
    let proxy = Proxy::new(
        first,
        ProxySettings::from(&config),
        metrics.clone(),
        limiter.clone(),
        clock.clone(),
    );
    let drained = proxy.clone();
    let proxies: Arc<[Proxy]> = std::iter::once(proxy.clone())
        .chain(upstreams.map(|u| proxy.with_upstream(u)))
        .collect();
    // The limiter in force may change with a reload; housekeeping follows it.
    let _housekeeping = {
        let metrics = metrics.clone();
        let proxy = proxy.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LIMITER_HOUSEKEEPING);
            loop {
                tick.tick().await;
                if let Some(limiter) = proxy.limiter() {
                    metrics.failed_checks_tracked(limiter.housekeep());
                }
            }
        }))
    };
    let tls = match &config.server.tls {
        Some(files) => Some(Certificates::new(files, metrics.clone())?),
        None => None,
    };
    let _tls_watch = tls
        .clone()
        .map(|certs| AbortOnDrop(tokio::spawn(certs.watch())));
    let (serve_options, serve_options_rx) = watch::channel(serve_options(&config.server));
    if let Some(digest) = options
        .config_path
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .map(|b| sha256(&b))
    {
        metrics.config_loaded(reload::digest_number(&digest));
    }
    let reloader = options.config_path.map(|path| {
        Arc::new(Reloader::new(
            path,
            config.clone(),
            reload::Parts {
                proxies: proxies.clone(),
                serve_options,
                log_level: options.log_level,
                metrics: metrics.clone(),
                clock: clock.clone(),
                limiter,
                shared: shared.clone(),
                tls: tls.clone(),
            },
        ))
    });
    let _sighup = reloader
        .clone()
        .filter(|_| options.reload_on_sighup)
        .and_then(reload_on_sighup);

    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let admin_addr = addr(&listeners.admin);
    let admin = Admin::new(metrics.clone(), readiness.clone())
        .with_reloader(reloader.clone())
        .with_shared_store(shared.as_ref().map(|q| q.store().clone()));
    let admin_opts = ServeOptions::internal(config.server.header_read_timeout, ADMIN_GRACE);
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_make_service = move |peer: SocketAddr, _worker: usize| {
        let admin = admin.clone();
        hyper::service::service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.serve(req, peer).await) }
        })
    };
    // The admin listener is served on worker 0 alone.
    let admin_task = tokio::spawn(async move {
        server::serve(
            server::Listener::plain(listeners.admin),
            admin_make_service,
            watch::channel(admin_opts).1,
            &Workers::local(),
            async {
                let _ = admin_stopped.await;
            },
            || {},
            |_refusal| {},
        )
        .await
    });

    let refused_metrics = metrics.clone();
    let upstream_origin = format!(
        "{}://{}",
        config.upstream.url.scheme_str().unwrap_or("https"),
        config.upstream.url.authority().map_or("", |a| a.as_str())
    );
    tracing::info!(
        listen = %addr(&listeners.proxy),
        admin = %admin_addr,
        upstream = %upstream_origin,
        version = env!("CARGO_PKG_VERSION"),
        "oauth-apps-gateway serving"
    );
    let make_service = move |peer: SocketAddr, worker: usize| {
        let proxy = proxies[worker].clone();
        let connection = metrics.connection_opened();
        hyper::service::service_fn(move |req| {
            // The service lives as long as the connection; so does the gauge guard.
            let _connection = &connection;
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
        })
    };
    let drain_started = std::sync::OnceLock::new();
    let drain_signal = async {
        shutdown.await;
        readiness.set_draining();
        // As the configuration in force says now (a reload may have changed it).
        let shutdown_delay = match &reloader {
            Some(r) => r.config().await.server.shutdown_delay,
            None => config.server.shutdown_delay,
        };
        if !shutdown_delay.is_zero() {
            tracing::info!(
                delay_seconds = shutdown_delay.as_secs_f64(),
                "shutdown: not ready; still serving for shutdown_delay before draining"
            );
            tokio::select! {
                () = tokio::time::sleep(shutdown_delay) => {}
                () = shutdown_signal() => {
                    tracing::info!("shutdown: second signal; shutdown_delay cut short");
                }
            }
        }
        let _ = drain_started.set(tokio::time::Instant::now());
    };
    let outcome = server::serve(
        server::Listener {
            tcp: listeners.proxy,
            tls: tls.as_ref().map(Certificates::acceptor),
        },
        make_service,
        serve_options_rx.clone(),
        &workers,
        drain_signal,
        || cut_off(&drained),
        move |refusal| refused_metrics.connection_refused(refusal),
    )
    .await;
    let grace = serve_options_rx.borrow().shutdown_grace;
    let outcome =
        settle_open_requests(&drained, outcome, drain_started.get().copied(), grace).await;
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    workers.stop().await;
    Ok(outcome)
}

/// Waits, within what is left of the grace period, for requests still open once the listener
/// drained: exchanges whose client went away are no connection, but they are accounted for when
/// they end. When the grace period ends first, what is still open is cut off (recorded with
/// outcome `shutdown`) and the drain reported as timed out; when the listener's drain already
/// timed out, its cut-off has ended them too, and this waits for their records.
async fn settle_open_requests(
    proxy: &Proxy,
    outcome: DrainOutcome,
    drain_started: Option<tokio::time::Instant>,
    grace: Duration,
) -> DrainOutcome {
    let grace_ends = drain_started.unwrap_or_else(tokio::time::Instant::now) + grace;
    let mut outcome = outcome;
    if outcome == DrainOutcome::Completed
        && tokio::time::timeout_at(grace_ends, proxy.idle())
            .await
            .is_err()
    {
        cut_off(proxy);
        outcome = DrainOutcome::TimedOut;
    }
    if outcome == DrainOutcome::TimedOut
        && tokio::time::timeout(CUT_OFF_SETTLE, proxy.idle())
            .await
            .is_err()
    {
        tracing::warn!(
            open_requests = proxy.open_requests(),
            "shutdown: requests still open after the cut-off"
        );
    }
    outcome
}

/// Ends every request still open (each answered 503 where its client is still there and
/// recorded with outcome `shutdown`), saying how many.
fn cut_off(proxy: &Proxy) {
    tracing::warn!(
        cut_off = proxy.open_requests(),
        "shutdown: grace period ended; open requests cut off"
    );
    proxy.cut_off();
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C); on non-Unix systems, on Ctrl-C only.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the gateway")
            }
        }
    }
    if tokio::signal::ctrl_c().await.is_ok() {
        tracing::info!("SIGINT received");
    }
}

/// Reloads the configuration on every SIGHUP (Unix only), for as long as the returned guard
/// lives. Watching SIGHUP also replaces its default action, which would end the process; the
/// watch is in place when this returns.
fn reload_on_sighup(reloader: Arc<Reloader>) -> Option<AbortOnDrop> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => Some(AbortOnDrop(tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP received: reloading the configuration");
                    let _ = reloader.reload("SIGHUP").await;
                }
            }))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP; reload with POST /reload on the admin listener");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = reloader;
        None
    }
}

/// Aborts a background task when the gateway stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
