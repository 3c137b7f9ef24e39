//! The request facts the access event carries besides the route: the request id (the client's
//! `X-Request-Id` when well-formed, else one made here), the user agent as logged (cut, never a
//! credential of its own request), the protocol name, and seconds as fixed decimals. PURE but for
//! the request-id sequence (a per-thread counter); nothing here logs: `proxy::observe` writes the
//! event. Nothing returned here holds a token, secret or Authorization value the request carries.

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Version};

use crate::rewrite::with_basic_credentials;

/// `X-Request-Id`: taken from the client when well-formed, forwarded upstream and returned.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `X-Request-Id` taken from a client, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Longest user agent logged, in bytes; a longer one is cut at a character boundary.
pub const MAX_USER_AGENT_BYTES: usize = 256;

/// Shortest part of a request's target or `Authorization` value, in bytes, that a logged user
/// agent or request id may not contain: shorter parts (`tokens`, `v3`) are no secret, and every
/// GitHub token, client secret and client_id is longer.
const MIN_SECRET_BYTES: usize = 8;

/// The prefixes of GitHub's tokens (personal, OAuth, user-to-server, server-to-server, refresh,
/// fine-grained personal): a word starting with one is a token whatever request carries it.
const TOKEN_PREFIXES: [&[u8]; 6] = [b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_"];

/// Authorization schemes: a scheme followed by a space is followed by a credential.
const SCHEMES: [&[u8]; 3] = [b"basic ", b"bearer ", b"token "];

/// Whether `id` has the form of a request id the gateway takes from a client: 1 to
/// [`MAX_REQUEST_ID_BYTES`] bytes of `[A-Za-z0-9._:-]` (a UUID, a W3C trace id, `req-42`): no
/// space, quote, slash, `%`, `+` or `=`, so no Authorization value, path, query or base64 padding.
pub fn well_formed_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The request id of a request whose header fields are `headers` and target `target`: its one
/// `X-Request-Id`, when well-formed and holding no credential of the request
/// ([`holds_credential`]); otherwise a new one ([`new_request_id`]).
pub fn request_id(headers: &HeaderMap, target: &str) -> HeaderValue {
    let mut sent = headers.get_all(REQUEST_ID).iter();
    match (sent.next(), sent.next()) {
        (Some(id), None)
            if well_formed_request_id(id.as_bytes())
                && !holds_credential(id.as_bytes(), target, headers) =>
        {
            id.clone()
        }
        _ => new_request_id(),
    }
}

thread_local! {
    /// Two hash keys drawn per thread by the standard library from the operating system's
    /// randomness, and the thread's sequence number.
    static SEQUENCE: (RandomState, RandomState, Cell<u64>) =
        (RandomState::new(), RandomState::new(), Cell::new(0));
}

/// A new request id: 128 bits in the layout of a random UUID (RFC 9562 §5.4, e.g.
/// `3f2c8a51-9d0e-4b7a-8c13-5e6f70a1b2c3`), the thread's next sequence number hashed under two
/// per-thread random SipHash keys: unique within the process, unpredictable from outside, and no
/// system call per request (about 40 ns; `getrandom` per request costs several times that).
pub fn new_request_id() -> HeaderValue {
    let (hi, lo) = SEQUENCE.with(|(a, b, n)| {
        let i = n.get();
        n.set(i.wrapping_add(1));
        (a.hash_one(i), b.hash_one(i))
    });
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hi.to_be_bytes());
    bytes[8..].copy_from_slice(&lo.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // variant RFC 9562
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text[at] = b'-';
            at += 1;
        }
        text[at] = HEX[usize::from(b >> 4)];
        text[at + 1] = HEX[usize::from(b & 0x0f)];
        at += 2;
    }
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Whether `text` (a user agent or a request id) holds a credential: a word starting like a
/// GitHub token (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`), an Authorization scheme
/// followed by a space (`Basic `, `Bearer `, `token `, any case), or any part of at least 8 bytes
/// of the request's own target `target` (path segments, query names and values) or
/// `Authorization` value in `headers` (its credentials, and a Basic value's decoded client_id and
/// secret). A secret the request carries nowhere else, and shorter than 8 bytes, is not found.
pub fn holds_credential(text: &[u8], target: &str, headers: &HeaderMap) -> bool {
    if text.len() < 4 {
        return false; // shorter than any token prefix or scheme
    }
    // One pass for the token prefixes (all start with `g`), one for the schemes (each ends in
    // the space that follows it).
    let token = (0..text.len())
        .filter(|&i| text[i] == b'g')
        .any(|i| TOKEN_PREFIXES.iter().any(|p| text[i..].starts_with(p)));
    let scheme = (0..text.len()).filter(|&i| text[i] == b' ').any(|i| {
        SCHEMES
            .iter()
            .any(|s| i + 1 >= s.len() && text[i + 1 - s.len()..=i].eq_ignore_ascii_case(s))
    });
    if token || scheme || text.len() < MIN_SECRET_BYTES {
        return token || scheme;
    }
    let found = |part: &[u8]| part.len() >= MIN_SECRET_BYTES && contains(text, part);
    if target
        .as_bytes()
        .split(|b| matches!(b, b'/' | b'?' | b'&' | b'=' | b';'))
        .any(found)
    {
        return true;
    }
    let Some(auth) = headers.get(http::header::AUTHORIZATION) else {
        return false;
    };
    auth.as_bytes().split(|&b| b == b' ').any(found)
        || with_basic_credentials(auth, |user, secret| found(user) || found(secret))
            .unwrap_or(false)
}

/// Whether `needle` occurs in `haystack`: candidates found by their first byte, so most
/// positions cost one comparison.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    if needle.len() > haystack.len() {
        return false;
    }
    let last_start = haystack.len() - needle.len();
    (0..=last_start).any(|i| haystack[i] == first && haystack[i + 1..].starts_with(rest))
}

/// The user agent as the access event logs it ([`LoggedUserAgent::as_str`]): cut to
/// [`MAX_USER_AGENT_BYTES`] at a character boundary; bytes that are not UTF-8 as U+FFFD and
/// control characters other than tab (which both log formats escape themselves) as `\u{..}`;
/// `[redacted]` when it holds a credential of its request ([`holds_credential`]). A printable
/// ASCII one (nearly all) is kept as the header value, with no allocation.
#[derive(Debug, Clone, Default)]
pub enum LoggedUserAgent {
    /// No `User-Agent` (logged as an empty string).
    #[default]
    Absent,
    /// Printable ASCII (and tab): the header value, cut when displayed.
    Ascii(HeaderValue),
    /// Not ASCII: decoded, escaped and cut.
    Escaped(Box<str>),
    /// Holds a credential of its request.
    Redacted,
}

impl LoggedUserAgent {
    /// The user agent in `headers` of a request with target `target` (path and query).
    pub fn of(headers: &HeaderMap, target: &str) -> Self {
        let Some(ua) = headers.get(http::header::USER_AGENT) else {
            return LoggedUserAgent::Absent;
        };
        if holds_credential(ua.as_bytes(), target, headers) {
            return LoggedUserAgent::Redacted;
        }
        if ua.to_str().is_ok() {
            return LoggedUserAgent::Ascii(ua.clone());
        }
        let mut out = String::new();
        for c in String::from_utf8_lossy(ua.as_bytes()).chars() {
            let before = out.len();
            if c.is_control() && c != '\t' {
                out.extend(c.escape_unicode());
            } else {
                out.push(c);
            }
            if out.len() > MAX_USER_AGENT_BYTES {
                out.truncate(before);
                break;
            }
        }
        LoggedUserAgent::Escaped(out.into_boxed_str())
    }

    /// The text logged.
    pub fn as_str(&self) -> &str {
        match self {
            LoggedUserAgent::Absent => "",
            // Visible ASCII, space and tab only: every index is a character boundary.
            LoggedUserAgent::Ascii(v) => v
                .to_str()
                .map_or("", |s| &s[..s.len().min(MAX_USER_AGENT_BYTES)]),
            LoggedUserAgent::Escaped(s) => s,
            LoggedUserAgent::Redacted => "[redacted]",
        }
    }
}

/// The protocol name of a request's HTTP version, as the access event logs it.
pub fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// Displays a duration in seconds with exactly six decimals (`0.000614`), cut to the
/// microsecond: never in exponent form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}", self.0.as_secs(), self.0.subsec_micros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn basic(user: &str, secret: &str) -> String {
        use base64::Engine as _;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
        format!("Basic {enc}")
    }

    #[test]
    fn seconds_are_fixed_decimals() {
        let cases = [
            (Duration::from_nanos(6_376), "0.000006"),
            (Duration::from_micros(614), "0.000614"),
            (Duration::from_nanos(1_999), "0.000001"),
            (Duration::ZERO, "0.000000"),
            (Duration::from_millis(1_500), "1.500000"),
            (Duration::from_secs(30), "30.000000"),
        ];
        for (d, want) in cases {
            assert_eq!(Seconds(d).to_string(), want, "{d:?}");
        }
    }

    #[test]
    fn which_request_ids_are_taken() {
        let ok: &[&str] = &[
            "a",
            "req_1",
            "3f2c8a51-9d0e-4b7a-8c13-5e6f70a1b2c3",
            "a.b:c-D9",
        ];
        for id in ok {
            assert!(well_formed_request_id(id.as_bytes()), "{id}");
        }
        let long = "a".repeat(MAX_REQUEST_ID_BYTES + 1);
        let bad: &[&str] = &[
            "",
            &long,
            "with space",
            "semi;colon",
            "slash/x",
            "quote\"",
            "per%20cent",
            "plus+",
            "é",
        ];
        for id in bad {
            assert!(!well_formed_request_id(id.as_bytes()), "{id:?}");
        }
        assert!(well_formed_request_id(
            "a".repeat(MAX_REQUEST_ID_BYTES).as_bytes()
        ));
    }

    #[test]
    fn a_request_id_is_kept_only_when_well_formed_single_and_no_credential() {
        let target = "/applications/Iv1.8a61f9b3a7aba766/tokens/abc";
        let h = headers(&[("x-request-id", "req-42")]);
        assert_eq!(request_id(&h, target), "req-42");
        for h in [
            headers(&[]),
            headers(&[("x-request-id", "a b")]),
            // Well-formed, but a GitHub token.
            headers(&[("x-request-id", "gho_16C7e42F292c6912E7710c838347Ae178B4a")]),
            headers(&[("x-request-id", "one"), ("x-request-id", "two")]),
            // The client secret of its own Basic credentials.
            headers(&[
                ("x-request-id", "s3cr3t-0b1d1a7e5e2c"),
                (
                    "authorization",
                    &basic("Iv1.8a61f9b3a7aba766", "s3cr3t-0b1d1a7e5e2c"),
                ),
            ]),
            // A part of its own path.
            headers(&[("x-request-id", "Iv1.8a61f9b3a7aba766")]),
        ] {
            let id = request_id(&h, target);
            assert_eq!(id.len(), 36, "{h:?} kept {id:?}");
        }
    }

    #[test]
    fn new_request_ids_are_uuid_shaped_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        let groups: Vec<_> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&s[14..15], "4");
        assert!("89ab".contains(&s[19..20]));
        assert!(well_formed_request_id(a.as_bytes()));
        let other_thread = std::thread::spawn(new_request_id).join().unwrap();
        assert_ne!(other_thread, a);
    }

    #[test]
    fn credentials_are_found_in_user_agents() {
        let secret = "s3cr3t-0b1d1a7e5e2c";
        let auth = basic("Iv1.app00000", secret);
        let h = headers(&[("authorization", &auth)]);
        let target =
            "/applications/Iv1.app00000/tokens/tok3n-in-the-path?client_secret=qu3ry-s3cret";
        let with = |ua: &str| holds_credential(ua.as_bytes(), target, &h);
        assert!(!with("octokit-rest.js/18.12.0"));
        assert!(!with("Mozilla/5.0 (X11; Linux x86_64) curl/8.5.0"));
        for ua in [
            "my-app gho_16C7e42F292c6912E7710c838347Ae178B4a",
            "x github_pat_11ABCDEFG",
            "x BASIC abc",
            "x bearer eyJ",
            &format!("x {secret} y"),
            &format!("x{}y", auth.trim_start_matches("Basic ")),
            "app tok3n-in-the-path",
            "app qu3ry-s3cret",
        ] {
            assert!(with(ua), "{ua}");
        }
        let mut h = h;
        h.insert(
            http::header::USER_AGENT,
            HeaderValue::from_str(&format!("app/1 {secret}")).unwrap(),
        );
        assert_eq!(LoggedUserAgent::of(&h, target).as_str(), "[redacted]");
    }

    #[test]
    fn user_agents_are_cut_and_escaped() {
        let ua = |v: HeaderValue| {
            let mut h = HeaderMap::new();
            h.insert(http::header::USER_AGENT, v);
            LoggedUserAgent::of(&h, "/")
        };
        assert_eq!(LoggedUserAgent::of(&HeaderMap::new(), "/").as_str(), "");
        let plain = ua(HeaderValue::from_static("octokit-rest.js/18.12.0"));
        assert!(matches!(plain, LoggedUserAgent::Ascii(_)), "no copy");
        assert_eq!(plain.as_str(), "octokit-rest.js/18.12.0");
        let long = ua(HeaderValue::from_str(&"x".repeat(300)).unwrap());
        assert_eq!(long.as_str().len(), MAX_USER_AGENT_BYTES);
        // Two-byte characters: cut before one that would cross the limit.
        let wide = ua(HeaderValue::from_bytes("é".repeat(200).as_bytes()).unwrap());
        assert_eq!(wide.as_str().len(), MAX_USER_AGENT_BYTES);
        assert!(wide.as_str().chars().all(|c| c == 'é'));
        // A C1 control (CSI) and bytes that are not UTF-8; the tab is left to the log format.
        let nasty = ua(HeaderValue::from_bytes(b"a\xc2\x9b31mb\xffc\td").unwrap());
        assert_eq!(nasty.as_str(), "a\\u{9b}31mb\u{fffd}c\td");
    }

    #[test]
    fn protocols_are_named() {
        assert_eq!(protocol(Version::HTTP_11), "HTTP/1.1");
        assert_eq!(protocol(Version::HTTP_2), "HTTP/2");
        assert_eq!(protocol(Version::HTTP_10), "HTTP/1.0");
    }
}
