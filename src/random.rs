//! Every random draw of the lock: owner nonces, refresh jitter, backoff delays and multipart
//! boundaries.
//!
//! They come from the thread's generator (`rand::rng()`), unless a simulation seeded this
//! thread with [`testing::seed_random`](crate::testing::seed_random): then from a generator
//! seeded with its seed, so that a run on a current-thread runtime with paused time is the same
//! on every run.

use std::cell::RefCell;
use std::ops::RangeInclusive;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore};

thread_local! {
    static SEEDED: RefCell<Option<SmallRng>> = const { RefCell::new(None) };
}

fn draw<T>(f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
    SEEDED.with_borrow_mut(|seeded| match seeded {
        Some(rng) => f(rng),
        None => f(&mut rand::rng()),
    })
}

/// 128 random bits.
pub(crate) fn bits() -> u128 {
    draw(|rng| (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
}

/// A number drawn uniformly from `range`.
pub(crate) fn in_range(range: RangeInclusive<f64>) -> f64 {
    draw(|rng| rng.random_range(range))
}

/// From now on, this thread's draws come from a generator seeded with `seed`.
#[cfg(feature = "testing")]
pub(crate) fn seed(seed: u64) {
    use rand::SeedableRng;
    SEEDED.set(Some(SmallRng::seed_from_u64(seed)));
}
