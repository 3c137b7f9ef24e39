//! Body types on the request path. `ProxyBody` is what the gateway answers with: either a body
//! it built (errors, nothing else) or the upstream's body streamed through under the
//! whole-exchange deadline. No boxing: one enum, polled in place.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// The body of every response the proxy listener sends.
pub type ProxyBody = Either<Full<Bytes>, DeadlineBody<Incoming>>;

/// Error yielded when the whole-exchange deadline passes while a response body is still
/// streaming; the connection (HTTP/1) or stream (HTTP/2) is then reset, so the client sees a
/// truncated body rather than a complete-looking one.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("upstream response body not finished before the request deadline")]
pub struct DeadlineElapsed;

pin_project_lite::pin_project! {
    /// A body that fails with [`DeadlineElapsed`] once `deadline` passes.
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
    }
}

impl<B> DeadlineBody<B> {
    /// Wraps `inner` so that it ends in an error at `deadline` (a tokio instant).
    pub fn new(inner: B, deadline: Instant) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(deadline),
        }
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
        // Data already available wins over a deadline that passed in the same instant.
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(DeadlineElapsed)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
    async fn body_finishing_in_time_is_untouched() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let body = DeadlineBody::new(Full::new(Bytes::from_static(b"hello")), deadline);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    }
}
