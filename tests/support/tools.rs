//! Outside programs a test needs (node, promtool, prometheus): found on PATH, or a panic that
//! names the program and how to install it. Tests that call these are `#[ignore = "needs …"]`
//! and run with `cargo test -- --include-ignored`; they never pass by skipping.

use std::path::PathBuf;

/// `program` on PATH. Panics with `install` (how to get it) when it is not there.
pub fn require(program: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("this test needs `{program}`, which is not on PATH: {install}"))
}

/// How to install promtool and prometheus (both in Debian's `prometheus` package).
pub const PROMETHEUS_INSTALL: &str =
    "apt-get install prometheus (Debian's package has both prometheus and promtool)";
