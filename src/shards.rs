//! [`Shards`]: a value kept in parts, each behind a lock of its own on cache lines of its own,
//! so that the worker threads of a busy server, each working on its own key or lease, do not
//! all write one lock's cache line; and [`Count`], a count kept in parts the same way.

use std::fmt;
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
}
