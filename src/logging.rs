//! Log output: builds the tracing-subscriber stack (JSON or text lines, level from config,
//! `RUST_LOG` overriding it). The only user of tracing_subscriber. What is logged is decided
//! where events are emitted; nothing emitted anywhere holds a token, secret or Authorization.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogConfig, LogFormat};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `RUST_LOG` is set but is not a valid filter.
    #[error(
        "RUST_LOG={value:?} is not a valid log filter (expected e.g. \"info\" or \"oauth_apps_gateway=debug,hyper=warn\"): {reason}"
    )]
    Filter {
        /// The variable's value.
        value: String,
        /// What the parser reported.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("a global log subscriber is already installed")]
    AlreadyInstalled,
}

/// Builds the subscriber for `cfg`, writing lines to `writer`. `rust_log`, when set and not
/// empty, replaces `cfg.level` as the filter.
///
/// # Errors
/// [`LogError::Filter`] when `rust_log` is not a valid filter.
pub fn subscriber<W>(
    cfg: &LogConfig,
    rust_log: Option<&str>,
    writer: W,
) -> Result<Box<dyn Subscriber + Send + Sync>, LogError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = match rust_log.filter(|v| !v.trim().is_empty()) {
        Some(value) => EnvFilter::try_new(value).map_err(|e| LogError::Filter {
            value: value.to_owned(),
            reason: e.to_string(),
        })?,
        None => EnvFilter::default().add_directive(cfg.level.into()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(true);
    Ok(match cfg.format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
        LogFormat::Text => Box::new(builder.with_ansi(false).finish()),
    })
}

/// Installs the process-wide subscriber for `cfg`, writing to standard output and honouring
/// `RUST_LOG`.
///
/// # Errors
/// [`LogError::Filter`] for a bad `RUST_LOG`; [`LogError::AlreadyInstalled`] when called twice.
pub fn init(cfg: &LogConfig) -> Result<(), LogError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let sub = subscriber(cfg, rust_log.as_deref(), std::io::stdout)?;
    tracing::subscriber::set_global_default(sub).map_err(|_| LogError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn bad_rust_log_is_reported() {
        let cfg = LogConfig {
            format: LogFormat::Text,
            level: LevelFilter::INFO,
        };
        let e = subscriber(&cfg, Some("oauth_apps_gateway=loud"), std::io::sink)
            .err()
            .expect("invalid filter accepted");
        assert!(
            e.to_string()
                .contains("RUST_LOG=\"oauth_apps_gateway=loud\""),
            "{e}"
        );
        assert!(subscriber(&cfg, Some("  "), std::io::sink).is_ok());
        assert!(subscriber(&cfg, Some("debug,hyper=warn"), std::io::sink).is_ok());
    }
}
