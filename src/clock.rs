//! The monotonic clock of every deadline and lease: tokio's.
//!
//! On a runtime with paused time (`tokio::time::pause`, `#[tokio::test(start_paused = true)]`)
//! it moves with the timers that wait for it, so a simulated test can run hours of leases in
//! milliseconds; everywhere else it is `std::time::Instant::now()`. Deadlines given to the
//! client under paused time are taken from `tokio::time::Instant::now()` too.

use std::time::Instant;

/// Now, on the clock of tokio's timers.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
