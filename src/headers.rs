//! Pure header functions used while forwarding: removal of hop-by-hop fields (RFC 9110 §7.6.1)
//! in both directions, adding a media type to `Accept` (GitHub API previews), and the
//! deprecation signalling headers (RFC 9745, RFC 8594), whose values are built once per config
//! load. No I/O, no logging; allocation only when a header actually changes.

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Deprecation;

/// The `Deprecation` response field (RFC 9745 §2).
pub const DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
/// The `Sunset` response field (RFC 8594 §3).
pub const SUNSET: HeaderName = HeaderName::from_static("sunset");

/// Prebuilt deprecation signalling for responses to legacy calls.
#[derive(Debug, Clone)]
pub struct DeprecationHeaders {
    deprecation: HeaderValue,
    link: HeaderValue,
    sunset: Option<HeaderValue>,
}

impl DeprecationHeaders {
    /// Builds the values: `Deprecation: @<unix seconds>` (an sf-date, RFC 9745 §2),
    /// `Link: <link>; rel="deprecation"; type="text/html"` (RFC 9745 §3) and, when a sunset is
    /// set, `Sunset: <IMF-fixdate>` (RFC 8594 §3, RFC 9110 §5.6.7).
    pub fn new(d: &Deprecation) -> Self {
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        // Both strings are ASCII built from digits and a validated URI, so they are valid
        // header values; the fallbacks only keep this free of panics.
        let deprecation = HeaderValue::try_from(format!("@{}", secs(d.date)))
            .unwrap_or(HeaderValue::from_static("@0"));
        let link = HeaderValue::try_from(format!(
            "<{}>; rel=\"deprecation\"; type=\"text/html\"",
            d.link
        ))
        .unwrap_or(HeaderValue::from_static("<>; rel=\"deprecation\""));
        let sunset = d
            .sunset
            .and_then(|t| HeaderValue::try_from(httpdate::fmt_http_date(t)).ok());
        DeprecationHeaders {
            deprecation,
            link,
            sunset,
        }
    }

    /// Adds the headers to a response; an existing `Link` is kept (the relation is appended).
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(DEPRECATION, self.deprecation.clone());
        headers.append(header::LINK, self.link.clone());
        if let Some(s) = &self.sunset {
            headers.insert(SUNSET, s.clone());
        }
    }
}

/// Fields that describe one connection, never the message (RFC 9110 §7.6.1, plus the
/// non-standard `Keep-Alive` and `Proxy-Connection` that HTTP/1.0-era clients send).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop fields: the fixed set of RFC 9110 §7.6.1 (with `Upgrade`) and every field
/// named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (comparisons, no hashing) instead of a
    // lookup per hop-by-hop name. A field named in `Connection` needs `Connection` present.
    if !headers
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    // Names listed in Connection; collected only when one is not already in the fixed set
    // (most clients send just "keep-alive" or "close").
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim();
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || HOP_BY_HOP
                    .iter()
                    .any(|h| token.eq_ignore_ascii_case(h.as_str()))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Adds `media_type` to the `Accept` header, keeping every media type the client listed (all
/// `Accept` lines are joined into one). Nothing changes when it is already listed. GitHub reads
/// preview media types anywhere in `Accept` (GitHub REST: API previews).
pub fn add_accept_media_type(headers: &mut HeaderMap, media_type: &HeaderValue) {
    let wanted = media_type.as_bytes();
    let already = headers.get_all(header::ACCEPT).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|item| {
            let essence = item.split(|&b| b == b';').next().unwrap_or_default();
            essence.trim_ascii().eq_ignore_ascii_case(wanted)
        })
    });
    if already {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in headers.get_all(header::ACCEPT) {
        let v = v.as_bytes().trim_ascii();
        if v.is_empty() {
            continue;
        }
        joined.extend_from_slice(v);
        joined.extend_from_slice(b", ");
    }
    if joined.is_empty() {
        headers.insert(header::ACCEPT, media_type.clone());
        return;
    }
    joined.extend_from_slice(wanted);
    match HeaderValue::from_bytes(&joined) {
        Ok(v) => {
            headers.insert(header::ACCEPT, v);
        }
        // Unreachable in practice: joined from valid values with ", ".
        Err(_) => {
            headers.insert(header::ACCEPT, media_type.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deprecation_header_formats() {
        let d = Deprecation {
            date: UNIX_EPOCH + Duration::from_secs(1_581_638_400),
            link: "https://developer.github.com/changes/2020-02-14-deprecating-oauth-app-endpoint/"
                .parse()
                .unwrap(),
            sunset: Some(UNIX_EPOCH + Duration::from_secs(1_620_172_800)),
        };
        let mut h = HeaderMap::new();
        h.insert(
            header::LINK,
            HeaderValue::from_static("<https://x/?page=2>; rel=\"next\""),
        );
        DeprecationHeaders::new(&d).apply(&mut h);
        assert_eq!(h["deprecation"], "@1581638400");
        assert_eq!(h["sunset"], "Wed, 05 May 2021 00:00:00 GMT");
        let links: Vec<_> = h.get_all(header::LINK).iter().collect();
        assert_eq!(links.len(), 2);
        assert_eq!(
            links[1],
            "<https://developer.github.com/changes/2020-02-14-deprecating-oauth-app-endpoint/>; rel=\"deprecation\"; type=\"text/html\""
        );

        let mut h = HeaderMap::new();
        DeprecationHeaders::new(&Deprecation { sunset: None, ..d }).apply(&mut h);
        assert!(h.get("sunset").is_none());
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    fn names(m: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = m.keys().map(|k| k.as_str().to_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn hop_by_hop_table() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[("accept", "a/b"), ("connection", "keep-alive")],
                &["accept"],
            ),
            (
                &[
                    ("connection", "close, X-Secret-Hop , x-other"),
                    ("x-secret-hop", "1"),
                    ("x-other", "2"),
                    ("x-kept", "3"),
                ],
                &["x-kept"],
            ),
            (
                &[
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("proxy-authenticate", "Basic"),
                    ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                    ("te", "trailers"),
                    ("trailer", "x-t"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                    ("authorization", "token x"),
                    ("host", "example"),
                ],
                &["authorization", "host"],
            ),
            (
                &[
                    ("connection", "x-a"),
                    ("connection", "x-b"),
                    ("x-a", "1"),
                    ("x-b", "2"),
                ],
                &[],
            ),
            (&[("connection", ",,"), ("x-a", "1")], &["x-a"]),
        ];
        for (input, kept) in cases {
            let mut m = map(input);
            remove_hop_by_hop(&mut m);
            assert_eq!(names(&m), *kept, "{input:?}");
        }
    }

    #[test]
    fn accept_table() {
        let preview =
            HeaderValue::from_static("application/vnd.github.doctor-strange-preview+json");
        let cases: &[(&[&str], &str)] = &[
            (&[], "application/vnd.github.doctor-strange-preview+json"),
            (
                &["application/vnd.github.v3+json"],
                "application/vnd.github.v3+json, application/vnd.github.doctor-strange-preview+json",
            ),
            (
                &["application/json", "text/plain;q=0.5"],
                "application/json, text/plain;q=0.5, application/vnd.github.doctor-strange-preview+json",
            ),
            (
                &["application/json, application/vnd.github.doctor-strange-preview+json; q=1"],
                "application/json, application/vnd.github.doctor-strange-preview+json; q=1",
            ),
            (
                &["Application/Vnd.GitHub.Doctor-Strange-Preview+JSON"],
                "Application/Vnd.GitHub.Doctor-Strange-Preview+JSON",
            ),
            (&[""], "application/vnd.github.doctor-strange-preview+json"),
        ];
        for (accepts, want) in cases {
            let mut m = HeaderMap::new();
            for a in *accepts {
                m.append(header::ACCEPT, HeaderValue::from_str(a).unwrap());
            }
            add_accept_media_type(&mut m, &preview);
            let got: Vec<_> = m.get_all(header::ACCEPT).iter().collect();
            assert_eq!(got.len(), 1, "{accepts:?}");
            assert_eq!(got[0], want, "{accepts:?}");
        }
    }
}
