//! The `oauth-apps-gateway` binary: parse the command line, load the config, set up logs, run.
//! Exit codes: 0 stopped after a complete drain (or `--check-config` found the config valid);
//! 1 runtime failure (a listener cannot be bound, the runtime cannot start) or a drain cut
//! short by `server.shutdown_grace`; 2 invalid configuration (the file, a file it names such as
//! `upstream.ca_file`, or `RUST_LOG`).

#![forbid(unsafe_code)]

mod cli;

/// The process's allocator: jemalloc, which returns freed memory to the system (issue 10: after
/// a burst of hostile connections RSS comes back to within 2x of idle; glibc's malloc kept the
/// peak). Built with `background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0` (see
/// `.cargo/config.toml`): pages unused for about one second are purged by jemalloc's own
/// thread, whether or not the gateway is allocating. Operators can override the options at
/// start with the `_RJEM_MALLOC_CONF` environment variable (jemalloc's `MALLOC_CONF` syntax).
#[cfg(all(unix, not(target_os = "macos")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;

use clap::Parser;
use oauth_apps_gateway::{app, config::Config, logging, server::DrainOutcome};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        let log_filter = std::env::var("RUST_LOG").ok();
        if let Err(e) = logging::subscriber(&config.log, log_filter.as_deref(), std::io::sink) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        return match app::check(&config) {
            Ok(()) => {
                println!("{}: configuration is valid", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}: {e}", cli.config.display());
                ExitCode::from(2)
            }
        };
    }
    let log_level = match logging::init(&config.log) {
        Ok(level) => level,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Worker 0: this thread's single-threaded runtime, which also accepts connections and
    // serves the admin listener; `app::run` starts the other workers.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listeners = app::bind(&config).await?;
        let options = app::RunOptions {
            config_path: Some(cli.config.clone()),
            log_level: Some(log_level),
            reload_on_sighup: true,
            ..app::RunOptions::default()
        };
        app::run_with(config, listeners, app::shutdown_signal(), options).await
    });
    // Blocking tasks still running (a worker thread that did not stop) do not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(DrainOutcome::Completed) => ExitCode::SUCCESS,
        Ok(DrainOutcome::TimedOut) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            match e {
                // A file the config names (upstream.ca_file, the TLS files): say which config
                // named it.
                app::AppError::Upstream(_) | app::AppError::Tls(_) | app::AppError::Shared(_) => {
                    eprintln!("error: {}: {e}", cli.config.display())
                }
                _ => eprintln!("error: {e}"),
            }
            match e {
                app::AppError::Upstream(_)
                | app::AppError::Tls(_)
                | app::AppError::Shared(_)
                | app::AppError::Metrics(_)
                | app::AppError::Limiter(_) => ExitCode::from(2),
                app::AppError::Bind { .. } | app::AppError::Workers(_) => ExitCode::FAILURE,
            }
        }
    }
}
