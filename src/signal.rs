//! [`Signal`]: a condition's waiters, woken when it may have come true.

use std::sync::atomic::{AtomicBool, Ordering, fence};

use tokio::sync::Notify;

/// Wakes the tasks waiting for a condition (a lease lost or ended, a client's leases all
/// released). Waking takes the waiters' lock, and most conditions never have a waiter (a
/// request's lease ends unobserved): until someone first waits, [`notify`](Self::notify)
/// skips it.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    notify: Notify,
    /// Someone has waited (or waits) on this signal.
    listened: AtomicBool,
}

impl Signal {
    /// Resolves once `done()` holds, checking again each time the signal wakes its waiters.
    pub(crate) async fn wait_until(&self, done: impl Fn() -> bool) {
        self.listened.store(true, Ordering::Relaxed);
        // Pairs with the fence in `notify`: a notifier that misses this flag made its change
        // before it, so `done()` below sees the change.
        fence(Ordering::SeqCst);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up in between is not missed.
            notified.as_mut().enable();
            if done() {
                return;
            }
            notified.await;
        }
    }

    /// Wakes the waiters, if anyone has waited. Call it after the change that may make their
    /// condition true.
    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.listened.load(Ordering::Relaxed) {
            self.notify.notify_waiters();
        }
    }
}

/// A flag set once (a client's shutdown), and the tasks waiting for it.
///
/// Not a `watch` channel: tokio's `watch` wakes its receivers from one of several queues
/// picked at random, so which waiter runs first would differ between two runs of one seeded
/// simulation; a [`Signal`] wakes them in the order they began to wait.
#[derive(Debug, Default)]
pub(crate) struct Latch {
    set: AtomicBool,
    signal: Signal,
}

impl Latch {
    /// Sets the flag and wakes its waiters.
    pub(crate) fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.signal.notify();
    }

    /// Resolves once the flag is set.
    pub(crate) async fn wait(&self) {
        self.signal
            .wait_until(|| self.set.load(Ordering::SeqCst))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_condition_already_true_resolves_without_a_wake_up() {
        let signal = Signal::default();
        let flag = AtomicBool::new(true);
        signal.notify();
        tokio::time::timeout(
            Duration::from_secs(1),
            signal.wait_until(|| flag.load(Ordering::SeqCst)),
        )
        .await
        .expect("the condition holds already");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_between_threads() {
        for _ in 0..2000 {
            let signal = Arc::new(Signal::default());
            let count = Arc::new(AtomicUsize::new(0));
            let waiter = tokio::spawn({
                let (signal, count) = (signal.clone(), count.clone());
                async move {
                    signal
                        .wait_until(|| count.load(Ordering::SeqCst) == 1)
                        .await
                }
            });
            tokio::task::yield_now().await;
            count.store(1, Ordering::SeqCst);
            signal.notify();
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .unwrap();
        }
    }
}
