//! What this process already knows: the leases its client holds, and the queue of its own
//! waiters per key.
//!
//! A key held by a healthy lease of this client is certainly held: answering "held" needs no
//! request. Waiters of this client for one key queue here (first come, first served) so that
//! only the head of the queue talks to the backend, and it is woken the moment the local
//! holder's release completes instead of polling.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::guard::LeaseShared;
use crate::shards::Shards;

/// Keys come from requests: a seeded hash, but a fast one (this runs several times a request).
type Hash = foldhash::fast::RandomState;

#[derive(Default)]
pub(crate) struct Local {
    /// The leases, found by their object names (no copy of the name needed), in shards by
    /// name: each request of a busy server looks up, enters and removes its own name, and with
    /// one lock for all of them every worker thread would write the same cache line at each
    /// step.
    held: Shards<HashSet<ByName, Hash>>,
    /// Picks a name's shard.
    hash: Hash,
    queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>, Hash>>,
}

/// A lease as a set member: identified by its object name.
struct ByName(Arc<LeaseShared>);

impl Borrow<[u8]> for ByName {
    fn borrow(&self) -> &[u8] {
        self.0.name_bytes()
    }
}

impl PartialEq for ByName {
    fn eq(&self, other: &Self) -> bool {
        self.0.name_bytes() == other.0.name_bytes()
    }
}

impl Eq for ByName {}

impl std::hash::Hash for ByName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes: lookups by the name's bytes find it.
        self.0.name_bytes().hash(state);
    }
}

/// A place at the head of one key's local queue; leaving it lets the next waiter in.
pub(crate) struct QueueTurn<'a> {
    local: &'a Local,
    name: String,
    queue: Arc<tokio::sync::Mutex<()>>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Local {
    /// The shard of `name`'s lease, locked.
    fn held(&self, name: &[u8]) -> std::sync::MutexGuard<'_, HashSet<ByName, Hash>> {
        use std::hash::BuildHasher;
        self.held.lock(self.hash.hash_one(name) as usize)
    }

    /// The lease of this client that holds `name`, if it is healthy.
    pub(crate) fn healthy_holder(&self, name: &str) -> Option<Arc<LeaseShared>> {
        self.held(name.as_bytes())
            .get(name.as_bytes())
            .filter(|s| s.0.is_healthy())
            .map(|s| s.0.clone())
    }

    /// How long the server may still see `name` as held by a healthy lease of this client
    /// ([`remaining`]), if one holds it. The hot path of a busy key: one look under the
    /// shard's lock, one read of the lease's state and of the clock, and no reference count
    /// taken on a lease every worker thread reads.
    pub(crate) fn held_for(&self, name: &[u8], margin: Duration) -> Option<Duration> {
        let left = self.held(name).get(name)?.0.healthy_for()?;
        Some(left + margin + RULE_SECOND)
    }

    /// Records `lease` as the holder of its object name (in place of an older one).
    pub(crate) fn insert(&self, lease: Arc<LeaseShared>) {
        self.held(lease.name_bytes()).replace(ByName(lease));
    }

    /// Forgets `lease` (and only it: a newer lease of the same name stays).
    pub(crate) fn remove(&self, lease: &Arc<LeaseShared>) {
        let name = lease.name_bytes();
        let mut held = self.held(name);
        if held.get(name).is_some_and(|s| Arc::ptr_eq(&s.0, lease)) {
            held.remove(name);
        }
    }

    /// Waits (until `deadline`) for the head of `name`'s local queue. `None` at the deadline.
    pub(crate) async fn queue(&self, name: &str, deadline: Instant) -> Option<QueueTurn<'_>> {
        let queue = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            queues.entry(name.to_owned()).or_default().clone()
        };
        let mut turn = QueueTurn {
            local: self,
            name: name.to_owned(),
            queue: queue.clone(),
            _turn: None,
        };
        match tokio::time::timeout_at(deadline.into(), queue.lock_owned()).await {
            Ok(guard) => {
                turn._turn = Some(guard);
                Some(turn)
            }
            Err(_) => None,
        }
    }
}

impl Drop for QueueTurn<'_> {
    fn drop(&mut self) {
        self._turn = None;
        // The map's entry, this turn's and nobody else's: the queue is empty.
        let mut queues = self.local.queues.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&self.queue) == 2 {
            queues.remove(&self.name);
        }
    }
}

/// The longest the server may still see a local lease as live: until its local deadline,
/// plus the margin, plus the expiry rule's second.
pub(crate) fn remaining(lease: &LeaseShared, margin: Duration) -> Duration {
    lease.deadline().saturating_duration_since(Instant::now()) + margin + RULE_SECOND
}

/// The expiry rule's second.
const RULE_SECOND: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, deadline: Instant) -> Arc<LeaseShared> {
        Arc::new(LeaseShared::for_test(1, name, deadline))
    }

    #[test]
    fn held_for_answers_for_a_healthy_holder_only() {
        let margin = Duration::from_secs(3);
        let local = Local::default();
        assert_eq!(local.held_for(b"a", margin), None, "nobody holds it");

        let healthy = lease("a", Instant::now() + Duration::from_secs(20));
        local.insert(healthy.clone());
        let left = local.held_for(b"a", margin).unwrap();
        assert!(left > Duration::from_secs(23) && left <= Duration::from_secs(24));

        healthy.mark_lost();
        assert_eq!(local.held_for(b"a", margin), None, "lost");

        let late = lease("b", Instant::now());
        local.insert(late);
        assert_eq!(
            local.held_for(b"b", margin),
            None,
            "at or past its deadline"
        );
    }

    #[test]
    fn a_refresh_moves_the_deadline_on() {
        let at = Instant::now() + Duration::from_secs(1);
        let shared = lease("a", at);
        // Stored in nanoseconds since the lease clock's origin: exact to the nanosecond.
        assert_eq!(shared.deadline(), at);
        shared.set_deadline(at + Duration::from_secs(30));
        assert_eq!(shared.deadline(), at + Duration::from_secs(30));
    }
}
