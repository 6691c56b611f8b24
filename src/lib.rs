//! A distributed mutex on Google Cloud Storage.
//!
//! `dimutex` makes sure that two replicas of a service never run the same job at once: a lock
//! is a GCS object created with `ifGenerationMatch=0`, held as a lease that is refreshed in
//! the background, and released with a delete conditional on the object's generation and
//! metageneration. Expiry is judged on the server's clock; outcomes lost in transit are
//! resolved by re-reading the object and comparing its owner.
//!
//! Three layers of API, each usable without the next: the lock [`Client`] (no tower or axum
//! types), the tower middleware in [`layer`], and axum extractors in `extract`.
//!
//! # Quick start
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
//! use dimutex::{Client, Error, backend::MemoryBackend};
//!
//! // In production: `GcsBackend::builder("my-bucket").build().await?`.
//! let client = Client::new(MemoryBackend::new());
//!
//! match client.try_acquire("nightly-export").await {
//!     Ok(guard) => {
//!         // ... the critical section; pass guard.token() to what you write ...
//!         guard.release().await?;
//!     }
//!     Err(Error::Held { remaining }) => println!("busy; retry in {remaining:?}"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```
//!
//! # Features
//! - `gcs` (default): [`backend::GcsBackend`], the GCS JSON API over `reqwest` + `gcp_auth`.
//! - `axum` (default): [`extract::Lock`] and the [`HeldLock`] extractor, and
//!   [`layer::FromPathParam`]. The tower layer ([`layer::LockLayer`]) never needs it.
//! - `cli`: the `dimutex` command (run a command under a lock; `status`; `release --force`).
//! - `testing`: [`testing::FakeGcs`], an in-process HTTP fake of the GCS JSON API with fault
//!   injection, for tests and benchmarks.
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod backend;
mod backoff;
mod client;
mod clock;
mod done;
mod driver;
mod error;
#[cfg(feature = "axum")]
pub mod extract;
mod guard;
pub mod idempotency;
mod inspect;
pub mod json_key;
mod key;
pub mod layer;
mod lease;
mod local;
mod object;
mod pending;
mod protocol;
mod random;
mod signal;
#[cfg(feature = "testing")]
pub mod testing;
mod token;

pub use backoff::{Backoff, RetryPolicy};
pub use client::{Client, ClientBuilder, MIN_REFRESH_INTERVAL, MIN_TTL};
pub use done::{Acquisition, Done};
pub use error::{ConfigError, Error, ShutdownTimeout};
pub use guard::{HeldLock, LockGuard, Lost};
pub use inspect::LockStatus;
pub use key::{KeyError, LockKey, MAX_OBJECT_NAME_LEN};
pub use protocol::WallClock;
pub use token::FencingToken;

/// A short, stable digest of a key for logs, so raw keys never appear above DEBUG.
pub(crate) fn key_id(key: &LockKey) -> u64 {
    use std::hash::BuildHasher;
    // Fixed: the same key has the same id in every process, so replicas' logs correlate.
    let state = foldhash::quality::FixedState::with_seed(0x0064_696d_7574_6578);
    state.hash_one(key.as_str()) & 0xffff_ffff
}

/// The README's code blocks, compiled as doctests.
#[cfg(all(doctest, feature = "axum", feature = "gcs"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_id_is_the_hash_of_the_key_as_str_as_it_always_was() {
        use std::hash::BuildHasher;
        for text in ["job-17", "tenant/é/export", &"x".repeat(300)] {
            let key = LockKey::new(text).unwrap();
            let as_str = foldhash::quality::FixedState::with_seed(0x0064_696d_7574_6578)
                .hash_one(text)
                & 0xffff_ffff;
            assert_eq!(key_id(&key), as_str, "{text}");
        }
        // Pinned: replicas of other versions log the same id for the same key.
        assert_eq!(key_id(&LockKey::new("job-17").unwrap()), PINNED_JOB_17);
    }

    const PINNED_JOB_17: u64 = 2_508_074_838;
}
