//! The handle to a held lock.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backend::Version;
use crate::client::Inner;
use crate::error::Error;
use crate::key::{LockKey, ObjectName};
use crate::lease;
use crate::signal::Signal;

/// Where the lease driver sends the outcome of a release, if anyone waits for it.
pub(crate) type ReleaseRequest = Option<oneshot::Sender<Result<bool, Error>>>;

/// A fencing token: the generation of the lock object this acquisition created.
///
/// Each acquisition of a key gets a token no other acquisition of that key gets. Pass it to the
/// resource you protect and have the resource refuse writes carrying a token other than the
/// newest it has seen. GCS promises that generations are unique, not that they increase, so
/// compare tokens by **equality**; they do increase on GCS and on this crate's backends in
/// practice, which is what [`get`](Self::get) is for. It serializes as a JSON integer.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
/// let a = client.try_acquire("k").await?;
/// let token_a = a.token();
/// a.release().await?;
/// let b = client.try_acquire("k").await?;
/// assert_ne!(b.token(), token_a);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct FencingToken(i64);

impl FencingToken {
    pub(crate) fn from_generation(generation: i64) -> Self {
        Self(generation)
    }

    /// The object generation.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.token().get() > 0);
    /// # Ok(()) }
    /// ```
    pub fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for FencingToken {
    /// A token from its number, as printed by [`Display`](fmt::Display) (for operators
    /// passing a token back, say).
    fn from(generation: i64) -> Self {
        Self(generation)
    }
}

impl std::str::FromStr for FencingToken {
    type Err = std::num::ParseIntError;

    /// Parses a token as printed by [`Display`](fmt::Display).
    ///
    /// ```
    /// let t: dimutex::FencingToken = "1795674826528415".parse().unwrap();
    /// assert_eq!(t.get(), 1795674826528415);
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(Self)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// What the guard, the client's local map and the lease driver share.
/// [`LeaseShared::end`]: its release has ended.
const ENDED: u8 = 1;
/// [`LeaseShared::watch`]: the lease driver has it in its care.
const WATCHED: u8 = 2;

pub(crate) struct LeaseShared {
    id: u64,
    key: LockKey,
    /// The lock object's name.
    name: ObjectName,
    /// This acquisition's owner id, as written in the object's metadata.
    owner: Arc<str>,
    token: FencingToken,
    /// Lost, or ended.
    lost: AtomicBool,
    /// [`ENDED`] once its release has ended; [`WATCHED`] once the lease driver took it into
    /// its care. Whoever comes second of the two knows the other's part is done.
    stage: AtomicU8,
    notify: Signal,
    /// `sent` of the last successful write + ttl − margin, in nanoseconds since the lease
    /// clock's origin: past it, the lease is not ours any more. Outside `state`: a busy key's
    /// health is read by every request for it, and a lock would be a write each time. It only
    /// grows, and it is written with `state` locked.
    deadline: AtomicU64,
    state: Mutex<LeaseState>,
}

/// Where a lease stands; changed by the lease driver and by [`LockGuard::release`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseState {
    /// The object's version after our last write.
    pub(crate) version: Version,
    /// When our last successful write was sent.
    pub(crate) sent: Instant,
    /// The driver has a refresh in flight.
    pub(crate) refreshing: bool,
    /// Its release has begun (by the driver, or by `LockGuard::release` in the caller's task).
    pub(crate) releasing: bool,
    /// Someone else changed or removed the object.
    pub(crate) gone: bool,
}

/// Who may release a lease now.
pub(crate) enum Claim {
    /// The caller, with the lease's state at that moment.
    Claimed(LeaseState),
    /// Nobody yet: a refresh is in flight (the driver releases it afterwards).
    Refreshing,
    /// Nobody: its release has begun.
    Releasing,
}

impl LeaseShared {
    pub(crate) fn new(
        id: u64,
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        version: Version,
        sent: Instant,
        deadline: Instant,
    ) -> Self {
        Self {
            id,
            key,
            name,
            owner,
            token: FencingToken(version.generation()),
            lost: AtomicBool::new(false),
            stage: AtomicU8::new(0),
            notify: Signal::default(),
            deadline: AtomicU64::new(lease::since_origin(deadline)),
            state: Mutex::new(LeaseState {
                version,
                sent,
                refreshing: false,
                releasing: false,
                gone: false,
            }),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the release unless a refresh is in flight or the release has begun.
    pub(crate) fn claim_release(&self) -> Claim {
        let mut state = self.state();
        if state.releasing {
            Claim::Releasing
        } else if state.refreshing {
            Claim::Refreshing
        } else {
            state.releasing = true;
            Claim::Claimed(*state)
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn deadline(&self) -> Instant {
        lease::at_since_origin(self.deadline.load(Ordering::Relaxed))
    }

    /// Moves the deadline on after a refresh (with `state` locked by the caller).
    pub(crate) fn set_deadline(&self, at: Instant) {
        self.deadline
            .store(lease::since_origin(at), Ordering::Relaxed);
    }

    pub(crate) fn key(&self) -> &LockKey {
        &self.key
    }

    pub(crate) fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The lock object's name as bytes (no check that they are UTF-8, which they are).
    pub(crate) fn name_bytes(&self) -> &[u8] {
        self.name.as_bytes()
    }

    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Marks the release ended. The first time: `Some(watched)`, whether the lease driver
    /// has the lease in its care (and so must be told to forget it); later: `None`.
    pub(crate) fn end(&self) -> Option<bool> {
        let before = self.stage.fetch_or(ENDED, Ordering::AcqRel);
        (before & ENDED == 0).then_some(before & WATCHED != 0)
    }

    /// The lease driver takes the lease into its care, unless its release has ended already.
    pub(crate) fn watch(&self) -> bool {
        self.stage.fetch_or(WATCHED, Ordering::AcqRel) & ENDED == 0
    }

    /// Marks the lease lost (or ended) and wakes everyone waiting for that.
    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.notify.notify();
    }

    /// Not lost, and the local deadline not passed.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy_for().is_some()
    }

    /// How long until the local deadline, if the lease is healthy (not lost, and strictly
    /// before that deadline).
    pub(crate) fn healthy_for(&self) -> Option<Duration> {
        if self.is_lost() {
            return None;
        }
        let left = self.deadline().checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some(left)
    }

    /// A lease for unit tests: object `name`, lease `id`, local `deadline`.
    #[cfg(test)]
    pub(crate) fn for_test(id: u64, name: &str, deadline: Instant) -> Self {
        Self::new(
            id,
            LockKey::new("k").unwrap(),
            name.into(),
            "test#1".into(),
            Version::new(1, 1),
            Instant::now(),
            deadline,
        )
    }

    /// Resolves when the lease is lost or has ended.
    pub(crate) fn ended(self: &Arc<Self>) -> impl Future<Output = ()> + Send + Sync + 'static {
        let shared = self.clone();
        async move { shared.notify.wait_until(|| shared.is_lost()).await }
    }
}

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
/// and nothing blocks in `Drop`); with a backend that answers at once, such as the in-memory
/// one, the release is done in `drop` itself (on a tokio runtime, no refresh in flight), so
/// the lock is free when `drop` returns.
/// [`release`](Self::release) sends the delete and waits for the outcome;
/// [`Client::shutdown`](crate::Client::shutdown) waits for all pending releases.
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
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    held: HeldLock,
    /// Until the release is asked for (then it moves into the release).
    client: Option<Arc<Inner>>,
}

impl LockGuard {
    pub(crate) fn new(shared: Arc<LeaseShared>, client: Arc<Inner>) -> Self {
        Self {
            held: HeldLock { shared },
            client: Some(client),
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
    /// take the lock over if no further refresh succeeds: the send time of the last successful
    /// write plus the ttl.
    ///
    /// It moves on with every successful refresh. A process that must stop working on the
    /// protected resource before anyone else may start (`dimutex run` kills its command by
    /// then) has until this moment, whatever [`lost`](Self::lost) says.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// use std::time::{Duration, Instant};
    /// let client = dimutex::Client::builder(dimutex::backend::MemoryBackend::new())
    ///     .ttl(Duration::from_secs(10))
    ///     .build()
    ///     .unwrap();
    /// let before = Instant::now();
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.expires_at() >= before + Duration::from_secs(10));
    /// assert!(guard.expires_at() <= Instant::now() + Duration::from_secs(10));
    /// # Ok(()) }
    /// ```
    pub fn expires_at(&self) -> std::time::Instant {
        // The local deadline is `sent + ttl − margin`; the client is here until the release.
        let margin = self
            .client
            .as_ref()
            .map_or(Duration::ZERO, |c| c.config.margin());
        self.held.shared.deadline() + margin
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
    /// changed or removed the object. Transient failures are retried per the client's retry
    /// policy; after that the error is returned and expiry frees the lock.
    ///
    /// The delete is sent from the calling task (after the refresh in flight, if one is).
    /// Dropping this future before it completes is safe: the client finishes the release in
    /// the background, as for a dropped guard.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.release().await?);
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self) -> Result<bool, Error> {
        let Some(client) = self.client.take() else {
            return Err(Error::ShutDown);
        };
        lease::release_from_guard(&client, &self.held.shared).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // No spawn, no blocking: an in-process delete is done here, any other by the driver.
            lease::release_on_drop(client, &self.held.shared);
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
    shared: Arc<LeaseShared>,
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
        self.shared.key()
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
        self.shared.token
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
        self.shared.is_healthy()
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
        Lost {
            inner: Box::pin(self.shared.ended()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> LeaseShared {
        LeaseShared::for_test(1, "dimutex/k", Instant::now())
    }

    #[test]
    fn ended_before_the_driver_looks_is_never_watched() {
        let shared = lease();
        assert_eq!(shared.end(), Some(false), "no driver entry to forget");
        assert!(!shared.watch(), "the driver skips it");
        assert_eq!(shared.end(), None, "counted once");
    }

    #[test]
    fn watched_before_the_end_is_forgotten_when_told() {
        let shared = lease();
        assert!(shared.watch());
        assert_eq!(shared.end(), Some(true), "the driver must be told");
        assert_eq!(shared.end(), None);
    }
}
