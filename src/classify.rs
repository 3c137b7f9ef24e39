//! Classifies a request head by method and path: one of GitHub's four legacy OAuth
//! Applications operations (token in the path), a call to the replacement token API, or
//! pass-through. Pure: no I/O, clock or logging, and it borrows from the path (it allocates only
//! when a segment holds percent-escapes).
//!
//! Source: GitHub REST "OAuth Applications" (GHES 2.20 to 3.1 carry both forms; the legacy form
//! was removed from api.github.com on 2021-05-05). `GET .../grants/{access_token}` never existed.

use std::borrow::Cow;
use std::fmt;

use http::Method;
use percent_encoding::percent_decode_str;

/// The GitHub Enterprise Server API prefix that may stand before `/applications`; kept as is.
pub const ENTERPRISE_PREFIX: &str = "/api/v3";

/// An OAuth Applications token operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Check a token: legacy `GET` (or `HEAD`) `.../tokens/{t}`, new `POST .../token` (GitHub REST:
    /// Check a token).
    Check,
    /// Reset a token: legacy `POST .../tokens/{t}`, new `PATCH .../token` (GitHub REST: Reset a token).
    Reset,
    /// Revoke one token: legacy `DELETE .../tokens/{t}`, new `DELETE .../token`
    /// (GitHub REST: Delete an app token).
    RevokeToken,
    /// Revoke the grant (all the user's tokens for the app): legacy `DELETE .../grants/{t}`, new
    /// `DELETE .../grant` (GitHub REST: Delete an app authorization).
    RevokeGrant,
    /// Create a scoped token: `POST .../token/scoped`, new form only
    /// (GitHub REST: Create a scoped access token). Never a legacy operation.
    ScopeToken,
    /// Revoke every token of the app: legacy `DELETE .../tokens`, removed by GitHub with no
    /// replacement (github3.py 4.0.1 `revoke_authorizations` still calls it). Carries no token.
    RevokeAll,
}

/// The operations that have a legacy form, in a fixed order.
pub const LEGACY_OPERATIONS: [Operation; 5] = [
    Operation::Check,
    Operation::Reset,
    Operation::RevokeToken,
    Operation::RevokeGrant,
    Operation::RevokeAll,
];

impl Operation {
    /// Position in [`LEGACY_OPERATIONS`]; `None` for [`Operation::ScopeToken`].
    pub fn legacy_index(self) -> Option<usize> {
        LEGACY_OPERATIONS.iter().position(|&op| op == self)
    }

    /// The operation's name as used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Check => "check",
            Operation::Reset => "reset",
            Operation::RevokeToken => "revoke_token",
            Operation::RevokeGrant => "revoke_grant",
            Operation::ScopeToken => "scope_token",
            Operation::RevokeAll => "revoke_all",
        }
    }

    /// Whether the operation judges one access token (all but revoke-all), so that a 404 or 422
    /// to it is a token failure.
    pub fn has_token(self) -> bool {
        self != Operation::RevokeAll
    }

    /// Method and last path segment(s) of the replacement endpoint, after `/applications/{client_id}/`.
    /// Revoke-all has none: GitHub's advice is to revoke each token, which this names.
    pub fn replacement(self) -> (Method, &'static str) {
        match self {
            Operation::Check => (Method::POST, "token"),
            Operation::Reset => (Method::PATCH, "token"),
            Operation::RevokeToken => (Method::DELETE, "token"),
            Operation::RevokeGrant => (Method::DELETE, "grant"),
            Operation::ScopeToken => (Method::POST, "token/scoped"),
            Operation::RevokeAll => (Method::DELETE, "token"),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A legacy call, with the token taken out of its path. Its `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq)]
pub struct LegacyCall<'a> {
    /// Which of the four legacy operations.
    pub operation: Operation,
    /// `""` or [`ENTERPRISE_PREFIX`], as the client sent it.
    pub prefix: &'a str,
    /// The client_id path segment exactly as sent (still percent-encoded), for the new path.
    pub client_id_segment: &'a str,
    /// The client_id, percent-decoded.
    pub client_id: Cow<'a, str>,
    /// The OAuth access token, percent-decoded. Secret: never log or label it.
    pub access_token: Cow<'a, str>,
}

impl std::fmt::Debug for LegacyCall<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyCall")
            .field("operation", &self.operation)
            .field("prefix", &self.prefix)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// What a request is, judged from its method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// One of the four deprecated token-in-path operations: to be rewritten.
    Legacy(LegacyCall<'a>),
    /// The removed revoke-all call, `DELETE [/api/v3]/applications/{client_id}/tokens`.
    RevokeAll {
        /// `""` or [`ENTERPRISE_PREFIX`], as the client sent it.
        prefix: &'a str,
        /// The client_id path segment exactly as sent, for the 410 message.
        client_id_segment: &'a str,
        /// The client_id, percent-decoded.
        client_id: Cow<'a, str>,
    },
    /// A call to the replacement token API (token in the body); forwarded unchanged.
    TokenApi {
        /// Which operation.
        operation: Operation,
        /// The client_id, percent-decoded.
        client_id: Cow<'a, str>,
    },
    /// Anything else; forwarded unchanged.
    PassThrough,
}

impl Route<'_> {
    /// The client_id of a legacy or token-API call.
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Route::Legacy(call) => Some(&call.client_id),
            Route::RevokeAll { client_id, .. } | Route::TokenApi { client_id, .. } => {
                Some(client_id)
            }
            Route::PassThrough => None,
        }
    }

    /// The operation of a legacy or token-API call.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Route::Legacy(call) => Some(call.operation),
            Route::RevokeAll { .. } => Some(Operation::RevokeAll),
            Route::TokenApi { operation, .. } => Some(*operation),
            Route::PassThrough => None,
        }
    }
}

/// The class of a route, a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// A deprecated token-in-path call (well-formed or not).
    Legacy,
    /// A call to the replacement token API.
    TokenApi,
    /// Anything else.
    PassThrough,
}

impl RouteClass {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Legacy => "legacy",
            RouteClass::TokenApi => "token_api",
            RouteClass::PassThrough => "pass_through",
        }
    }
}

impl Route<'_> {
    /// The route's class.
    pub fn class(&self) -> RouteClass {
        match self {
            Route::Legacy(_) | Route::RevokeAll { .. } => RouteClass::Legacy,
            Route::TokenApi { .. } => RouteClass::TokenApi,
            Route::PassThrough => RouteClass::PassThrough,
        }
    }
}

/// Why a path of legacy shape cannot be served. Never carries the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed legacy {operation} call: {problem}")]
pub struct ClassifyError {
    /// The legacy operation the method and path shape name.
    pub operation: Operation,
    /// What is wrong with the path.
    pub problem: Malformed,
}

/// What is wrong with a legacy-shaped path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// `/applications/{client_id}/tokens/` with nothing after the last slash.
    #[error("the access_token path segment is empty")]
    EmptyToken,
    /// The access_token segment decodes to bytes that are not UTF-8.
    #[error("the access_token path segment is not valid UTF-8 after percent-decoding")]
    TokenNotUtf8,
    /// `/applications//tokens/...`.
    #[error("the client_id path segment is empty")]
    EmptyClientId,
    /// The client_id segment decodes to bytes that are not UTF-8.
    #[error("the client_id path segment is not valid UTF-8 after percent-decoding")]
    ClientIdNotUtf8,
    /// The segments do not form a valid path again once rewritten (not expected: they come
    /// from a request URI that parsed).
    #[error("the path cannot be rewritten into the replacement form")]
    Unrewritable,
}

/// Classifies a request by its method and path (the path without the query string).
///
/// Only an exact match is legacy: `/applications/{client_id}/tokens/{access_token}` with GET,
/// POST or DELETE, and `/applications/{client_id}/grants/{access_token}` with DELETE, optionally
/// behind `/api/v3`. Extra segments, a trailing slash or another method pass through.
///
/// # Errors
/// A legacy-shaped path whose client_id or token segment is empty or not UTF-8 after
/// percent-decoding (the caller answers 400).
///
/// # Example
/// ```
/// use http::Method;
/// use oauth_apps_gateway::classify::{Operation, Route, classify};
///
/// let Ok(Route::Legacy(call)) = classify(&Method::DELETE, "/api/v3/applications/Iv1.a/grants/gho%2Fx")
/// else { panic!("not a legacy call") };
/// assert_eq!(call.operation, Operation::RevokeGrant);
/// assert_eq!((call.prefix, &*call.client_id, &*call.access_token), ("/api/v3", "Iv1.a", "gho/x"));
///
/// // GET .../grants/{t} never existed: it passes through.
/// assert_eq!(classify(&Method::GET, "/applications/Iv1.a/grants/t"), Ok(Route::PassThrough));
/// ```
pub fn classify<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, ClassifyError> {
    let (prefix, rest) = match path.strip_prefix(ENTERPRISE_PREFIX) {
        Some(rest) if rest.starts_with('/') => (ENTERPRISE_PREFIX, rest),
        _ => ("", path),
    };
    let Some(rest) = rest.strip_prefix("/applications/") else {
        return Ok(Route::PassThrough);
    };
    let mut segments = rest.split('/');
    let (Some(client_id_segment), Some(kind)) = (segments.next(), segments.next()) else {
        return Ok(Route::PassThrough);
    };
    let (third, fourth) = (segments.next(), segments.next());
    if segments.next().is_some() {
        return Ok(Route::PassThrough);
    }

    let legacy = match (method, kind, third, fourth) {
        // The Ruby `gh` gem checks a token with HEAD; it is a check like GET.
        (&Method::GET | &Method::HEAD, "tokens", Some(t), None) => Some((Operation::Check, t)),
        (&Method::POST, "tokens", Some(t), None) => Some((Operation::Reset, t)),
        (&Method::DELETE, "tokens", Some(t), None) => Some((Operation::RevokeToken, t)),
        (&Method::DELETE, "grants", Some(t), None) => Some((Operation::RevokeGrant, t)),
        _ => None,
    };
    if let Some((operation, token_segment)) = legacy {
        let fail = |problem| ClassifyError { operation, problem };
        if client_id_segment.is_empty() {
            return Err(fail(Malformed::EmptyClientId));
        }
        let client_id = decode(client_id_segment).ok_or(fail(Malformed::ClientIdNotUtf8))?;
        let access_token = decode(token_segment).ok_or(fail(Malformed::TokenNotUtf8))?;
        if access_token.is_empty() {
            return Err(fail(Malformed::EmptyToken));
        }
        return Ok(Route::Legacy(LegacyCall {
            operation,
            prefix,
            client_id_segment,
            client_id,
            access_token,
        }));
    }

    if let (&Method::DELETE, "tokens", None) = (method, kind, third) {
        return match decode(client_id_segment) {
            Some(client_id) if !client_id.is_empty() => Ok(Route::RevokeAll {
                prefix,
                client_id_segment,
                client_id,
            }),
            Some(_) => Err(ClassifyError {
                operation: Operation::RevokeAll,
                problem: Malformed::EmptyClientId,
            }),
            None => Err(ClassifyError {
                operation: Operation::RevokeAll,
                problem: Malformed::ClientIdNotUtf8,
            }),
        };
    }

    let token_api = match (method, kind, third, fourth) {
        (&Method::POST, "token", None, None) => Some(Operation::Check),
        (&Method::PATCH, "token", None, None) => Some(Operation::Reset),
        (&Method::DELETE, "token", None, None) => Some(Operation::RevokeToken),
        (&Method::DELETE, "grant", None, None) => Some(Operation::RevokeGrant),
        (&Method::POST, "token", Some("scoped"), None) => Some(Operation::ScopeToken),
        _ => None,
    };
    match (token_api, decode(client_id_segment)) {
        (Some(operation), Some(client_id)) if !client_id.is_empty() => Ok(Route::TokenApi {
            operation,
            client_id,
        }),
        _ => Ok(Route::PassThrough),
    }
}

/// The client_id of any `[/api/v3]/applications/{client_id}/...` path with at least one segment
/// after the id, percent-decoded; `None` for other paths or an empty or undecodable id.
pub fn app_client_id(path: &str) -> Option<Cow<'_, str>> {
    let rest = match path.strip_prefix(ENTERPRISE_PREFIX) {
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    };
    let (segment, tail) = rest.strip_prefix("/applications/")?.split_once('/')?;
    if segment.is_empty() || tail.is_empty() {
        return None;
    }
    decode(segment).filter(|id| !id.is_empty())
}

/// The forms of a path the classifier matches, besides the path as sent: percent-encoded
/// unreserved characters decoded and dot segments removed (RFC 3986 §6.2.2.2, §6.2.2.3), then
/// also empty segments collapsed and a trailing slash dropped. Whether the upstream's router
/// squeezes `//` or resolves `..` is not the gateway's to bet on: every spelling of a legacy call
/// is treated as the call. Each form borrows when nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spellings<'a> {
    /// Unreserved characters decoded, dot segments removed.
    pub normalized: Cow<'a, str>,
    /// As `normalized`, with empty segments collapsed and no trailing slash.
    pub collapsed: Cow<'a, str>,
}

/// The [`Spellings`] of `path` (the path of a request target, without the query).
///
/// # Example
/// ```
/// use oauth_apps_gateway::classify::spellings;
///
/// let s = spellings("//api/v3/x/../applications/%49v1.a/./tokens/t/");
/// assert_eq!(s.normalized, "//api/v3/applications/Iv1.a/tokens/t/");
/// assert_eq!(s.collapsed, "/api/v3/applications/Iv1.a/tokens/t");
/// ```
pub fn spellings(path: &str) -> Spellings<'_> {
    let normalized = match decode_unreserved(path) {
        Cow::Borrowed(p) => remove_dot_segments(p),
        Cow::Owned(p) => Cow::Owned(remove_dot_segments(&p).into_owned()),
    };
    let collapsed = match collapse_empty_segments(&normalized) {
        Cow::Borrowed(_) => normalized.clone(),
        Cow::Owned(c) => Cow::Owned(c),
    };
    Spellings {
        normalized,
        collapsed,
    }
}

/// Decodes `%XX` escapes of unreserved characters (ALPHA, DIGIT, `-`, `.`, `_`, `~`: RFC 3986
/// §2.3), which mean the same decoded or not; every other escape stays as it is. A `%` that
/// starts no escape (invalid, RFC 3986 §2.1) becomes `%25`, so decoding never makes an escape
/// the client did not send (`%%32%65` is not `%2e`).
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let b = path.as_bytes();
    let hex = |i: usize| b.get(i).and_then(|&c| (c as char).to_digit(16));
    // What the `%` at `i` is: Some(Some(c)) an unreserved escape, Some(None) a stray `%`.
    let at = |i: usize| match (hex(i + 1), hex(i + 2)) {
        (Some(h), Some(l)) => {
            let c = (h * 16 + l) as u8;
            (c.is_ascii_alphanumeric() || b"-._~".contains(&c)).then_some(Some(c as char))
        }
        _ => Some(None),
    };
    if !path.match_indices('%').any(|(i, _)| at(i).is_some()) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 4);
    let mut i = 0;
    while i < path.len() {
        match (b[i], at(i)) {
            (b'%', Some(Some(c))) => {
                out.push(c);
                i += 3;
            }
            (b'%', Some(None)) => {
                out.push_str("%25");
                i += 1;
            }
            _ => {
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                i += ch.len_utf8().max(1);
            }
        }
    }
    Cow::Owned(out)
}

/// The path with every separator some server might see decoded or translated (`%2F`, `%5C`
/// and `\` as `/`) and `;` parameters cut from each segment; `None` when it has none of them.
/// A legacy call spelled this way is ambiguous: the gateway answers it 400 rather than guess.
pub fn with_separators_decoded(path: &str) -> Option<String> {
    let escaped_separator = path
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && matches!((w[1], w[2] | 0x20), (b'2', b'f') | (b'5', b'c')));
    if !escaped_separator && !path.contains(['\\', ';']) {
        return None;
    }
    let replaced = path
        .replace('\\', "/")
        .replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%5C", "/")
        .replace("%5c", "/");
    let cut: Vec<&str> = replaced
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect();
    Some(cut.join("/"))
}

/// Removes `.` and `..` segments (RFC 3986 §5.2.4); `..` above the root stays at the root.
fn remove_dot_segments(path: &str) -> Cow<'_, str> {
    if !path.split('/').any(|s| s == "." || s == "..") {
        return Cow::Borrowed(path);
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        // A path ending in a dot segment names a directory: it keeps its trailing slash.
        if last && (*seg == "." || *seg == "..") {
            out.push("");
        }
    }
    Cow::Owned(format!("/{}", out.join("/")))
}

/// Collapses runs of `/` into one and drops a trailing `/` (but for the root).
fn collapse_empty_segments(path: &str) -> Cow<'_, str> {
    let trailing = path.len() > 1 && path.ends_with('/');
    if !path.contains("//") && !trailing {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Percent-decodes one path segment; `None` when the bytes are not UTF-8.
fn decode(segment: &str) -> Option<Cow<'_, str>> {
    percent_decode_str(segment).decode_utf8().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a case should classify as, in a form that is easy to write in a table.
    #[derive(Debug, PartialEq)]
    enum Want {
        Legacy(Operation, &'static str, &'static str, &'static str),
        TokenApi(Operation, &'static str),
        AllTokens(&'static str, &'static str),
        Pass,
        Bad(Operation, Malformed),
    }

    fn run(method: &str, path: &str) -> Want {
        let method: Method = method.parse().unwrap();
        match classify(&method, path) {
            Ok(Route::Legacy(c)) => Want::Legacy(
                c.operation,
                c.prefix.to_owned().leak(),
                c.client_id.into_owned().leak(),
                c.access_token.into_owned().leak(),
            ),
            Ok(Route::TokenApi {
                operation,
                client_id,
            }) => Want::TokenApi(operation, client_id.into_owned().leak()),
            Ok(Route::RevokeAll {
                prefix, client_id, ..
            }) => Want::AllTokens(prefix.to_owned().leak(), client_id.into_owned().leak()),
            Ok(Route::PassThrough) => Want::Pass,
            Err(e) => Want::Bad(e.operation, e.problem),
        }
    }

    #[test]
    fn spellings_of_a_path() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "/applications/C/tokens/T",
                "/applications/C/tokens/T",
                "/applications/C/tokens/T",
            ),
            (
                "//applications/C/tokens/T",
                "//applications/C/tokens/T",
                "/applications/C/tokens/T",
            ),
            (
                "/applications/C/./tokens/T",
                "/applications/C/tokens/T",
                "/applications/C/tokens/T",
            ),
            (
                "/applications/C/tokens/T/",
                "/applications/C/tokens/T/",
                "/applications/C/tokens/T",
            ),
            (
                "/applications/C/%74okens/T",
                "/applications/C/tokens/T",
                "/applications/C/tokens/T",
            ),
            (
                "/applications/C/%2e/tokens/T",
                "/applications/C/tokens/T",
                "/applications/C/tokens/T",
            ),
            (
                "/x/../applications/C/tokens/T",
                "/applications/C/tokens/T",
                "/applications/C/tokens/T",
            ),
            // `..` removes `v3` only: no legacy call is left (and this is what is forwarded).
            (
                "/api/v3/../applications/C/grants/T",
                "/api/applications/C/grants/T",
                "/api/applications/C/grants/T",
            ),
            (
                "/api/v3/x/../applications/C/grants/T",
                "/api/v3/applications/C/grants/T",
                "/api/v3/applications/C/grants/T",
            ),
            (
                "/../../applications/C/token",
                "/applications/C/token",
                "/applications/C/token",
            ),
            (
                "/applications/C/tokens/T/..",
                "/applications/C/tokens/",
                "/applications/C/tokens",
            ),
            (
                "/applications//tokens/T",
                "/applications//tokens/T",
                "/applications/tokens/T",
            ),
            // Reserved escapes and other bytes stay as sent.
            (
                "/applications/C/tokens/a%2Fb%25",
                "/applications/C/tokens/a%2Fb%25",
                "/applications/C/tokens/a%2Fb%25",
            ),
            (
                "/applications/C/tokens/%E2%9C%93",
                "/applications/C/tokens/%E2%9C%93",
                "/applications/C/tokens/%E2%9C%93",
            ),
            // A stray `%` is kept as `%25`: decoding makes no escape the client did not send.
            ("/%", "/%25", "/%25"),
            ("/x/%%32%65%%32%65", "/x/%252e%252e", "/x/%252e%252e"),
            ("/", "/", "/"),
            ("", "", ""),
        ];
        for (path, normalized, collapsed) in cases {
            let s = spellings(path);
            assert_eq!(
                (&*s.normalized, &*s.collapsed),
                (*normalized, *collapsed),
                "{path}"
            );
        }
        assert!(
            matches!(spellings("/user").collapsed, Cow::Borrowed(_)),
            "no allocation"
        );
        assert_eq!(
            with_separators_decoded("/applications/C/tokens%2FT").as_deref(),
            Some("/applications/C/tokens/T")
        );
        assert_eq!(
            with_separators_decoded("/applications\\C\\tokens;v=1\\T").as_deref(),
            Some("/applications/C/tokens/T")
        );
        assert_eq!(with_separators_decoded("/applications/C/tokens/T"), None);
    }

    #[test]
    fn table() {
        use Malformed::*;
        use Operation::*;
        use Want::*;
        let cases: &[(&str, &str, Want)] = &[
            // The four legacy operations, with and without the Enterprise prefix.
            (
                "GET",
                "/applications/abc/tokens/t1",
                Legacy(Check, "", "abc", "t1"),
            ),
            (
                "POST",
                "/applications/abc/tokens/t1",
                Legacy(Reset, "", "abc", "t1"),
            ),
            (
                "DELETE",
                "/applications/abc/tokens/t1",
                Legacy(RevokeToken, "", "abc", "t1"),
            ),
            (
                "DELETE",
                "/applications/abc/grants/t1",
                Legacy(RevokeGrant, "", "abc", "t1"),
            ),
            (
                "GET",
                "/api/v3/applications/abc/tokens/t1",
                Legacy(Check, "/api/v3", "abc", "t1"),
            ),
            (
                "POST",
                "/api/v3/applications/abc/tokens/t1",
                Legacy(Reset, "/api/v3", "abc", "t1"),
            ),
            (
                "DELETE",
                "/api/v3/applications/abc/tokens/t1",
                Legacy(RevokeToken, "/api/v3", "abc", "t1"),
            ),
            (
                "DELETE",
                "/api/v3/applications/abc/grants/t1",
                Legacy(RevokeGrant, "/api/v3", "abc", "t1"),
            ),
            // Percent-decoding of both segments.
            (
                "GET",
                "/applications/a%2Eb/tokens/x%2Fy%20z",
                Legacy(Check, "", "a.b", "x/y z"),
            ),
            (
                "GET",
                "/applications/abc/tokens/%E2%9C%93",
                Legacy(Check, "", "abc", "\u{2713}"),
            ),
            (
                "GET",
                "/applications/abc/tokens/a+b",
                Legacy(Check, "", "abc", "a+b"),
            ),
            // Malformed legacy paths.
            ("GET", "/applications/abc/tokens/", Bad(Check, EmptyToken)),
            (
                "DELETE",
                "/applications/abc/grants/",
                Bad(RevokeGrant, EmptyToken),
            ),
            (
                "GET",
                "/applications/abc/tokens/%FF",
                Bad(Check, TokenNotUtf8),
            ),
            (
                "DELETE",
                "/applications/abc/tokens/%C3",
                Bad(RevokeToken, TokenNotUtf8),
            ),
            ("GET", "/applications//tokens/t1", Bad(Check, EmptyClientId)),
            (
                "POST",
                "/applications/%FE/tokens/t1",
                Bad(Reset, ClientIdNotUtf8),
            ),
            // Not an exact match: pass through.
            ("GET", "/applications/abc/grants/t1", Pass),
            ("POST", "/applications/abc/grants/t1", Pass),
            ("PUT", "/applications/abc/tokens/t1", Pass),
            ("PATCH", "/applications/abc/tokens/t1", Pass),
            // HEAD is a check (the Ruby `gh` gem checks tokens with it).
            (
                "HEAD",
                "/applications/abc/tokens/t1",
                Legacy(Check, "", "abc", "t1"),
            ),
            ("HEAD", "/applications/abc/grants/t1", Pass),
            ("GET", "/applications/abc/tokens/t1/", Pass),
            ("GET", "/applications/abc/tokens/t1/extra", Pass),
            ("GET", "/applications/abc/tokens", Pass),
            // Revoke-all: removed by GitHub, a legacy operation with no replacement.
            ("DELETE", "/applications/abc/tokens", AllTokens("", "abc")),
            (
                "DELETE",
                "/api/v3/applications/a%2Eb/tokens",
                AllTokens("/api/v3", "a.b"),
            ),
            (
                "DELETE",
                "/applications//tokens",
                Bad(Operation::RevokeAll, EmptyClientId),
            ),
            ("GET", "/applications/abc", Pass),
            ("GET", "/applications/", Pass),
            ("GET", "/Applications/abc/tokens/t1", Pass),
            ("GET", "/v3/applications/abc/tokens/t1", Pass),
            ("GET", "/api/v3applications/abc/tokens/t1", Pass),
            ("GET", "/api/v4/applications/abc/tokens/t1", Pass),
            ("GET", "/x/api/v3/applications/abc/tokens/t1", Pass),
            ("GET", "/applications/grants", Pass),
            ("GET", "/user", Pass),
            ("GET", "/", Pass),
            ("GET", "", Pass),
            // The replacement token API.
            ("POST", "/applications/abc/token", TokenApi(Check, "abc")),
            ("PATCH", "/applications/abc/token", TokenApi(Reset, "abc")),
            (
                "DELETE",
                "/applications/abc/token",
                TokenApi(RevokeToken, "abc"),
            ),
            (
                "DELETE",
                "/applications/abc/grant",
                TokenApi(RevokeGrant, "abc"),
            ),
            (
                "POST",
                "/applications/abc/token/scoped",
                TokenApi(ScopeToken, "abc"),
            ),
            (
                "POST",
                "/api/v3/applications/a%2Eb/token",
                TokenApi(Check, "a.b"),
            ),
            ("GET", "/applications/abc/token", Pass),
            ("PATCH", "/applications/abc/token/scoped", Pass),
            ("POST", "/applications//token", Pass),
            ("POST", "/applications/%FF/token", Pass),
            ("POST", "/applications/abc/token/", Pass),
        ];
        for (method, path, want) in cases {
            assert_eq!(&run(method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn undecoded_segments_are_borrowed() {
        let Ok(Route::Legacy(call)) = classify(&Method::GET, "/applications/abc/tokens/t1") else {
            panic!("not legacy");
        };
        assert!(matches!(call.access_token, Cow::Borrowed(_)));
        assert!(matches!(call.client_id, Cow::Borrowed(_)));
        assert_eq!(call.client_id_segment, "abc");
    }

    #[test]
    fn client_id_segment_stays_encoded() {
        let Ok(Route::Legacy(call)) = classify(&Method::GET, "/applications/a%2Eb/tokens/t") else {
            panic!("not legacy");
        };
        assert_eq!(call.client_id_segment, "a%2Eb");
    }

    #[test]
    fn app_client_id_table() {
        let cases = [
            ("/applications/Iv1.a/token", Some("Iv1.a")),
            ("/api/v3/applications/Iv1.a/grants/x", Some("Iv1.a")),
            ("/applications/a%2Eb/hooks/1", Some("a.b")),
            ("/applications/Iv1.a", None),
            ("/applications/Iv1.a/", None),
            ("/applications//token", None),
            ("/applications/%FF/token", None),
            ("/user", None),
            ("/api/v3x/applications/a/token", None),
        ];
        for (path, want) in cases {
            assert_eq!(app_client_id(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn replacements_follow_the_contract() {
        assert_eq!(Operation::Check.replacement(), (Method::POST, "token"));
        assert_eq!(Operation::Reset.replacement(), (Method::PATCH, "token"));
        assert_eq!(
            Operation::RevokeToken.replacement(),
            (Method::DELETE, "token")
        );
        assert_eq!(
            Operation::RevokeGrant.replacement(),
            (Method::DELETE, "grant")
        );
        assert_eq!(
            Operation::ScopeToken.replacement(),
            (Method::POST, "token/scoped")
        );
    }
}
