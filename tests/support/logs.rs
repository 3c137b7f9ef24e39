//! Captures what the gateway's own tracing subscriber writes, for tests that read the logs. The
//! subscriber is the thread's default, so the test must run on a current-thread runtime (every
//! task the gateway spawns then logs on this thread).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use oauth_apps_gateway::config::{LogConfig, LogFormat};
use oauth_apps_gateway::logging;
use tracing::level_filters::LevelFilter;

/// Collects everything the subscriber writes.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    /// Everything written so far.
    pub fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8(bytes).expect("UTF-8 logs")
    }

    /// The access events written so far (one line each).
    pub fn access_lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("oauth_apps_gateway::access"))
            .map(str::to_owned)
            .collect()
    }
}

/// Installs the gateway's subscriber, in `format` at `level`, as this thread's default until the
/// guard drops; returns the guard and the capture.
pub fn capture(
    format: LogFormat,
    level: LevelFilter,
) -> (tracing::subscriber::DefaultGuard, Capture) {
    let capture = Capture::default();
    let writer = capture.clone();
    let (sub, _level) =
        logging::subscriber(&LogConfig { format, level }, None, move || writer.clone())
            .expect("subscriber");
    (tracing::subscriber::set_default(sub), capture)
}

/// The fields of a text-format event line, `key=value` after the target: a quoted value as
/// written between its quotes (escapes kept), a bare one up to the next space.
pub fn text_fields(line: &str) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    let mut rest = line.split_once(": ").map_or(line, |(_, r)| r).trim_start();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let mut escaped = false;
                let end = quoted
                    .char_indices()
                    .find(|&(_, c)| {
                        let closes = !escaped && c == '"';
                        escaped = !escaped && c == '\\';
                        closes
                    })
                    .map_or(quoted.len(), |(i, _)| i);
                (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        fields.insert(key, value.to_owned());
        rest = next.trim_start();
    }
    fields
}
