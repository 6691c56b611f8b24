//! [`Pending`]: the client's count of unfinished work, and the flag that closes it.
//!
//! Every acquisition in flight, every held lease and every background clean-up holds a
//! [`Ticket`]. [`Client::shutdown`](crate::Client::shutdown) closes the count (no new
//! acquisition may begin after that) and waits until no ticket is left, so that when it
//! returns `Ok` nothing of this client can still create or hold a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::signal::Signal;

/// Unfinished work of one client.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
    closed: AtomicBool,
    /// Notified whenever the count drops to zero.
    drained: Signal,
}

/// One unit of unfinished work; dropping it ends that work.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<Pending>);

impl Pending {
    /// A ticket for new work, unless the count is closed. Counted before the flag is read, so
    /// a [`close`](Self::close) that follows either sees this ticket or is seen by it.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<Ticket> {
        self.count.fetch_add(1, Ordering::SeqCst);
        let ticket = Ticket(self.clone());
        (!self.closed.load(Ordering::SeqCst)).then_some(ticket)
    }

    /// Closes the count: [`enter`](Self::enter) fails from now on.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// How many tickets are out.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once no ticket is out.
    pub(crate) async fn drained(&self) {
        self.drained.wait_until(|| self.count() == 0).await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_count_refuses_new_work_and_counts_old_work_out() {
        let pending = Arc::new(Pending::default());
        let ticket = pending.enter().expect("open");
        pending.close();
        assert!(pending.enter().is_none());
        assert_eq!(pending.count(), 1, "the refused ticket is not counted");
        drop(ticket);
        assert_eq!(pending.count(), 0);
    }

    #[tokio::test]
    async fn drained_waits_for_the_last_ticket() {
        let pending = Arc::new(Pending::default());
        let ticket = pending.enter().unwrap();
        let waiter = tokio::spawn({
            let pending = pending.clone();
            async move { pending.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(ticket);
        waiter.await.unwrap();
    }
}
