//! An in-process fake of the Google Cloud Storage JSON API, for tests and benchmarks
//! (feature `testing`).
//!
//! [`FakeGcs`] serves the part of the GCS JSON API a lock uses over real HTTP/1.1 on
//! `127.0.0.1`, so the whole client stack — URL encoding, JSON, status codes, connection
//! pooling, timeouts — is exercised, without credentials or a network. Its object model is the
//! one behind [`MemoryBackend`](crate::backend::MemoryBackend), so both agree on GCS semantics.
//!
//! Served routes (`{object}` is one percent-encoded path segment):
//!
//! | request | answer |
//! |---|---|
//! | `POST /upload/storage/v1/b/{bucket}/o?uploadType=multipart` | create or overwrite (metadata part + media part) |
//! | `POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name=N` | create or overwrite (raw body) |
//! | `GET /storage/v1/b/{bucket}/o/{object}` | the object resource; `?alt=media` the data |
//! | `GET /storage/v1/b/{bucket}/o?prefix=P` | `storage#objects`, `items` omitted when empty |
//! | `PATCH /storage/v1/b/{bucket}/o/{object}` | merge `{"metadata": {k: v or null}}` |
//! | `DELETE /storage/v1/b/{bucket}/o/{object}` | 204 |
//! | `GET /storage/v1/b/{bucket}` | the bucket resource |
//!
//! Writes honour `ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch` and
//! `ifMetagenerationNotMatch` (412 `conditionNotMet` when one fails, 400 when one is not an
//! integer). Every response carries a `Date` header from the fake's clock.
//!
//! [`Fault`]s make requests fail the ways real ones do — before or after taking effect, with
//! an error status, a delay, or a connection closed without a response — either scripted
//! ([`FakeGcs::inject`]) or at random with a seed ([`FakeGcs::set_fault_rate`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! use dimutex::testing::{FakeGcs, Fault, FaultRule};
//! use http::Method;
//!
//! let fake = FakeGcs::start().await?;
//! // The next upload takes effect, but its response is lost:
//! fake.inject(FaultRule::new(Fault::CommitThenDrop).with_method(Method::POST));
//! // ... run the code under test against fake.endpoint() ...
//! # drop(fake.endpoint());
//! # Ok(()) }
//! ```

mod api;
mod fault;
mod multipart;
mod request_log;
mod serve;
mod server;
mod wire;

pub use fault::{Fault, FaultRule};
pub use request_log::LoggedRequest;
pub use server::{FakeGcs, FakeGcsBuilder};

/// Makes every random draw of this crate on the current thread — owner nonces, refresh
/// jitter, retry and poll backoff — come from a generator seeded with `seed`, for the rest of
/// the thread's life.
///
/// For deterministic simulation: on a current-thread runtime with paused time, over
/// [`MemoryBackend`](crate::backend::MemoryBackend), the same seed then gives the same run.
/// Never in production: owner nonces would repeat across processes seeded alike.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use dimutex::{Client, backend::MemoryBackend};
///
/// dimutex::testing::seed_random(7);
/// let client = Client::new(MemoryBackend::new());
/// let guard = client.try_acquire("k").await.unwrap();
/// guard.release().await.unwrap();
/// # }
/// ```
pub fn seed_random(seed: u64) {
    crate::random::seed(seed);
}

#[cfg(all(test, feature = "gcs"))]
mod tests;
