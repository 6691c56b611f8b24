//! What one client knows locally: the leases it holds, by object name, and the queues of its
//! own waiters. A key held in this process is refused without a request, and of this
//! process's waiters for one key only the first talks to the backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::lease::Lease;

/// Added to a local holder's remaining time when telling a contender how long the lock may
/// stay held: the second of the server's expiry rule.
const RULE_SECOND: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct Local {
    held: Mutex<HashMap<String, Arc<Lease>>>,
    queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Local {
    /// The lease of this client on `name`, healthy or not, until the driver is done with it.
    pub(crate) fn holder(&self, name: &str) -> Option<Arc<Lease>> {
        locked(&self.held).get(name).cloned()
    }

    /// The lease of this client on `name`, if it is healthy.
    pub(crate) fn healthy_holder(&self, name: &str) -> Option<Arc<Lease>> {
        locked(&self.held)
            .get(name)
            .filter(|lease| lease.is_healthy())
            .cloned()
    }

    /// How long the lock `name` may stay held, if a healthy lease of this client holds it:
    /// until its deadline, plus the margin and the rule's second after which others may take
    /// it over.
    pub(crate) fn held_for(&self, name: &str) -> Option<Duration> {
        let lease = self.healthy_holder(name)?;
        Some(remaining(&lease))
    }

    pub(crate) fn insert(&self, lease: Arc<Lease>) {
        locked(&self.held).insert(lease.name().to_owned(), lease);
    }

    /// Forgets `lease`, if it is still the one held under its name.
    pub(crate) fn remove(&self, lease: &Arc<Lease>) {
        let mut held = locked(&self.held);
        if held
            .get(lease.name())
            .is_some_and(|l| Arc::ptr_eq(l, lease))
        {
            held.remove(lease.name());
        }
    }

    /// Waits for this client's earlier waiters for `name`; `None` at the deadline.
    pub(crate) async fn queue(&self, name: &str, deadline: Instant) -> Option<QueueTurn<'_>> {
        let queue = locked(&self.queues)
            .entry(name.to_owned())
            .or_default()
            .clone();
        let mut turn = QueueTurn {
            local: self,
            name: name.to_owned(),
            queue: queue.clone(),
            turn: None,
        };
        let guard = tokio::time::timeout_at(deadline.into(), queue.lock_owned())
            .await
            .ok()?;
        turn.turn = Some(guard);
        Some(turn)
    }
}

/// The time a contender is told a local holder may keep the lock.
pub(crate) fn remaining(lease: &Lease) -> Duration {
    lease
        .expires_at()
        .saturating_duration_since(crate::clock::now())
        + RULE_SECOND
}

/// A waiter's turn at the head of its key's local queue.
pub(crate) struct QueueTurn<'a> {
    local: &'a Local,
    name: String,
    queue: Arc<tokio::sync::Mutex<()>>,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for QueueTurn<'_> {
    fn drop(&mut self) {
        self.turn = None;
        let mut queues = locked(&self.local.queues);
        // The map's reference and this one: nobody else waits, the queue goes.
        if Arc::strong_count(&self.queue) == 2 {
            queues.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Cause;

    fn lease(name: &str, sent: Instant) -> Arc<Lease> {
        Arc::new(Lease::for_test(name, sent))
    }

    #[test]
    fn held_for_answers_for_a_healthy_holder_only() {
        let local = Local::default();
        assert_eq!(local.held_for("a"), None, "nobody holds it");
        let healthy = lease("a", Instant::now());
        local.insert(healthy.clone());
        let left = local.held_for("a").unwrap();
        assert!(left > Duration::from_secs(30) && left <= Duration::from_secs(31));
        healthy.lose(Cause::Refused);
        assert_eq!(local.held_for("a"), None, "lost");
        local.insert(lease("b", Instant::now() - Duration::from_secs(28)));
        assert_eq!(local.held_for("b"), None, "inside the margin");
    }

    #[test]
    fn a_replaced_lease_is_not_removed_by_its_predecessor() {
        let local = Local::default();
        let (old, new) = (lease("a", Instant::now()), lease("a", Instant::now()));
        local.insert(old.clone());
        local.insert(new.clone());
        local.remove(&old);
        assert!(
            local
                .healthy_holder("a")
                .is_some_and(|l| Arc::ptr_eq(&l, &new))
        );
        local.remove(&new);
        assert!(local.healthy_holder("a").is_none());
    }

    #[tokio::test]
    async fn waiters_queue_and_the_queue_goes_with_the_last() {
        let local = Local::default();
        let far = Instant::now() + Duration::from_secs(5);
        let first = local.queue("a", far).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(local.queue("a", soon).await.is_none(), "behind the first");
        drop(first);
        assert!(locked(&local.queues).is_empty());
        assert!(local.queue("a", far).await.is_some());
    }
}
