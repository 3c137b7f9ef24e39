//! The composition root: turns a validated `Config` into running parts (upstream client, proxy
//! service, listener) and runs them until shutdown. The only place that knows how the pieces
//! fit; each piece gets what it needs handed in, so tests assemble the same parts on port 0.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::proxy::{Proxy, ProxySettings};
use crate::server::{self, DrainOutcome, ServeOptions};
use crate::upstream::{self, Upstream, UpstreamBuildError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The upstream client could not be built (e.g. a bad `upstream.ca_file`).
    #[error(transparent)]
    Upstream(#[from] UpstreamBuildError),
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
}

/// Binds every listener named in `config`.
///
/// # Errors
/// [`AppError::Bind`] naming the key and address that failed.
pub async fn bind(config: &Config) -> Result<Listeners, AppError> {
    let addr = config.server.listen;
    let proxy = TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind {
            key: "server.listen",
            addr,
            source,
        })?;
    Ok(Listeners { proxy })
}

/// Builds every runtime object `config` describes without binding or serving: what
/// `--check-config` runs to catch errors that only appear when files are read (the CA file).
///
/// # Errors
/// [`AppError::Upstream`] when the upstream client cannot be built.
pub fn check(config: &Config) -> Result<(), AppError> {
    upstream::install_crypto_provider();
    Upstream::new(&config.upstream)?;
    Ok(())
}

/// Runs the gateway on `listeners` until `shutdown` resolves, then drains within
/// `server.shutdown_grace` and reports how the drain ended.
///
/// # Errors
/// [`AppError::Upstream`] when the upstream client cannot be built.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<DrainOutcome, AppError> {
    upstream::install_crypto_provider();
    let upstream = Upstream::new(&config.upstream)?;
    let proxy = Proxy::new(upstream, ProxySettings::from(&config));
    let opts = ServeOptions {
        header_read_timeout: config.server.header_read_timeout,
        shutdown_grace: config.server.shutdown_grace,
    };
    if let Ok(addr) = listeners.proxy.local_addr() {
        tracing::info!(
            listen = %addr,
            upstream = %config.upstream.url,
            version = env!("CARGO_PKG_VERSION"),
            "oauth-apps-gateway serving"
        );
    }
    let make_service = move |_peer: SocketAddr| {
        let proxy = proxy.clone();
        hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        })
    };
    Ok(server::serve(listeners.proxy, make_service, opts, shutdown).await)
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
