//! The shipped config.toml and the command line: the annotated default file loads and equals
//! the built-in defaults; `--check-config` accepts it and rejects bad files with a message that
//! names the key, the value and what was expected.

use std::path::Path;
use std::process::Command;

use oauth_apps_gateway::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_oauth-apps-gateway");

fn shipped() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
}

#[test]
fn shipped_config_is_the_documented_default() {
    let file = Config::load(shipped()).expect("config.toml loads");
    let defaults = Config::default();
    // Compare through Debug: Config is plain data and every field shows there.
    assert_eq!(format!("{file:?}"), format!("{defaults:?}"));
    assert_eq!(file.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(file.upstream.url, "https://api.github.com");
}

#[test]
fn check_config_accepts_the_shipped_file() {
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(shipped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

#[test]
fn check_config_rejects_bad_files_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let cases = [
        (
            "[server]\nrequest_timeout = \"soon\"\n",
            vec!["server.request_timeout", "\"soon\"", "duration"],
        ),
        (
            "[upstream]\nurl = \"https://ghe.example/api/v3\"\n",
            vec!["upstream.url", "no path"],
        ),
        (
            "[server]\nlistne = \"127.0.0.1:1\"\n",
            vec!["listne", "line 2"],
        ),
        (
            &*format!("[upstream]\nca_file = {:?}\n", ca.display().to_string()),
            vec!["bad.toml", "upstream.ca_file", "ca.pem", "no CERTIFICATE"],
        ),
    ];
    for (text, wanted) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in wanted {
            assert!(err.contains(w), "{text:?}: {err:?} lacks {w:?}");
        }
    }
}

#[test]
fn check_config_rejects_a_bad_rust_log() {
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(shipped())
        .env("RUST_LOG", "oauth_apps_gateway=loud")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RUST_LOG"));
}

#[test]
fn missing_config_file_is_reported() {
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/oauth-apps-gateway.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/oauth-apps-gateway.toml"));
}
