//! Log output: builds the tracing-subscriber stack (JSON or text lines, level from config,
//! `RUST_LOG` overriding it). The only user of tracing_subscriber. What is logged is decided
//! where events are emitted; nothing emitted anywhere holds a token, secret or Authorization.

use tracing::Subscriber;
use tracing::level_filters::LevelFilter;
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

/// Changes the level of a running subscriber (a reload of `log.level`).
pub struct LogLevel {
    set: Box<dyn Fn(LevelFilter) -> Result<(), String> + Send + Sync>,
    /// `RUST_LOG` set the filter: it stays in force over `log.level`.
    from_env: bool,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel")
            .field("from_env", &self.from_env)
            .finish_non_exhaustive()
    }
}

impl LogLevel {
    /// The control of a subscriber's reloadable level filter.
    fn new<S: Send + Sync + 'static>(
        handle: tracing_subscriber::reload::Handle<EnvFilter, S>,
        from_env: bool,
    ) -> Self {
        let set = move |l: LevelFilter| handle.reload(level_filter(l)).map_err(|e| e.to_string());
        LogLevel {
            set: Box::new(set),
            from_env,
        }
    }

    /// Puts `level` in force for every event from now on. With `RUST_LOG` set, which overrides
    /// `log.level`, nothing changes and `Ok(false)` says so.
    ///
    /// # Errors
    /// The subscriber is gone (the process is ending).
    pub fn set(&self, level: LevelFilter) -> Result<bool, String> {
        if self.from_env {
            return Ok(false);
        }
        (self.set)(level).map(|()| true)
    }
}

/// Builds the subscriber for `cfg`, writing lines to `writer`, and the handle that changes its
/// level. `rust_log`, when set and not empty, replaces `cfg.level` as the filter.
///
/// # Errors
/// [`LogError::Filter`] when `rust_log` is not a valid filter.
pub fn subscriber<W>(
    cfg: &LogConfig,
    rust_log: Option<&str>,
    writer: W,
) -> Result<(Box<dyn Subscriber + Send + Sync>, LogLevel), LogError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let rust_log = rust_log.filter(|v| !v.trim().is_empty());
    let filter = match rust_log {
        Some(value) => EnvFilter::try_new(value).map_err(|e| LogError::Filter {
            value: value.to_owned(),
            reason: e.to_string(),
        })?,
        None => level_filter(cfg.level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(true);
    let from_env = rust_log.is_some();
    Ok(match cfg.format {
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_filter_reloading();
            let level = LogLevel::new(builder.reload_handle(), from_env);
            (Box::new(builder.finish()), level)
        }
        LogFormat::Text => {
            let builder = builder.with_ansi(false).with_filter_reloading();
            let level = LogLevel::new(builder.reload_handle(), from_env);
            (Box::new(builder.finish()), level)
        }
    })
}

fn level_filter(level: LevelFilter) -> EnvFilter {
    EnvFilter::default().add_directive(level.into())
}

/// Installs the process-wide subscriber for `cfg`, writing to standard output and honouring
/// `RUST_LOG`; returns the handle that changes its level.
///
/// # Errors
/// [`LogError::Filter`] for a bad `RUST_LOG`; [`LogError::AlreadyInstalled`] when called twice.
pub fn init(cfg: &LogConfig) -> Result<LogLevel, LogError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (sub, level) = subscriber(cfg, rust_log.as_deref(), std::io::stdout)?;
    tracing::subscriber::set_global_default(sub).map_err(|_| LogError::AlreadyInstalled)?;
    Ok(level)
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

    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_level_changes_while_running_unless_rust_log_set_it() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let cfg = LogConfig {
                format,
                level: LevelFilter::INFO,
            };
            let lines = Lines::default();
            let writer = lines.clone();
            let (sub, level) = subscriber(&cfg, None, move || writer.clone()).unwrap();
            tracing::subscriber::with_default(sub, || {
                tracing::debug!("before the change");
                assert_eq!(level.set(LevelFilter::DEBUG), Ok(true));
                tracing::debug!("after the change");
            });
            let out = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            assert!(!out.contains("before the change"), "{out}");
            assert!(out.contains("after the change"), "{out}");

            let (_sub, level) = subscriber(&cfg, Some("warn"), std::io::sink).unwrap();
            assert_eq!(level.set(LevelFilter::DEBUG), Ok(false), "RUST_LOG wins");
        }
    }
}
