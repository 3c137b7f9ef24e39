//! Turns what the classifier found into the replacement request: the new method and path, the
//! JSON body carrying the token, and the `Authorization` header built from deprecated
//! query-parameter credentials. Pure: no I/O, clock or logging. Token and secret values only
//! ever go into the body or the header built here, never into an error.
//!
//! Sources: GitHub REST "OAuth Applications" (the replacement endpoints take
//! `{"access_token": ...}` in a JSON body); GitHub's 2019-11-05 / 2020-02-10 deprecation of
//! authentication through query parameters (`client_id`/`client_secret`, `access_token`).

use std::borrow::Cow;

use base64::Engine as _;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method};
use serde::Serialize;

use crate::classify::LegacyCall;

/// The replacement of a legacy call. Its `Debug` leaves the body (which holds the token) out.
pub struct Replacement {
    /// The new method (POST, PATCH or DELETE).
    pub method: Method,
    /// `[/api/v3]/applications/{client_id}/token|grant` plus the query string kept.
    pub path_and_query: PathAndQuery,
    /// `{"access_token": "<token>"}`, to be sent as `application/json`.
    pub body: Bytes,
}

impl std::fmt::Debug for Replacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replacement")
            .field("method", &self.method)
            .field("path_and_query", &self.path_and_query)
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

#[derive(Serialize)]
struct TokenBody<'a> {
    access_token: &'a str,
}

/// Builds the replacement request for a legacy call: method and path per the contract,
/// `query` (already stripped of credentials) kept, the token moved into a JSON body.
///
/// Returns `None` only if the pieces, which all come from a valid request URI, fail to form a
/// valid path again (not expected; the caller answers 400).
pub fn replace_legacy(call: &LegacyCall<'_>, query: Option<&str>) -> Option<Replacement> {
    let (method, tail) = call.operation.replacement();
    let query_len = query.map_or(0, |q| q.len() + 1);
    let mut path = String::with_capacity(
        call.prefix.len()
            + "/applications/".len()
            + call.client_id_segment.len()
            + 1
            + tail.len()
            + query_len,
    );
    path.push_str(call.prefix);
    path.push_str("/applications/");
    path.push_str(call.client_id_segment);
    path.push('/');
    path.push_str(tail);
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    let path_and_query = PathAndQuery::try_from(path).ok()?;
    let body = serde_json::to_vec(&TokenBody {
        access_token: &call.access_token,
    })
    .ok()?;
    Some(Replacement {
        method,
        path_and_query,
        body: Bytes::from(body),
    })
}

/// Deprecated credentials found in a query string, and the query without them. Its `Debug`
/// shows whether credentials were found, never their values.
#[derive(Default, PartialEq, Eq)]
pub struct QueryCredentials<'a> {
    /// The query string without credential parameters; `None` when nothing is left.
    /// Borrowed when nothing was removed.
    pub remaining: Option<Cow<'a, str>>,
    /// `client_id` and `client_secret`, when both were present (the first of each).
    pub client: Option<(Cow<'a, str>, Cow<'a, str>)>,
    /// `access_token`, when present and not empty (the first one).
    pub access_token: Option<Cow<'a, str>>,
    /// A `client_secret` parameter was present (and removed).
    pub had_client_secret: bool,
    /// An `access_token` parameter was present (and removed).
    pub had_access_token: bool,
}

impl std::fmt::Debug for QueryCredentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryCredentials")
            .field("remaining", &self.remaining)
            .field(
                "client",
                &self.client.as_ref().map(|(id, _)| (id, "<secret>")),
            )
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<secret>"),
            )
            .field("had_client_secret", &self.had_client_secret)
            .field("had_access_token", &self.had_access_token)
            .finish()
    }
}

/// The credentials of an `Authorization: Basic` value: RFC 7617 §2, base64 of
/// `user-id ":" password`, here the app's client_id and client_secret. Secret: its `Debug` shows
/// neither part.
#[derive(PartialEq, Eq)]
pub struct BasicCredentials {
    decoded: Vec<u8>,
    colon: usize,
}

impl BasicCredentials {
    /// The user-id part (for the OAuth Applications API, the client_id), as bytes.
    pub fn user(&self) -> &[u8] {
        &self.decoded[..self.colon]
    }

    /// The password part (the client_secret), as bytes.
    pub fn password(&self) -> &[u8] {
        &self.decoded[self.colon + 1..]
    }
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasicCredentials(..)")
    }
}

/// Decodes an `Authorization: Basic` value (the scheme is case-insensitive, RFC 9110 §11.1;
/// the credentials are strict base64, RFC 7617 §2). `None` for another scheme, or credentials
/// that are not base64 or hold no colon.
pub fn basic_credentials(value: &HeaderValue) -> Option<BasicCredentials> {
    let bytes = value.as_bytes();
    let (scheme, rest) = bytes.split_at(bytes.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(BasicCredentials { decoded, colon })
}

/// Longest Basic credentials decoded on the stack by [`with_basic_credentials`], in bytes
/// (GitHub's client_id and secret take 61); longer ones are decoded on the heap.
const STACK_CREDENTIALS_BYTES: usize = 192;

/// Calls `f` with the user-id and password of an `Authorization: Basic` value, as
/// [`basic_credentials`] reads them, decoded without allocating when they are short. `None`
/// when [`basic_credentials`] would give `None`.
pub fn with_basic_credentials<R>(
    value: &HeaderValue,
    f: impl FnOnce(&[u8], &[u8]) -> R,
) -> Option<R> {
    let bytes = value.as_bytes();
    let (scheme, rest) = bytes.split_at(bytes.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let mut buf = [0u8; STACK_CREDENTIALS_BYTES];
    match base64::engine::general_purpose::STANDARD.decode_slice(rest.trim_ascii(), &mut buf) {
        Ok(n) => {
            let decoded = &buf[..n];
            let colon = decoded.iter().position(|&b| b == b':')?;
            Some(f(&decoded[..colon], &decoded[colon + 1..]))
        }
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            let c = basic_credentials(value)?;
            Some(f(c.user(), c.password()))
        }
        Err(base64::DecodeSliceError::DecodeError(_)) => None,
    }
}

impl QueryCredentials<'_> {
    /// Whether any credential parameter was removed from the query.
    pub fn removed_any(&self) -> bool {
        self.had_client_secret || self.had_access_token
    }

    /// The `Authorization` value that replaces the query credentials: `Basic
    /// base64(client_id:client_secret)` or `token <access_token>`. When both kinds are present,
    /// `prefer_basic` picks Basic (the OAuth Applications API authenticates the app) over the
    /// user token. The value is marked sensitive (never indexed by HPACK).
    ///
    /// # Errors
    /// [`InvalidCredential`] when the access token holds bytes a header cannot carry.
    pub fn authorization(
        &self,
        prefer_basic: bool,
    ) -> Result<Option<HeaderValue>, InvalidCredential> {
        let basic = || {
            self.client.as_ref().map(|(id, secret)| {
                let mut raw = String::with_capacity(id.len() + 1 + secret.len());
                raw.push_str(id);
                raw.push(':');
                raw.push_str(secret);
                let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
                HeaderValue::try_from(format!("Basic {encoded}")).map_err(|_| InvalidCredential)
            })
        };
        let token = || {
            self.access_token
                .as_ref()
                .map(|t| HeaderValue::try_from(format!("token {t}")).map_err(|_| InvalidCredential))
        };
        let value = if prefer_basic {
            basic().or_else(token)
        } else {
            token().or_else(basic)
        };
        value.transpose().map(|v| {
            v.map(|mut v| {
                v.set_sensitive(true);
                v
            })
        })
    }
}

/// An `access_token` query parameter that cannot be carried in an `Authorization` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the access_token query parameter holds characters that cannot be sent in a header")]
pub struct InvalidCredential;

/// Takes the deprecated credential parameters out of a raw query string.
///
/// `client_secret` and `access_token` are always removed (they are secrets). `client_id` is
/// removed when it comes with a `client_secret` (together they are the app's credentials);
/// alone it is no secret and stays. Every other parameter is kept byte for byte, in order.
/// Names and values are decoded as `application/x-www-form-urlencoded`.
///
/// # Example
/// ```
/// use oauth_apps_gateway::rewrite::take_query_credentials;
///
/// let c = take_query_credentials("page=2&client_id=Iv1.a&client_secret=s%2B1");
/// assert_eq!(c.remaining.as_deref(), Some("page=2"));
/// assert_eq!(c.authorization(true).unwrap().unwrap(), "Basic SXYxLmE6cysx");
/// ```
pub fn take_query_credentials(query: &str) -> QueryCredentials<'_> {
    let mut client_id = None;
    let mut client_secret = None;
    let mut access_token = None;
    let mut had_client_id = false;
    let mut had_client_secret = false;
    let mut had_access_token = false;
    for piece in query.split('&') {
        let Some((name, value)) = form_urlencoded::parse(piece.as_bytes()).next() else {
            continue;
        };
        match name.as_ref() {
            "client_id" => {
                had_client_id = true;
                client_id.get_or_insert(value);
            }
            "client_secret" => {
                had_client_secret = true;
                client_secret.get_or_insert(value);
            }
            "access_token" => {
                had_access_token = true;
                if !value.is_empty() {
                    access_token.get_or_insert(value);
                }
            }
            _ => {}
        }
    }
    if !had_client_secret && !had_access_token {
        return QueryCredentials {
            remaining: (!query.is_empty()).then_some(Cow::Borrowed(query)),
            ..QueryCredentials::default()
        };
    }
    let drop_client_id = had_client_id && had_client_secret;
    let mut remaining = String::new();
    for piece in query.split('&') {
        let name = form_urlencoded::parse(piece.as_bytes())
            .next()
            .map(|(n, _)| n);
        let drop = match name.as_deref() {
            Some("client_secret" | "access_token") => true,
            Some("client_id") => drop_client_id,
            Some(_) => false,
            None => true, // empty piece from "a=1&&b=2": nothing to keep
        };
        if !drop {
            if !remaining.is_empty() {
                remaining.push('&');
            }
            remaining.push_str(piece);
        }
    }
    QueryCredentials {
        remaining: (!remaining.is_empty()).then_some(Cow::Owned(remaining)),
        client: client_id.zip(client_secret),
        access_token,
        had_client_secret,
        had_access_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded_only_from_strict_basic() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let value = |s: String| HeaderValue::try_from(s).unwrap();
        let c = basic_credentials(&value(format!("Basic {}", enc("Iv1.a:s3:cret")))).unwrap();
        assert_eq!((c.user(), c.password()), (&b"Iv1.a"[..], &b"s3:cret"[..]));
        assert_eq!(format!("{c:?}"), "BasicCredentials(..)");
        let same = basic_credentials(&value(format!("bASIC   {} ", enc("Iv1.a:s3:cret"))));
        assert_eq!(same, Some(c));
        for bad in [
            format!("Bearer {}", enc("Iv1.a:s")),
            format!("Basic {}", enc("no-colon")),
            "Basic !!!not base64".to_owned(),
            "Basic".to_owned(),
        ] {
            assert_eq!(basic_credentials(&value(bad.clone())), None, "{bad}");
        }
    }

    #[test]
    fn basic_credentials_read_on_the_stack_are_the_same() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let long = format!("Iv1.a:{}", "x".repeat(400));
        for raw in [
            format!("Basic {}", enc("Iv1.a:s3:cret")),
            format!("bASIC   {} ", enc("Iv1.a:s3:cret")),
            format!("Basic {}", enc(&long)),
            format!("Bearer {}", enc("Iv1.a:s")),
            format!("Basic {}", enc("no-colon")),
            "Basic !!!not base64".to_owned(),
            "Basic".to_owned(),
        ] {
            let v = HeaderValue::try_from(raw.clone()).unwrap();
            let heap = basic_credentials(&v).map(|c| (c.user().to_vec(), c.password().to_vec()));
            let stack = with_basic_credentials(&v, |u, p| (u.to_vec(), p.to_vec()));
            assert_eq!(stack, heap, "{raw}");
        }
    }
    use crate::classify::{Route, classify};

    fn legacy(method: Method, path: &str) -> LegacyCall<'_> {
        match classify(&method, path) {
            Ok(Route::Legacy(call)) => call,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn each_operation_maps_to_its_replacement() {
        let cases = [
            (
                Method::GET,
                "/applications/cid/tokens/tok",
                Method::POST,
                "/applications/cid/token",
            ),
            (
                Method::POST,
                "/applications/cid/tokens/tok",
                Method::PATCH,
                "/applications/cid/token",
            ),
            (
                Method::DELETE,
                "/applications/cid/tokens/tok",
                Method::DELETE,
                "/applications/cid/token",
            ),
            (
                Method::DELETE,
                "/applications/cid/grants/tok",
                Method::DELETE,
                "/applications/cid/grant",
            ),
            (
                Method::GET,
                "/api/v3/applications/cid/tokens/tok",
                Method::POST,
                "/api/v3/applications/cid/token",
            ),
            (
                Method::DELETE,
                "/api/v3/applications/cid/grants/tok",
                Method::DELETE,
                "/api/v3/applications/cid/grant",
            ),
        ];
        for (method, path, new_method, new_path) in cases {
            let r = replace_legacy(&legacy(method, path), None).unwrap();
            assert_eq!(r.method, new_method, "{path}");
            assert_eq!(r.path_and_query.as_str(), new_path, "{path}");
            assert_eq!(&r.body[..], br#"{"access_token":"tok"}"#, "{path}");
        }
    }

    #[test]
    fn query_is_kept_and_client_id_stays_encoded() {
        let call = legacy(Method::GET, "/applications/a%2Eb/tokens/tok");
        let r = replace_legacy(&call, Some("page=2&x=%20")).unwrap();
        assert_eq!(
            r.path_and_query.as_str(),
            "/applications/a%2Eb/token?page=2&x=%20"
        );
    }

    #[test]
    fn token_is_json_escaped_in_the_body() {
        let call = legacy(Method::GET, "/applications/c/tokens/a%22b%5Cc%0A%E2%9C%93");
        let r = replace_legacy(&call, None).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"access_token": "a\"b\\c\n\u{2713}"})
        );
    }

    #[test]
    fn query_credentials_table() {
        // (query, remaining, client pair, access_token, had_secret, had_token)
        type Row = (
            &'static str,
            Option<&'static str>,
            Option<(&'static str, &'static str)>,
            Option<&'static str>,
            bool,
            bool,
        );
        let cases: &[Row] = &[
            ("", None, None, None, false, false),
            ("page=2", Some("page=2"), None, None, false, false),
            (
                "client_id=abc",
                Some("client_id=abc"),
                None,
                None,
                false,
                false,
            ),
            (
                "client_id=abc&client_secret=s3",
                None,
                Some(("abc", "s3")),
                None,
                true,
                false,
            ),
            (
                "page=1&client_id=abc&per_page=5&client_secret=s%2B3+x",
                Some("page=1&per_page=5"),
                Some(("abc", "s+3 x")),
                None,
                true,
                false,
            ),
            ("client_secret=s3&q=1", Some("q=1"), None, None, true, false),
            (
                "access_token=t0k&q=1",
                Some("q=1"),
                None,
                Some("t0k"),
                false,
                true,
            ),
            ("access%5Ftoken=t0k", None, None, Some("t0k"), false, true),
            ("access_token=", None, None, None, false, true),
            (
                "access_token=a&access_token=b",
                None,
                None,
                Some("a"),
                false,
                true,
            ),
            (
                "client_id=i&client_secret=s&access_token=t",
                None,
                Some(("i", "s")),
                Some("t"),
                true,
                true,
            ),
            (
                "a=1&&access_token=t&b",
                Some("a=1&b"),
                None,
                Some("t"),
                false,
                true,
            ),
        ];
        for &(query, remaining, client, token, had_secret, had_token) in cases {
            let c = take_query_credentials(query);
            assert_eq!(c.remaining.as_deref(), remaining, "{query}");
            assert_eq!(
                c.client.as_ref().map(|(i, s)| (i.as_ref(), s.as_ref())),
                client,
                "{query}"
            );
            assert_eq!(c.access_token.as_deref(), token, "{query}");
            assert_eq!(c.had_client_secret, had_secret, "{query}");
            assert_eq!(c.had_access_token, had_token, "{query}");
        }
    }

    #[test]
    fn untouched_query_is_borrowed() {
        let c = take_query_credentials("a=1&b=2");
        assert!(matches!(c.remaining, Some(Cow::Borrowed("a=1&b=2"))));
        assert!(!c.removed_any());
    }

    #[test]
    fn authorization_values() {
        let c = take_query_credentials("client_id=Iv1.abc&client_secret=shh");
        let v = c.authorization(true).unwrap().unwrap();
        assert_eq!(v, "Basic SXYxLmFiYzpzaGg=");
        assert!(v.is_sensitive());

        let c = take_query_credentials("access_token=gho_1");
        assert_eq!(c.authorization(true).unwrap().unwrap(), "token gho_1");

        let both = take_query_credentials("client_id=i&client_secret=s&access_token=t");
        assert_eq!(both.authorization(true).unwrap().unwrap(), "Basic aTpz");
        assert_eq!(both.authorization(false).unwrap().unwrap(), "token t");

        let none = take_query_credentials("client_secret=s");
        assert_eq!(none.authorization(true).unwrap(), None);

        let bad = take_query_credentials("access_token=a%0Ab");
        assert_eq!(bad.authorization(false), Err(InvalidCredential));
    }
}
