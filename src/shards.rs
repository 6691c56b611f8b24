//! [`Shards`]: a value kept in parts, each behind a lock of its own on cache lines of its own,
//! so that the worker threads of a busy server, each working on its own key or lease, do not
//! all write one lock's cache line; and [`Count`], a count kept in parts the same way.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// How many parts.
pub(crate) const SHARDS: usize = 16;

pub(crate) struct Shards<T>([Shard<T>; SHARDS]);

#[derive(Default)]
#[repr(align(128))]
struct Shard<T>(Mutex<T>);

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Self(std::array::from_fn(|_| Shard::default()))
    }
}

impl<T> Shards<T> {
    /// Part `i % SHARDS`, locked (a lock poisoned by a panic elsewhere is taken over: every
    /// part is left consistent between statements).
    pub(crate) fn lock(&self, i: usize) -> MutexGuard<'_, T> {
        self.0[i % SHARDS]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every part in turn, each locked while the caller looks at it.
    pub(crate) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, T>> {
        (0..SHARDS).map(|i| self.lock(i))
    }
}

/// A count kept in parts on cache lines of their own. An item is counted in and out of the
/// same part (the caller names it: a thread's own, say), so threads counting their own items
/// do not write one cache line. No part ever goes below zero, so an item counted in during a
/// whole reading of [`total`](Self::total) is in it: the total reads 0 only if no item was in
/// throughout.
#[derive(Default)]
pub(crate) struct Count([Part; SHARDS]);

#[derive(Default)]
#[repr(align(128))]
struct Part(AtomicUsize);

impl Count {
    /// Counts an item in, in part `part % SHARDS`.
    pub(crate) fn add(&self, part: usize) {
        self.0[part % SHARDS].0.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts an item out of part `part % SHARDS` (where it was counted in); whether that part
    /// is now empty (the total can only have reached 0 with such a change).
    pub(crate) fn remove(&self, part: usize) -> bool {
        self.0[part % SHARDS].0.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// The items counted in and not yet out.
    pub(crate) fn total(&self) -> usize {
        self.0.iter().map(|p| p.0.load(Ordering::Acquire)).sum()
    }
}

impl fmt::Debug for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Count").field(&self.total()).finish()
    }
}

impl<T: fmt::Debug> fmt::Debug for Shards<T> {
    /// As a list of the parts' mutexes (which print without waiting for a held lock).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|s| &s.0)).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_found_again_by_index_modulo_their_count() {
        let shards: Shards<Vec<usize>> = Shards::default();
        for i in 0..100 {
            shards.lock(i).push(i);
        }
        assert_eq!(shards.lock(3 + SHARDS).first(), Some(&3));
        assert_eq!(shards.each().map(|p| p.len()).sum::<usize>(), 100);
        assert!(std::mem::align_of::<Shard<()>>() >= 128);
    }

    #[test]
    fn a_count_is_the_sum_of_its_parts_and_says_when_a_part_empties() {
        let count = Count::default();
        count.add(1);
        count.add(1 + SHARDS);
        count.add(2);
        assert_eq!(count.total(), 3);
        assert!(!count.remove(1));
        assert!(count.remove(1));
        assert!(count.remove(2 + 2 * SHARDS));
        assert_eq!(count.total(), 0);
        assert_eq!(format!("{count:?}"), "Count(0)");
        assert!(std::mem::align_of::<Part>() >= 128);
    }
}
