//! The accept loop for any hyper service: HTTP/1.1 and HTTP/2 (cleartext h2 by prior knowledge
//! too) with hyper-util's auto builder, a header read timeout, and a graceful drain bounded by a
//! grace period. It owns connections, not requests: what a request means is the service's job.
//! Each accepted connection is handed to a worker ([`Workers`]) and served there.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::workers::Workers;

/// How long connections get to write what the cut-off at the end of the grace period answered,
/// in seconds.
const CUT_OFF_FLUSH: Duration = Duration::from_secs(1);

/// Pause after a failed `accept` (e.g. out of file descriptors), in milliseconds, so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Connection-level settings of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Longest wait for the first byte of a new connection and for a complete HTTP/1 request
    /// head (hyper also closes HTTP/1 keep-alive connections idle this long).
    pub header_read_timeout: Duration,
    /// Longest wait for in-flight requests once shutdown starts.
    pub shutdown_grace: Duration,
}

/// A new connection on its way to its worker.
enum Handoff {
    /// Served on the runtime that accepted it.
    Local(TcpStream),
    /// Registered with no runtime; joins the worker's.
    Moved(std::net::TcpStream),
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
/// in-flight requests finish within `opts.shutdown_grace`, and reports how the drain ended.
/// When the grace period ends first, `cut_off` runs (the service is to answer what is still in
/// flight at once) and connections get one more second to write those answers.
/// Each connection is served on the worker of `workers` with the fewest open connections;
/// `make_service` is called once per connection with the peer address and that worker's index.
/// Must run on worker 0's runtime.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    make_service: M,
    opts: ServeOptions,
    workers: &Workers,
    shutdown: impl Future<Output = ()>,
    cut_off: impl FnOnce(),
) -> DrainOutcome
where
    M: Fn(SocketAddr, usize) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
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
        // Small request/response messages: send them without Nagle delay.
        let _ = stream.set_nodelay(true);
        let worker = workers.assign();
        let service = make_service(peer, worker.index);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_byte_timeout = opts.header_read_timeout;
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
            let _worker = worker;
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
            match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return, // closed or failed before sending anything
                Err(_) => {
                    tracing::debug!("connection sent nothing within header_read_timeout; closed");
                    return;
                }
            }
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                // Client resets, header timeouts and malformed requests end up here.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let open = graceful.count();
    tracing::info!(
        open_connections = open,
        grace_seconds = opts.shutdown_grace.as_secs_f64(),
        "shutdown: draining"
    );
    let drained = graceful.shutdown();
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
