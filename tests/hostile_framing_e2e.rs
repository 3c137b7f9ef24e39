//! Hostile framing and open-proxy tricks (issue 10, point 6), sent to the gateway on raw
//! sockets and checked against a *recording upstream*: a hyper HTTP/1.1 server on 127.0.0.1
//! that keeps every request it parses (method, target, headers, whole body) and every error it
//! meets on a connection. A *canary* (one listener on 127.0.0.1, one on 127.0.0.2) counts every
//! byte anyone sends it; every open-proxy trick names it as the other host.
//!
//! What the suite proves, one table of cases per test, each case on its own connection (all run
//! concurrently against one gateway with the default configuration; a summary table goes to
//! stderr):
//! - HTTP/1.1 framing attacks (Content-Length with Transfer-Encoding in both orders, duplicate,
//!   listed, signed, hex, overflowing lengths, odd Transfer-Encoding values, obs-fold, bare CR
//!   and LF, NUL, space before the colon, chunk-extension floods, bad chunk sizes, truncated
//!   bodies, requests hidden in bodies, HTTP/1.0 with Transfer-Encoding, `Expect`) are answered
//!   with a status from the case's set or the connection is closed; a served ambiguous message
//!   closes its connection; the upstream gets at most the requests the client legitimately made,
//!   each with one unambiguous framing and the body the client framed, never a request that
//!   was only body bytes or a second framing (the `/smuggled` marker), and never bytes it
//!   cannot parse;
//! - open-proxy tricks (absolute-form targets, `Host`, `X-Forwarded-Host`, `Forwarded`,
//!   `CONNECT`, dot segments, `//host` paths, HTTP/2 `:authority` and `host`) only ever reach
//!   the configured upstream, with the upstream's own `Host`, and the canary gets no byte;
//! - HTTP/2 requests the gateway downgrades to HTTP/1.1 upstream (`content-length` that
//!   disagrees with the DATA, bodies holding a second request, connection-specific fields,
//!   CR/LF inside HPACK strings) are refused or stripped, never forwarded with
//!   `transfer-encoding` or as more requests than streams opened. The h2 crate refuses to send
//!   connection-specific fields (`connection`, `transfer-encoding`, `upgrade`, `keep-alive`,
//!   `proxy-connection`, `te` other than `trailers`) and cannot put CR/LF in a field, so those
//!   cases are written as raw HTTP/2 frames (a well-formed raw request is the control);
//! - a legacy call, whatever `Host`, absolute-form target or spelling it came with, arrives as
//!   its replacement (`GET /applications/{client_id}/tokens/{token}` as
//!   `POST /applications/{client_id}/token`) with the token only in the JSON body.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use support::h2raw::{
    ACK, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, PREFACE, RST_STREAM, SETTINGS,
    h2_frame, hpack_literal,
};
use support::{CLIENT_ID, Gateway, basic_auth, config_for};

/// Stands for a case's tag in raw request text; as long as a tag (three bytes), so lengths
/// computed over the text stay right once it is filled in.
const T: &str = "@T@";
/// "The gateway closed the connection (or reset the HTTP/2 stream) without answering."
const CLOSED: u16 = 0;
/// Invalid framing: answered 400, or closed at once.
const REFUSED: &[u16] = &[400, CLOSED];
/// Valid and unambiguous to a lenient parser, invalid to a strict one: either is fine, as long
/// as what is forwarded is exactly what the client framed.
const OK_OR_REFUSED: &[u16] = &[200, 400, CLOSED];
const OK: &[u16] = &[200];
/// How long a case keeps reading after its answers, to catch an answer to a smuggled request.
const QUIET: Duration = Duration::from_millis(300);
/// The longest a case waits for its answers.
const CASE_DEADLINE: Duration = Duration::from_secs(8);
/// A made-up token for the legacy calls (never printed).
const TOKEN: &str = "gho_hostileFramingE2e000000000000000042";
/// What the recording upstream answers to every request.
const ANSWER: &[u8] = br#"{"recorded":true}"#;

/// A complete second request, only ever sent inside a body or behind an ambiguous framing:
/// reaching the upstream as a request means it was smuggled.
fn smuggled() -> String {
    format!("GET /smuggled?tag={T} HTTP/1.1\r\nhost: gw.test\r\nx-case: {T}\r\n\r\n")
}

fn lock<V>(m: &Mutex<V>) -> MutexGuard<'_, V> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn fill(raw: &[u8], tag: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = find(rest, T.as_bytes()) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(tag.as_bytes());
        rest = &rest[i + T.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// One chunk of a chunked body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------------
// The recording upstream and the canary

/// One request as the recording upstream parsed it.
#[derive(Clone)]
struct Seen {
    method: Method,
    target: String,
    headers: HeaderMap,
    body: Bytes,
    body_complete: bool,
}

impl Seen {
    /// The case a request belongs to: its `x-case` field, else the `tag=` in its target.
    fn tag(&self) -> Option<String> {
        if let Some(v) = self.headers.get("x-case") {
            return Some(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
        let at = self.target.find("tag=")?;
        Some(self.target[at + 4..].chars().take(3).collect())
    }

    /// Method and target with the token hidden, for messages.
    fn describe(&self) -> String {
        format!("{} {}", self.method, self.target.replace(TOKEN, "<token>"))
    }
}

#[derive(Default)]
struct Log {
    seen: Vec<Seen>,
    /// Errors hyper met on the gateway's connections to the upstream (an unparseable request
    /// among them), except a message cut short.
    errors: Vec<String>,
    connections: usize,
}

/// A hyper HTTP/1.1 server on 127.0.0.1:0 that records every request and answers 200 JSON.
struct Recorder {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the recording upstream");
        let addr = listener.local_addr().expect("recorder address");
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = log.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                let Ok((stream, _)) = listener.accept().await else {
                    sleep(Duration::from_millis(10)).await;
                    continue;
                };
                lock(&shared).connections += 1;
                let log = shared.clone();
                conns.spawn(async move {
                    let for_service = log.clone();
                    let service = service_fn(move |req: Request<Incoming>| {
                        let log = for_service.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let (body, body_complete) = match body.collect().await {
                                Ok(b) => (b.to_bytes(), true),
                                Err(_) => (Bytes::new(), false),
                            };
                            lock(&log).seen.push(Seen {
                                method: parts.method,
                                target: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                                body_complete,
                            });
                            let mut resp = Response::new(Full::new(Bytes::from_static(ANSWER)));
                            resp.headers_mut().insert(
                                header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served
                        && !e.is_incomplete_message()
                    {
                        lock(&log).errors.push(format!("{e:?}"));
                    }
                });
            }
        });
        Recorder { addr, log, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn authority(&self) -> String {
        self.addr.to_string()
    }

    fn seen(&self) -> Vec<Seen> {
        lock(&self.log).seen.clone()
    }

    fn errors(&self) -> Vec<String> {
        lock(&self.log).errors.clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listeners on 127.0.0.1:0 and 127.0.0.2:0 that count connections and bytes received.
struct Canary {
    addrs: Vec<SocketAddr>,
    connections: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Canary {
    async fn start() -> Canary {
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for ip in ["127.0.0.1", "127.0.0.2"] {
            let listener = TcpListener::bind(format!("{ip}:0"))
                .await
                .expect("bind a canary");
            addrs.push(listener.local_addr().expect("canary address"));
            let (connections, bytes) = (connections.clone(), bytes.clone());
            tasks.push(tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let bytes = bytes.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let until = Instant::now() + Duration::from_secs(30);
                        while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut buf)).await
                        {
                            if n == 0 {
                                break;
                            }
                            bytes.fetch_add(n, Ordering::SeqCst);
                        }
                    });
                }
            }));
        }
        Canary {
            addrs,
            connections,
            bytes,
            tasks,
        }
    }

    /// Problems: any connection or byte the canary received.
    fn problems(&self) -> Vec<String> {
        let (c, b) = (
            self.connections.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        );
        match (c, b) {
            (0, 0) => Vec::new(),
            _ => vec![format!(
                "the canary ({:?}) got {c} connection(s) and {b} byte(s): a request went to the host it named",
                self.addrs
            )],
        }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Checks every request the upstream received, whichever case sent it: origin-form target
/// with no dot segment and no smuggled marker, the upstream's own Host, one framing that
/// matches the body, no hop-by-hop or `Expect` field, and a case to account for it.
fn audit(seen: &[Seen], upstream: &str, tags: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    for r in seen {
        let what = r.describe();
        let mut bad = |p: String| problems.push(format!("upstream got `{what}`: {p}"));
        if !r.target.starts_with('/') {
            bad("a target not in origin-form".into());
        }
        let path = r.target.split('?').next().unwrap_or_default();
        if path.split('/').any(|seg| {
            let seg = seg.replace("%2e", ".").replace("%2E", ".");
            seg == "." || seg == ".."
        }) {
            bad("a dot segment in its path".into());
        }
        if r.target.contains(TOKEN) {
            bad(
                "the token in its target (a token in a URL is what the gateway exists to stop)"
                    .into(),
            );
        }
        if r.target.contains("smuggled") {
            bad("a request that was only body bytes or a second framing (smuggled)".into());
        }
        let hosts: Vec<_> = r.headers.get_all(header::HOST).iter().collect();
        if hosts.len() != 1 || hosts[0].as_bytes() != upstream.as_bytes() {
            bad(format!(
                "Host {hosts:?}, not the upstream's own ({upstream})"
            ));
        }
        let lengths: Vec<_> = r.headers.get_all(header::CONTENT_LENGTH).iter().collect();
        if lengths.len() > 1 {
            bad(format!("{} content-length fields", lengths.len()));
        }
        // Compared as numbers: the client's spelling (`00005`) is passed on as sent.
        if let Some(cl) = lengths.first()
            && cl.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok())
                != Some(r.body.len() as u64)
        {
            bad(format!(
                "content-length {cl:?} for a body of {} bytes",
                r.body.len()
            ));
        }
        if !r.body_complete {
            bad("a body that broke off".into());
        }
        for name in [
            "transfer-encoding",
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "te",
            "trailer",
            "upgrade",
            "expect",
            "http2-settings",
        ] {
            if r.headers.contains_key(name) {
                bad(format!("a `{name}` field"));
            }
        }
        if r.headers.get_all("x-case").iter().count() > 1 {
            bad("more than one x-case field".into());
        }
        match r.tag() {
            Some(t) if tags.contains(&t) => {}
            _ => bad("no case of this test sent it".into()),
        }
    }
    problems
}

/// The checks of a legacy call as the upstream got it: the replacement method and path (the
/// query kept), the token only in the JSON body.
fn check_legacy(r: &Seen, method: &Method, path: &str, tag: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let what = r.describe();
    if r.method != *method {
        problems.push(format!("legacy call forwarded as `{what}`, not {method}"));
    }
    if r.target != format!("{path}?tag={tag}") {
        problems.push(format!("legacy call forwarded as `{what}`, not {path}"));
    }
    if r.target.contains(TOKEN) {
        problems.push("the token is in the upstream target".into());
    }
    for (name, value) in &r.headers {
        if String::from_utf8_lossy(value.as_bytes()).contains(TOKEN) {
            problems.push(format!("the token is in the upstream field `{name}`"));
        }
    }
    match serde_json::from_slice::<serde_json::Value>(&r.body) {
        Ok(v) if v == serde_json::json!({ "access_token": TOKEN }) => {}
        Ok(_) => problems.push("the JSON body is not exactly {\"access_token\": <token>}".into()),
        Err(_) => problems.push(format!(
            "the legacy call's upstream body is not JSON ({} bytes)",
            r.body.len()
        )),
    }
    if r.headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()) != Some(b"application/json") {
        problems.push("the rewritten call is not application/json".into());
    }
    problems
}

/// What a case's forwarded request must look like, where the case says.
#[derive(Default)]
struct Shape {
    /// The body the client framed.
    body: Option<Vec<u8>>,
    /// The target (`@T@` standing for the tag).
    target: Option<String>,
    /// A legacy call: the replacement method and path.
    legacy: Option<(Method, String)>,
}

impl Shape {
    fn check(&self, r: &Seen, tag: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(body) = &self.body {
            let body = fill(body, tag);
            if r.body.as_ref() != body.as_slice() {
                problems.push(format!(
                    "the upstream got a body of {} bytes, not the {} the client framed",
                    r.body.len(),
                    body.len()
                ));
            }
        }
        if let Some(target) = &self.target {
            let target = String::from_utf8_lossy(&fill(target.as_bytes(), tag)).into_owned();
            if r.target != target {
                problems.push(format!("forwarded as `{}`, not `{target}`", r.describe()));
            }
        }
        if let Some((method, path)) = &self.legacy {
            problems.extend(check_legacy(r, method, path, tag));
        }
        problems
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 on a raw socket

enum Step {
    Send(Vec<u8>),
    Pause(Duration),
    /// Read until an interim (1xx) or final answer arrives, at most 3 s.
    AwaitInterim,
    /// Shut down the write half: the client will send nothing more.
    HalfClose,
}

/// One HTTP/1.1 case: what the client sends and what may come of it.
struct H1Case {
    name: &'static str,
    steps: Vec<Step>,
    /// Final statuses the gateway may answer ([`CLOSED`]: it may close without answering).
    statuses: &'static [u16],
    /// Requests the client legitimately made on this connection: at most this many answers.
    requests: usize,
    /// At most this many requests may reach the upstream.
    forward: usize,
    /// A served (2xx) answer must be followed by the end of the connection: the message was
    /// ambiguous (RFC 9112 §6.1: Content-Length with Transfer-Encoding), or said `close`.
    closes: bool,
    /// What a forwarded request must look like.
    shape: Shape,
    /// Whether a `100 Continue` must (true) or must not (false) come first.
    interim: Option<bool>,
}

impl H1Case {
    fn new(
        name: &'static str,
        statuses: &'static [u16],
        forward: usize,
        raw: impl Into<Vec<u8>>,
    ) -> Self {
        Self::steps(name, statuses, forward, vec![Step::Send(raw.into())])
    }

    fn steps(
        name: &'static str,
        statuses: &'static [u16],
        forward: usize,
        steps: Vec<Step>,
    ) -> Self {
        H1Case {
            name,
            steps,
            statuses,
            requests: forward.max(1),
            forward,
            closes: false,
            shape: Shape::default(),
            interim: None,
        }
    }

    fn closes(mut self) -> Self {
        self.closes = true;
        self
    }

    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.shape.body = Some(body.as_ref().to_vec());
        self
    }

    fn target(mut self, target: impl Into<String>) -> Self {
        self.shape.target = Some(target.into());
        self
    }

    fn interim(mut self, expected: bool) -> Self {
        self.interim = Some(expected);
        self
    }

    fn requests(mut self, n: usize) -> Self {
        self.requests = n;
        self
    }

    fn legacy(mut self, method: Method, path: impl Into<String>) -> Self {
        self.shape.legacy = Some((method, path.into()));
        self
    }
}

/// `POST /hf/echo?tag=@T@` with `fields` (each line ending in CRLF) and `body` as is.
fn post(fields: &str, body: &[u8]) -> Vec<u8> {
    let mut v =
        format!("POST /hf/echo?tag={T} HTTP/1.1\r\nhost: gw.test\r\nx-case: {T}\r\n{fields}\r\n")
            .into_bytes();
    v.extend_from_slice(body);
    v
}

/// `GET {target}` with `fields` (each line ending in CRLF) and no body.
fn get(target: &str, fields: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nx-case: {T}\r\n{fields}\r\n")
}

/// What came back on one connection.
#[derive(Default)]
struct H1Outcome {
    finals: Vec<u16>,
    interim: Vec<u16>,
    /// The gateway ended the connection (EOF or reset).
    closed: bool,
    /// The connection was reset: answers sent before it may have been lost.
    reset: bool,
    /// Bytes that are no HTTP/1.x response.
    garbage: bool,
}

/// Final and interim statuses of the whole responses in `buf`, whether `buf` ends on a
/// response boundary, and whether something in it is no response at all.
fn parse_responses(buf: &[u8]) -> (Vec<u16>, Vec<u16>, bool, bool) {
    let (mut finals, mut interim) = (Vec::new(), Vec::new());
    let mut rest = buf;
    loop {
        if rest.is_empty() {
            return (finals, interim, true, false);
        }
        let Some(end) = find(rest, b"\r\n\r\n") else {
            let garbage = !rest.starts_with(&b"HTTP/1."[..rest.len().min(7)]);
            return (finals, interim, false, garbage);
        };
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .starts_with("HTTP/1.")
            .then(|| status_line.split(' ').nth(1)?.parse::<u16>().ok())
            .flatten();
        let Some(status) = status else {
            return (finals, interim, false, true);
        };
        let (mut length, mut chunked) = (None, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
        rest = &rest[end + 4..];
        if (100..200).contains(&status) {
            interim.push(status);
            continue;
        }
        finals.push(status);
        if status == 204 || status == 304 {
            continue;
        }
        if chunked {
            match chunked_len(rest) {
                Some(n) => rest = &rest[n..],
                None => return (finals, interim, false, false),
            }
        } else if let Some(n) = length {
            if rest.len() < n {
                return (finals, interim, false, false);
            }
            rest = &rest[n..];
        } else {
            // A body to the end of the connection.
            return (finals, interim, false, false);
        }
    }
}

/// The length of the chunked body at the start of `b`, if it is all there.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        let line_end = find(&b[i..], b"\r\n")? + i;
        let size = std::str::from_utf8(&b[i..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            loop {
                let end = find(&b[i..], b"\r\n")? + i;
                let empty = end == i;
                i = end + 2;
                if empty {
                    return Some(i);
                }
            }
        }
        i += size + 2;
        if i > b.len() {
            return None;
        }
    }
}

/// Reads from `s` into `got` once, within `wait`. `Some(reset)` when the connection ended.
async fn read_some(s: &mut TcpStream, got: &mut Vec<u8>, wait: Duration) -> Option<bool> {
    let mut buf = [0u8; 8192];
    match timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(0)) => Some(false),
        Ok(Ok(n)) => {
            got.extend_from_slice(&buf[..n]);
            None
        }
        Ok(Err(_)) => Some(true),
        Err(_) => None,
    }
}

async fn run_h1(addr: SocketAddr, steps: Vec<Step>, requests: usize, closes: bool) -> H1Outcome {
    let mut out = H1Outcome::default();
    let Ok(Ok(mut s)) = timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
        out.closed = true;
        return out;
    };
    let deadline = Instant::now() + CASE_DEADLINE;
    let mut got = Vec::new();
    let mut ended: Option<bool> = None;
    for step in steps {
        match step {
            // The gateway may answer and close before every byte is written.
            Step::Send(bytes) => {
                if s.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            Step::Pause(d) => sleep(d).await,
            Step::HalfClose => {
                let _ = s.shutdown().await;
            }
            Step::AwaitInterim => {
                let until = Instant::now() + Duration::from_secs(3);
                while ended.is_none() && Instant::now() < until {
                    let (finals, interim, _, _) = parse_responses(&got);
                    if !finals.is_empty() || !interim.is_empty() {
                        break;
                    }
                    ended = read_some(&mut s, &mut got, until - Instant::now()).await;
                }
            }
        }
    }
    while ended.is_none() && Instant::now() < deadline {
        let (finals, _, whole, _) = parse_responses(&got);
        let settled = whole && finals.len() >= requests;
        let wait = match (settled, closes) {
            (true, false) => QUIET,
            _ => deadline - Instant::now(),
        };
        let before = got.len();
        ended = read_some(&mut s, &mut got, wait).await;
        if ended.is_none() && got.len() == before {
            break; // quiet, or out of time
        }
    }
    let (finals, interim, _, garbage) = parse_responses(&got);
    out.finals = finals;
    out.interim = interim;
    out.garbage = garbage;
    out.closed = ended.is_some();
    out.reset = ended == Some(true);
    out
}

/// The first forwarded request, shortened, for the summary table.
fn forwarded_as(forwarded: &[&Seen]) -> String {
    let Some(r) = forwarded.first() else {
        return String::new();
    };
    let mut d = r.describe();
    if d.len() > 72 {
        d.truncate(d.floor_char_boundary(69));
        d.push_str("...");
    }
    d
}

fn show(statuses: &[u16]) -> String {
    match statuses {
        [] => "closed".into(),
        s => s
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// Runs `cases` concurrently against `gw`, each with the tag `{prefix}NN`, and returns every
/// problem found (after printing the summary table).
async fn run_h1_table(
    gw: &Gateway,
    recorder: &Recorder,
    canary: &Canary,
    prefix: char,
    cases: Vec<H1Case>,
) -> Vec<String> {
    assert!(cases.len() < 100, "tags have two digits");
    let tags: Vec<String> = (0..cases.len())
        .map(|i| format!("{prefix}{i:02}"))
        .collect();
    let mut running = Vec::new();
    let mut checks = Vec::new();
    for (case, tag) in cases.into_iter().zip(&tags) {
        let steps = case
            .steps
            .into_iter()
            .map(|s| match s {
                Step::Send(b) => Step::Send(fill(&b, tag)),
                other => other,
            })
            .collect();
        running.push(tokio::spawn(run_h1(
            gw.addr,
            steps,
            case.requests,
            case.closes,
        )));
        checks.push(H1Case {
            steps: Vec::new(),
            ..case
        });
    }
    let mut outcomes = Vec::new();
    for r in running {
        outcomes.push(r.await.expect("a case panicked"));
    }
    // Anything forwarded late (a smuggled request) has a moment to arrive.
    sleep(Duration::from_millis(200)).await;
    let seen = recorder.seen();
    let mut problems = Vec::new();
    eprintln!(
        "{:<44} {:<12} {:>8}  {:<6} forwarded as",
        "case", "statuses", "upstream", "closed"
    );
    for ((case, tag), out) in checks.iter().zip(&tags).zip(&outcomes) {
        let forwarded: Vec<&Seen> = seen
            .iter()
            .filter(|r| r.tag().as_deref() == Some(tag))
            .collect();
        eprintln!(
            "{:<44} {:<12} {:>8}  {:<6} {}",
            case.name,
            show(&out.finals),
            forwarded.len(),
            if out.reset {
                "reset"
            } else if out.closed {
                "yes"
            } else {
                "no"
            },
            forwarded_as(&forwarded)
        );
        let mut bad = |p: String| problems.push(format!("{} ({tag}): {p}", case.name));
        if out.finals.is_empty() {
            if !case.statuses.contains(&CLOSED) {
                bad("no answer".into());
            } else if !out.closed {
                bad(format!(
                    "no answer, and the connection still open after {CASE_DEADLINE:?}"
                ));
            }
        }
        for s in &out.finals {
            if !case.statuses.contains(s) {
                bad(format!("answered {s}, expected one of {:?}", case.statuses));
            }
        }
        if out.finals.len() > case.requests {
            bad(format!(
                "{} answers to {} request(s): a smuggled request was answered",
                out.finals.len(),
                case.requests
            ));
        }
        if out.garbage {
            bad("bytes that are no HTTP/1.x response".into());
        }
        if forwarded.len() > case.forward {
            bad(format!(
                "{} request(s) reached the upstream, at most {} may",
                forwarded.len(),
                case.forward
            ));
        }
        let served = out.finals.iter().filter(|&&s| s == 200).count();
        if !out.reset && served != forwarded.len() {
            bad(format!(
                "{served} answer(s) 200 from the upstream, but it got {} request(s)",
                forwarded.len()
            ));
        }
        if case.closes && served > 0 && !out.closed {
            bad(
                "served, then kept the connection open after an ambiguous or closing message"
                    .into(),
            );
        }
        match case.interim {
            Some(true) if !out.interim.contains(&100) => bad("no 100 Continue".into()),
            Some(false) if !out.interim.is_empty() => {
                bad(format!(
                    "interim answers {:?} before a refusal",
                    out.interim
                ));
            }
            _ => {}
        }
        for r in &forwarded {
            for p in case.shape.check(r, tag) {
                bad(p);
            }
        }
    }
    problems.extend(audit(&seen, &recorder.authority(), &tags));
    problems.extend(
        recorder
            .errors()
            .into_iter()
            .map(|e| format!("an upstream connection ended with an error (a desync?): {e}")),
    );
    problems.extend(canary.problems());
    problems
}

fn framing_cases() -> Vec<H1Case> {
    let s = smuggled();
    let s = s.as_bytes();
    let hello = b"hello".as_slice();
    let hello_chunked = cat(&[&chunk(hello), b"0\r\n\r\n"]);
    // A zero chunk, then a request: to a Content-Length reader, all one body.
    let zero_then_request = cat(&[b"0\r\n\r\n", s]);
    // A request inside a chunk: to a reader of a short Content-Length, the request comes next.
    let request_in_chunk = cat(&[&chunk(s), b"0\r\n\r\n"]);
    let cl_te = |cl: &str, te_first: bool, body: &[u8]| {
        let (cl, te) = (
            format!("content-length: {cl}\r\n"),
            "transfer-encoding: chunked\r\n".to_owned(),
        );
        let fields = match te_first {
            true => te + &cl,
            false => cl + &te,
        };
        post(&fields, body)
    };
    let cl_hello_smuggled =
        |cl: &str| post(&format!("content-length: {cl}\r\n"), &cat(&[hello, s]));
    let te_hello = |te_fields: &str| post(te_fields, &hello_chunked);
    let chunked_body = |body: &[u8]| post("transfer-encoding: chunked\r\n", body);
    let mut split = cl_te(
        &zero_then_request.len().to_string(),
        false,
        &zero_then_request,
    );
    let at = find(&split, b"transfer-enc").expect("te field") + 12;
    let rest = split.split_off(at);
    let (middle, last) = rest.split_at(rest.len() - s.len() + 10);
    let flood = format!("5{}\r\nhello\r\n0\r\n\r\n", ";a=b".repeat(5_000));
    let spread_flood: String = (0..40)
        .map(|_| format!("1{}\r\nx\r\n", ";a=b".repeat(130)))
        .chain(std::iter::once("0\r\n\r\n".to_owned()))
        .collect();
    let http10 = |fields: &str, body: &[u8]| {
        let mut v =
            format!("POST /hf/echo?tag={T} HTTP/1.0\r\nx-case: {T}\r\n{fields}\r\n").into_bytes();
        v.extend_from_slice(body);
        v
    };
    let line =
        |request_line: &str| format!("{request_line}\r\nhost: gw.test\r\nx-case: {T}\r\n\r\n");
    vec![
        // Content-Length and Transfer-Encoding together: chunked wins, the connection ends.
        H1Case::new(
            "cl_then_te_chunked",
            OK_OR_REFUSED,
            1,
            cl_te(&zero_then_request.len().to_string(), false, &zero_then_request),
        )
        .closes()
        .body(b""),
        H1Case::new(
            "te_chunked_then_cl",
            OK_OR_REFUSED,
            1,
            cl_te(&zero_then_request.len().to_string(), true, &zero_then_request),
        )
        .closes()
        .body(b""),
        H1Case::new("te_chunked_then_short_cl", OK_OR_REFUSED, 1, cl_te("4", true, &request_in_chunk))
            .closes()
            .body(s),
        H1Case::new("short_cl_then_te_chunked", OK_OR_REFUSED, 1, cl_te("4", false, &request_in_chunk))
            .closes()
            .body(s),
        H1Case::steps(
            "cl_te_split_across_writes",
            OK_OR_REFUSED,
            1,
            vec![
                Step::Send(split),
                Step::Pause(Duration::from_millis(30)),
                Step::Send(middle.to_vec()),
                Step::Pause(Duration::from_millis(30)),
                Step::Send(last.to_vec()),
            ],
        )
        .closes()
        .body(b""),
        H1Case::new("te_chunked_with_cl_0", OK_OR_REFUSED, 1, cl_te("0", true, &request_in_chunk))
            .closes()
            .body(s),
        H1Case::new("cl_0_with_te_chunked", OK_OR_REFUSED, 1, cl_te("0", false, &request_in_chunk))
            .closes()
            .body(s),
        H1Case::new(
            "cl_te_names_in_capitals",
            OK_OR_REFUSED,
            1,
            post(
                &format!(
                    "Content-Length: {}\r\nTRANSFER-ENCODING: chunked\r\n",
                    zero_then_request.len()
                ),
                &zero_then_request,
            ),
        )
        .closes()
        .body(b""),
        // Duplicate and listed lengths.
        H1Case::new(
            "duplicate_cl_same_value",
            OK_OR_REFUSED,
            1,
            post("content-length: 5\r\ncontent-length: 5\r\n", hello),
        )
        .body(hello),
        H1Case::new(
            "duplicate_cl_different_values",
            REFUSED,
            0,
            post(
                &format!("content-length: 5\r\ncontent-length: {}\r\n", 5 + s.len()),
                &cat(&[hello, s]),
            ),
        ),
        H1Case::new(
            "duplicate_cl_larger_first",
            REFUSED,
            0,
            post(
                &format!("content-length: {}\r\ncontent-length: 5\r\n", 5 + s.len()),
                &cat(&[hello, s]),
            ),
        ),
        H1Case::new("cl_list_same_values", OK_OR_REFUSED, 1, post("content-length: 5, 5\r\n", hello))
            .body(hello),
        H1Case::new(
            "cl_list_different_values",
            REFUSED,
            0,
            cl_hello_smuggled(&format!("5, {}", 5 + s.len())),
        ),
        // Lengths that are no plain decimal number.
        H1Case::new("cl_plus_sign", REFUSED, 0, cl_hello_smuggled("+5")),
        H1Case::new("cl_minus_sign", REFUSED, 0, cl_hello_smuggled("-5")),
        H1Case::new("cl_hex", REFUSED, 0, cl_hello_smuggled("0x5")),
        H1Case::new("cl_decimal_point", REFUSED, 0, cl_hello_smuggled("5.0")),
        H1Case::new("cl_inner_space", REFUSED, 0, cl_hello_smuggled("5 5")),
        H1Case::new("cl_empty", REFUSED, 0, cl_hello_smuggled("")),
        H1Case::new("cl_u64_overflow", REFUSED, 0, cl_hello_smuggled("18446744073709551616")),
        H1Case::new("cl_forty_digits", REFUSED, 0, cl_hello_smuggled(&"9".repeat(40))),
        H1Case::new("cl_u64_max", &[400, 413, 431, CLOSED], 0, cl_hello_smuggled("18446744073709551615")),
        H1Case::new("cl_over_the_body_limit", &[413], 0, post("content-length: 10485761\r\n", b"")),
        H1Case::new("cl_leading_spaces", OK_OR_REFUSED, 1, post("content-length:    5\r\n", hello))
            .body(hello),
        H1Case::new("cl_leading_zeros", OK_OR_REFUSED, 1, post("content-length: 00005\r\n", hello))
            .body(hello),
        // Transfer-Encoding values.
        H1Case::new(
            "te_chunked_identity",
            REFUSED,
            0,
            te_hello("transfer-encoding: chunked, identity\r\n"),
        ),
        H1Case::new(
            "te_identity_chunked",
            OK_OR_REFUSED,
            1,
            te_hello("transfer-encoding: identity, chunked\r\n"),
        )
        .body(hello),
        H1Case::new("te_xchunked", REFUSED, 0, te_hello("transfer-encoding: xchunked\r\n")),
        H1Case::new("te_chunked_x", REFUSED, 0, te_hello("transfer-encoding: chunked-x\r\n")),
        H1Case::new("te_quoted", REFUSED, 0, te_hello("transfer-encoding: \"chunked\"\r\n")),
        H1Case::new("te_trailing_comma", REFUSED, 0, te_hello("transfer-encoding: chunked,\r\n")),
        H1Case::new(
            "te_identity_with_cl",
            REFUSED,
            0,
            te_hello("transfer-encoding: identity\r\ncontent-length: 5\r\n"),
        ),
        H1Case::new(
            "te_two_fields_chunked_then_identity",
            REFUSED,
            0,
            te_hello("transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n"),
        ),
        H1Case::new(
            "te_two_fields_identity_then_chunked",
            OK_OR_REFUSED,
            1,
            te_hello("transfer-encoding: identity\r\ntransfer-encoding: chunked\r\n"),
        )
        .body(hello),
        H1Case::new(
            "te_obs_fold",
            REFUSED,
            0,
            post(
                &format!("transfer-encoding:\r\n chunked\r\ncontent-length: {}\r\n", request_in_chunk.len()),
                &request_in_chunk,
            ),
        ),
        H1Case::new("te_tab_before_value", OK_OR_REFUSED, 1, te_hello("transfer-encoding:\tchunked\r\n"))
            .body(hello),
        H1Case::new("te_value_in_capitals", OK_OR_REFUSED, 1, te_hello("transfer-encoding: CHUNKED\r\n"))
            .body(hello),
        H1Case::new(
            "te_vertical_tab",
            REFUSED,
            0,
            te_hello("transfer-encoding: \x0bchunked\r\ncontent-length: 5\r\n"),
        ),
        H1Case::new(
            "te_space_before_colon",
            REFUSED,
            0,
            post(
                &format!("transfer-encoding : chunked\r\ncontent-length: {}\r\n", request_in_chunk.len()),
                &request_in_chunk,
            ),
        ),
        // Not Transfer-Encoding at all: framed by its Content-Length, whole.
        H1Case::new(
            "te_underscore_name_is_another_field",
            OK_OR_REFUSED,
            1,
            post(
                &format!("transfer_encoding: chunked\r\ncontent-length: {}\r\n", hello_chunked.len()),
                &hello_chunked,
            ),
        )
        .body(&hello_chunked),
        // Field syntax.
        H1Case::new(
            "obs_fold_line",
            REFUSED,
            0,
            post("x-note: a\r\n folded\r\ncontent-length: 5\r\n", hello),
        ),
        H1Case::new(
            "obs_fold_line_with_tab",
            REFUSED,
            0,
            post("x-note: a\r\n\tfolded\r\ncontent-length: 5\r\n", hello),
        ),
        H1Case::new(
            "bare_cr_in_field_value",
            REFUSED,
            0,
            post("x-note: a\rcontent-length: 0\r\ncontent-length: 5\r\n", hello),
        ),
        H1Case::new(
            "bare_cr_ending_a_field",
            REFUSED,
            0,
            post("x-note: a\rcontent-length: 5\r\n", hello),
        ),
        H1Case::new(
            "bare_cr_in_request_line",
            REFUSED,
            0,
            format!("POST /hf/echo?tag={T}\rHTTP/1.1\r\nhost: gw.test\r\nx-case: {T}\r\ncontent-length: 5\r\n\r\nhello"),
        ),
        H1Case::new(
            "bare_lf_line_endings",
            OK_OR_REFUSED,
            1,
            format!("POST /hf/echo?tag={T} HTTP/1.1\nhost: gw.test\nx-case: {T}\ncontent-length: 5\n\nhello"),
        )
        .body(hello),
        H1Case::new(
            "bare_lf_between_cl_and_te",
            OK_OR_REFUSED,
            1,
            post(
                &format!("content-length: {}\ntransfer-encoding: chunked\r\n", zero_then_request.len()),
                &zero_then_request,
            ),
        )
        .closes()
        .body(b""),
        H1Case::new("nul_in_field_value", REFUSED, 0, post("x-note: a\0b\r\ncontent-length: 5\r\n", hello)),
        H1Case::new("nul_in_field_name", REFUSED, 0, post("x-no\0te: a\r\ncontent-length: 5\r\n", hello)),
        H1Case::new(
            "nul_in_request_target",
            REFUSED,
            0,
            format!("GET /hf/x\0y?tag={T} HTTP/1.1\r\nhost: gw.test\r\nx-case: {T}\r\n\r\n"),
        ),
        H1Case::new(
            "space_before_colon_in_cl",
            REFUSED,
            0,
            cat(&[&post("content-length : 5\r\n", hello), s]),
        ),
        H1Case::new("space_in_field_name", REFUSED, 0, post("x note: a\r\ncontent-length: 5\r\n", hello)),
        H1Case::new("empty_field_name", REFUSED, 0, post(": a\r\ncontent-length: 5\r\n", hello)),
        H1Case::new("field_without_colon", REFUSED, 0, post("x-note\r\ncontent-length: 5\r\n", hello)),
        // Chunked bodies.
        H1Case::new(
            "chunk_extensions_a_few",
            OK_OR_REFUSED,
            1,
            chunked_body(b"5;a=b;q=\"x y\"\r\nhello\r\n0;end\r\n\r\n"),
        )
        .body(hello),
        H1Case::new("chunk_extension_flood", REFUSED, 0, chunked_body(flood.as_bytes())),
        H1Case::new(
            "chunk_extension_flood_over_many_chunks",
            REFUSED,
            0,
            chunked_body(spread_flood.as_bytes()),
        ),
        H1Case::new(
            "chunk_size_overflow",
            REFUSED,
            0,
            chunked_body(&cat(&[b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n", s])),
        ),
        H1Case::steps(
            "chunk_size_u64_max_then_eof",
            &[400, 413, CLOSED],
            0,
            vec![
                Step::Send(chunked_body(b"ffffffffffffffff\r\nhello")),
                Step::HalfClose,
            ],
        ),
        H1Case::new("chunk_size_not_hex", REFUSED, 0, chunked_body(&cat(&[b"zz\r\nhello\r\n0\r\n\r\n", s]))),
        H1Case::new("chunk_size_0x_prefix", REFUSED, 0, chunked_body(b"0x5\r\nhello\r\n0\r\n\r\n")),
        H1Case::new("chunk_size_negative", REFUSED, 0, chunked_body(b"-5\r\nhello\r\n0\r\n\r\n")),
        H1Case::new("chunk_size_leading_space", OK_OR_REFUSED, 1, chunked_body(b" 5\r\nhello\r\n0\r\n\r\n"))
            .body(hello),
        H1Case::new("chunk_size_trailing_space", OK_OR_REFUSED, 1, chunked_body(b"5 \r\nhello\r\n0\r\n\r\n"))
            .body(hello),
        H1Case::new(
            "chunk_data_longer_than_its_size",
            REFUSED,
            0,
            chunked_body(&cat(&[b"3\r\nhello\r\n0\r\n\r\n", s])),
        ),
        H1Case::new(
            "chunk_data_without_crlf",
            REFUSED,
            0,
            chunked_body(&cat(&[b"5\r\nhello0\r\n\r\n", s])),
        ),
        H1Case::new("chunk_lines_bare_lf", OK_OR_REFUSED, 1, chunked_body(b"5\nhello\n0\n\n"))
            .body(hello),
        H1Case::steps(
            "missing_final_crlf_then_eof",
            REFUSED,
            0,
            vec![Step::Send(chunked_body(b"5\r\nhello\r\n0\r\n")), Step::HalfClose],
        ),
        H1Case::steps(
            "missing_last_chunk_then_eof",
            REFUSED,
            0,
            vec![Step::Send(chunked_body(b"5\r\nhello\r\n")), Step::HalfClose],
        ),
        H1Case::steps(
            "cl_longer_than_the_body_then_eof",
            REFUSED,
            0,
            vec![Step::Send(post("content-length: 50\r\n", hello)), Step::HalfClose],
        ),
        H1Case::new(
            "trailer_fields_naming_framing",
            OK_OR_REFUSED,
            1,
            chunked_body(b"5\r\nhello\r\n0\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n"),
        )
        .body(hello),
        // Requests inside bodies, and real pipelining.
        H1Case::new(
            "request_hidden_in_a_cl_body",
            OK,
            1,
            post(&format!("content-length: {}\r\n", s.len()), s),
        )
        .body(s),
        H1Case::new("request_hidden_in_a_chunked_body", OK, 1, chunked_body(&request_in_chunk))
            .body(s),
        H1Case::new(
            "two_pipelined_requests",
            OK,
            2,
            get(&format!("/hf/one?tag={T}"), "host: gw.test\r\n") + &get(&format!("/hf/two?tag={T}"), "host: gw.test\r\n"),
        ),
        H1Case::new(
            "request_after_connection_close",
            OK,
            1,
            cat(&[get(&format!("/hf/close?tag={T}"), "host: gw.test\r\nconnection: close\r\n").as_bytes(), s]),
        )
        .closes(),
        H1Case::new(
            "get_with_a_cl_body",
            OK_OR_REFUSED,
            1,
            get(&format!("/hf/echo?tag={T}"), "host: gw.test\r\ncontent-length: 5\r\n") + "hello",
        )
        .body(hello),
        // HTTP/1.0 knows no chunked.
        H1Case::new(
            "http10_with_te_chunked",
            REFUSED,
            0,
            http10("transfer-encoding: chunked\r\n", &request_in_chunk),
        ),
        H1Case::new(
            "http10_with_te_and_cl",
            REFUSED,
            0,
            http10(
                &format!("transfer-encoding: chunked\r\ncontent-length: {}\r\n", zero_then_request.len()),
                &zero_then_request,
            ),
        ),
        H1Case::new("http10_with_cl", OK, 1, http10("content-length: 5\r\n", hello)).body(hello),
        // Expect.
        H1Case::new(
            "expect_continue_over_the_body_limit",
            &[413],
            0,
            post("content-length: 10485761\r\nexpect: 100-continue\r\n", b""),
        )
        .interim(false),
        H1Case::steps(
            "expect_continue_within_the_limit",
            OK,
            1,
            vec![
                Step::Send(post("content-length: 5\r\nexpect: 100-continue\r\n", b"")),
                Step::AwaitInterim,
                Step::Send(hello.to_vec()),
            ],
        )
        .interim(true)
        .body(hello),
        H1Case::new(
            "expect_unknown_expectation",
            &[200, 417],
            1,
            post("content-length: 5\r\nexpect: 200-maybe\r\n", hello),
        )
        .body(hello),
        // Request lines.
        H1Case::new("version_http_1_2", &[400, 505, CLOSED], 0, line(&format!("GET /hf/v?tag={T} HTTP/1.2"))),
        H1Case::new("version_http_2_0_in_http1", &[400, 505, CLOSED], 0, line(&format!("GET /hf/v?tag={T} HTTP/2.0"))),
        H1Case::new("version_lowercase", REFUSED, 0, line(&format!("GET /hf/v?tag={T} http/1.1"))),
        H1Case::new("request_line_double_space", REFUSED, 0, line(&format!("GET  /hf/v?tag={T} HTTP/1.1"))),
        H1Case::new("request_line_tabs", REFUSED, 0, line(&format!("GET\t/hf/v?tag={T}\tHTTP/1.1"))),
        H1Case::new("request_line_trailing_space", REFUSED, 0, line(&format!("GET /hf/v?tag={T} HTTP/1.1 "))),
        // Upgrades and fields that name other fields: served as plain HTTP/1.1, never passed on.
        H1Case::new(
            "upgrade_to_h2c",
            OK,
            1,
            get(
                &format!("/hf/up?tag={T}"),
                "host: gw.test\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            ),
        ),
        H1Case::new(
            "upgrade_to_websocket",
            OK,
            1,
            get(
                &format!("/hf/ws?tag={T}"),
                "host: gw.test\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            ),
        ),
        H1Case::new(
            "connection_names_content_length",
            OK_OR_REFUSED,
            1,
            post("connection: content-length\r\ncontent-length: 5\r\n", hello),
        )
        .body(hello),
        H1Case::new(
            "connection_names_transfer_encoding",
            OK_OR_REFUSED,
            1,
            te_hello("connection: transfer-encoding\r\ntransfer-encoding: chunked\r\n"),
        )
        .body(hello),
    ]
}

#[tokio::test]
async fn http1_framing_attacks_are_refused_or_unambiguous_and_never_smuggle_a_request_upstream() {
    let started = std::time::Instant::now();
    let recorder = Recorder::start().await;
    let canary = Canary::start().await;
    let gw = Gateway::start(config_for(&recorder.url())).await;
    let cases = framing_cases();
    let count = cases.len();
    let problems = run_h1_table(&gw, &recorder, &canary, 'f', cases).await;
    eprintln!(
        "{count} framing cases, {} upstream requests, {:?}",
        recorder.seen().len(),
        started.elapsed()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn proxy_cases(c1: SocketAddr, c2: SocketAddr, upstream: &str) -> Vec<H1Case> {
    let auth = basic_auth();
    let legacy = |target: &str, fields: &str| {
        format!("GET {target} HTTP/1.1\r\nx-case: {T}\r\nauthorization: {auth}\r\n{fields}\r\n")
    };
    let legacy_path = format!("/applications/{CLIENT_ID}/tokens/{TOKEN}?tag={T}");
    let replacement = format!("/applications/{CLIENT_ID}/token");
    let host = "host: gw.test\r\n";
    let s = smuggled();
    vec![
        // Absolute-form: only the path and query are used.
        H1Case::new("absolute_form_canary", OK, 1, get(&format!("http://{c1}/hf/abs?tag={T}"), &format!("host: {c1}\r\n")))
            .target("/hf/abs?tag=@T@"),
        H1Case::new("absolute_form_canary_on_127_0_0_2", OK, 1, get(&format!("http://{c2}/hf/abs?tag={T}"), host))
            .target("/hf/abs?tag=@T@"),
        H1Case::new("absolute_form_https_canary", OK_OR_REFUSED, 1, get(&format!("https://{c1}/hf/abs?tag={T}"), host))
            .target("/hf/abs?tag=@T@"),
        H1Case::new("absolute_form_without_a_path", OK_OR_REFUSED, 1, get(&format!("http://{c1}?tag={T}"), host))
            .target("/?tag=@T@"),
        H1Case::new("absolute_form_with_userinfo", OK_OR_REFUSED, 1, get(&format!("http://user:pw@{c1}/hf/abs?tag={T}"), host))
            .target("/hf/abs?tag=@T@"),
        H1Case::new(
            "absolute_form_upstream_as_userinfo",
            OK_OR_REFUSED,
            1,
            get(&format!("http://{upstream}@{c1}/hf/abs?tag={T}"), host),
        )
        .target("/hf/abs?tag=@T@"),
        H1Case::new("absolute_form_ftp_scheme", OK_OR_REFUSED, 1, get(&format!("ftp://{c1}/hf/abs?tag={T}"), host))
            .target("/hf/abs?tag=@T@"),
        H1Case::new(
            "absolute_form_and_host_disagree",
            OK_OR_REFUSED,
            1,
            get(&format!("http://{c1}/hf/abs?tag={T}"), &format!("host: {c2}\r\n")),
        )
        .target("/hf/abs?tag=@T@"),
        H1Case::new(
            "absolute_form_post_with_a_body",
            OK,
            1,
            format!("POST http://{c1}/hf/abs?tag={T} HTTP/1.1\r\nhost: {c1}\r\nx-case: {T}\r\ncontent-length: 5\r\n\r\nhello"),
        )
        .target("/hf/abs?tag=@T@")
        .body("hello"),
        H1Case::new(
            "absolute_form_with_dot_segments",
            OK,
            1,
            get(&format!("http://{c1}/a/../../hf/dots?tag={T}"), host),
        )
        .target("/hf/dots?tag=@T@"),
        // Host and the fields some proxies route by.
        H1Case::new("host_canary", OK, 1, get(&format!("/hf/host?tag={T}"), &format!("host: {c1}\r\n")))
            .target("/hf/host?tag=@T@"),
        H1Case::new("host_canary_on_127_0_0_2", OK, 1, get(&format!("/hf/host?tag={T}"), &format!("host: {c2}\r\n")))
            .target("/hf/host?tag=@T@"),
        H1Case::new("host_with_userinfo", OK_OR_REFUSED, 1, get(&format!("/hf/host?tag={T}"), &format!("host: user@{c1}\r\n")))
            .target("/hf/host?tag=@T@"),
        H1Case::new("two_host_fields", &[400], 0, get(&format!("/hf/host?tag={T}"), &format!("host: gw.test\r\nhost: {c1}\r\n"))),
        H1Case::new("host_list", &[400], 0, get(&format!("/hf/host?tag={T}"), &format!("host: gw.test, {c1}\r\n"))),
        H1Case::new(
            "x_forwarded_host_canary",
            OK,
            1,
            get(&format!("/hf/xfh?tag={T}"), &format!("host: gw.test\r\nx-forwarded-host: {c1}\r\nx-forwarded-proto: http\r\n")),
        )
        .target("/hf/xfh?tag=@T@"),
        H1Case::new(
            "forwarded_host_canary",
            OK,
            1,
            get(&format!("/hf/fwd?tag={T}"), &format!("host: gw.test\r\nforwarded: for=192.0.2.1;host={c1};proto=http\r\n")),
        )
        .target("/hf/fwd?tag=@T@"),
        H1Case::new(
            "rewrite_url_fields_canary",
            OK,
            1,
            get(
                &format!("/hf/plain?tag={T}"),
                &format!("host: gw.test\r\nx-original-url: http://{c1}/hf/other\r\nx-rewrite-url: http://{c2}/hf/other\r\nx-host: {c1}\r\nx-forwarded-server: {c2}\r\n"),
            ),
        )
        .target("/hf/plain?tag=@T@"),
        H1Case::new(
            "proxy_fields_are_not_passed_on",
            OK,
            1,
            get(&format!("/hf/proxy?tag={T}"), "host: gw.test\r\nproxy-connection: keep-alive\r\nproxy-authorization: Basic Zm9vOmJhcg==\r\n"),
        )
        .target("/hf/proxy?tag=@T@"),
        // CONNECT: no tunnel, anywhere.
        H1Case::new("connect_canary", &[405], 0, format!("CONNECT {c1} HTTP/1.1\r\nhost: {c1}\r\nx-case: {T}\r\n\r\n")),
        H1Case::new("connect_canary_on_127_0_0_2", &[405], 0, format!("CONNECT {c2} HTTP/1.1\r\nhost: {c2}\r\nx-case: {T}\r\n\r\n")),
        H1Case::new(
            "connect_absolute_form",
            &[400, 405, CLOSED],
            0,
            format!("CONNECT http://{c1}/ HTTP/1.1\r\nhost: {c1}\r\nx-case: {T}\r\n\r\n"),
        ),
        // The bytes after a refused CONNECT are HTTP again, never a tunnel to the canary.
        H1Case::new(
            "connect_then_tunnel_bytes",
            &[405, 200, CLOSED],
            1,
            format!("CONNECT {c1} HTTP/1.1\r\nhost: {c1}\r\nx-case: {T}\r\n\r\n") + &get(&format!("/hf/after-connect?tag={T}"), host),
        )
        .requests(2)
        .target("/hf/after-connect?tag=@T@"),
        H1Case::new("get_in_authority_form", &[200, 400, CLOSED], 1, get(&c1.to_string(), &format!("host: {c1}\r\n"))),
        H1Case::new("target_starting_with_at", OK_OR_REFUSED, 1, get(&format!("@{c1}/hf/at?tag={T}"), host)),
        H1Case::new("target_starting_with_double_slash", OK_OR_REFUSED, 1, get(&format!("//{c1}/hf/dbl?tag={T}"), host)),
        // Dot segments: resolved, never sent upstream, never above the root.
        H1Case::new("dot_segments_out_of_applications", OK, 1, get(&format!("/applications/../../hf/dots?tag={T}"), host))
            .target("/hf/dots?tag=@T@"),
        H1Case::new("dot_segments_encoded", OK, 1, get(&format!("/applications/%2e%2e/%2E%2E/hf/dots?tag={T}"), host))
            .target("/hf/dots?tag=@T@"),
        H1Case::new("dot_segments_mixed", OK, 1, get(&format!("/hf/./a/.%2e/b/../dots?tag={T}"), host))
            .target("/hf/dots?tag=@T@"),
        H1Case::new("dot_segments_above_the_root", OK, 1, get(&format!("/../../../../etc/passwd?tag={T}"), host))
            .target("/etc/passwd?tag=@T@"),
        H1Case::new("encoded_slash_dot_segments", OK_OR_REFUSED, 1, get(&format!("/..%2f..%2fhf?tag={T}"), host)),
        H1Case::new("backslash_dot_segments", OK_OR_REFUSED, 1, get(&format!("/hf\\..\\..\\x?tag={T}"), host)),
        // The asterisk form is about the gateway itself.
        H1Case::new("options_asterisk_host_canary", &[204], 0, format!("OPTIONS * HTTP/1.1\r\nhost: {c1}\r\nx-case: {T}\r\n\r\n")),
        H1Case::new(
            "options_absolute_form_canary",
            &[200, 204, 400, CLOSED],
            1,
            format!("OPTIONS http://{c1} HTTP/1.1\r\nhost: {c1}\r\nx-case: {T}\r\n\r\n"),
        ),
        // Legacy calls: rewritten for the configured upstream whatever they named; the token
        // only in the JSON body.
        H1Case::new("legacy_check", OK, 1, legacy(&legacy_path, host)).legacy(Method::POST, &replacement),
        H1Case::new("legacy_check_absolute_form_canary", OK, 1, legacy(&format!("http://{c1}{legacy_path}"), &format!("host: {c1}\r\n")))
            .legacy(Method::POST, &replacement),
        H1Case::new("legacy_check_host_canary", OK, 1, legacy(&legacy_path, &format!("host: {c2}\r\n")))
            .legacy(Method::POST, &replacement),
        H1Case::new(
            "legacy_check_forwarded_host_canary",
            OK,
            1,
            legacy(&legacy_path, &format!("host: gw.test\r\nx-forwarded-host: {c1}\r\nforwarded: host={c2}\r\n")),
        )
        .legacy(Method::POST, &replacement),
        H1Case::new("legacy_check_dot_segments", OK, 1, legacy(&format!("/x/../applications/./{CLIENT_ID}/tokens/{TOKEN}?tag={T}"), host))
            .legacy(Method::POST, &replacement),
        H1Case::new(
            "legacy_check_with_a_request_in_its_body",
            OK,
            1,
            legacy(&legacy_path, &format!("host: gw.test\r\ncontent-length: {}\r\n", s.len())) + &s,
        )
        .legacy(Method::POST, &replacement),
        H1Case::new(
            "legacy_check_cl_then_te",
            OK_OR_REFUSED,
            1,
            legacy(&legacy_path, "host: gw.test\r\ncontent-length: 40\r\ntransfer-encoding: chunked\r\n") + "0\r\n\r\n" + &s,
        )
        .closes()
        .legacy(Method::POST, &replacement),
        // Spellings a server that reads `\\`, `%5C`, `%2F` or `;` its own way could take for a
        // token operation: refused (README, Spellings); or, where every reading names the same
        // operation, rewritten (never forwarded with the token in the target).
        H1Case::new("legacy_path_behind_backslash_dot_segments", &[400], 0, legacy(&format!("/x\\..\\applications/{CLIENT_ID}/tokens/{TOKEN}?tag={T}"), host)),
        H1Case::new("legacy_path_with_backslash_separators", &[400], 0, legacy(&format!("/applications\\{CLIENT_ID}\\tokens\\{TOKEN}?tag={T}"), host)),
        H1Case::new("legacy_token_behind_backslash", &[400], 0, legacy(&format!("/applications/{CLIENT_ID}/tokens\\{TOKEN}?tag={T}"), host)),
        H1Case::new("legacy_token_behind_backslash_dots", OK_OR_REFUSED, 1, legacy(&format!("/applications/{CLIENT_ID}/tokens/x\\..\\{TOKEN}?tag={T}"), host)),
        H1Case::new("legacy_path_behind_encoded_backslash_dots", &[400], 0, legacy(&format!("/x%5C..%5Capplications/{CLIENT_ID}/tokens/{TOKEN}?tag={T}"), host)),
        H1Case::new("legacy_path_behind_dot_dot_semicolon", &[400], 0, legacy(&format!("/x/..;/applications/{CLIENT_ID}/tokens/{TOKEN}?tag={T}"), host)),
        H1Case::new("legacy_path_with_semicolon_parameter", &[400], 0, legacy(&format!("/applications;v=1/{CLIENT_ID}/tokens/{TOKEN}?tag={T}"), host)),
        H1Case::new("legacy_path_behind_encoded_slash_dots", &[400], 0, legacy(&format!("/x/..%2Fapplications/{CLIENT_ID}/tokens/{TOKEN}?tag={T}"), host)),
        H1Case::new(
            "legacy_reset",
            OK,
            1,
            format!("POST /applications/{CLIENT_ID}/tokens/{TOKEN}?tag={T} HTTP/1.1\r\nhost: gw.test\r\nx-case: {T}\r\nauthorization: {auth}\r\ncontent-length: 0\r\n\r\n"),
        )
        .legacy(Method::PATCH, &replacement),
        H1Case::new(
            "legacy_revoke_grant_absolute_form_canary",
            OK,
            1,
            format!("DELETE http://{c1}/applications/{CLIENT_ID}/grants/{TOKEN}?tag={T} HTTP/1.1\r\nhost: {c1}\r\nx-case: {T}\r\nauthorization: {auth}\r\n\r\n"),
        )
        .legacy(Method::DELETE, format!("/applications/{CLIENT_ID}/grant")),
    ]
}

#[tokio::test]
async fn open_proxy_tricks_over_http1_only_ever_reach_the_configured_upstream() {
    let started = std::time::Instant::now();
    let recorder = Recorder::start().await;
    let canary = Canary::start().await;
    let gw = Gateway::start(config_for(&recorder.url())).await;
    let cases = proxy_cases(canary.addrs[0], canary.addrs[1], &recorder.authority());
    let count = cases.len();
    let problems = run_h1_table(&gw, &recorder, &canary, 'p', cases).await;
    eprintln!(
        "{count} open-proxy cases, {} upstream requests, {:?}",
        recorder.seen().len(),
        started.elapsed()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 with the h2 crate (prior knowledge), downgraded by the gateway to HTTP/1.1 upstream

/// What one HTTP/2 stream got: a status, or [`CLOSED`] for a reset stream or connection.
struct H2Result {
    status: u16,
    note: String,
}

/// One HTTP/2 case: the request the h2 crate sends on each of `streams` streams of one
/// connection, and what may come of it.
struct H2Case {
    name: &'static str,
    method: Method,
    uri: String,
    fields: Vec<(&'static str, String)>,
    data: Vec<Vec<u8>>,
    statuses: &'static [u16],
    streams: usize,
    forward: usize,
    shape: Shape,
}

impl H2Case {
    fn new(
        name: &'static str,
        method: Method,
        uri: String,
        statuses: &'static [u16],
        forward: usize,
    ) -> Self {
        H2Case {
            name,
            method,
            uri,
            fields: Vec::new(),
            data: Vec::new(),
            statuses,
            streams: 1,
            forward,
            shape: Shape::default(),
        }
    }

    fn field(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.fields.push((name, value.into()));
        self
    }

    fn data(mut self, frames: &[&[u8]]) -> Self {
        self.data = frames.iter().map(|f| f.to_vec()).collect();
        self
    }

    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.shape.body = Some(body.as_ref().to_vec());
        self
    }

    fn target(mut self, target: impl Into<String>) -> Self {
        self.shape.target = Some(target.into());
        self
    }

    fn streams(mut self, n: usize) -> Self {
        self.streams = n;
        self.forward = n;
        self
    }

    fn legacy(mut self, method: Method, path: impl Into<String>) -> Self {
        self.shape.legacy = Some((method, path.into()));
        self
    }
}

/// Sends `case` (filled in for `tag`) on one new HTTP/2 connection, one stream per request,
/// all streams at once.
async fn run_h2(addr: SocketAddr, case: &H2Case, tag: &str) -> Vec<H2Result> {
    let fail = |note: String| {
        vec![H2Result {
            status: u16::MAX,
            note,
        }]
    };
    let tcp = match timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        _ => return fail("no connection".into()),
    };
    let (client, connection) =
        match timeout(Duration::from_secs(5), h2::client::handshake(tcp)).await {
            Ok(Ok(pair)) => pair,
            _ => return fail("no HTTP/2 handshake".into()),
        };
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let uri = String::from_utf8_lossy(&fill(case.uri.as_bytes(), tag)).into_owned();
    let mut streams = Vec::new();
    for _ in 0..case.streams {
        let mut client = match timeout(Duration::from_secs(5), client.clone().ready()).await {
            Ok(Ok(c)) => c,
            _ => return fail("the connection was not ready for a stream".into()),
        };
        let mut req = Request::builder()
            .method(case.method.clone())
            .uri(uri.as_str());
        req = req.header("x-case", tag);
        for (name, value) in &case.fields {
            req = req.header(*name, value.as_str());
        }
        let req = match req.body(()) {
            Ok(req) => req,
            Err(e) => return fail(format!("request not built: {e}")),
        };
        let (response, mut send) = match client.send_request(req, case.data.is_empty()) {
            Ok(pair) => pair,
            Err(e) => return fail(format!("the h2 crate refused to send it: {e}")),
        };
        for (i, frame) in case.data.iter().enumerate() {
            // A stream the gateway already reset takes no more data; the answer says why.
            let _ = send.send_data(Bytes::from(fill(frame, tag)), i + 1 == case.data.len());
        }
        streams.push(tokio::spawn(async move {
            let _send = send;
            match timeout(Duration::from_secs(5), response).await {
                Err(_) => H2Result {
                    status: u16::MAX,
                    note: "no answer within 5 s".into(),
                },
                Ok(Err(e)) => H2Result {
                    status: CLOSED,
                    note: format!("{e}"),
                },
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    while let Some(Ok(chunk)) = timeout(Duration::from_secs(5), body.data())
                        .await
                        .ok()
                        .flatten()
                    {
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    H2Result {
                        status,
                        note: String::new(),
                    }
                }
            }
        }));
    }
    let mut results = Vec::new();
    for s in streams {
        results.push(s.await.unwrap_or_else(|e| H2Result {
            status: u16::MAX,
            note: format!("stream task: {e}"),
        }));
    }
    drop(client);
    driver.abort();
    results
}

/// Checks of one case common to both HTTP/2 tables: statuses from the set, every 200 one the
/// upstream answered, no more requests upstream than allowed, the body and target as framed.
fn check_h2(
    (name, tag): (&str, &str),
    statuses: &[u16],
    got: &[u16],
    forward: usize,
    forwarded: &[&Seen],
    shape: &Shape,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut bad = |p: String| problems.push(format!("{name} ({tag}): {p}"));
    for s in got {
        if !statuses.contains(s) {
            bad(format!(
                "stream ended with {s}, expected one of {statuses:?} (0: reset)"
            ));
        }
    }
    if forwarded.len() > forward {
        bad(format!(
            "{} request(s) reached the upstream, at most {forward} may",
            forwarded.len()
        ));
    }
    let served = got.iter().filter(|&&s| s == 200).count();
    if served != forwarded.len() {
        bad(format!(
            "{served} stream(s) answered 200 from the upstream, but it got {} request(s)",
            forwarded.len()
        ));
    }
    for r in forwarded {
        for p in shape.check(r, tag) {
            bad(p);
        }
    }
    problems
}

fn h2_cases(c1: SocketAddr, c2: SocketAddr) -> Vec<H2Case> {
    let s = smuggled();
    let s = s.as_bytes();
    let gw = "http://gw.test";
    let post = |name, statuses, forward| {
        H2Case::new(
            name,
            Method::POST,
            format!("{gw}/hf/h2?tag={T}"),
            statuses,
            forward,
        )
    };
    let auth = basic_auth();
    vec![
        // :authority and host name the canary: the request still goes to the upstream only.
        H2Case::new(
            "authority_canary",
            Method::GET,
            format!("http://{c1}/hf/h2?tag={T}"),
            OK,
            1,
        )
        .target("/hf/h2?tag=@T@"),
        H2Case::new(
            "authority_canary_on_127_0_0_2",
            Method::GET,
            format!("http://{c2}/hf/h2?tag={T}"),
            OK,
            1,
        )
        .target("/hf/h2?tag=@T@"),
        H2Case::new(
            "authority_canary_https_scheme",
            Method::GET,
            format!("https://{c1}/hf/h2?tag={T}"),
            OK_OR_REFUSED,
            1,
        )
        .target("/hf/h2?tag=@T@"),
        H2Case::new(
            "host_differs_from_authority",
            Method::GET,
            format!("{gw}/hf/h2?tag={T}"),
            OK_OR_REFUSED,
            1,
        )
        .field("host", c1.to_string())
        .target("/hf/h2?tag=@T@"),
        H2Case::new(
            "host_and_authority_both_canaries",
            Method::GET,
            format!("http://{c2}/hf/h2?tag={T}"),
            OK_OR_REFUSED,
            1,
        )
        .field("host", c1.to_string())
        .target("/hf/h2?tag=@T@"),
        H2Case::new(
            "connect_canary",
            Method::CONNECT,
            c1.to_string(),
            &[405, CLOSED],
            0,
        ),
        H2Case::new(
            "connect_canary_on_127_0_0_2",
            Method::CONNECT,
            c2.to_string(),
            &[405, CLOSED],
            0,
        ),
        H2Case::new(
            "dot_segments",
            Method::GET,
            format!("{gw}/applications/../../hf/dots?tag={T}"),
            OK,
            1,
        )
        .target("/hf/dots?tag=@T@"),
        H2Case::new(
            "dot_segments_encoded",
            Method::GET,
            format!("{gw}/%2e%2e/%2E%2E/hf/dots?tag={T}"),
            OK,
            1,
        )
        .target("/hf/dots?tag=@T@"),
        // content-length against the DATA sent (RFC 9113 §8.1.1: malformed, never forwarded).
        post("content_length_more_than_data", &[400, CLOSED], 0)
            .field("content-length", "40")
            .data(&[b"hello"]),
        post("content_length_less_than_data", &[400, CLOSED], 0)
            .field("content-length", "5")
            .data(&[&cat(&[b"hello", s])]),
        post(
            "content_length_less_than_data_in_two_frames",
            &[400, CLOSED],
            0,
        )
        .field("content-length", "5")
        .data(&[b"hello", s]),
        post("content_length_zero_with_data", &[400, CLOSED], 0)
            .field("content-length", "0")
            .data(&[s]),
        post("content_length_two_values", &[400, CLOSED], 0)
            .field("content-length", "5")
            .field("content-length", (5 + s.len()).to_string())
            .data(&[&cat(&[b"hello", s])]),
        post("content_length_plus_sign", &[400, CLOSED], 0)
            .field("content-length", "+5")
            .data(&[b"hello"]),
        // Bodies that hold HTTP/1.1 framing: body bytes upstream, nothing more.
        post("body_holds_a_second_request", OK, 1)
            .field("content-length", s.len().to_string())
            .data(&[s])
            .body(s),
        post("body_holds_a_second_request_without_length", OK, 1)
            .data(&[&s[..10], &s[10..]])
            .body(s),
        post("body_holds_chunked_framing", OK, 1)
            .data(&[&cat(&[b"0\r\n\r\n", s])])
            .body(cat(&[b"0\r\n\r\n", s])),
        H2Case::new(
            "te_trailers",
            Method::GET,
            format!("{gw}/hf/h2?tag={T}"),
            OK,
            1,
        )
        .field("te", "trailers")
        .target("/hf/h2?tag=@T@"),
        // Streams and requests: one each.
        post("six_streams_on_one_connection", OK, 6)
            .field("content-length", s.len().to_string())
            .data(&[s])
            .body(s)
            .streams(6),
        H2Case::new(
            "legacy_check_authority_canary",
            Method::GET,
            format!("http://{c1}/applications/{CLIENT_ID}/tokens/{TOKEN}?tag={T}"),
            OK,
            1,
        )
        .field("authorization", auth)
        .legacy(Method::POST, format!("/applications/{CLIENT_ID}/token")),
    ]
}

#[tokio::test]
async fn http2_requests_downgraded_to_http1_carry_no_smuggled_framing_and_go_nowhere_else() {
    let started = std::time::Instant::now();
    let recorder = Recorder::start().await;
    let canary = Canary::start().await;
    let gw = Gateway::start(config_for(&recorder.url())).await;
    let cases = h2_cases(canary.addrs[0], canary.addrs[1]);
    let tags: Vec<String> = (0..cases.len()).map(|i| format!("h{i:02}")).collect();
    let cases = Arc::new(cases);
    let mut running = Vec::new();
    for (i, tag) in tags.iter().enumerate() {
        let (cases, tag, addr) = (cases.clone(), tag.clone(), gw.addr);
        running.push(tokio::spawn(
            async move { run_h2(addr, &cases[i], &tag).await },
        ));
    }
    let mut outcomes = Vec::new();
    for r in running {
        outcomes.push(r.await.expect("a case panicked"));
    }
    sleep(Duration::from_millis(200)).await;
    let seen = recorder.seen();
    let mut problems = Vec::new();
    eprintln!(
        "{:<44} {:<16} {:>8}  forwarded as",
        "case", "statuses", "upstream"
    );
    for ((case, tag), results) in cases.iter().zip(&tags).zip(&outcomes) {
        let forwarded: Vec<&Seen> = seen
            .iter()
            .filter(|r| r.tag().as_deref() == Some(tag))
            .collect();
        let got: Vec<u16> = results.iter().map(|r| r.status).collect();
        eprintln!(
            "{:<44} {:<16} {:>8}  {}",
            case.name,
            show(&got),
            forwarded.len(),
            forwarded_as(&forwarded)
        );
        for r in results.iter().filter(|r| !r.note.is_empty()) {
            eprintln!("    {}", r.note);
        }
        problems.extend(check_h2(
            (case.name, tag),
            case.statuses,
            &got,
            case.forward,
            &forwarded,
            &case.shape,
        ));
    }
    problems.extend(audit(&seen, &recorder.authority(), &tags));
    problems.extend(
        recorder
            .errors()
            .into_iter()
            .map(|e| format!("an upstream connection ended with an error: {e}")),
    );
    problems.extend(canary.problems());
    eprintln!(
        "{} HTTP/2 cases, {} upstream requests, {:?}",
        cases.len(),
        seen.len(),
        started.elapsed()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 as raw frames: what the h2 crate will not send

/// A header block of literal fields without indexing, new names, no Huffman (RFC 7541 §6.2.2):
/// any bytes at all, CR and LF included.
fn hpack_block(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        hpack_literal(&mut out, name, value);
    }
    out
}

/// The status in a response header block, when its first field is `:status` in a form the
/// gateway's HPACK encoder uses: indexed (RFC 7541 Appendix A, 8 to 14) or literal with the
/// `:status` name (digits, plain or Huffman-coded). 1 when it cannot tell.
fn hpack_status(block: &[u8]) -> u16 {
    const INDEXED: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let Some(&first) = block.first() else {
        return 1;
    };
    if first & 0x80 != 0 {
        let i = usize::from(first & 0x7f);
        return if (8..=14).contains(&i) {
            INDEXED[i - 8]
        } else {
            1
        };
    }
    let name_index = match first {
        b if b & 0xc0 == 0x40 => b & 0x3f,
        b if b & 0xe0 == 0x00 => b & 0x0f,
        _ => return 1,
    };
    if !(8..=14).contains(&name_index) || block.len() < 2 {
        return 1;
    }
    let (huffman, len) = (block[1] & 0x80 != 0, usize::from(block[1] & 0x7f));
    let Some(value) = block.get(2..2 + len) else {
        return 1;
    };
    let digits = if huffman {
        huffman_digits(value)
    } else {
        String::from_utf8_lossy(value).into_owned()
    };
    digits.parse().unwrap_or(1)
}

/// Decodes a Huffman-coded string of digits (RFC 7541 Appendix B: `0`-`2` in five bits,
/// `3`-`9` in six).
fn huffman_digits(bytes: &[u8]) -> String {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let read = |at: usize, n: usize| {
        bits.get(at..at + n)
            .map(|b| b.iter().fold(0u8, |a, &x| a << 1 | x))
    };
    let mut out = String::new();
    let mut at = 0;
    while out.len() < 3 {
        match (read(at, 5), read(at, 6)) {
            (Some(c @ 0..=2), _) => {
                out.push(char::from(b'0' + c));
                at += 5;
            }
            (_, Some(c @ 0x19..=0x1f)) => {
                out.push(char::from(b'3' + (c - 0x19)));
                at += 6;
            }
            _ => break,
        }
    }
    out
}

/// What came back on stream 1 of a raw HTTP/2 connection.
#[derive(Default)]
struct RawOutcome {
    status: Option<u16>,
    reset: Option<u32>,
    goaway: Option<u32>,
    closed: bool,
}

impl RawOutcome {
    /// The status, or [`CLOSED`] when the stream or connection ended without one.
    fn code(&self) -> u16 {
        self.status.unwrap_or(CLOSED)
    }

    fn note(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = self.reset {
            parts.push(format!("RST_STREAM error {e:#x}"));
        }
        if let Some(e) = self.goaway {
            parts.push(format!("GOAWAY error {e:#x}"));
        }
        if self.closed {
            parts.push("connection closed".into());
        }
        parts.join(", ")
    }
}

/// Opens a connection, sends `fields` as stream 1's header block and `data` as its body, and
/// reads until stream 1 ends (at most 5 s).
async fn run_raw_h2(
    addr: SocketAddr,
    fields: &[(Vec<u8>, Vec<u8>)],
    data: Option<&[u8]>,
) -> RawOutcome {
    let mut out = RawOutcome::default();
    let Ok(Ok(mut s)) = timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
        out.closed = true;
        return out;
    };
    let mut wire = PREFACE.to_vec();
    wire.extend(h2_frame(SETTINGS, 0, 0, &[]));
    let flags = END_HEADERS | if data.is_none() { END_STREAM } else { 0 };
    wire.extend(h2_frame(HEADERS, flags, 1, &hpack_block(fields)));
    if let Some(d) = data {
        wire.extend(h2_frame(DATA, END_STREAM, 1, d));
    }
    if s.write_all(&wire).await.is_err() {
        out.closed = true;
        return out;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        // Every whole frame read so far.
        while got.len() >= 9 {
            let len = usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
            if got.len() < 9 + len {
                break;
            }
            let (kind, flags) = (got[3], got[4]);
            let stream = u32::from_be_bytes([got[5], got[6], got[7], got[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = got[9..9 + len].to_vec();
            got.drain(..9 + len);
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let _ = s.write_all(&h2_frame(SETTINGS, ACK, 0, &[])).await;
                }
                PING if flags & ACK == 0 => {
                    let _ = s.write_all(&h2_frame(PING, ACK, 0, &payload)).await;
                }
                HEADERS if stream == 1 => {
                    out.status.get_or_insert(hpack_status(&payload));
                    if flags & END_STREAM != 0 {
                        return out;
                    }
                }
                DATA if stream == 1 && flags & END_STREAM != 0 => return out,
                RST_STREAM if stream == 1 => {
                    out.reset = payload
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return out;
                }
                GOAWAY => {
                    out.goaway = payload
                        .get(4..8)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return out;
                }
                _ => {}
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                out.closed = true;
                return out;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return out,
        }
    }
}

/// One raw HTTP/2 case: stream 1's fields (pseudo-fields first unless the case is about
/// their order) and body.
struct RawCase {
    name: &'static str,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    data: Option<Vec<u8>>,
    statuses: &'static [u16],
    forward: usize,
    shape: Shape,
}

fn raw_cases(c1: SocketAddr) -> Vec<RawCase> {
    let f = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec());
    let base = |method: &str, path: &str| {
        vec![
            f(":method", method),
            f(":scheme", "http"),
            f(":authority", "gw.test"),
            f(":path", path),
            f("x-case", T),
        ]
    };
    let post_path = format!("/hf/raw?tag={T}");
    let post = |extra: &[(&str, &str)]| {
        let mut v = base("POST", &post_path);
        v.extend(extra.iter().map(|(n, val)| f(n, val)));
        v
    };
    let s = smuggled();
    let chunked_smuggle = cat(&[&chunk(b"hello"), b"0\r\n\r\n", s.as_bytes()]);
    let case = |name, fields, data: Option<&[u8]>, statuses, forward| RawCase {
        name,
        fields,
        data: data.map(<[u8]>::to_vec),
        statuses,
        forward,
        shape: Shape::default(),
    };
    // Stripped and forwarded is as good as refused for a connection-specific field, as long
    // as the DATA go upstream as the body, byte for byte.
    let stripped_or_refused = |name, extra: &[(&str, &str)]| RawCase {
        shape: Shape {
            body: Some(chunked_smuggle.clone()),
            ..Shape::default()
        },
        ..case(
            name,
            post(extra),
            Some(&chunked_smuggle),
            &[200, 400, CLOSED],
            1,
        )
    };
    let refused = |name, fields| case(name, fields, None, &[400, CLOSED], 0);
    let mut swapped = base("GET", &format!("/hf/raw?tag={T}"));
    swapped.swap(3, 4); // x-case before :path
    let mut two_paths = base("GET", &format!("/hf/raw?tag={T}"));
    two_paths.insert(4, f(":path", &format!("/smuggled?tag={T}")));
    // No :scheme and no :path (RFC 9113 §8.5).
    let connect = vec![
        f(":method", "CONNECT"),
        f(":authority", &c1.to_string()),
        f("x-case", T),
    ];
    vec![
        // The control: a well-formed request in raw frames is forwarded.
        RawCase {
            shape: Shape {
                body: Some(b"hello".to_vec()),
                target: Some(format!("/hf/raw?tag={T}")),
                legacy: None,
            },
            ..case(
                "raw_control_well_formed",
                post(&[("content-length", "5")]),
                Some(b"hello"),
                OK,
                1,
            )
        },
        stripped_or_refused(
            "raw_transfer_encoding_chunked",
            &[("transfer-encoding", "chunked")],
        ),
        stripped_or_refused(
            "raw_transfer_encoding_capitals",
            &[("Transfer-Encoding", "chunked")],
        ),
        stripped_or_refused(
            "raw_transfer_encoding_with_content_length",
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
        ),
        stripped_or_refused("raw_connection_keep_alive", &[("connection", "keep-alive")]),
        stripped_or_refused(
            "raw_connection_names_content_length",
            &[("connection", "content-length")],
        ),
        stripped_or_refused(
            "raw_upgrade_websocket",
            &[("connection", "upgrade"), ("upgrade", "websocket")],
        ),
        stripped_or_refused("raw_keep_alive", &[("keep-alive", "timeout=5")]),
        stripped_or_refused(
            "raw_proxy_connection",
            &[("proxy-connection", "keep-alive")],
        ),
        stripped_or_refused("raw_te_gzip", &[("te", "gzip")]),
        // CR, LF and NUL inside HPACK strings: an HTTP/1.1 field or request line split in two.
        refused(
            "raw_crlf_in_field_value",
            post(&[("x-note", "a\r\ntransfer-encoding: chunked")]),
        ),
        refused(
            "raw_lf_in_field_value",
            post(&[("x-note", "a\ncontent-length: 0")]),
        ),
        refused("raw_nul_in_field_value", post(&[("x-note", "a\0b")])),
        refused(
            "raw_crlf_in_field_name",
            post(&[("x-note\r\ntransfer-encoding", "chunked")]),
        ),
        refused("raw_colon_in_field_name", post(&[("x:note", "a")])),
        refused("raw_space_in_field_name", post(&[("x note", "a")])),
        refused(
            "raw_request_in_path",
            base(
                "GET",
                &format!("/hf/raw?tag={T} HTTP/1.1\r\nhost: x\r\n\r\nGET /smuggled?tag={T}"),
            ),
        ),
        refused(
            "raw_space_in_path",
            base("GET", &format!("/hf/raw?tag={T} HTTP/1.1")),
        ),
        refused(
            "raw_crlf_in_method",
            base(&format!("GET /smuggled?tag={T} HTTP/1.1\r\n"), "/hf/raw"),
        ),
        refused("raw_crlf_in_authority", {
            let mut v = base("GET", &format!("/hf/raw?tag={T}"));
            v[2] = f(":authority", "gw.test\r\nx-smuggled: 1");
            v
        }),
        refused("raw_pseudo_field_after_a_field", swapped),
        refused("raw_path_twice", two_paths),
        refused("raw_unknown_pseudo_field", {
            let mut v = base("GET", &format!("/hf/raw?tag={T}"));
            v.insert(0, f(":smuggle", "1"));
            v
        }),
        case(
            "raw_content_length_more_than_data",
            post(&[("content-length", "40")]),
            Some(b"hello"),
            &[400, CLOSED],
            0,
        ),
        // Targets and authorities naming the canary.
        RawCase {
            shape: Shape {
                target: Some(format!("/hf/raw?tag={T}")),
                ..Shape::default()
            },
            ..case(
                "raw_authority_canary",
                {
                    let mut v = base("GET", &format!("/hf/raw?tag={T}"));
                    v[2] = f(":authority", &c1.to_string());
                    v
                },
                None,
                OK,
                1,
            )
        },
        case(
            "raw_absolute_form_path",
            base("GET", &format!("http://{c1}/hf/raw?tag={T}")),
            None,
            OK_OR_REFUSED,
            1,
        ),
        case(
            "raw_path_starting_with_double_slash",
            base("GET", &format!("//{c1}/hf/raw?tag={T}")),
            None,
            OK_OR_REFUSED,
            1,
        ),
        case("raw_connect_canary", connect, None, &[405, CLOSED], 0),
    ]
}

#[tokio::test]
async fn http2_connection_specific_and_malformed_fields_are_refused_or_stripped_never_forwarded() {
    let started = std::time::Instant::now();
    let recorder = Recorder::start().await;
    let canary = Canary::start().await;
    let gw = Gateway::start(config_for(&recorder.url())).await;
    let cases = raw_cases(canary.addrs[0]);
    let tags: Vec<String> = (0..cases.len()).map(|i| format!("r{i:02}")).collect();
    let mut running = Vec::new();
    for (case, tag) in cases.iter().zip(&tags) {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = case
            .fields
            .iter()
            .map(|(n, v)| (fill(n, tag), fill(v, tag)))
            .collect();
        let data = case.data.as_ref().map(|d| fill(d, tag));
        let addr = gw.addr;
        running.push(tokio::spawn(async move {
            run_raw_h2(addr, &fields, data.as_deref()).await
        }));
    }
    let mut outcomes = Vec::new();
    for r in running {
        outcomes.push(r.await.expect("a case panicked"));
    }
    sleep(Duration::from_millis(200)).await;
    let seen = recorder.seen();
    let mut problems = Vec::new();
    eprintln!(
        "{:<44} {:<8} {:>8}  {:<40} forwarded as",
        "case", "status", "upstream", "stream"
    );
    for ((case, tag), out) in cases.iter().zip(&tags).zip(&outcomes) {
        let forwarded: Vec<&Seen> = seen
            .iter()
            .filter(|r| r.tag().as_deref() == Some(tag))
            .collect();
        eprintln!(
            "{:<44} {:<8} {:>8}  {:<40} {}",
            case.name,
            show(&[out.code()]),
            forwarded.len(),
            out.note(),
            forwarded_as(&forwarded)
        );
        if out.status.is_none() && out.reset.is_none() && out.goaway.is_none() && !out.closed {
            problems.push(format!(
                "{} ({tag}): no answer, no reset within 5 s",
                case.name
            ));
        }
        problems.extend(check_h2(
            (case.name, tag),
            case.statuses,
            &[out.code()],
            case.forward,
            &forwarded,
            &case.shape,
        ));
    }
    problems.extend(audit(&seen, &recorder.authority(), &tags));
    problems.extend(
        recorder
            .errors()
            .into_iter()
            .map(|e| format!("an upstream connection ended with an error: {e}")),
    );
    problems.extend(canary.problems());
    eprintln!(
        "{} raw HTTP/2 cases, {} upstream requests, {:?}",
        cases.len(),
        seen.len(),
        started.elapsed()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
