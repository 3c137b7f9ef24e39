//! Body types on the request path. `ProxyBody` is what the gateway answers with: either a body
//! it built (errors, nothing else) or the upstream's body streamed through under the
//! whole-exchange deadline; [`Metered`] counts what of it reaches the connection and reports
//! the count when it ends. No boxing: one enum, polled in place.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::server::ResponseWatch;

/// The body of every response the proxy listener sends.
pub type ProxyBody = Either<Full<Bytes>, DeadlineBody<Incoming>>;

/// What is told how a response body ended, once: [`Metered`] calls it when the body ends or is
/// dropped.
pub trait BodyEnd {
    /// The body ended: `sent_bytes` of data were handed to the connection; `complete` is false
    /// when it was dropped (or failed) before its end.
    fn ended(self, sent_bytes: u64, complete: bool);
}

pin_project_lite::pin_project! {
    /// A response body that counts the data bytes it hands to the connection and tells `E`
    /// once, when it ends, fails or is dropped (the client went away, the connection was cut).
    pub struct Metered<B: Body, E: BodyEnd> {
        #[pin]
        inner: B,
        sent: u64,
        end: Option<E>,
    }

    impl<B: Body, E: BodyEnd> PinnedDrop for Metered<B, E> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(end) = this.end.take() {
                // A body whose last frame went out ends without being polled again.
                let complete = this.inner.is_end_stream();
                end.ended(*this.sent, complete);
            }
        }
    }
}

impl<B: Body, E: BodyEnd> Metered<B, E> {
    /// Meters `inner`, telling `end` (if any) how it ended.
    pub fn new(inner: B, end: Option<E>) -> Self {
        Self {
            inner,
            sent: 0,
            end,
        }
    }
}

impl<B: Body<Data = Bytes>, E: BodyEnd> Body for Metered<B, E> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let complete = match &polled {
            Poll::Pending => return polled,
            Poll::Ready(None) => Some(true),
            Poll::Ready(Some(Err(_))) => Some(false),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.sent += data.len() as u64;
                }
                None
            }
        };
        if let Some(complete) = complete
            && let Some(end) = this.end.take()
        {
            end.ended(*this.sent, complete);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Error yielded when the whole-exchange deadline passes while a response body is still
/// streaming; the connection (HTTP/1) or stream (HTTP/2) is then reset, so the client sees a
/// truncated body rather than a complete-looking one.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("upstream response body not finished before the request deadline")]
pub struct DeadlineElapsed;

/// Largest part of a streamed response handed to the connection at once, in bytes: a longer
/// upstream frame is handed over in parts of this size, so `server.send_timeout` measures how
/// long the client takes to read at most this much (a client reading less than 16 KiB per
/// `send_timeout` is cut off; one that reads steadily, however slowly above that, is not).
pub const SEND_PART_BYTES: usize = 16 * 1024;

pin_project_lite::pin_project! {
    /// A body that fails with [`DeadlineElapsed`] once `deadline` passes, and hands its data to
    /// the connection in parts of at most [`SEND_PART_BYTES`].
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        watch: Option<ResponseWatch>,
        // What is left of an upstream frame longer than SEND_PART_BYTES.
        rest: Option<Bytes>,
    }
}

impl<B> DeadlineBody<B> {
    /// Wraps `inner` so that it ends in an error at `deadline` (a tokio instant).
    pub fn new(inner: B, deadline: Instant) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(deadline),
            watch: None,
            rest: None,
        }
    }

    /// Also keeps `watch` until the body ends, and tells it when a part is handed to the
    /// connection and when the connection asks for the next: the connection is closed if the
    /// client has not taken the whole body by the deadline, polled or not, or has taken nothing
    /// for `server.send_timeout` (see [`crate::server::ConnectionControl`]).
    pub fn watched(mut self, watch: Option<ResponseWatch>) -> Self {
        self.watch = watch;
        self
    }
}

/// `hint` with `extra` bytes more at both bounds. Built anew, lower first: `set_lower` asserts
/// that it is not above the upper bound already set.
fn plus(hint: SizeHint, extra: u64) -> SizeHint {
    let mut sum = SizeHint::new();
    sum.set_lower(hint.lower().saturating_add(extra));
    if let Some(upper) = hint.upper() {
        sum.set_upper(upper.saturating_add(extra));
    }
    sum
}

/// The first [`SEND_PART_BYTES`] of `data`, leaving the remainder (if any) in `rest`.
fn first_part(mut data: Bytes, rest: &mut Option<Bytes>) -> Bytes {
    if data.len() > SEND_PART_BYTES {
        let part = data.split_to(SEND_PART_BYTES);
        *rest = Some(data);
        part
    } else {
        data
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(watch) = this.watch.as_ref() {
            // The connection asks for more: the client took what it was handed.
            watch.taken();
        }
        if let Some(rest) = this.rest.take() {
            let part = first_part(rest, this.rest);
            if let Some(watch) = this.watch.as_ref() {
                watch.handed_over();
            }
            return Poll::Ready(Some(Ok(Frame::data(part))));
        }
        // Data already available wins over a deadline that passed in the same instant.
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            let frame = match frame {
                None => {
                    // Sent whole: the connection no longer watches it.
                    this.watch.take();
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => Frame::data(first_part(data, this.rest)),
                    Err(trailers) => trailers,
                },
            };
            if let Some(watch) = this.watch.as_ref() {
                // Handed to the connection: it waits for the client to read it.
                watch.handed_over();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(DeadlineElapsed)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        plus(self.inner.size_hint(), extra)
    }
}

/// Request bodies of at most this many bytes are read completely before anything is sent
/// upstream, so a client that sends slowly never holds an upstream connection (token
/// operations send tens of bytes). A longer body is streamed once this much has arrived.
pub const BUFFERED_BODY_BYTES: usize = 64 * 1024;

pin_project_lite::pin_project! {
    /// A body whose first bytes were read already: `prefix`, then the rest of `rest`, whose
    /// data bytes are added to a shared count as they arrive.
    pub struct Prefixed<B> {
        prefix: Option<Bytes>,
        #[pin]
        rest: B,
        received: Option<Arc<AtomicU64>>,
    }
}

impl<B> Prefixed<B> {
    /// `prefix` (sent first, when not empty), then `rest`.
    pub fn new(prefix: Bytes, rest: B) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
            received: None,
        }
    }

    /// Also adds the data bytes of `rest` to `received` as they arrive (the prefix is not
    /// counted: it was received before).
    pub fn counted(mut self, received: Arc<AtomicU64>) -> Self {
        self.received = Some(received);
        self
    }
}

impl<B: Body<Data = Bytes>> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let polled = this.rest.poll_frame(cx);
        if let (Some(received), Poll::Ready(Some(Ok(frame)))) = (this.received.as_ref(), &polled)
            && let Some(data) = frame.data_ref()
        {
            received.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        plus(self.rest.size_hint(), extra)
    }
}

/// Memory for request bodies being read before forwarding, shared by every worker: at most
/// `total` bytes in all and `per_address` bytes for one client address (an IPv6 address by its
/// /64, as `server.max_connections_per_ip`), held from the first byte read until the request
/// is answered. Without it, one client could park up to 64 KiB in every HTTP/2 stream of
/// every connection it may open (256 connections x 100 streams x 64 KiB = 1.6 GiB) for
/// `body_read_timeout`.
#[derive(Debug)]
pub struct BodyBudget {
    total: std::sync::atomic::AtomicUsize,
    per_address: std::sync::atomic::AtomicUsize,
    used: std::sync::Mutex<BudgetUse>,
}

#[derive(Debug, Default)]
struct BudgetUse {
    total: usize,
    by_address: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// Which share of a [`BodyBudget`] a body would have gone past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetExceeded {
    /// The client address's (`server.max_buffered_body_bytes_per_ip`): that client is sending
    /// too many bodies at once.
    Address,
    /// The whole gateway's (`server.max_buffered_body_bytes`).
    Total,
}

impl BodyBudget {
    /// A budget of `total` bytes, at most `per_address` of them for one client address.
    pub fn new(total: usize, per_address: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(BodyBudget {
            total: total.into(),
            per_address: per_address.into(),
            used: std::sync::Mutex::new(BudgetUse::default()),
        })
    }

    /// An empty charge for a body from `peer`, to grow as its bytes arrive.
    pub fn charge(self: &std::sync::Arc<Self>, peer: std::net::IpAddr) -> BodyCharge {
        BodyCharge {
            budget: self.clone(),
            // An IPv4 peer on a dual-stack listener arrives as ::ffff:a.b.c.d: keyed as IPv4,
            // not by the /64 every such peer shares.
            key: crate::limiter::address_key(peer.to_canonical()),
            bytes: 0,
        }
    }

    /// New limits for charges from now on (a reload): bytes already held stay held; while they
    /// are over a lowered limit, no new byte is.
    pub fn set_limits(&self, total: usize, per_address: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.total.store(total, Relaxed);
        self.per_address.store(per_address, Relaxed);
    }

    /// Bytes held now, in all (for tests and metrics).
    pub fn in_use(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetUse> {
        self.used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Bytes of one request body held against a [`BodyBudget`]; given back when dropped.
#[derive(Debug)]
pub struct BodyCharge {
    budget: std::sync::Arc<BodyBudget>,
    key: std::net::IpAddr,
    bytes: usize,
}

impl BodyCharge {
    /// Bytes held: every byte of the body read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes as u64
    }

    /// Holds `n` more bytes.
    ///
    /// # Errors
    /// [`BudgetExceeded`] when the address's share or the total would go past its limit; then
    /// nothing more is held.
    pub fn grow(&mut self, n: usize) -> Result<(), BudgetExceeded> {
        if n == 0 {
            // Nothing to hold (an empty DATA frame): no entry for the address either, which
            // only a charge of more than nothing removes.
            return Ok(());
        }
        let budget = &self.budget;
        let mut used = budget.lock();
        let mine = used.by_address.get(&self.key).copied().unwrap_or(0);
        if mine + n
            > budget
                .per_address
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(BudgetExceeded::Address);
        }
        if used.total + n > budget.total.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(BudgetExceeded::Total);
        }
        used.total += n;
        used.by_address.insert(self.key, mine + n);
        self.bytes += n;
        Ok(())
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut used = self.budget.lock();
        used.total -= self.bytes;
        if let Some(mine) = used.by_address.get_mut(&self.key) {
            *mine -= self.bytes;
            if *mine == 0 {
                used.by_address.remove(&self.key);
            }
        }
    }
}

/// A client's request body as far as it was read before forwarding. Its `Debug` shows lengths
/// only.
pub enum ReadBody<B> {
    /// The whole body (empty when there was none).
    Whole(Bytes),
    /// Its first bytes, and the rest still to stream: a body declared or found longer than the
    /// buffer.
    Started(Bytes, B),
}

impl<B> std::fmt::Debug for ReadBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadBody::Whole(b) => write!(f, "Whole({} bytes)", b.len()),
            ReadBody::Started(b, _) => write!(f, "Started({} bytes, ..)", b.len()),
        }
    }
}

/// Why a request body could not be read before forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ReadBodyError {
    /// It did not arrive by the deadline (`server.body_read_timeout`): the client is slow.
    #[error("the request body was not received in time")]
    TimedOut,
    /// It is longer than the configured limit (`server.max_request_body_bytes`).
    #[error("the request body is larger than the configured limit")]
    TooLarge,
    /// The client broke it off or broke its framing.
    #[error("the request body could not be read")]
    Broken(#[source] Box<dyn StdError + Send + Sync>),
    /// Holding it would go past the memory for bodies being read ([`BodyBudget`]).
    #[error("no memory left for request bodies ({0:?})")]
    OverBudget(BudgetExceeded),
}

/// Reads `body` completely when it ends within `buffer` bytes, by `deadline`; a body declared
/// longer than `buffer` is not read here, and one found longer is returned started. Trailers
/// of a buffered body are dropped (no GitHub API call sends any).
///
/// Every byte read is held against `charge` (keep it until the request is answered).
///
/// # Errors
/// [`ReadBodyError::TimedOut`] when `deadline` passes first, [`ReadBodyError::TooLarge`] past
/// `limit` bytes, [`ReadBodyError::Broken`] when the client breaks the body,
/// [`ReadBodyError::OverBudget`] when `charge` cannot grow.
pub async fn read_request_body<B>(
    mut body: B,
    buffer: usize,
    limit: u64,
    deadline: Instant,
    charge: &mut BodyCharge,
) -> Result<ReadBody<B>, ReadBodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    if body.is_end_stream() {
        return Ok(ReadBody::Whole(Bytes::new()));
    }
    let declared = body.size_hint().lower();
    if declared > limit {
        return Err(ReadBodyError::TooLarge);
    }
    if declared > buffer as u64 {
        return Ok(ReadBody::Started(Bytes::new(), body));
    }
    let mut read = BytesMut::new();
    let collected = tokio::time::timeout_at(deadline, async {
        while read.len() <= buffer {
            match body.frame().await {
                None => return Ok(true),
                Some(Err(e)) => return Err(ReadBodyError::Broken(e.into())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        charge.grow(data.len()).map_err(ReadBodyError::OverBudget)?;
                        read.extend_from_slice(&data);
                        if read.len() as u64 > limit {
                            return Err(ReadBodyError::TooLarge);
                        }
                    }
                }
            }
        }
        Ok(false)
    })
    .await
    .map_err(|_| ReadBodyError::TimedOut)??;
    Ok(match collected {
        true => ReadBody::Whole(read.freeze()),
        false => ReadBody::Started(read.freeze(), body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// A body fed chunk by chunk from a channel.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
        }
    }

    fn unlimited() -> BodyCharge {
        BodyBudget::new(1 << 20, 1 << 20).charge(std::net::Ipv4Addr::LOCALHOST.into())
    }

    #[test]
    fn a_body_charge_is_held_to_the_address_share_and_the_total_and_given_back_when_dropped() {
        let budget = BodyBudget::new(100, 60);
        let a: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let b: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        let mut first = budget.charge(a);
        first.grow(40).unwrap();
        let mut second = budget.charge(a);
        // The address's share: 40 + 30 > 60.
        assert_eq!(second.grow(30), Err(BudgetExceeded::Address));
        second.grow(20).unwrap();
        let mut other = budget.charge(b);
        // The total: 60 + 50 > 100, though b's share has room.
        assert_eq!(other.grow(50), Err(BudgetExceeded::Total));
        other.grow(40).unwrap();
        assert_eq!(budget.in_use(), 100);
        drop(first);
        assert_eq!(budget.in_use(), 60);
        // a's share is free again up to 60.
        let mut third = budget.charge(a);
        third.grow(0).unwrap();
        assert_eq!(third.grow(41), Err(BudgetExceeded::Address));
        drop((second, other, third));
        assert_eq!(budget.in_use(), 0);
        // An empty chunk holds nothing and leaves no entry behind.
        let mut empty = budget.charge("127.0.0.9".parse().unwrap());
        empty.grow(0).unwrap();
        drop(empty);
        assert!(budget.lock().by_address.is_empty());
        // An IPv4 peer seen through a dual-stack listener is keyed as IPv4, not by ::/64.
        let mut mapped = budget.charge("::ffff:127.0.0.2".parse().unwrap());
        mapped.grow(60).unwrap();
        let mut other = budget.charge("::ffff:127.0.0.3".parse().unwrap());
        other.grow(40).unwrap();
        drop((mapped, other));
        assert!(budget.lock().by_address.is_empty());
        // IPv6 addresses share their /64's share.
        let budget = BodyBudget::new(100, 60);
        let mut x = budget.charge("2001:db8::1".parse().unwrap());
        x.grow(50).unwrap();
        let mut y = budget.charge("2001:db8::ffff".parse().unwrap());
        assert_eq!(y.grow(20), Err(BudgetExceeded::Address));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_budget_is_refused_while_it_is_read() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        drop(tx);
        let budget = BodyBudget::new(1000, 15);
        let mut charge = budget.charge(std::net::Ipv4Addr::LOCALHOST.into());
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = read_request_body(ChannelBody(rx), 64, 1000, deadline, &mut charge).await;
        assert!(matches!(
            got,
            Err(ReadBodyError::OverBudget(BudgetExceeded::Address))
        ));
        assert_eq!(
            budget.in_use(),
            10,
            "the first chunk stays held until the charge is dropped"
        );
        drop(charge);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_long_frame_is_handed_over_in_parts_and_the_size_hint_counts_the_rest() {
        let data = Bytes::from(vec![b'x'; 40 * 1024]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut body = std::pin::pin!(DeadlineBody::new(Full::new(data), deadline));
        assert_eq!(body.size_hint().exact(), Some(40 * 1024));
        let mut parts = Vec::new();
        while let Some(frame) = body.frame().await {
            parts.push(frame.unwrap().into_data().unwrap().len());
            // What is left, in the parts not yet handed over (an exact hint, never a panic).
            let left = 40 * 1024 - parts.iter().sum::<usize>();
            assert_eq!(body.size_hint().exact(), Some(left as u64));
            assert_eq!(body.is_end_stream(), left == 0);
        }
        assert_eq!(parts, [16 * 1024, 16 * 1024, 8 * 1024]);
    }

    #[tokio::test(start_paused = true)]
    async fn body_that_outlives_the_deadline_fails() {
        let (tx, rx) = mpsc::channel(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut body = std::pin::pin!(DeadlineBody::new(ChannelBody(rx), deadline));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        // Nothing more arrives: the deadline ends the body with an error.
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<DeadlineElapsed>());
        assert!(Instant::now() >= deadline);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_body_is_read_whole_and_a_slow_one_times_out() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"{\"access_token\":"))
            .await
            .unwrap();
        tx.send(Bytes::from_static(b"\"t\"}")).await.unwrap();
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        match read_request_body(ChannelBody(rx), 64, 1000, deadline, &mut unlimited()).await {
            Ok(ReadBody::Whole(b)) => assert_eq!(b, "{\"access_token\":\"t\"}"),
            other => panic!("{other:?}"),
        }
        // One chunk, then nothing: the deadline passes.
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"{")).await.unwrap();
        let got = read_request_body(ChannelBody(rx), 64, 1000, deadline, &mut unlimited()).await;
        assert!(matches!(got, Err(ReadBodyError::TimedOut)), "{got:?}");
        assert!(Instant::now() >= deadline);
        drop(tx);
    }

    #[tokio::test]
    async fn a_long_body_is_started_then_streamed_whole() {
        let (tx, rx) = mpsc::channel(8);
        for _ in 0..4 {
            tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        let Ok(ReadBody::Started(prefix, rest)) =
            read_request_body(ChannelBody(rx), 15, 1000, deadline, &mut unlimited()).await
        else {
            panic!("a body longer than the buffer is started");
        };
        assert_eq!(prefix.len(), 20);
        let all = Prefixed::new(prefix, rest)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(all.len(), 40);
        // Past the limit while buffering: refused.
        let (tx, rx) = mpsc::channel(8);
        for _ in 0..4 {
            tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
        }
        drop(tx);
        let got = read_request_body(ChannelBody(rx), 64, 25, deadline, &mut unlimited()).await;
        assert!(matches!(got, Err(ReadBodyError::TooLarge)), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn body_finishing_in_time_is_untouched() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let body = DeadlineBody::new(Full::new(Bytes::from_static(b"hello")), deadline);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    }
}
