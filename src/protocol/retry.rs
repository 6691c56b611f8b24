//! One request, retried on transient failures.

use std::future::Future;
use std::time::{Duration, Instant};

use super::{MUTATION_WINDOW, Protocol};
use crate::backend::BackendError;

/// The outcome of one request, retried on transient failures.
#[derive(Debug)]
pub(crate) struct Attempted<T> {
    pub(crate) result: Result<T, BackendError>,
    /// Whether an attempt failed in a way that may have taken effect (a timeout, a dropped
    /// connection, a 5xx; never a 429, which is refused before it is applied).
    pub(crate) ambiguous: bool,
    /// When the first attempt was sent.
    pub(crate) first_sent: Instant,
    /// When the last attempt was sent: the one whose answer (or failure) `result` is.
    pub(crate) last_sent: Instant,
}

/// Whether a 429 is retried like other transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum On429 {
    Retry,
    /// Handed back: a waiter goes back to reading instead of repeating a write.
    GiveUp,
}

impl Protocol {
    /// Sends `op()` until it answers with anything but a transient failure, or until the next
    /// attempt would start after `give_up_at`. Each attempt is cut off after the request
    /// timeout, which counts as a transient failure.
    pub(crate) async fn send<T, F, Fut>(
        &self,
        mut op: F,
        give_up_at: Instant,
        on_429: On429,
    ) -> Attempted<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let timeout = self.settings.request_timeout;
        let first_sent = crate::clock::now();
        let mut delays = self.settings.retry.backoff().delays();
        let mut ambiguous = false;
        loop {
            let last_sent = crate::clock::now();
            let result = match tokio::time::timeout(timeout, op()).await {
                Ok(result) => result,
                Err(_) => Err(BackendError::Transient {
                    status: None,
                    retry_after: None,
                    message: format!("no reply within {timeout:?}"),
                }),
            };
            let e = match result {
                Err(e) if e.is_transient() => e,
                result => {
                    return Attempted {
                        result,
                        ambiguous,
                        first_sent,
                        last_sent,
                    };
                }
            };
            let throttled = e.is_rate_limited();
            if throttled {
                self.note_throttled();
            }
            ambiguous |= !throttled;
            let delay = self.pause_after(&e, delays.next_delay());
            if (throttled && on_429 == On429::GiveUp) || super::after(delay) > give_up_at {
                return Attempted {
                    result: Err(e),
                    ambiguous,
                    first_sent,
                    last_sent,
                };
            }
            tracing::debug!(target: "dimutex", error = %e, delay_ms = delay.as_millis() as u64, "transient failure; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// [`send`](Self::send) with the retry policy's budget from now.
    pub(crate) async fn send_within_policy<T, F, Fut>(&self, op: F) -> Attempted<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let give_up_at = super::after(self.settings.retry.max_elapsed());
        self.send(op, give_up_at, On429::Retry).await
    }

    /// The pause before the next attempt after the transient failure `e`: the backoff's
    /// `delay`, at least a mutation window after a 429, and at least what the server asked
    /// for (capped by the backoff's maximum).
    fn pause_after(&self, e: &BackendError, mut delay: Duration) -> Duration {
        if e.is_rate_limited() {
            delay = delay.max(MUTATION_WINDOW);
        }
        if let BackendError::Transient {
            retry_after: Some(after),
            ..
        } = e
        {
            delay = delay.max((*after).min(self.settings.retry.backoff().max()));
        }
        delay
    }
}
