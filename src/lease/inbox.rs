//! Where acquisitions leave new leases for the lease driver, and guards the ids of the leases
//! they released after the driver took them.
//!
//! The inbox belongs to the client, not to a driver: a driver runs on one runtime, and should
//! that runtime stop, the next acquisition starts another driver on the same inbox (which
//! finds whatever the last one had not taken yet).
//!
//! It is kept in shards by lease id. Ids come in per-thread blocks ([`next_id`]), so one
//! thread's leases share a shard: the worker threads of a busy server each write a cache line
//! of their own. And a guard released before the driver looked (the usual case behind a
//! layer: most requests are shorter than a [`TICK`]) takes its lease back out itself, on its
//! own thread ([`Inbox::take`]). The lease's memory is then freed on the thread that
//! allocated it; freed by the driver, on the other worker thread, it made glibc's `malloc`
//! lock the allocating thread's arena, and both threads wait on each other (profiled: futex
//! waits under the driver's wake-up and under every acquisition's allocation).
//!
//! [`next_id`]: super::next_id

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::{IdHasher, Lease, TICK, since_origin};
use crate::shards::{SHARDS, Shards};

/// [`Inbox::looks_by`]: no driver runs on this inbox (none started yet, or its runtime
/// stopped). Every post asks for one.
const NO_DRIVER: u64 = u64::MAX;

/// [`Inbox::looks_by`]: the driver is awake and has not decided when it sleeps until.
pub(super) const AWAKE: u64 = u64::MAX - 1;

pub(crate) struct Inbox {
    shards: Shards<Items>,
    /// By when the driver will next empty the inbox without being told, in nanoseconds since
    /// the lease clock's origin; [`AWAKE`] or [`NO_DRIVER`] when it is not sure to.
    looks_by: AtomicU64,
}

/// What one shard holds (and the driver's spare, to swap with a shard).
#[derive(Default)]
pub(super) struct Items {
    pub(super) leases: HashMap<u64, Lease, BuildHasherDefault<IdHasher>>,
    /// Leases the driver has, released by their guards: the driver only forgets them.
    pub(super) released: Vec<u64>,
}

impl Items {
    pub(super) fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.released.is_empty()
    }
}

impl Inbox {
    pub(crate) fn new() -> Self {
        Self {
            shards: Default::default(),
            looks_by: AtomicU64::new(NO_DRIVER),
        }
    }

    /// The shard of lease `id`: one per block of ids, so a thread's leases share a shard.
    fn shard(&self, id: u64) -> MutexGuard<'_, Items> {
        self.shards.lock(super::part_of(id))
    }

    /// Leaves a new lease for the driver; whether the driver must be woken (or started) to
    /// take it in time. `now` may be a little late (the acquisition's send time, read
    /// anyway): that errs towards a wake-up.
    #[must_use]
    pub(crate) fn post(&self, id: u64, lease: Lease, now: Instant) -> bool {
        self.put(id, now, |items| {
            items.leases.insert(id, lease);
        })
    }

    /// Tells the driver that the guard of lease `id` released it; whether the driver must be
    /// woken to forget it in time.
    #[must_use]
    pub(crate) fn post_released(&self, id: u64) -> bool {
        self.put(id, Instant::now(), |items| items.released.push(id))
    }

    fn put(&self, id: u64, now: Instant, put: impl FnOnce(&mut Items)) -> bool {
        let first = {
            let mut items = self.shard(id);
            let first = items.is_empty();
            put(&mut items);
            first
        };
        // Something behind another item of its shard is covered by the wake-up that one
        // arranged, unless the driver is gone.
        let looks_by = self.looks_by.load(Ordering::Acquire);
        looks_by == NO_DRIVER || (first && looks_by > since_origin(now + TICK))
    }

    /// Takes back lease `id` if the driver has not taken it. The caller drops it, after the
    /// shard's lock is gone.
    pub(crate) fn take(&self, id: u64) -> Option<Lease> {
        self.shard(id).leases.remove(&id)
    }

    /// Swaps shard `i`'s items with `items` (empty) unless the shard is empty; whether it
    /// swapped.
    pub(super) fn swap(&self, i: usize, items: &mut Items) -> bool {
        let mut shard = self.shards.lock(i);
        if shard.is_empty() {
            return false;
        }
        std::mem::swap(&mut *shard, items);
        true
    }

    pub(super) fn shard_count(&self) -> usize {
        SHARDS
    }

    pub(super) fn is_empty(&self) -> bool {
        self.shards.each().all(|s| s.is_empty())
    }

    /// The driver says when it will next look without being told (see [`AWAKE`]).
    pub(super) fn set_looks_by(&self, at: u64) {
        self.looks_by.store(at, Ordering::Release);
    }

    /// The driver is gone.
    pub(super) fn no_driver(&self) {
        self.looks_by.store(NO_DRIVER, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::Client;
    use crate::backend::MemoryBackend;
    use crate::guard::LeaseShared;

    fn lease(client: &Client, id: u64) -> Lease {
        let shared =
            LeaseShared::for_test(id, "dimutex/k", Instant::now() + Duration::from_secs(1));
        Lease::new(client.inner.clone(), Arc::new(shared))
    }

    #[test]
    fn without_a_driver_every_post_asks_for_one() {
        let client = Client::new(MemoryBackend::new());
        let inbox = Inbox::new();
        assert!(inbox.post(1, lease(&client, 1), Instant::now()));
        assert!(
            inbox.post(2, lease(&client, 2), Instant::now()),
            "not first in its shard"
        );
        assert!(inbox.post_released(3));
    }

    #[test]
    fn the_first_post_of_a_shard_wakes_a_driver_that_would_not_look_within_a_tick() {
        let client = Client::new(MemoryBackend::new());
        let inbox = Inbox::new();
        inbox.set_looks_by(since_origin(Instant::now() + Duration::from_secs(10)));
        assert!(inbox.post(1, lease(&client, 1), Instant::now()));
        assert!(
            !inbox.post(2, lease(&client, 2), Instant::now()),
            "covered by the first's wake-up"
        );
        assert!(
            inbox.post(2048, lease(&client, 2048), Instant::now()),
            "another shard"
        );
        inbox.set_looks_by(AWAKE);
        assert!(inbox.post_released(4096), "awake, undecided");
        let empty_shard = 5 << 10;
        inbox.set_looks_by(since_origin(Instant::now()));
        assert!(!inbox.post(empty_shard, lease(&client, empty_shard), Instant::now()));
        inbox.no_driver();
        assert!(inbox.post(
            empty_shard + 1,
            lease(&client, empty_shard + 1),
            Instant::now()
        ));
    }

    #[test]
    fn a_lease_is_taken_back_once_and_the_shards_empty() {
        let client = Client::new(MemoryBackend::new());
        let inbox = Inbox::new();
        let _ = inbox.post(7, lease(&client, 7), Instant::now());
        assert!(!inbox.is_empty());
        assert!(inbox.take(7).is_some());
        assert!(inbox.take(7).is_none());
        assert!(inbox.is_empty());
        assert_eq!(client.active_leases(), 0, "dropped leases are uncounted");
    }

    #[test]
    fn the_driver_swaps_full_shards_only() {
        let client = Client::new(MemoryBackend::new());
        let inbox = Inbox::new();
        let _ = inbox.post(1, lease(&client, 1), Instant::now());
        let _ = inbox.post_released(9);
        let mut items = Items::default();
        let swapped: Vec<usize> = (0..inbox.shard_count())
            .filter(|&i| {
                let mut mine = Items::default();
                let swapped = inbox.swap(i, &mut mine);
                if swapped {
                    items = mine;
                }
                swapped
            })
            .collect();
        assert_eq!(swapped, vec![0], "ids 1 and 9 share the first shard");
        assert_eq!(items.leases.len(), 1);
        assert_eq!(items.released, vec![9]);
        assert!(inbox.is_empty());
    }
}
