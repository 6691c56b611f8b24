//! The response body of the idempotency layer: buffered (a stored response, a replay, a
//! rejection), or what was buffered followed by the rest of the inner body (a response not
//! stored).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::guard::LockGuard;

/// The body of responses from [`IdempotencyService`](super::IdempotencyService).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use http_body_util::BodyExt;
/// let body = dimutex::idempotency::IdempotentBody::<String>::full("done".into());
/// assert_eq!(body.collect().await.unwrap().to_bytes(), "done");
/// # }
/// ```
pub struct IdempotentBody<B: Body> {
    head: VecDeque<Frame<Bytes>>,
    rest: Option<Pin<Box<B>>>,
    error: Option<<B as Body>::Error>,
    /// The lock of a response not stored, released once the body ends (or is dropped).
    guard: Option<LockGuard>,
}

// No field is pinned structurally: the inner body is boxed.
impl<B: Body> Unpin for IdempotentBody<B> {}

impl<B: Body> IdempotentBody<B> {
    /// A body of `bytes` alone.
    pub fn full(bytes: Bytes) -> Self {
        let head = if bytes.is_empty() {
            VecDeque::new()
        } else {
            VecDeque::from([Frame::data(bytes)])
        };
        Self {
            head,
            rest: None,
            error: None,
            guard: None,
        }
    }

    /// The frames read already, then `rest` (if any), or the error that ended reading.
    pub(crate) fn resumed(
        head: VecDeque<Frame<Bytes>>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    ) -> Self {
        Self {
            head,
            rest,
            error,
            guard: None,
        }
    }

    /// This body, holding `guard` until its end.
    pub(crate) fn holding(mut self, guard: LockGuard) -> Self {
        self.guard = Some(guard);
        self
    }
}

/// [`IdempotentBody::full`].
impl<B: Body> From<Bytes> for IdempotentBody<B> {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl<B> Body for IdempotentBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.head.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let next = match (this.error.take(), &mut this.rest) {
            (Some(e), _) => Some(Err(e)),
            (None, Some(rest)) => ready!(rest.as_mut().poll_frame(cx)),
            (None, None) => None,
        };
        let done = match &next {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => this.is_end_stream(),
        };
        if done {
            // Dropping the guard has the client's lease driver release the lock.
            this.guard.take();
        }
        Poll::Ready(next)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .head
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(rest) => {
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + buffered);
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}

impl<B: Body> fmt::Debug for IdempotentBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentBody")
            .field("buffered_frames", &self.head.len())
            .field("streaming", &self.rest.is_some())
            .field("holds_lock", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
