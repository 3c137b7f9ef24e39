//! A faulty upstream for tests: a raw TCP relay on 127.0.0.1:0 in front of a real HTTP/1.1
//! server (the fake GitHub). It reads each request off the wire (Content-Length or chunked
//! framing), asks the test which [`Fault`] to apply, forwards the request (unless the fault is a
//! black hole or a made-up `101`), reads the server's whole answer, then passes it back or breaks
//! it. Every request it receives is logged as an [`Arrival`] before a byte goes back, so once a
//! caller has its answer the log is complete. Each accepted connection gets its own connection to
//! the server. Nothing here leaves 127.0.0.1; dropping the relay closes every connection.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Longest a held connection (black hole, `101`, half-close) is kept open.
const HOLD: Duration = Duration::from_secs(30);
/// Longest wait for the next request on a connection, or for the server's answer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message head read.
const MAX_HEAD: usize = 64 * 1024;

/// Bytes that are no HTTP answer at all.
pub const GARBAGE: &[u8] = b"\x00\x01\x02\x03\xfe\xff this is not an HTTP answer\r\n\r\n";

/// What the relay answers instead of forwarding, for [`Fault::Switching`].
const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";

/// The body of the unrequested answer of [`Fault::ExtraResponse`].
pub const STALE_BODY: &str = r#"{"message":"a stale answer nobody asked for"}"#;

/// What the relay does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward it and pass the whole answer back.
    Pass,
    /// Forward it; send back the first `n` bytes of the answer, then reset the connection
    /// (`SO_LINGER` 0, then close: RST).
    ResetAfter(usize),
    /// Forward it; send back the answer's head and `n` bytes of its body, then reset.
    ResetInBody(usize),
    /// Read it, never forward or answer it; hold the connection until the peer closes it.
    BlackHole,
    /// Forward it; answer with bytes that are not HTTP ([`GARBAGE`]), then close.
    Garbage,
    /// Forward it; shut down the write side without a byte of answer (FIN), then wait for the
    /// peer to close.
    HalfClose,
    /// Forward it; send the answer's head with `connection: close` added and half of its body
    /// (so fewer bytes than its `Content-Length`), then close (FIN).
    TruncatedBody,
    /// Forward it and pass the whole answer back; after the delay, send a second, unrequested
    /// `200` (header `x-stale: 1`, body [`STALE_BODY`]) on the same connection, and go on serving.
    ExtraResponse(Duration),
    /// Answer `101 Switching Protocols` without forwarding, then hold the connection.
    Switching,
}

/// A request as the relay read it, for the test to choose a fault by.
pub struct RequestHead {
    /// The method.
    pub method: String,
    /// The request target as received.
    pub target: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request the relay received. Holds no header value but `x-seq` (no credential).
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Arrival order, from 0.
    pub index: usize,
    /// The connection it came on: accepted connections are numbered from 0.
    pub conn: usize,
    /// Its method.
    pub method: String,
    /// Its request target.
    pub target: String,
    /// Its `x-seq` header, the tests' request id.
    pub seq: Option<String>,
    /// What the relay did with it.
    pub fault: Fault,
    /// Length of the answer's head, when there was an answer.
    pub head_len: usize,
    /// Length of the whole answer, head and body (0 when it was not forwarded).
    pub answer_len: usize,
    /// Bytes of that answer the relay sent back.
    pub answered: usize,
    /// Whether the request reached the server.
    pub forwarded: bool,
}

impl Arrival {
    /// Whether the answer's head went back whole but part of its body was withheld.
    pub fn body_cut(&self) -> bool {
        self.head_len > 0 && self.answered >= self.head_len && self.answered < self.answer_len
    }
}

type Choose = dyn Fn(usize, &RequestHead) -> Fault + Send + Sync;

struct Shared {
    target: SocketAddr,
    choose: Box<Choose>,
    next: AtomicUsize,
    log: Mutex<Vec<Arrival>>,
    closed_by_peer: Mutex<HashSet<usize>>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<Arrival>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closed(&self, conn: usize) {
        self.closed_by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(conn);
    }
}

/// A running relay; dropping it closes the listener and every connection.
pub struct FaultyRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultyRelay {
    /// A relay on 127.0.0.1:0 in front of `target`, applying `choose(arrival index, request)`
    /// to each request.
    pub async fn start(
        target: SocketAddr,
        choose: impl Fn(usize, &RequestHead) -> Fault + Send + Sync + 'static,
    ) -> FaultyRelay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the relay");
        let addr = listener.local_addr().expect("relay address");
        let shared = Arc::new(Shared {
            target,
            choose: Box::new(choose),
            next: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            closed_by_peer: Mutex::new(HashSet::new()),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultyRelay { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        let mut log = self.shared.log().clone();
        log.sort_by_key(|a| a.index);
        log
    }

    /// Whether the peer (the gateway) closed connection `conn`.
    pub fn closed_by_peer(&self, conn: usize) -> bool {
        self.shared
            .closed_by_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&conn)
    }

    /// Waits until the peer has closed connection `conn`, at most `within`; whether it did.
    pub async fn await_closed_by_peer(&self, conn: usize, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.closed_by_peer(conn) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.closed_by_peer(conn)
    }
}

impl Drop for FaultyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owning the connection tasks here means aborting this task closes every connection.
    let mut conns = JoinSet::new();
    let mut next_conn = 0usize;
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        conns.spawn(serve(stream, next_conn, shared.clone()));
        next_conn += 1;
    }
}

/// Serves one accepted connection: request after request until a fault ends it.
async fn serve(mut down: TcpStream, conn: usize, shared: Arc<Shared>) {
    let _ = down.set_nodelay(true);
    let mut down_buf = Vec::new();
    let mut up: Option<(TcpStream, Vec<u8>)> = None;
    loop {
        let read = tokio::time::timeout(
            IO_TIMEOUT,
            read_message(&mut down, &mut down_buf, Framing::Request),
        )
        .await;
        let req = match read {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None) | Err(_)) => {
                shared.closed(conn);
                return;
            }
            Err(_) => return,
        };
        let head = req.request_head();
        let index = shared.next.fetch_add(1, Ordering::SeqCst);
        let fault = (shared.choose)(index, &head);
        let mut arrival = Arrival {
            index,
            conn,
            seq: head.header("x-seq").map(str::to_owned),
            method: head.method.clone(),
            target: head.target.clone(),
            fault,
            head_len: 0,
            answer_len: 0,
            answered: 0,
            forwarded: false,
        };
        match fault {
            Fault::BlackHole => {
                shared.log().push(arrival);
                if hold(&mut down).await {
                    shared.closed(conn);
                }
                return;
            }
            Fault::Switching => {
                arrival.head_len = SWITCHING.len();
                arrival.answer_len = SWITCHING.len();
                arrival.answered = SWITCHING.len();
                shared.log().push(arrival);
                if down.write_all(SWITCHING).await.is_ok() && hold(&mut down).await {
                    shared.closed(conn);
                }
                return;
            }
            _ => {}
        }

        // Forward it, and read the server's whole answer.
        if up.is_none() {
            match TcpStream::connect(shared.target).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    up = Some((s, Vec::new()));
                }
                Err(_) => {
                    shared.log().push(arrival);
                    reset(down);
                    return;
                }
            }
        }
        let Some((upstream, up_buf)) = up.as_mut() else {
            return;
        };
        arrival.forwarded = true;
        let framing = Framing::Response {
            head_request: head.method == "HEAD",
        };
        let answer = match upstream.write_all(&req.raw).await {
            Ok(()) => tokio::time::timeout(IO_TIMEOUT, read_message(upstream, up_buf, framing))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
            Err(_) => None,
        };
        let Some(answer) = answer else {
            shared.log().push(arrival);
            reset(down);
            return;
        };
        let raw = &answer.raw;
        let head_len = answer.head_len;
        let body_len = raw.len() - head_len;
        let sent = match fault {
            Fault::ResetAfter(n) => n.min(raw.len()),
            Fault::ResetInBody(n) => (head_len + n).min(raw.len()),
            Fault::Garbage | Fault::HalfClose => 0,
            Fault::TruncatedBody => head_len + body_len / 2,
            Fault::Pass | Fault::ExtraResponse(_) | Fault::BlackHole | Fault::Switching => {
                raw.len()
            }
        };
        arrival.head_len = head_len;
        arrival.answer_len = raw.len();
        arrival.answered = sent;
        shared.log().push(arrival);

        match fault {
            // Black holes and 101s were handled before forwarding.
            Fault::Pass | Fault::BlackHole | Fault::Switching => {
                if down.write_all(raw).await.is_err() {
                    return;
                }
            }
            Fault::ExtraResponse(delay) => {
                if down.write_all(raw).await.is_err() {
                    return;
                }
                tokio::time::sleep(delay).await;
                let stale = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-stale: 1\r\ncontent-length: {}\r\n\r\n{STALE_BODY}",
                    STALE_BODY.len()
                );
                if down.write_all(stale.as_bytes()).await.is_err() {
                    return;
                }
            }
            Fault::ResetAfter(_) | Fault::ResetInBody(_) => {
                let _ = down.write_all(&raw[..sent]).await;
                reset(down);
                return;
            }
            Fault::Garbage => {
                let _ = down.write_all(GARBAGE).await;
                return; // dropped: closed (FIN)
            }
            Fault::HalfClose => {
                if down.shutdown().await.is_ok() && hold(&mut down).await {
                    shared.closed(conn);
                }
                return;
            }
            Fault::TruncatedBody => {
                let mut cut = raw[..head_len - 2].to_vec();
                cut.extend_from_slice(b"connection: close\r\n\r\n");
                cut.extend_from_slice(&raw[head_len..sent]);
                let _ = down.write_all(&cut).await;
                return; // dropped: closed (FIN)
            }
        }
    }
}

/// Closes `s` with a reset (RST) instead of a FIN.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Reads and discards until the peer closes `s` (true) or [`HOLD`] passes (false).
async fn hold(s: &mut TcpStream) -> bool {
    let until = Instant::now() + HOLD;
    let mut scratch = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, s.read(&mut scratch)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Which side's framing rules apply.
#[derive(Clone, Copy)]
enum Framing {
    Request,
    Response { head_request: bool },
}

/// One whole HTTP/1.1 message as it was on the wire.
struct Message {
    raw: Vec<u8>,
    head_len: usize,
}

impl Message {
    fn head_text(&self) -> String {
        String::from_utf8_lossy(&self.raw[..self.head_len]).into_owned()
    }

    fn request_head(&self) -> RequestHead {
        let text = self.head_text();
        let mut lines = text.split("\r\n");
        let mut start = lines.next().unwrap_or("").split(' ');
        let method = start.next().unwrap_or("").to_owned();
        let target = start.next().unwrap_or("").to_owned();
        RequestHead {
            method,
            target,
            headers: parse_headers(&text),
        }
    }
}

fn parse_headers(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// Reads from `s` into `buf` until it holds at least `need` bytes.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, need: usize) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < need {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Reads one whole message (bytes already read are in `buf`; bytes past it stay there), or
/// `None` when the peer closed before its first byte.
async fn read_message(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    framing: Framing,
) -> io::Result<Option<Message>> {
    let mut chunk = [0u8; 16 * 1024];
    let head_len = loop {
        if let Some(end) = find(buf, 0, b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let headers = parse_headers(&head);
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    let bodiless = match framing {
        Framing::Request => false,
        Framing::Response { head_request } => {
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            head_request || (100..200).contains(&status) || status == 204 || status == 304
        }
    };
    let chunked = value("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let end = if bodiless {
        head_len
    } else if chunked {
        // Chunk after chunk, then the last (size 0) chunk, its trailers and an empty line.
        let mut pos = head_len;
        loop {
            let line_end = loop {
                if let Some(e) = find(buf, pos, b"\r\n") {
                    break e;
                }
                let need = buf.len() + 1;
                fill(s, buf, need).await?;
            };
            let size_text = String::from_utf8_lossy(&buf[pos..line_end]).into_owned();
            let size_hex = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            pos = line_end + 2;
            if size == 0 {
                // Trailer lines, if any, then the empty line.
                loop {
                    let e = loop {
                        if let Some(e) = find(buf, pos, b"\r\n") {
                            break e;
                        }
                        let need = buf.len() + 1;
                        fill(s, buf, need).await?;
                    };
                    let empty = e == pos;
                    pos = e + 2;
                    if empty {
                        break;
                    }
                }
                break pos;
            }
            fill(s, buf, pos + size + 2).await?;
            pos += size + 2;
        }
    } else {
        let len: usize = match value("content-length") {
            Some(v) => v
                .parse()
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?,
            None if matches!(framing, Framing::Request) => 0,
            // An answer delimited by the end of the connection: not used by the fake.
            None => return Err(io::ErrorKind::InvalidData.into()),
        };
        fill(s, buf, head_len + len).await?;
        head_len + len
    };
    let raw: Vec<u8> = buf.drain(..end).collect();
    Ok(Some(Message { raw, head_len }))
}
