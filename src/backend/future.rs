//! [`BackendFuture`]: what a [`Backend`](super::Backend) method returns, its answer already
//! known or a future of it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What [`Backend`](super::Backend) methods returned before [`BackendFuture`]: a boxed,
/// sendable future. A `BoxFuture` converts into a `BackendFuture` as it is (`.into()`).
#[deprecated(note = "`Backend` methods return `BackendFuture`; `BoxFuture::into()` converts")]
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The answer of one backend request: known when the method returns (an in-process backend,
/// which then costs no allocation), or a boxed future of it (a request over the network).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use dimutex::backend::BackendFuture;
/// let known: BackendFuture<'_, u32> = BackendFuture::ready(7);
/// let later: BackendFuture<'_, u32> = BackendFuture::new(async { 7 });
/// assert_eq!(known.await, later.await);
/// # }
/// ```
#[must_use = "a backend request does nothing unless awaited"]
pub struct BackendFuture<'a, T> {
    kind: Kind<'a, T>,
}

enum Kind<'a, T> {
    /// `None` once taken.
    Ready(Option<T>),
    Boxed(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> BackendFuture<'a, T> {
    /// A request already answered: its future is ready on its first poll.
    pub fn ready(value: T) -> Self {
        Self {
            kind: Kind::Ready(Some(value)),
        }
    }

    /// A request answered by `future` (boxed here).
    pub fn new(future: impl Future<Output = T> + Send + 'a) -> Self {
        Self {
            kind: Kind::Boxed(Box::pin(future)),
        }
    }
}

impl<'a, T> From<Pin<Box<dyn Future<Output = T> + Send + 'a>>> for BackendFuture<'a, T> {
    /// A future boxed already, kept in its box.
    fn from(future: Pin<Box<dyn Future<Output = T> + Send + 'a>>) -> Self {
        Self {
            kind: Kind::Boxed(future),
        }
    }
}

// The value of `Ready` is moved out, never pinned; `Boxed` is pinned in its box.
impl<T> Unpin for BackendFuture<'_, T> {}

impl<T> Future for BackendFuture<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.get_mut().kind {
            Kind::Ready(value) => {
                Poll::Ready(value.take().expect("BackendFuture polled after completion"))
            }
            Kind::Boxed(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> fmt::Debug for BackendFuture<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Ready(Some(_)) => "ready",
            Kind::Ready(None) => "done",
            Kind::Boxed(_) => "boxed",
        };
        f.debug_tuple("BackendFuture").field(&state).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_answer_is_ready_on_the_first_poll_and_a_boxed_one_as_its_future_is() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut known = BackendFuture::ready(1);
        assert_eq!(format!("{known:?}"), r#"BackendFuture("ready")"#);
        assert_eq!(Pin::new(&mut known).poll(&mut cx), Poll::Ready(1));
        assert_eq!(format!("{known:?}"), r#"BackendFuture("done")"#);

        let boxed: Pin<Box<dyn Future<Output = u8> + Send>> = Box::pin(async { 2 });
        let mut boxed = BackendFuture::from(boxed);
        assert_eq!(format!("{boxed:?}"), r#"BackendFuture("boxed")"#);
        assert_eq!(Pin::new(&mut boxed).poll(&mut cx), Poll::Ready(2));

        let mut never = BackendFuture::<u8>::new(std::future::pending());
        assert_eq!(format!("{never:?}"), r#"BackendFuture("boxed")"#);
        assert_eq!(Pin::new(&mut never).poll(&mut cx), Poll::Pending);
    }
}
