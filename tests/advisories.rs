//! Dependency hygiene (issue 10, point 5): `Cargo.lock` is checked against the RustSec advisory
//! database snapshot kept in `audit/advisory-db` (CI has no network; refresh it with
//! `scripts/refresh-advisory-db.sh`). The check is the `rustsec` library that `cargo audit` is
//! built on, so `cargo audit --db audit/advisory-db --no-fetch` gives the same answer.
//!
//! A vulnerability or an unsound-code advisory against any locked crate fails the test; an
//! unmaintained crate is printed, not failed (there is often no replacement yet). An advisory
//! that does not apply to this project can be listed in [`IGNORED`] with the reason.

use std::path::Path;

use rustsec::advisory::{Id, Informational};
use rustsec::report::{Report, Settings};
use rustsec::{Database, Lockfile};

/// Advisory ids that do not apply to this project, each with why. Empty: none are ignored.
const IGNORED: &[(&str, &str)] = &[];

fn database() -> Database {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("audit/advisory-db");
    Database::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

fn settings() -> Settings {
    Settings {
        ignore: IGNORED
            .iter()
            .map(|(id, _)| id.parse::<Id>().expect("advisory id"))
            .collect(),
        informational_warnings: vec![Informational::Unsound, Informational::Unmaintained],
        ..Settings::default()
    }
}

/// One line per finding: advisory id, crate and version, title.
fn findings(report: &Report) -> (Vec<String>, Vec<String>) {
    let vulnerabilities = report
        .vulnerabilities
        .list
        .iter()
        .map(|v| {
            format!(
                "{} {} {}: {}",
                v.advisory.id, v.package.name, v.package.version, v.advisory.title
            )
        })
        .collect();
    let warnings = report
        .warnings
        .iter()
        .flat_map(|(kind, list)| list.iter().map(move |w| (kind, w)))
        .map(|(kind, w)| {
            let id = w
                .advisory
                .as_ref()
                .map_or_else(|| "-".to_owned(), |a| a.id.to_string());
            format!("{kind:?} {id} {} {}", w.package.name, w.package.version)
        })
        .collect();
    (vulnerabilities, warnings)
}

#[test]
fn cargo_lock_has_no_known_vulnerability_or_unsound_crate() {
    let db = database();
    let lockfile = Lockfile::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"))
        .expect("Cargo.lock");
    let report = Report::generate(&db, &lockfile, &settings());
    let (vulnerabilities, warnings) = findings(&report);
    eprintln!(
        "advisories: {} in the snapshot, {} locked crates, {} vulnerabilities, {} warnings",
        db.iter().count(),
        lockfile.packages.len(),
        vulnerabilities.len(),
        warnings.len()
    );
    for w in &warnings {
        eprintln!("  warning: {w}");
    }
    let unsound: Vec<_> = warnings
        .iter()
        .filter(|w| w.starts_with("Unsound"))
        .collect();
    assert!(
        vulnerabilities.is_empty() && unsound.is_empty(),
        "Cargo.lock has advisories: upgrade the crate, or list the id in IGNORED with why\n{}",
        vulnerabilities
            .iter()
            .chain(unsound.into_iter())
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The snapshot is loaded and matched, not silently empty: a lockfile pinning h2 0.4.2 (before
/// the CONTINUATION flood fix, RUSTSEC-2024-0332) is reported.
#[test]
fn a_lockfile_with_a_known_vulnerable_h2_is_reported() {
    let lockfile: Lockfile = "version = 3\n\n\
        [[package]]\nname = \"h2\"\nversion = \"0.4.2\"\n\
        source = \"registry+https://github.com/rust-lang/crates.io-index\"\n"
        .parse()
        .expect("lockfile");
    let report = Report::generate(&database(), &lockfile, &settings());
    let (vulnerabilities, _) = findings(&report);
    assert!(
        vulnerabilities
            .iter()
            .any(|v| v.starts_with("RUSTSEC-2024-0332 h2 0.4.2")),
        "expected RUSTSEC-2024-0332 for h2 0.4.2, got {vulnerabilities:#?}"
    );
}

/// The snapshot says where it came from, so a reviewer can tell how old it is.
#[test]
fn the_snapshot_records_its_source_commit() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("audit/advisory-db/SNAPSHOT.toml");
    let text = std::fs::read_to_string(&path).expect("SNAPSHOT.toml");
    let commit = text
        .lines()
        .find_map(|l| l.strip_prefix("commit = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("a commit line");
    assert_eq!(commit.len(), 40, "commit {commit:?} is not a full hash");
    assert!(commit.bytes().all(|b| b.is_ascii_hexdigit()));
}
