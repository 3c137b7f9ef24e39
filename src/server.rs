//! The accept loop for any hyper service: HTTP/1.1 and HTTP/2 (cleartext h2 by prior knowledge
//! too) with hyper-util's auto builder, a header read timeout, and a graceful drain bounded by a
//! grace period. It owns connections, not requests: what a request means is the service's job.
//! Each accepted connection is handed to a worker ([`Workers`]) and served there.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::limiter::address_key;
use crate::tls::{Acceptor, TlsStream};
use crate::workers::Workers;

/// How long connections get to write what the cut-off at the end of the grace period answered,
/// in seconds.
const CUT_OFF_FLUSH: Duration = Duration::from_secs(1);

/// Pause after a failed `accept` (e.g. out of file descriptors), in milliseconds, so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Interval of HTTP/2 PING frames on a connection, in seconds (RFC 9113 §6.7), and how long an
/// answer may take before the connection is closed: a peer that went away without a FIN is
/// found out even while a stream is open.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// HTTP/2 flow-control windows the gateway grants a client, in bytes (RFC 9113 §6.9.2): a stream
/// may have at most 64 KiB of request body, a connection 256 KiB, sent ahead of what the
/// gateway has read (hyper's defaults, 1 MiB each, let every connection park a megabyte while
/// its call waits at the failed-check gate). Request bodies here are small JSON.
const H2_STREAM_WINDOW: u32 = 65_535;
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;

/// Connection-level settings of one listener. [`serve`] reads them from a watch channel: a new
/// value (a reload) applies to connections accepted from then on, and its connection limits at
/// once; connections already open keep the timeouts they started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Longest wait for the first byte of a new connection and for a complete HTTP/1 request
    /// head (hyper also closes HTTP/1 keep-alive connections idle this long).
    pub header_read_timeout: Duration,
    /// Longest wait for in-flight requests once shutdown starts.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight for this long is closed gracefully (HTTP/2:
    /// GOAWAY), in seconds.
    pub idle_timeout: Duration,
    /// A response the client has taken nothing of for this long (it stopped reading) gets its
    /// connection closed, in seconds.
    pub send_timeout: Duration,
    /// Client connections open at once; past it a new connection is closed at once.
    pub max_connections: usize,
    /// Client connections open at once from one address (an IPv6 address by its /64); past it
    /// a new connection from that address is closed at once.
    pub max_connections_per_ip: usize,
    /// Largest request head, in bytes: HTTP/1.1 request line and fields (hyper answers 431
    /// past it; at least 8192), HTTP/2 header list (RFC 9113 §6.5.2 SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_request_head_bytes: usize,
    /// Most header fields in an HTTP/1.1 request (hyper answers 431 past it).
    pub max_request_headers: usize,
    /// Streams a client may open at once on one HTTP/2 connection (RFC 9113 §6.5.2
    /// SETTINGS_MAX_CONCURRENT_STREAMS).
    pub http2_max_concurrent_streams: u32,
    /// Longest a TLS handshake may take from the client's first byte, in seconds (listeners
    /// with TLS only).
    pub tls_handshake_timeout: Duration,
}

impl ServeOptions {
    /// Options with the given timeouts and the limits of a small internal listener (the admin
    /// listener): 64 connections, 16 per address, 16 KiB heads, 100 fields, 16 streams.
    pub fn internal(header_read_timeout: Duration, shutdown_grace: Duration) -> Self {
        ServeOptions {
            header_read_timeout,
            shutdown_grace,
            idle_timeout: header_read_timeout,
            send_timeout: header_read_timeout,
            max_connections: 64,
            max_connections_per_ip: 16,
            max_request_head_bytes: 16 * 1024,
            max_request_headers: 100,
            http2_max_concurrent_streams: 16,
            tls_handshake_timeout: header_read_timeout,
        }
    }
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections` were open.
    MaxConnections = 0,
    /// `server.max_connections_per_ip` were open from the same address.
    MaxConnectionsPerIp = 1,
}

impl Refusal {
    /// Every reason, in metric-label order.
    pub const ALL: [Refusal; 2] = [Refusal::MaxConnections, Refusal::MaxConnectionsPerIp];

    /// The reason's name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// Open connections, in all and per address; an address leaves the table with its last one,
/// so the table never holds more than `max` entries.
struct Limits {
    max: AtomicUsize,
    per_ip: AtomicUsize,
    open: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place in [`Limits`], given back when dropped.
struct Slot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Limits {
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let ip = address_key(ip.to_canonical());
        let mut by_ip = self.by_ip.lock().unwrap_or_else(PoisonError::into_inner);
        if self.open.load(Ordering::Relaxed) >= self.max.load(Ordering::Relaxed) {
            return Err(Refusal::MaxConnections);
        }
        let n = by_ip.entry(ip).or_insert(0);
        if *n >= self.per_ip.load(Ordering::Relaxed) {
            return Err(Refusal::MaxConnectionsPerIp);
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_ip = self
            .limits
            .by_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout; and
/// the responses being sent, for cutting off a client that stops reading (`send_timeout`) or
/// has not taken a response by its deadline.
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds from `epoch` at which the connection last went without a request.
    idle_since_ms: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
    /// How long a response may wait for the client to take its next part.
    send_timeout: Duration,
    /// Responses still being sent, with their deadlines (a response is finished once its
    /// `Weak` is dead). Pruned on every registration and every look.
    responses: Mutex<Responses>,
    registered: tokio::sync::Notify,
}

/// The responses a connection is sending, and the instant its watcher's timer is armed for, if
/// any (a new response whose deadline is not earlier needs no wake-up: the armed timer is never
/// more than `send_timeout` away, and no response can be cut sooner than that after it starts).
#[derive(Default)]
struct Responses {
    watched: Vec<(Instant, std::sync::Weak<Stall>)>,
    armed_until: Option<Instant>,
}

/// Since when (milliseconds from the connection's epoch) a part of one response handed to the
/// connection has waited for the client to take it; [`NOT_WAITING`] while the connection is
/// asking for more (the client took the last part) or before the first part.
struct Stall {
    since_ms: AtomicU64,
}

const NOT_WAITING: u64 = u64::MAX;

/// Why [`Activity::overdue`] resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overdue {
    /// A response was not sent completely by its deadline (`request_timeout`).
    Deadline,
    /// A part of a response waited `send_timeout` for the client to read it.
    SendTimeout,
}

/// A per-connection handle the service finds in each request's extensions: it registers
/// responses that must be finished by a deadline. When one is not, or when the client takes
/// nothing of one for `send_timeout`, the connection is closed at once, whatever the client
/// reads (HTTP/1.1: the socket; HTTP/2: every stream of the connection), so a client that stops
/// reading cannot hold its response, nor the upstream connection behind it.
#[derive(Clone)]
pub struct ConnectionControl {
    activity: Arc<Activity>,
}

impl std::fmt::Debug for ConnectionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionControl").finish_non_exhaustive()
    }
}

/// A response registered with [`ConnectionControl::finish_by`]: finished when dropped. The
/// response body reports through it when it hands a part to the connection
/// ([`ResponseWatch::handed_over`]) and when the connection asks for the next
/// ([`ResponseWatch::taken`]): between the two, the client is not reading.
pub struct ResponseWatch {
    stall: Arc<Stall>,
    activity: Arc<Activity>,
}

impl std::fmt::Debug for ResponseWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseWatch").finish_non_exhaustive()
    }
}

impl ResponseWatch {
    /// A part of the response was handed to the connection: from now on it waits for the
    /// client to read.
    pub fn handed_over(&self) {
        self.stall
            .since_ms
            .store(self.activity.now_ms(), Ordering::Relaxed);
    }

    /// The connection asked for the next part: the client took the previous one (or the
    /// response is waiting for the upstream, which `request_timeout` bounds).
    pub fn taken(&self) {
        self.stall.since_ms.store(NOT_WAITING, Ordering::Relaxed);
    }
}

impl ConnectionControl {
    /// Registers a response that must be sent completely by `deadline`, and whose client must
    /// keep reading (`send_timeout`). Keep the returned watch as long as the response is being
    /// sent; drop it when it is finished.
    pub fn finish_by(&self, deadline: Instant) -> ResponseWatch {
        let stall = Arc::new(Stall {
            since_ms: AtomicU64::new(NOT_WAITING),
        });
        let wake = {
            let mut responses = self
                .activity
                .responses
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            responses.watched.retain(|(_, w)| w.strong_count() > 0);
            responses.watched.push((deadline, Arc::downgrade(&stall)));
            responses.armed_until.is_none_or(|t| deadline < t)
        };
        if wake {
            self.activity.registered.notify_one();
        }
        ResponseWatch {
            stall,
            activity: self.activity.clone(),
        }
    }
}

impl Activity {
    fn new(send_timeout: Duration) -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: std::sync::OnceLock::new(),
            send_timeout,
            responses: Mutex::new(Responses::default()),
            registered: tokio::sync::Notify::new(),
        }
    }

    /// Resolves once a registered response is still being sent at its deadline, or has waited
    /// `send_timeout` for its client to read.
    async fn overdue(&self) -> Overdue {
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let send_timeout_ms = u64::try_from(self.send_timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let registered = self.registered.notified();
            let now = Instant::now();
            let now_ms = self.now_ms();
            let mut next: Option<Instant> = None;
            {
                let mut responses = self
                    .responses
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                responses.watched.retain(|(_, w)| w.strong_count() > 0);
                for (deadline, stall) in &responses.watched {
                    let Some(stall) = stall.upgrade() else {
                        continue;
                    };
                    if *deadline <= now {
                        return Overdue::Deadline;
                    }
                    let since = stall.since_ms.load(Ordering::Relaxed);
                    let check = if since == NOT_WAITING {
                        // Not waiting now: look again when it could have waited long enough.
                        now + self.send_timeout
                    } else {
                        let waited = now_ms.saturating_sub(since);
                        if waited >= send_timeout_ms {
                            return Overdue::SendTimeout;
                        }
                        now + Duration::from_millis(send_timeout_ms - waited)
                    };
                    let at = check.min(*deadline);
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                responses.armed_until = next;
            }
            match next {
                Some(at) => {
                    timer.as_mut().reset(at);
                    tokio::select! {
                        () = &mut timer => {}
                        () = registered => {}
                    }
                }
                None => registered.await,
            }
        }
    }

    fn now_ms(&self) -> u64 {
        let epoch = *self.epoch.get_or_init(Instant::now);
        u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let idle_for = self
                .now_ms()
                .saturating_sub(self.idle_since_ms.load(Ordering::Relaxed));
            if self.in_flight.load(Ordering::Acquire) == 0 && idle_for >= timeout_ms {
                return;
            }
            let wait = match self.in_flight.load(Ordering::Acquire) {
                0 => timeout_ms.saturating_sub(idle_for).max(1),
                _ => timeout_ms,
            };
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
}

/// A service that keeps [`Activity`] up to date.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
{
    type Response = Response<CountedBody<B>>;
    type Error = Infallible;
    type Future = CountedFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        req.extensions_mut().insert(ConnectionControl {
            activity: self.activity.clone(),
        });
        CountedFuture {
            inner: self.inner.call(req),
            done: Some(Done(self.activity.clone())),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Counted`] call: hands the request's activity to the response body,
    /// or ends it when dropped first.
    struct CountedFuture<F> {
        #[pin]
        inner: F,
        done: Option<Done>,
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it ends or is
    /// dropped: a connection still sending a response is not idle.
    struct CountedBody<B> {
        #[pin]
        inner: B,
        done: Option<Done>,
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.done.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One request counted in flight on its connection until dropped.
struct Done(Arc<Activity>);

impl Drop for Done {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.now_ms(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<F, B> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<CountedBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Poll::Ready(Ok(resp)) = this.inner.poll(cx) else {
            return Poll::Pending;
        };
        let done = this.done.take();
        Poll::Ready(Ok(resp.map(|inner| CountedBody { inner, done })))
    }
}

/// A new connection on its way to its worker.
enum Handoff {
    /// Served on the runtime that accepted it.
    Local(TcpStream),
    /// Registered with no runtime; joins the worker's.
    Moved(std::net::TcpStream),
}

/// The HTTP/1.1 and HTTP/2 connection settings of `opts`.
fn connection_builder(opts: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(opts.max_request_head_bytes.max(8192))
        .max_headers(opts.max_request_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(opts.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(opts.max_request_head_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(H2_STREAM_WINDOW)
        // A response part is handed to h2 as soon as the stream has room for one byte; h2
        // buffers up to this much of it per stream (hyper's default: 400 KiB), so the 16 KiB
        // parts bound memory per stream and send_timeout starts counting early.
        .max_send_buf_size(2 * crate::body::SEND_PART_BYTES)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// A listening socket, and the TLS acceptor when connections to it speak TLS.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub tcp: TcpListener,
    /// `Some` for HTTPS (`server.tls_cert_file`): each connection's handshake first.
    pub tls: Option<Acceptor>,
}

impl Listener {
    /// A plain-TCP listener.
    pub fn plain(tcp: TcpListener) -> Self {
        Listener { tcp, tls: None }
    }
}

/// A client connection: plain TCP, or TLS over it (`server.tls_cert_file`).
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished its in-flight requests within the grace period.
    Completed,
    /// The grace period ran out with requests still in flight; their connections are dropped.
    TimedOut,
}

/// Serves connections from `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish within `opts.shutdown_grace` (the value current when the drain
/// starts), and reports how the drain ended. `opts` may change while serving (a reload): see
/// [`ServeOptions`].
/// When the grace period ends first, `cut_off` runs (the service is to answer what is still in
/// flight at once) and connections get one more second to write those answers.
/// Each connection is served on the worker of `workers` with the fewest open connections;
/// `make_service` is called once per connection with the peer address and that worker's index.
/// Must run on worker 0's runtime.
pub async fn serve<M, S, B>(
    listener: Listener,
    make_service: M,
    mut options: watch::Receiver<ServeOptions>,
    workers: &Workers,
    shutdown: impl Future<Output = ()>,
    cut_off: impl FnOnce(),
    on_refused: impl Fn(Refusal),
) -> DrainOutcome
where
    M: Fn(SocketAddr, usize) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Listener { tcp: listener, tls } = listener;
    let mut opts = *options.borrow_and_update();
    let mut builder = Arc::new(connection_builder(&opts));
    let limits = Arc::new(Limits {
        max: opts.max_connections.into(),
        per_ip: opts.max_connections_per_ip.into(),
        open: AtomicUsize::new(0),
        by_ip: Mutex::new(HashMap::new()),
    });
    // Every connection holds a receiver: `true` asks it to finish gracefully, and the drain is
    // over once every receiver is gone.
    let (drain, _) = watch::channel(false);
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        if options.has_changed().unwrap_or(false) {
            opts = *options.borrow_and_update();
            builder = Arc::new(connection_builder(&opts));
            limits.max.store(opts.max_connections, Ordering::Relaxed);
            limits
                .per_ip
                .store(opts.max_connections_per_ip, Ordering::Relaxed);
        }
        let slot = match limits.acquire(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                // Closed at once: the socket is dropped here, before any byte is read.
                on_refused(refusal);
                tracing::debug!(reason = refusal.as_str(), "connection refused");
                continue;
            }
        };
        // Small request/response messages: send them without Nagle delay.
        let _ = stream.set_nodelay(true);
        let worker = workers.assign();
        let activity = Arc::new(Activity::new(opts.send_timeout));
        let service = Counted {
            inner: make_service(peer, worker.index),
            activity: activity.clone(),
        };
        let builder = builder.clone();
        let opts = opts;
        let tls = tls.clone();
        let mut drained = drain.subscribe();
        let index = worker.index;
        // Off worker 0 the socket moves to the worker's own reactor: out of this one here,
        // into that one on the worker's thread.
        let stream = match index {
            0 => Handoff::Local(stream),
            _ => match stream.into_std() {
                Ok(std) => Handoff::Moved(std),
                Err(e) => {
                    tracing::debug!(error = %e, "connection could not be handed to a worker");
                    continue;
                }
            },
        };
        workers.spawn(index, async move {
            let _held = (worker, slot);
            let stream = match stream {
                Handoff::Local(stream) => stream,
                Handoff::Moved(std) => match TcpStream::from_std(std) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, "connection could not join its worker");
                        return;
                    }
                },
            };
            // hyper's header timer starts at the first byte; a client that sends nothing at
            // all is held to the same limit here.
            let mut probe = [0u8; 1];
            tokio::select! {
                biased;
                _ = drained.wait_for(|d| *d) => return,
                first = tokio::time::timeout(opts.header_read_timeout, stream.peek(&mut probe)) => {
                    match first {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return, // closed or failed before sending anything
                        Err(_) => {
                            tracing::debug!("connection sent nothing within header_read_timeout; closed");
                            return;
                        }
                    }
                }
            }
            let stream = match &tls {
                None => Stream::Plain(stream),
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(opts.tls_handshake_timeout, acceptor.accept(stream));
                    tokio::select! {
                        biased;
                        _ = drained.wait_for(|d| *d) => return,
                        done = handshake => match done {
                            Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed; connection closed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake not done within tls_handshake_timeout; connection closed");
                                return;
                            }
                        },
                    }
                }
            };
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut closing = false;
            let mut closing_idle = false;
            loop {
                tokio::select! {
                    ended = conn.as_mut() => {
                        if let Err(e) = ended {
                            // Client resets, header timeouts and malformed requests end up here.
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = drained.wait_for(|d| *d), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    why = activity.overdue() => {
                        match why {
                            Overdue::Deadline => tracing::debug!(
                                "a response was not sent by its deadline; connection closed"
                            ),
                            Overdue::SendTimeout => tracing::debug!(
                                "the client read nothing of a response for send_timeout; connection closed"
                            ),
                        }
                        break;
                    }
                    () = activity.idle_for(opts.idle_timeout), if !closing => {
                        tracing::debug!("connection idle for idle_timeout; closing");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        closing_idle = true;
                    }
                    // HTTP/2's graceful close waits for the client to answer a PING; one that
                    // never does gets header_read_timeout, then the connection is dropped.
                    () = activity.idle_for(opts.idle_timeout + opts.header_read_timeout), if closing_idle => {
                        tracing::debug!("idle connection did not finish closing; dropped");
                        break;
                    }
                }
            }
        });
    }

    drop(listener);
    let opts = *options.borrow();
    let open = drain.receiver_count();
    tracing::info!(
        open_connections = open,
        grace_seconds = opts.shutdown_grace.as_secs_f64(),
        "shutdown: draining"
    );
    let _ = drain.send(true);
    let drained = drain.closed();
    tokio::pin!(drained);
    match tokio::time::timeout(opts.shutdown_grace, &mut drained).await {
        Ok(()) => {
            tracing::info!("shutdown: drain completed");
            DrainOutcome::Completed
        }
        Err(_) => {
            tracing::warn!("shutdown: grace period ended with requests still in flight");
            cut_off();
            let _ = tokio::time::timeout(CUT_OFF_FLUSH, &mut drained).await;
            DrainOutcome::TimedOut
        }
    }
}
