//! A time limit on one backend request that costs nothing to a request done at once.
//!
//! `tokio::time::timeout` reads the clock and looks up the runtime's timer (a reference count
//! on the runtime handle, shared by every worker thread) before the work is first polled, and
//! keeps its timer inside the future. An in-process backend answers at its first poll, so
//! here the timer is set up only when the work is still pending after that poll, and it is
//! boxed: the futures that carry a request stay small, and a network request (whose reply
//! takes far longer than one allocation) pays for the box.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

pin_project! {
    /// `work`, unless it is still pending `limit` after its first poll: then `None`.
    pub(crate) struct Within<F> {
        #[pin]
        work: F,
        limit: Duration,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

/// `work` with a time limit of `limit`.
pub(crate) fn within<F: Future>(limit: Duration, work: F) -> Within<F> {
    Within {
        work,
        limit,
        timer: None,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Some(output));
        }
        let limit = *this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_done_at_once_sets_no_timer() {
        let mut w = std::pin::pin!(within(Duration::from_secs(1), async { 7 }));
        let polled = std::future::poll_fn(|cx| Poll::Ready(w.as_mut().poll(cx))).await;
        assert_eq!(polled, Poll::Ready(Some(7)));
        assert!(w.timer.is_none());
    }

    #[tokio::test]
    async fn pending_work_is_cut_off_at_the_limit() {
        let started = std::time::Instant::now();
        let out = within(Duration::from_millis(50), std::future::pending::<()>()).await;
        assert_eq!(out, None);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn pending_work_that_finishes_in_time_is_kept() {
        let out = within(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            "done"
        })
        .await;
        assert_eq!(out, Some("done"));
    }
}
