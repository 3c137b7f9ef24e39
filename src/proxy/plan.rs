//! PURE: what to do with a request, from its head and the settings: answer it from the gateway
//! (malformed legacy path, legacy operation in mode `reject`, `CONNECT`, a body declared too
//! large, an unusable query credential) or forward it, and how: the replacement method, path
//! and JSON body of a rewritten legacy call, the query without deprecated credentials, and the
//! `Authorization` value those credentials become. No I/O, clock or logging.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Uri, Version};

use crate::classify::{
    ClassifyError, LegacyCall, Malformed, Operation, Route, RouteClass, app_client_id, classify,
    spellings, with_separators_decoded,
};
use crate::config::Mode;
use crate::metrics::LegacyAction;
use crate::proxy::ProxySettings;
use crate::proxy::error::{ProxyError, replacement_of, replacement_path};
use crate::rewrite::{QueryCredentials, replace_legacy, take_query_credentials};

/// What a request is: the facts every later stage reads, decided once here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Legacy, token API or pass-through (a bounded metric label).
    pub class: RouteClass,
    /// The token operation, legacy or new form.
    pub operation: Option<Operation>,
    /// For a legacy call: its operation and what the gateway does with it.
    pub legacy: Option<(Operation, LegacyAction)>,
    /// The app's client_id from the path, percent-decoded: of a legacy or token-API call, or of
    /// any other `/applications/{client_id}/...` call. `None` elsewhere and for a malformed path.
    pub client_id: Option<Box<str>>,
    /// Deprecated query credentials removed: `(client_secret, access_token)`.
    pub query_credentials: (bool, bool),
}

impl Call {
    /// Whether this is a call to the OAuth Applications API of one app
    /// (`/applications/{client_id}/...`), whose 401 is a credential failure.
    pub fn is_app_call(&self) -> bool {
        self.client_id.is_some()
    }
}

/// How to forward a request. Its `Debug` shows neither the body nor the `Authorization` value.
pub struct Forward {
    /// The replacement method of a rewritten legacy call; `None` keeps the client's.
    pub method: Option<Method>,
    /// The path and query to send upstream.
    pub path_and_query: PathAndQuery,
    /// The JSON body of a rewritten legacy call (`{"access_token": ...}`); `None` streams the
    /// client's own body.
    pub json_body: Option<Bytes>,
    /// `Authorization` built from deprecated query credentials, to set because the request has
    /// none. Sensitive.
    pub authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("method", &self.method)
            .field("path_and_query", &self.path_and_query)
            .field("json_body_bytes", &self.json_body.as_ref().map(Bytes::len))
            .field("authorization", &self.authorization.is_some())
            .finish()
    }
}

/// The decision for one request.
#[derive(Debug)]
pub enum Plan {
    /// Answered by the gateway; never forwarded.
    Answer(Call, ProxyError),
    /// Forwarded as described.
    Forward(Call, Forward),
}

/// Decides what to do with a request whose method is `method`, target `uri` and header fields
/// `headers`, at wall-clock time `now` (for brownout windows). Allocates only the client_id of an OAuth Applications call (it outlives the request
/// head: a call whose client went away is still accounted for) and what a rewrite builds.
pub fn plan(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    settings: &ProxySettings,
    now: SystemTime,
) -> Plan {
    // Every spelling of a call is the call: the path is classified as normalized (RFC 3986
    // §6.2.2), then with empty segments collapsed, and forwarded as it was classified.
    let spelled = spellings(uri.path());
    let collapsing_changed = spelled.collapsed != spelled.normalized;
    let classified = |method: &Method| match classify(method, &spelled.normalized) {
        Ok(Route::PassThrough) if collapsing_changed => {
            match classify(method, &spelled.collapsed) {
                Ok(Route::PassThrough) => (Ok(Route::PassThrough), &*spelled.normalized),
                other => (other, &*spelled.collapsed),
            }
        }
        other => (other, &*spelled.normalized),
    };
    // Methods are case-sensitive (RFC 9110 §9.1): `get` is not GET. On the path of a token
    // operation a case variant is refused rather than forwarded with a token in its path.
    let upper = case_variant(method);
    if let Some(upper) = &upper
        && let (r, _) = classified(upper)
        && !matches!(r, Ok(Route::PassThrough))
    {
        let call = refused(&r, true);
        return Plan::Answer(call, ProxyError::MethodCase);
    }
    let (route, canonical) = classified(method);
    // A path that is a token operation once `%2F`, `%5C` or `\` is read as `/` or `;`
    // parameters are cut, as some servers do, is ambiguous: refused, never forwarded or guessed.
    // Read with the method as sent and, for a case variant (`get`), as the standard method an
    // upstream might take it for.
    if let Ok(Route::PassThrough) = route
        && spelled.normalized.contains("applications")
        && let Some(alt) = with_separators_decoded(&spelled.normalized)
    {
        let alt = spellings(&alt);
        let alt_route = |method: &Method| match classify(method, &alt.normalized) {
            Ok(Route::PassThrough) => classify(method, &alt.collapsed),
            other => other,
        };
        let alt_route = match (alt_route(method), &upper) {
            (Ok(Route::PassThrough), Some(upper)) => alt_route(upper),
            (other, _) => other,
        };
        if !matches!(alt_route, Ok(Route::PassThrough)) {
            // The client_id read through a guessed separator is no fact to record.
            let call = refused(&alt_route, false);
            return Plan::Answer(call, ProxyError::AmbiguousPath);
        }
    }
    let route = match route {
        Ok(route) => route,
        Err(e) => {
            let call = Call {
                class: RouteClass::Legacy,
                operation: Some(e.operation),
                legacy: Some((e.operation, LegacyAction::Malformed)),
                client_id: None,
                query_credentials: (false, false),
            };
            return Plan::Answer(call, ProxyError::MalformedLegacy(e));
        }
    };
    let legacy_mode = match &route {
        Route::Legacy(c) => Some((c, settings.mode(c.operation))),
        _ => None,
    };
    // Revoke-all has no replacement: rewrite and reject both answer 410; observe forwards it.
    let revoke_all = match &route {
        Route::RevokeAll {
            prefix,
            client_id_segment,
            ..
        } => Some((
            settings.mode(Operation::RevokeAll),
            replacement_path(Operation::RevokeAll, prefix, client_id_segment),
        )),
        _ => None,
    };
    let action = |mode| match mode {
        Mode::Rewrite => LegacyAction::Rewritten,
        Mode::Observe => LegacyAction::Observed,
        Mode::Reject => LegacyAction::Rejected,
    };
    let mut call = Call {
        class: route.class(),
        operation: route.operation(),
        legacy: match (&legacy_mode, &revoke_all) {
            (Some((c, mode)), _) => Some((c.operation, action(*mode))),
            (_, Some((Mode::Observe, _))) => Some((Operation::RevokeAll, LegacyAction::Observed)),
            (_, Some(_)) => Some((Operation::RevokeAll, LegacyAction::Rejected)),
            (None, None) => None,
        },
        client_id: match &route {
            Route::PassThrough => app_client_id(&spelled.collapsed).map(Box::from),
            r => r.client_id().map(Box::from),
        },
        query_credentials: (false, false),
    };
    // Inside a brownout window a legacy operation is answered as in `reject`, whatever its mode.
    let legacy_op = match (&legacy_mode, &revoke_all) {
        (Some((c, _)), _) => Some(c.operation),
        (_, Some(_)) => Some(Operation::RevokeAll),
        (None, None) => None,
    };
    if let Some(op) = legacy_op
        && let Some((unavailable, until)) = settings.brownout(op, now)
    {
        let replacement = match (legacy_mode, revoke_all) {
            (Some((c, _)), _) => replacement_of(c),
            (_, Some((_, r))) => r,
            (None, None) => String::new(),
        };
        call.legacy = Some((op, LegacyAction::Brownout));
        let left = until.duration_since(now).unwrap_or_default();
        let brownout = ProxyError::Brownout {
            operation: op,
            replacement,
            until,
            retry_after_secs: unavailable
                .then(|| (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)),
        };
        return Plan::Answer(call, brownout);
    }
    if let Some((c, Mode::Reject)) = legacy_mode {
        let gone = ProxyError::Gone {
            operation: c.operation,
            replacement: replacement_of(c),
        };
        return Plan::Answer(call, gone);
    }
    if let Some((mode, replacement)) = revoke_all
        && mode != Mode::Observe
    {
        let gone = ProxyError::Gone {
            operation: Operation::RevokeAll,
            replacement,
        };
        return Plan::Answer(call, gone);
    }
    // A CONNECT would make the upstream connection a tunnel for the client.
    if method == Method::CONNECT {
        return Plan::Answer(call, ProxyError::MethodNotAllowed);
    }
    let limit = settings.max_request_body_bytes;
    if content_length(headers).is_some_and(|len| len > limit) {
        return Plan::Answer(call, ProxyError::PayloadTooLarge { limit });
    }

    let creds = match uri.query() {
        Some(q) => take_query_credentials(q),
        None => QueryCredentials::default(),
    };
    call.query_credentials = (creds.had_client_secret, creds.had_access_token);
    // The client's own header wins; the parameters are removed either way. The OAuth
    // Applications API authenticates the app (Basic); elsewhere a user token wins.
    let authorization = if creds.removed_any() && !headers.contains_key(header::AUTHORIZATION) {
        match creds.authorization(call.is_app_call() || call.operation.is_some()) {
            Ok(v) => v,
            Err(e) => return Plan::Answer(call, ProxyError::InvalidQueryCredential(e)),
        }
    } else {
        None
    };

    let rewrite: Option<&LegacyCall<'_>> = match legacy_mode {
        Some((c, Mode::Rewrite)) => Some(c),
        _ => None,
    };
    let forward = match rewrite {
        Some(c) => match replace_legacy(c, creds.remaining.as_deref()) {
            Some(r) => Forward {
                method: Some(r.method),
                path_and_query: r.path_and_query,
                json_body: Some(r.body),
                authorization,
            },
            None => {
                let e = ClassifyError {
                    operation: c.operation,
                    problem: Malformed::Unrewritable,
                };
                return Plan::Answer(call, ProxyError::MalformedLegacy(e));
            }
        },
        None => Forward {
            method: None,
            path_and_query: if creds.removed_any() || canonical != uri.path() {
                let query = match creds.removed_any() {
                    true => creds.remaining.as_deref(),
                    false => uri.query(),
                };
                rebuild_path_and_query(canonical, query)
            } else {
                uri.path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"))
            },
            json_body: None,
            authorization,
        },
    };
    Plan::Forward(call, forward)
}

/// Whether a request's target and `Host` can be forwarded at all: `None` when they can.
/// - `OPTIONS *` asks about the gateway itself (RFC 9110 §9.3.7): answered, never forwarded;
/// - the asterisk form with any other method (`PRI *` over HTTP/1.1 among them): 400
///   (RFC 9112 §3.2.4);
/// - more than one `Host`, an invalid `Host`, or an HTTP/1.1 request without `Host`: 400
///   (RFC 9112 §3.2).
pub fn target_refusal(
    version: Version,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<ProxyError> {
    if uri.path() == "*" && uri.query().is_none() {
        return Some(match *method {
            Method::OPTIONS => ProxyError::ServerOptions,
            _ => ProxyError::BadTarget("the asterisk-form target (*) is only for OPTIONS"),
        });
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some(ProxyError::BadTarget(
            "a request may carry only one Host header field",
        )),
        (Some(host), None) if Authority::try_from(host.as_bytes()).is_err() => Some(
            ProxyError::BadTarget("the Host header field is not a valid host"),
        ),
        (None, _) if version == Version::HTTP_11 => Some(ProxyError::BadTarget(
            "an HTTP/1.1 request needs a Host header field",
        )),
        _ => None,
    }
}

/// The facts of a request refused before it was classified ([`target_refusal`]): a
/// pass-through call of no app.
pub fn unrouted() -> Call {
    Call {
        class: RouteClass::PassThrough,
        operation: None,
        legacy: None,
        client_id: None,
        query_credentials: (false, false),
    }
}

/// The facts of a call refused by the gateway for how it is spelled (a method in the wrong case,
/// an ambiguous separator): counted as malformed when legacy; its client_id only when
/// `with_client_id`.
fn refused(route: &Result<Route<'_>, ClassifyError>, with_client_id: bool) -> Call {
    let (class, operation) = match route {
        Ok(r) => (r.class(), r.operation()),
        Err(e) => (RouteClass::Legacy, Some(e.operation)),
    };
    Call {
        class,
        operation,
        legacy: match (class, operation) {
            (RouteClass::Legacy, Some(op)) => Some((op, LegacyAction::Malformed)),
            _ => None,
        },
        client_id: route
            .as_ref()
            .ok()
            .filter(|_| with_client_id)
            .and_then(Route::client_id)
            .map(Box::from),
        query_credentials: (false, false),
    }
}

/// The method a case variant of GET, HEAD, POST, PATCH or DELETE names, such as `Get`.
fn case_variant(method: &Method) -> Option<Method> {
    let name = method.as_str();
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return None; // no allocation for the methods clients send
    }
    let upper = name.to_ascii_uppercase();
    let standard = ["GET", "HEAD", "POST", "PATCH", "DELETE"].contains(&upper.as_str());
    (standard && upper != name)
        .then(|| Method::from_bytes(upper.as_bytes()).ok())
        .flatten()
}

fn rebuild_path_and_query(path: &str, query: Option<&str>) -> PathAndQuery {
    let path = if path.is_empty() { "/" } else { path };
    let built = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    };
    // Both pieces come from a valid request URI; "/" is only a guard.
    built.unwrap_or_else(|_| PathAndQuery::from_static("/"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings(adjust: impl FnOnce(&mut Config)) -> ProxySettings {
        let mut c = Config::default();
        adjust(&mut c);
        ProxySettings::from(&c)
    }

    /// `(status answered | "forward METHOD path+query", class, action, client_id)`.
    fn run(s: &ProxySettings, method: &str, target: &str, auth: bool) -> String {
        let uri: Uri = target.parse().unwrap();
        let mut headers = HeaderMap::new();
        if auth {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_static("Basic eDp5"),
            );
        }
        let method: Method = method.parse().unwrap();
        let (call, what) = match plan(&method, &uri, &headers, s, SystemTime::UNIX_EPOCH) {
            Plan::Answer(call, e) => (call, http::StatusCode::from(&e).as_str().to_owned()),
            Plan::Forward(call, f) => {
                let m = f.method.clone().unwrap_or(method.clone());
                let body = f.json_body.map_or(String::new(), |b| {
                    format!(" {}", String::from_utf8_lossy(&b))
                });
                let a = f.authorization.map_or("", |_| " +auth");
                (call, format!("{m} {}{body}{a}", f.path_and_query))
            }
        };
        format!(
            "{what} | {} | {} | {}",
            call.class.as_str(),
            call.legacy.map_or("-", |(_, a)| a.as_str()),
            call.client_id.as_deref().unwrap_or("-"),
        )
    }

    /// What every spelling of a legacy check of `gho_t` for `Iv1.a` becomes.
    const CHECK: &str =
        "POST /applications/Iv1.a/token {\"access_token\":\"gho_t\"} | legacy | rewritten | Iv1.a";

    #[test]
    fn request_targets_and_host_fields_the_gateway_will_not_forward() {
        let host = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::HOST, HeaderValue::from_static(v));
            }
            h
        };
        let check = |version, method: Method, target: &str, headers: &HeaderMap| {
            target_refusal(version, &method, &target.parse().unwrap(), headers)
                .map(|e| (http::StatusCode::from(&e).as_u16(), e.to_string()))
        };
        let v11 = Version::HTTP_11;
        let one = host(&["gw.example"]);
        assert_eq!(check(v11, Method::GET, "/user", &one), None);
        assert_eq!(check(v11, Method::OPTIONS, "*", &one).unwrap().0, 204);
        let pri = check(v11, Method::from_bytes(b"PRI").unwrap(), "*", &one).unwrap();
        assert_eq!(pri.0, 400);
        assert!(pri.1.contains("only for OPTIONS"), "{pri:?}");
        let none = check(v11, Method::GET, "/user", &HeaderMap::new()).unwrap();
        assert_eq!(none.0, 400);
        assert!(none.1.contains("needs a Host"), "{none:?}");
        let two = check(v11, Method::GET, "/user", &host(&["a", "b"])).unwrap();
        assert!(two.1.contains("only one Host"), "{two:?}");
        let bad = check(v11, Method::GET, "/user", &host(&["a b"])).unwrap();
        assert!(bad.1.contains("not a valid host"), "{bad:?}");
        // HTTP/1.0 may leave Host out; HTTP/2 names the authority in :authority.
        assert_eq!(
            check(Version::HTTP_10, Method::GET, "/user", &HeaderMap::new()),
            None
        );
        let h2 = "http://gw.example/user";
        assert_eq!(
            check(Version::HTTP_2, Method::GET, h2, &HeaderMap::new()),
            None
        );
    }

    #[test]
    fn table() {
        let rewrite = settings(|_| {});
        let mut reject = settings(|_| {});
        reject.modes.reset = Mode::Reject;
        let mut observe = settings(|_| {});
        observe.modes.check = Mode::Observe;
        let mut observe_all = settings(|_| {});
        observe_all.modes.revoke_all = Mode::Observe;
        let cases: &[(&ProxySettings, &str, &str, bool, &str)] = &[
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/tokens/gho_t",
                true,
                "POST /applications/Iv1.a/token {\"access_token\":\"gho_t\"} | legacy | rewritten | Iv1.a",
            ),
            (
                &rewrite,
                "DELETE",
                "/api/v3/applications/Iv1.a/grants/gho_t?x=1",
                true,
                "DELETE /api/v3/applications/Iv1.a/grant?x=1 {\"access_token\":\"gho_t\"} | legacy | rewritten | Iv1.a",
            ),
            (
                &observe,
                "GET",
                "/applications/Iv1.a/tokens/gho_t",
                true,
                "GET /applications/Iv1.a/tokens/gho_t | legacy | observed | Iv1.a",
            ),
            (
                &reject,
                "POST",
                "/applications/Iv1.a/tokens/gho_t",
                true,
                "410 | legacy | rejected | Iv1.a",
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/tokens/",
                true,
                "400 | legacy | malformed | -",
            ),
            (
                &rewrite,
                "POST",
                "/applications/Iv1.a/token",
                true,
                "POST /applications/Iv1.a/token | token_api | - | Iv1.a",
            ),
            // Any other call of one app is an app call: its 401s are credential failures.
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/tokens",
                true,
                "GET /applications/Iv1.a/tokens | pass_through | - | Iv1.a",
            ),
            (
                &rewrite,
                "GET",
                "/user",
                false,
                "GET /user | pass_through | - | -",
            ),
            (
                &rewrite,
                "CONNECT",
                "/user",
                false,
                "405 | pass_through | - | -",
            ),
            // Query credentials become Authorization (Basic for the app), unless one is sent.
            (
                &rewrite,
                "DELETE",
                "/applications/Iv1.a/grants/gho_t?client_id=Iv1.a&client_secret=s",
                false,
                "DELETE /applications/Iv1.a/grant {\"access_token\":\"gho_t\"} +auth | legacy | rewritten | Iv1.a",
            ),
            (
                &rewrite,
                "DELETE",
                "/applications/Iv1.a/grants/gho_t?client_id=Iv1.a&client_secret=s",
                true,
                "DELETE /applications/Iv1.a/grant {\"access_token\":\"gho_t\"} | legacy | rewritten | Iv1.a",
            ),
            (
                &rewrite,
                "GET",
                "/user?access_token=gho_u&page=2",
                false,
                "GET /user?page=2 +auth | pass_through | - | -",
            ),
            (
                &rewrite,
                "GET",
                "/user?access_token=%0A",
                false,
                "400 | pass_through | - | -",
            ),
            // Every spelling of a legacy call is the call, forwarded in canonical form.
            (
                &rewrite,
                "GET",
                "//applications/Iv1.a/tokens/gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/./tokens/gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/tokens/gho_t/",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a//tokens//gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/%74okens/gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "GET",
                "/applications/%49v1.a/tokens/gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "GET",
                "/x/../applications/Iv1.a/tokens/gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/tokens/x/../gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "HEAD",
                "/applications/Iv1.a/tokens/gho_t",
                true,
                CHECK,
            ),
            (
                &rewrite,
                "DELETE",
                "/api/v3//applications/Iv1.a/grants/gho_t/?x=1",
                true,
                "DELETE /api/v3/applications/Iv1.a/grant?x=1 {\"access_token\":\"gho_t\"} | legacy | rewritten | Iv1.a",
            ),
            (
                &reject,
                "POST",
                "//applications/Iv1.a/tokens/gho_t",
                true,
                "410 | legacy | rejected | Iv1.a",
            ),
            (
                &reject,
                "POST",
                "/applications/Iv1.a/./tokens/gho_t/",
                true,
                "410 | legacy | rejected | Iv1.a",
            ),
            (
                &observe,
                "GET",
                "/applications/Iv1.a//tokens/gho_t?p=1",
                true,
                "GET /applications/Iv1.a/tokens/gho_t?p=1 | legacy | observed | Iv1.a",
            ),
            (
                &rewrite,
                "GET",
                "/applications//tokens/gho_t",
                true,
                "400 | legacy | malformed | -",
            ),
            // ... and of a new-form call.
            (
                &rewrite,
                "POST",
                "//applications/Iv1.a/token/",
                true,
                "POST /applications/Iv1.a/token | token_api | - | Iv1.a",
            ),
            (
                &rewrite,
                "POST",
                "/applications/Iv1.a/token/./scoped",
                true,
                "POST /applications/Iv1.a/token/scoped | token_api | - | Iv1.a",
            ),
            (
                &rewrite,
                "DELETE",
                "//applications/Iv1.a/other",
                true,
                "DELETE //applications/Iv1.a/other | pass_through | - | Iv1.a",
            ),
            // Methods are case-sensitive: a variant on a token-operation path is refused.
            (
                &rewrite,
                "get",
                "/applications/Iv1.a/tokens/gho_t",
                true,
                "400 | legacy | malformed | Iv1.a",
            ),
            (
                &rewrite,
                "Delete",
                "//applications/Iv1.a/token",
                true,
                "400 | token_api | - | Iv1.a",
            ),
            (
                &rewrite,
                "get",
                "/user",
                false,
                "get /user | pass_through | - | -",
            ),
            // Elsewhere dot segments are resolved before forwarding, and `//` kept.
            (
                &rewrite,
                "GET",
                "/user/../repos//x",
                false,
                "GET /repos//x | pass_through | - | -",
            ),
            (
                &rewrite,
                "DELETE",
                "/api/v3/../applications/C/grants/T",
                false,
                "DELETE /api/applications/C/grants/T | pass_through | - | -",
            ),
            // Encoded or other separators that some server might read: refused, not guessed.
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/tokens%2Fgho_t",
                true,
                "400 | legacy | malformed | -",
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a%2ftokens%2Fgho_t",
                true,
                "400 | legacy | malformed | -",
            ),
            (
                &rewrite,
                "GET",
                "/applications\\Iv1.a\\tokens\\gho_t",
                true,
                "400 | legacy | malformed | -",
            ),
            (
                &rewrite,
                "GET",
                "/applications/Iv1.a/tokens;v=1/gho_t",
                true,
                "400 | legacy | malformed | -",
            ),
            (
                &rewrite,
                "POST",
                "/applications/Iv1.a/token;x",
                true,
                "400 | token_api | - | -",
            ),
            (
                &rewrite,
                "GET",
                "/repos/o/r/contents/a%2Fb",
                false,
                "GET /repos/o/r/contents/a%2Fb | pass_through | - | -",
            ),
            // Revoke-all (removed by GitHub, no replacement): 410 unless observed.
            (
                &rewrite,
                "DELETE",
                "/applications/Iv1.a/tokens",
                true,
                "410 | legacy | rejected | Iv1.a",
            ),
            (
                &reject,
                "DELETE",
                "//api/v3/applications/Iv1.a/tokens/",
                true,
                "410 | legacy | rejected | Iv1.a",
            ),
            (
                &observe_all,
                "DELETE",
                "/applications/Iv1.a/./tokens",
                true,
                "DELETE /applications/Iv1.a/tokens | legacy | observed | Iv1.a",
            ),
        ];
        for (s, method, target, auth, want) in cases {
            assert_eq!(run(s, method, target, *auth), *want, "{method} {target}");
        }
    }

    #[test]
    fn inside_a_brownout_window_legacy_operations_are_answered_whatever_their_mode() {
        use crate::config::{Brownout, OperationSet};
        let at = |secs| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let mut s = settings(|c| c.migration.modes.check = Mode::Observe);
        s.brownouts = vec![
            Brownout {
                start: at(1000),
                end: at(2000),
                operations: OperationSet {
                    reset: false,
                    ..OperationSet::ALL
                },
                unavailable: false,
            },
            Brownout {
                start: at(3000),
                end: at(4000),
                operations: OperationSet::ALL,
                unavailable: true,
            },
            // Touches the second: Retry-After points past both.
            Brownout {
                start: at(4000),
                end: at(4500),
                operations: OperationSet::ALL,
                unavailable: true,
            },
        ];
        let uri: Uri = "/applications/Iv1.a/tokens/gho_t".parse().unwrap();
        let h = HeaderMap::new();
        let answer = |m: Method, now| match plan(&m, &uri, &h, &s, at(now)) {
            Plan::Answer(call, e) => Some((call.legacy.map(|(_, a)| a), e)),
            Plan::Forward(..) => None,
        };
        // Observed outside the windows; answered 410 inside the first (check is named)...
        assert!(answer(Method::GET, 999).is_none());
        let Some((action, e)) = answer(Method::GET, 1000) else {
            panic!("not browned out")
        };
        assert_eq!(action, Some(LegacyAction::Brownout));
        assert_eq!(http::StatusCode::from(&e), 410);
        // ... but not reset, which the first window leaves out, and not after the end.
        assert!(answer(Method::POST, 1500).is_none());
        assert!(answer(Method::GET, 2000).is_none());
        // The second answers 503 with the seconds left.
        let Some((_, e)) = answer(Method::DELETE, 3500) else {
            panic!()
        };
        assert_eq!(http::StatusCode::from(&e), 503);
        assert!(matches!(
            e,
            ProxyError::Brownout {
                retry_after_secs: Some(1000),
                ..
            }
        ));
        // New-form calls and other paths are never browned out.
        let new_form: Uri = "/applications/Iv1.a/token".parse().unwrap();
        assert!(matches!(
            plan(&Method::POST, &new_form, &h, &s, at(3500)),
            Plan::Forward(..)
        ));
    }

    #[test]
    fn a_declared_body_over_the_limit_is_answered_413() {
        let s = settings(|c| c.server.max_request_body_bytes = 10);
        let uri: Uri = "/user".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("11"));
        assert!(matches!(
            plan(&Method::POST, &uri, &headers, &s, SystemTime::UNIX_EPOCH),
            Plan::Answer(_, ProxyError::PayloadTooLarge { limit: 10 })
        ));
    }

    #[test]
    fn path_and_query_rebuilt_without_credentials() {
        assert_eq!(rebuild_path_and_query("/user", Some("a=1")), "/user?a=1");
        assert_eq!(rebuild_path_and_query("/user", None), "/user");
        assert_eq!(rebuild_path_and_query("", None), "/");
    }
}
