//! The shipped config.toml and the command line: the annotated default file loads and equals
//! the built-in defaults; `--check-config` accepts it and rejects bad files with a message that
//! names the key, the value, what was expected and where the value is, in TOML's terms; a
//! relative path in the file is relative to the file.

use std::path::Path;
use std::process::{Command, Output};

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

/// `--check-config --config <config>`, run from `cwd`.
fn check_config(cwd: &Path, config: &Path) -> Output {
    Command::new(BIN)
        .current_dir(cwd)
        .args(["--check-config", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn check_config_says_where_the_bad_value_is() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "[server]\nlisten = \"nonsense\"\n",
            &[
                "bad.toml: invalid value for `server.listen`: \"nonsense\"",
                "(line 2, column 10)",
            ],
        ),
        // A nested table.
        (
            "[migration]\nmode = \"observe\"\n\n[migration.operations]\ncheck = \"reject\"\nreset = \"drop\"\n",
            &[
                "invalid value for `migration.operations.reset`: \"drop\"",
                "(line 6, column 9)",
            ],
        ),
        // The second entry of an array of tables.
        (
            "[[migration.brownouts]]\nstart = 2027-03-01T14:00:00Z\nend = 2027-03-01T15:00:00Z\n\n[[migration.brownouts]]\nstart = 2027-03-08T14:00:00Z\nend = 2027-03-08T13:00:00Z\n",
            &[
                "invalid value for `migration.brownouts[1].end`: 2027-03-08T13:00:00Z",
                "after the window's start",
                "(line 7, column 7)",
            ],
        ),
        // The second element of an array.
        (
            "[failed_checks]\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"lb.internal\",\n]\n",
            &[
                "invalid value for `failed_checks.trusted_proxies[1]`: \"lb.internal\"",
                "(line 4, column 3)",
            ],
        ),
        (
            "[migration]\ndeprecation_date = \"2020-02-14\"\nsunset_date = \"2020-01-01\"\n",
            &["`migration.sunset_date`", "(line 3, column 15)"],
        ),
        // A default that does not fit another key: the other key is named.
        (
            "[server]\nmax_connections = 10\n",
            &[
                "invalid value for `server.max_connections_per_ip`: 256",
                "`server.max_connections`",
                "(default; not in the file)",
            ],
        ),
    ];
    for (text, wanted) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = check_config(dir.path(), &path);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in *wanted {
            assert!(err.contains(w), "{text:?}: {err:?} lacks {w:?}");
        }
    }
}

#[test]
fn wrong_types_are_named_in_tomls_terms_never_rusts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    // The two examples, as the operator sees them.
    for (text, wanted) in [
        (
            "[migration]\nsunset_date = 2027-06-30\n",
            "bad.toml: `migration.sunset_date` must be a quoted string like \"2027-06-30\", not the unquoted date 2027-06-30 (line 2, column 15)",
        ),
        (
            "[failed_checks]\ncredential_burst = -5\n",
            "bad.toml: `failed_checks.credential_burst` must be a non-negative whole number, not -5 (line 2, column 20)",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = String::from_utf8_lossy(&check_config(dir.path(), &path).stderr).into_owned();
        assert!(err.contains(wanted), "{text:?}: {err:?}");
    }
    // Each kind of TOML value where each kind of key is expected.
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
    ];
    let values = [
        "\"text\"",
        "-5",
        "1.5",
        "true",
        "2027-06-30",
        "07:30:00",
        "[1, 2]",
        "{ a = 1 }",
        "99999999999999999999",
    ];
    let keys = [
        ("server", "listen"),
        ("server", "max_request_body_bytes"),
        ("server", "max_request_headers"),
        ("server", "http2_max_concurrent_streams"),
        ("server", "worker_threads"),
        ("upstream", "ca_file"),
        ("migration", "status_compat"),
        ("migration", "sunset_date"),
        ("failed_checks", "credential_burst"),
        ("failed_checks", "trusted_proxies"),
    ];
    let mut checked = 0;
    for (section, key) in keys {
        for value in values {
            let text = format!("[{section}]\n{key} = {value}\n");
            std::fs::write(&path, &text).unwrap();
            let Err(e) = Config::load(&path) else {
                continue; // the right type after all (a string for listen...)
            };
            // Without the file's name: a temporary directory's name is random letters.
            let msg = e
                .to_string()
                .replacen(&*path.to_string_lossy(), "bad.toml", 1);
            if msg.contains("invalid value for") {
                continue; // the right type, a bad value: not a type error
            }
            checked += 1;
            // The key, or the element of it (`failed_checks.trusted_proxies[0]`).
            let named = msg.starts_with(&format!("bad.toml: `{section}.{key}"));
            assert!(named && msg.contains("` must be "), "{text:?}: {msg:?}");
            assert!(msg.contains(" (line 2, column "), "{text:?}: {msg:?}");
            for word in FORBIDDEN {
                assert!(!msg.contains(word), "{text:?}: {msg:?} says {word:?}");
            }
        }
    }
    assert!(checked > 60, "only {checked} wrong types checked");
    // Sections and arrays of tables of the wrong kind.
    for (text, wanted) in [
        ("server = 5\n", "`server` must be a table, not 5"),
        (
            "[migration.brownouts]\nstart = 2027-03-01T14:00:00Z\n",
            "`migration.brownouts` must be an array (an array of tables is written with double brackets: [[migration.brownouts]]), not a table",
        ),
        (
            "[migration]\nbrownouts = [\"2027-03-01\"]\n",
            "`migration.brownouts[0]` must be a table, not the string \"2027-03-01\"",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        let msg = msg.replacen(&*path.to_string_lossy(), "bad.toml", 1);
        assert!(msg.contains(wanted), "{text:?}: {msg:?}");
        for word in FORBIDDEN {
            assert!(!msg.contains(word), "{text:?}: {msg:?} says {word:?}");
        }
    }
}

#[test]
fn a_relative_ca_file_is_relative_to_the_config_file_and_errors_show_where_it_was_looked_for() {
    // The config is in conf/, the CA next to it in conf/certs/; the process runs from the parent.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(conf.join("certs")).unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["ghe.example".to_owned()]).unwrap();
    std::fs::write(conf.join("certs/ca.pem"), ca.cert.pem()).unwrap();
    let config = Path::new("conf/gw.toml");

    std::fs::write(
        dir.path().join(config),
        "[upstream]\nca_file = \"certs/ca.pem\"\n",
    )
    .unwrap();
    let out = check_config(dir.path(), config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(
        dir.path().join(config),
        "[upstream]\nca_file = \"certs/missing.pem\"\n",
    )
    .unwrap();
    let out = check_config(dir.path(), config);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let resolved = conf.join("certs/missing.pem");
    assert!(
        err.starts_with("error: conf/gw.toml: upstream.ca_file "),
        "{err}"
    );
    assert!(
        err.contains(&*resolved.to_string_lossy()),
        "{err} lacks {resolved:?}"
    );
}
