//! PURE pieces of the legacy-client report (`/legacy-clients`): which published library a user
//! agent names, and which release of it stops calling the legacy endpoints. The table of known
//! libraries is data with the source of every row (the facts are those of
//! `shared/contract/legacy-libraries.md`, read from the packages' own published files). No I/O.

use std::cmp::Ordering;

/// One published client library that calls the legacy endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownLibrary {
    /// The library as its users know it, with its registry.
    pub library: &'static str,
    /// What its user agent starts a product with; the version follows it, when it has one.
    pub agent_prefix: &'static str,
    /// The first release without legacy calls; `None` when no release has stopped.
    pub first_without: Option<&'static str>,
    /// What to do instead when no release has stopped (or the library is gone).
    pub instead: &'static str,
    /// Where the facts come from.
    pub source: &'static str,
}

/// The known legacy libraries, by the user agent they send.
pub const KNOWN_LIBRARIES: [KnownLibrary; 5] = [
    KnownLibrary {
        library: "@octokit/rest (npm)",
        agent_prefix: "octokit.js/",
        first_without: Some("17.0.0"),
        instead: "",
        source: "npm view @octokit/rest@17.0.0 dependencies; @octokit/plugin-rest-endpoint-methods 2.4.1 dist-src/generated/endpoints.js",
    },
    KnownLibrary {
        library: "octokit.rb (RubyGems)",
        agent_prefix: "Octokit Ruby Gem ",
        first_without: Some("4.17.0"),
        instead: "",
        source: "octokit.rb lib/octokit/client/authorizations.rb L154-202, changed in 4.17.0 (2020-03-10)",
    },
    KnownLibrary {
        library: "go-github (Go modules)",
        agent_prefix: "go-github",
        first_without: Some("v30.0.0"),
        instead: "",
        source: "go-github github/authorizations.go L277-330 at v29.0.3, removed in commit 419f07c3 (2020-03-17)",
    },
    KnownLibrary {
        library: "github3.py (PyPI)",
        agent_prefix: "github3.py/",
        first_without: None,
        instead: "no release stops (checked up to 4.0.1): call POST, PATCH or DELETE /applications/{client_id}/token with the token in a JSON body",
        source: "github3.py github3/github.py L613, L2141, L2166 (4.0.1)",
    },
    KnownLibrary {
        library: "github, \"node-github\" (npm)",
        agent_prefix: "NodeJS HTTP Client",
        first_without: None,
        instead: "the package ended at 13.1.1 (14.0.0 is a deprecation stub): replace it with @octokit/rest 17.0.0 or later",
        source: "github (npm) lib/routes.json L139-166 (13.1.1)",
    },
];

/// What the report advises for one user agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advice {
    /// The library the user agent names.
    pub library: &'static str,
    /// What to do, e.g. "upgrade @octokit/rest (npm) 16.43.2 to 17.0.0 or later".
    pub text: String,
    /// Where the facts come from.
    pub source: &'static str,
}

/// The advice for a user agent that names a known legacy library; `None` when it names none, or
/// a release that no longer calls the legacy endpoints (the calls come from something else).
///
/// # Example
/// ```
/// use oauth_apps_gateway::report::advice;
///
/// let a = advice("octokit.js/16.43.2 Node.js/20.20.2 (Linux 6.18; x64)").unwrap();
/// assert_eq!(a.text, "upgrade @octokit/rest (npm) 16.43.2 to 17.0.0 or later");
/// assert_eq!(advice("octokit.js/17.1.0 Node.js/20.20.2"), None);
/// ```
pub fn advice(user_agent: &str) -> Option<Advice> {
    KNOWN_LIBRARIES.iter().find_map(|lib| {
        let at = user_agent.find(lib.agent_prefix)?;
        let starts_product = at == 0 || user_agent[..at].ends_with(' ');
        if !starts_product {
            return None;
        }
        let rest = &user_agent[at + lib.agent_prefix.len()..];
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let version = rest
            .split(|c: char| c.is_whitespace() || c == '(')
            .next()
            .filter(|v| v.starts_with(|c: char| c.is_ascii_digit() || c == 'v'));
        let text = match (lib.first_without, version) {
            (Some(fixed), Some(v)) if compare_versions(v, fixed) != Ordering::Less => return None,
            (Some(fixed), Some(v)) => format!("upgrade {} {v} to {fixed} or later", lib.library),
            (Some(fixed), None) => format!("upgrade {} to {fixed} or later", lib.library),
            (None, _) => format!("{}: {}", lib.library, lib.instead),
        };
        Some(Advice {
            library: lib.library,
            text,
            source: lib.source,
        })
    })
}

/// Compares dotted numeric versions (`v` prefix and pre-release suffixes ignored).
fn compare_versions(a: &str, b: &str) -> Ordering {
    let parts = |v: &str| -> Vec<u64> {
        v.trim_start_matches('v')
            .split(['-', '+'])
            .next()
            .unwrap_or("")
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    let len = a.len().max(b.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    (0..len)
        .map(|i| at(&a, i).cmp(&at(&b, i)))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// Client-supplied text as the report shows it: control characters escaped, at most `max`
/// bytes (cut at a character boundary, marked with `…`).
pub fn shown(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_per_user_agent() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "octokit.js/16.43.2 Node.js/20.20.2 (Linux 6.18; x64)",
                Some("upgrade @octokit/rest (npm) 16.43.2 to 17.0.0 or later"),
            ),
            (
                "octokit.js/15.18.3 Node.js/10.0.0",
                Some("upgrade @octokit/rest (npm) 15.18.3 to 17.0.0 or later"),
            ),
            ("octokit.js/17.0.0 Node.js/20", None),
            ("octokit-rest.js/18.12.0 octokit-core.js/3.6.0", None),
            (
                "Octokit Ruby Gem 4.16.0",
                Some("upgrade octokit.rb (RubyGems) 4.16.0 to 4.17.0 or later"),
            ),
            ("Octokit Ruby Gem 4.25.1", None),
            (
                "go-github",
                Some("upgrade go-github (Go modules) to v30.0.0 or later"),
            ),
            (
                "go-github/v29.0.3",
                Some("upgrade go-github (Go modules) v29.0.3 to v30.0.0 or later"),
            ),
            ("go-github/v50.0.0", None),
            (
                "github3.py/4.0.1",
                Some(
                    "github3.py (PyPI): no release stops (checked up to 4.0.1): call POST, PATCH or DELETE /applications/{client_id}/token with the token in a JSON body",
                ),
            ),
            (
                "NodeJS HTTP Client",
                Some(
                    "github, \"node-github\" (npm): the package ended at 13.1.1 (14.0.0 is a deprecation stub): replace it with @octokit/rest 17.0.0 or later",
                ),
            ),
            ("python-requests/2.31.0", None),
            ("curl/8.5.0", None),
            ("notoctokit.js/16.0.0", None),
            ("", None),
        ];
        for (ua, want) in cases {
            assert_eq!(advice(ua).map(|a| a.text).as_deref(), *want, "{ua}");
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("16.43.2", "17.0.0"), Ordering::Less);
        assert_eq!(compare_versions("v29.0.3", "v30.0.0"), Ordering::Less);
        assert_eq!(compare_versions("4.17", "4.17.0"), Ordering::Equal);
        assert_eq!(compare_versions("4.100.0", "4.17.0"), Ordering::Greater);
        assert_eq!(compare_versions("17.0.0-beta.1", "17.0.0"), Ordering::Equal);
    }

    #[test]
    fn shown_escapes_and_cuts() {
        assert_eq!(shown("octokit.js/16", 64), "octokit.js/16");
        assert_eq!(shown("a\nb\x1b", 64), "a\\nb\\u{1b}");
        assert_eq!(shown("ééé", 4), "éé…");
    }
}
