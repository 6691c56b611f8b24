//! The handle to a held lock, and views of it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::backend::Metadata;
use crate::driver::{Completion, DriverHandle};
use crate::error::Error;
use crate::key::LockKey;
use crate::lease::Lease;
use crate::token::FencingToken;

/// A held lock. Dropping it releases the lock in the background.
///
/// While the guard lives, the lease is refreshed in the background. If the lease is lost
/// (refresh refused because someone else took the lock over, or the backend unreachable until
/// the lease ran out), [`is_healthy`](Self::is_healthy) turns false and [`lost`](Self::lost)
/// resolves: stop working on the protected resource then. A lease is not a mutex by itself: a
/// process paused longer than the ttl may wake up after someone else took over, so pass the
/// [`token`](Self::token) to whatever you protect.
///
/// Dropping the guard hands the release to the client's background work (no task is spawned
/// and nothing blocks in `Drop`). [`release`](Self::release) sends the delete from the
/// caller's task and waits for the outcome; [`Client::shutdown`](crate::Client::shutdown)
/// waits for all pending releases.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
/// let guard = client.try_acquire("payroll").await?;
/// tokio::select! {
///     _ = guard.lost() => eprintln!("lease lost; stopping"),
///     _ = async { /* the critical section */ } => {}
/// }
/// let still_held = guard.release().await?;
/// assert!(still_held);
/// # Ok(()) }
/// ```
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    held: HeldLock,
    driver: DriverHandle,
    /// Its release has begun.
    released: bool,
}

impl LockGuard {
    pub(crate) fn new(lease: Arc<Lease>, driver: DriverHandle) -> Self {
        Self {
            held: HeldLock { lease },
            driver,
            released: false,
        }
    }

    /// The key this guard holds.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert_eq!(guard.key().as_str(), "k");
    /// # Ok(()) }
    /// ```
    pub fn key(&self) -> &LockKey {
        self.held.key()
    }

    /// The fencing token of this acquisition.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// println!("writing with token {}", guard.token());
    /// # Ok(()) }
    /// ```
    pub fn token(&self) -> FencingToken {
        self.held.token()
    }

    /// Whether the lease is still ours: not lost, and its local deadline (the send time of the
    /// last successful write + ttl − margin) not passed.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.is_healthy());
    /// # Ok(()) }
    /// ```
    pub fn is_healthy(&self) -> bool {
        self.held.is_healthy()
    }

    /// The earliest moment, by this process's monotonic clock, at which another owner could
    /// take the lock over if no further refresh succeeds: the send time of the last
    /// successful write plus the ttl. The lease counts as lost a tenth of the ttl earlier;
    /// work that must not overlap another holder's (a child process, say) must stop by then.
    /// A lease lost because someone else changed or removed the lock object, or given up at
    /// shutdown, expires when it is lost: another owner may hold the lock already.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.expires_at() > std::time::Instant::now());
    /// # Ok(()) }
    /// ```
    pub fn expires_at(&self) -> Instant {
        self.held.expires_at()
    }

    /// A [`HeldLock`]: a cheap view of this lock (key, token, lost signal) to hand to code
    /// that does not own the guard.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// let held = guard.held_lock();
    /// assert_eq!(held.key(), guard.key());
    /// # Ok(()) }
    /// ```
    pub fn held_lock(&self) -> HeldLock {
        self.held.clone()
    }

    /// A future that resolves when the lease is lost (or has ended). It does not borrow the
    /// guard, so it can be moved into another task.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// let lost = guard.lost();
    /// guard.release().await?;
    /// lost.await; // the lease has ended
    /// # Ok(()) }
    /// ```
    pub fn lost(&self) -> Lost {
        self.held.lost()
    }

    /// Releases the lock and reports whether it was still ours: `true` when the conditional
    /// delete removed our lock object, `false` when the lease had been lost and someone else
    /// changed or removed the object. Transient failures (a 429 for a delete right after the
    /// create, say: GCS allows one mutation per second per object) are retried while the
    /// lease is ours, and at least for the client's retry policy's budget; after that the
    /// error is returned and expiry frees the lock. A lease the client
    /// gave up at [`Client::shutdown`](crate::Client::shutdown) is [`Error::ShutDown`].
    ///
    /// The delete is sent from the caller's task, after the refresh in flight if one is.
    /// Dropping this future before it completes is safe: the lease driver then releases the
    /// lock, as for a dropped guard.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.release().await?);
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self) -> Result<bool, Error> {
        self.released = true;
        let mut handoff = Handoff(Some((&self.held.lease, &self.driver)));
        let result = self.driver.release(&self.held.lease).await;
        handoff.0 = None;
        result
    }
}

impl LockGuard {
    /// The work under this lock succeeded: the lock stays behind as a completed record for
    /// `retention` (judged on the server's clock), one write conditional on the version we
    /// hold, instead of the release's delete. Until then
    /// [`Client::try_acquire_unless_done`](crate::Client::try_acquire_unless_done) of the key
    /// answers [`Acquisition::Done`](crate::Acquisition::Done), and other acquisitions find it
    /// held. `retention` is clamped to between 1 s and 10 years.
    ///
    /// `Ok(true)`: stored. `Ok(false)`: nothing stored, the lease was lost first (someone
    /// else changed the lock, or the client shut down). An error: the outcome is unknown (the backend kept failing for
    /// the retry policy's budget); the guard is then released as if dropped, so either the
    /// record or nothing remains.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// use std::time::Duration;
    /// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("weekly-cleanup").await?;
    /// assert!(guard.complete(Duration::from_secs(6 * 86_400)).await?);
    /// assert!(client.try_acquire("weekly-cleanup").await.unwrap_err().is_held());
    /// # Ok(()) }
    /// ```
    pub async fn complete(self, retention: Duration) -> Result<bool, Error> {
        let completion = Completion {
            fields: Metadata::new(),
            data: &[],
            retention,
        };
        self.complete_with(completion).await
    }

    /// Turns the lock into the completed record `record` with one write conditional on the
    /// version we hold; see [`DriverHandle::complete`]. Unless the record is stored, the
    /// guard is dropped here, which releases what is still ours.
    pub(crate) async fn complete_with(mut self, record: Completion<'_>) -> Result<bool, Error> {
        let result = self.driver.complete(&self.held.lease, record).await;
        if matches!(result, Ok(true)) {
            self.released = true;
        }
        result
    }
}

/// Asks the lease driver for the release: only a flag and a message, no spawn, no blocking.
fn hand_over(lease: &Lease, driver: &DriverHandle) {
    lease.ask_release();
    driver.take_in();
}

/// Hands the release of a guard whose `release` future is dropped before it finished to the
/// lease driver.
struct Handoff<'a>(Option<(&'a Arc<Lease>, &'a DriverHandle)>);

impl Drop for Handoff<'_> {
    fn drop(&mut self) {
        if let Some((lease, driver)) = self.0 {
            hand_over(lease, driver);
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            hand_over(&self.held.lease, &self.driver);
        }
    }
}

/// A view of a held lock for code that does not own the guard — a handler behind
/// [`LockLayer`](crate::layer::LockLayer), say: the key, the fencing token, and the lost-lease
/// signal. Cheap to clone. It does not keep the lock: the guard does.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
/// let guard = client.try_acquire("k").await?;
/// let held = guard.held_lock();
/// assert_eq!(held.token(), guard.token());
/// assert!(held.is_healthy());
/// guard.release().await?;
/// assert!(!held.is_healthy());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HeldLock {
    lease: Arc<Lease>,
}

impl HeldLock {
    /// The key.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let held = client.try_acquire("k").await?.held_lock();
    /// assert_eq!(held.key().as_str(), "k");
    /// # Ok(()) }
    /// ```
    pub fn key(&self) -> &LockKey {
        self.lease.key()
    }

    /// The fencing token of the acquisition.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert_eq!(guard.held_lock().token(), guard.token());
    /// # Ok(()) }
    /// ```
    pub fn token(&self) -> FencingToken {
        self.lease.token()
    }

    /// Whether the lease is still held and healthy; see [`LockGuard::is_healthy`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.held_lock().is_healthy());
    /// # Ok(()) }
    /// ```
    pub fn is_healthy(&self) -> bool {
        self.lease.is_healthy()
    }

    /// The earliest moment another owner could take the lock over; see
    /// [`LockGuard::expires_at`].
    pub fn expires_at(&self) -> Instant {
        self.lease.expires_at()
    }

    /// Resolves when the lease is lost or has ended; see [`LockGuard::lost`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// let lost = guard.held_lock().lost();
    /// drop(guard);
    /// lost.await;
    /// # Ok(()) }
    /// ```
    pub fn lost(&self) -> Lost {
        let lease = self.lease.clone();
        Lost {
            inner: Box::pin(async move { lease.over().await }),
        }
    }
}

impl fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldLock")
            .field("key", self.key())
            .field("token", &self.token())
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", self.key())
            .field("token", &self.token())
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

/// Resolves when a lease is lost or has ended; see [`LockGuard::lost`].
#[must_use = "futures do nothing unless polled"]
pub struct Lost {
    inner: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
}

impl Future for Lost {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lost").finish_non_exhaustive()
    }
}
