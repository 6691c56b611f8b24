//! The response body that carries the lock until the response has been sent.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::guard::LockGuard;

pin_project! {
    /// The body of responses from [`LockService`](super::LockService): the inner service's
    /// body, holding the lock until its last frame (or an error, or until it is dropped), or
    /// the body of a rejection.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use http_body_util::BodyExt;
    /// let body = dimutex::layer::LockBody::new(String::from("done"), None);
    /// assert_eq!(body.collect().await.unwrap().to_bytes(), "done");
    /// # }
    /// ```
    pub struct LockBody<B> {
        #[pin]
        kind: Kind<B>,
        guard: Option<LockGuard>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Rejection { bytes: Option<Bytes> },
    }
}

impl<B> LockBody<B> {
    /// The inner service's body, holding `guard` (if any) until the body ends.
    pub fn new(body: B, guard: Option<LockGuard>) -> Self {
        Self {
            kind: Kind::Inner { body },
            guard,
        }
    }

    pub(crate) fn rejection(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Rejection { bytes: Some(bytes) },
            guard: None,
        }
    }

    /// Whether this body still holds its lock.
    ///
    /// ```
    /// assert!(!dimutex::layer::LockBody::new((), None).holds_lock());
    /// ```
    pub fn holds_lock(&self) -> bool {
        self.guard.is_some()
    }
}

/// A body of these bytes alone, holding no lock (what a layer outside answers with).
impl<B> From<Bytes> for LockBody<B> {
    fn from(bytes: Bytes) -> Self {
        Self::rejection(bytes)
    }
}

impl<B> Body for LockBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Inner { mut body } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                let done = match &frame {
                    None | Some(Err(_)) => true,
                    Some(Ok(_)) => body.is_end_stream(),
                };
                if done {
                    // Dropping the guard has the client's lease driver release the lock.
                    this.guard.take();
                }
                Poll::Ready(frame)
            }
            KindProj::Rejection { bytes } => {
                Poll::Ready(bytes.take().map(|b| Ok(Frame::data(B::Data::from(b)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Rejection { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Rejection { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for LockBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockBody")
            .field("holds_lock", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
