//! The lock client: entry points (its configuration is in [`builder`]). The lock protocol
//! itself is in [`crate::protocol`], the life of a held lease in [`crate::driver`].

mod builder;

pub use builder::{ClientBuilder, MIN_REFRESH_INTERVAL, MIN_TTL};

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, ObjectState};
use crate::done::{Acquisition, Done};
use crate::driver::{self, DriverHandle, Job, Kept};
use crate::error::{Error, ShutdownTimeout};
use crate::guard::LockGuard;
use crate::key::{self, KeyError, LockKey, ObjectName};
use crate::lease::Lease;
use crate::local::{self, Local};
use crate::pending::{Pending, Ticket};
use crate::protocol::Protocol;
use crate::protocol::acquire::{self, Acquired, Entry, Mode, Trace};
use crate::protocol::refresh::Known;
use crate::signal::Latch;

/// A distributed lock client: cheap to clone, shared by all tasks of a process.
///
/// Build one per process from a [`Backend`] and take locks with [`try_acquire`](Self::try_acquire)
/// (fail fast) or [`acquire`](Self::acquire) (wait up to a deadline).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// use std::time::{Duration, Instant};
/// use dimutex::{Client, backend::MemoryBackend};
///
/// let client = Client::new(MemoryBackend::new());
/// let guard = client.acquire("invoice-run", Instant::now() + Duration::from_secs(5)).await?;
/// println!("fencing token {}", guard.token());
/// guard.release().await?;
/// client.shutdown(Duration::from_secs(5)).await.expect("all releases done");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

/// What a client's handles share.
pub(crate) struct Inner {
    pub(crate) protocol: Arc<Protocol>,
    prefix: String,
    identity: String,
    /// The leases held here and the local queues of waiters.
    local: Arc<Local>,
    /// Acquisitions in flight, held leases and clean-ups: what shutdown waits for.
    pending: Arc<Pending>,
    /// The lease driver (started before the first write, and again if its runtime stopped).
    driver: Mutex<Option<DriverHandle>>,
    /// Set once by [`Client::shutdown`].
    shutdown: Arc<Latch>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.inner.protocol.settings();
        f.debug_struct("Client")
            .field("backend", &self.inner.protocol.backend())
            .field("prefix", &self.inner.prefix)
            .field("ttl", &s.ttl)
            .field("refresh_interval", &s.refresh_interval)
            .field("identity", &self.inner.identity)
            .field("request_timeout", &s.request_timeout)
            .field("retry", &s.retry)
            .field("poll", &s.poll)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client with the default configuration (see [`ClientBuilder`]).
    ///
    /// ```
    /// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.prefix(), "dimutex/");
    /// ```
    pub fn new(backend: impl Backend) -> Self {
        Self::builder(backend)
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder to configure a client.
    ///
    /// ```
    /// use std::time::Duration;
    /// let client = dimutex::Client::builder(dimutex::backend::MemoryBackend::new())
    ///     .prefix("locks/")
    ///     .ttl(Duration::from_secs(20))
    ///     .build()?;
    /// assert_eq!(client.ttl(), Duration::from_secs(20));
    /// # Ok::<(), dimutex::ConfigError>(())
    /// ```
    pub fn builder(backend: impl Backend) -> ClientBuilder {
        ClientBuilder::new(Arc::new(backend))
    }

    /// The object name prefix.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.prefix(), "dimutex/");
    /// ```
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The lease length.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.ttl(), std::time::Duration::from_secs(30));
    /// ```
    pub fn ttl(&self) -> Duration {
        self.inner.protocol.settings().ttl
    }

    /// How often a held lease is refreshed.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.refresh_interval(), std::time::Duration::from_secs(10));
    /// ```
    pub fn refresh_interval(&self) -> Duration {
        self.inner.protocol.settings().refresh_interval
    }

    /// The readable part of the owner recorded in lock objects.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert!(!client.identity().is_empty());
    /// ```
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The backend.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// println!("{:?}", client.backend());
    /// ```
    pub fn backend(&self) -> &dyn Backend {
        self.inner.protocol.backend()
    }

    /// The object name of `key`: the prefix followed by the key.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.object_name(&"a".parse()?)?, "dimutex/a");
    /// # Ok::<(), dimutex::KeyError>(())
    /// ```
    pub fn object_name(&self, key: &LockKey) -> Result<String, KeyError> {
        self.name_of(key).map(|name| name.to_string())
    }

    /// [`object_name`](Self::object_name), as the lock's requests use it.
    pub(crate) fn name_of(&self, key: &LockKey) -> Result<ObjectName, KeyError> {
        key::object_name(&self.inner.prefix, key)
    }

    /// How many acquisitions, held leases and releases of this client are not finished yet: a
    /// snapshot.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.active_leases(), 0);
    /// ```
    pub fn active_leases(&self) -> usize {
        self.inner.pending.count()
    }

    /// Takes the lock if it is free (or expired), without waiting.
    ///
    /// Costs 2 requests when uncontended (create, then the delete on release), 2 when the lock
    /// is held (create, inspect), 3 to take over an expired lock. A held lock is
    /// [`Error::Held`] with the remaining lease time.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("tenant-7").await?;
    /// assert!(client.try_acquire("tenant-7").await.unwrap_err().is_held());
    /// drop(guard); // released in the background
    /// # Ok(()) }
    /// ```
    pub async fn try_acquire<K>(&self, key: K) -> Result<LockGuard, Error>
    where
        K: TryInto<LockKey>,
        K::Error: Into<Error>,
    {
        let key = key.try_into().map_err(Into::into)?;
        let name = self.name_of(&key)?;
        self.acquire_named(key, name, Mode::Try).await
    }

    /// Takes the lock, waiting until `deadline` while another owner holds it.
    ///
    /// While waiting it polls the lock object with reads (decorrelated-jitter backoff, see
    /// [`ClientBuilder::poll`]); it never repeats the create, so waiters do not spend the
    /// object's write budget. Once the backend has answered 429 (GCS allows about one
    /// mutation per second per object), waiters wait out that window before they create. At
    /// the deadline a held lock is [`Error::Held`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// use std::time::{Duration, Instant};
    /// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let first = client.try_acquire("migration").await?;
    /// let waiter = tokio::spawn({
    ///     let client = client.clone();
    ///     async move { client.acquire("migration", Instant::now() + Duration::from_secs(5)).await }
    /// });
    /// first.release().await?;
    /// let second = waiter.await.unwrap()?;
    /// second.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn acquire<K>(&self, key: K, deadline: Instant) -> Result<LockGuard, Error>
    where
        K: TryInto<LockKey>,
        K::Error: Into<Error>,
    {
        let key = key.try_into().map_err(Into::into)?;
        let name = self.name_of(&key)?;
        self.acquire_named(key, name, Mode::WaitUntil(deadline))
            .await
    }

    /// Takes the lock of `key` like [`try_acquire`](Self::try_acquire), unless the work it
    /// guards was [completed](LockGuard::complete) within the retention of its record: then
    /// [`Acquisition::Done`], with when. For work done once per period across a fleet ("the
    /// nightly report once a day, on one machine"). A record past its retention is taken over
    /// like an expired lock. Costs what `try_acquire` costs; finding the record, 2 requests.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// use std::time::Duration;
    /// use dimutex::{Acquisition, Client, backend::MemoryBackend};
    /// let client = Client::new(MemoryBackend::new());
    /// match client.try_acquire_unless_done("nightly-report").await? {
    ///     Acquisition::Lock(guard) => {
    ///         // ... the report; on success:
    ///         guard.complete(Duration::from_secs(20 * 3600)).await?;
    ///     }
    ///     Acquisition::Done(done) => println!("done at {:?}", done.completed_at()),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_acquire_unless_done<K>(&self, key: K) -> Result<Acquisition, Error>
    where
        K: TryInto<LockKey>,
        K::Error: Into<Error>,
    {
        let key = key.try_into().map_err(Into::into)?;
        let name = self.name_of(&key)?;
        match self.enter_named(key, name, Mode::Try, true).await? {
            Entered::Lock(guard) => Ok(Acquisition::Lock(guard)),
            Entered::Record(state) => Ok(Acquisition::Done(Done::of(&state, self.ttl()))),
        }
    }

    /// Gives up every lock this client holds and waits (up to `timeout`) until all of its
    /// work is done: each held lease is marked lost (its guard's [`LockGuard::lost`] fires)
    /// *before* its delete is sent; acquisitions in flight, and local waiters, end with
    /// [`Error::ShutDown`], and whatever of theirs may have landed is deleted. Once it
    /// returns `Ok`, nothing of this client holds or can create a lock; later acquisitions
    /// fail with [`Error::ShutDown`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// let backend = dimutex::backend::MemoryBackend::new();
    /// let client = dimutex::Client::new(backend.clone());
    /// let _guard = client.try_acquire("a").await.unwrap();
    /// client.shutdown(Duration::from_secs(5)).await.unwrap();
    /// assert_eq!(backend.object_count(), 0);
    /// # }
    /// ```
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), ShutdownTimeout> {
        let inner = &self.inner;
        inner.pending.close();
        inner.shutdown.set();
        match tokio::time::timeout(timeout, inner.pending.drained()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(ShutdownTimeout {
                pending: inner.pending.count(),
            }),
        }
    }

    /// The contents of the record `name`, if it is still at `generation`.
    pub(crate) async fn record_contents(
        &self,
        name: &str,
        generation: i64,
    ) -> Result<Option<bytes::Bytes>, Error> {
        crate::protocol::record::contents(&self.inner.protocol, name, generation).await
    }

    /// How long the lock object `name` may stay held, if a healthy lease of this client
    /// holds it: a fail-fast caller is refused without a request.
    pub(crate) fn held_here_for(&self, name: &str) -> Option<Duration> {
        self.inner.local.held_for(name)
    }

    /// An acquisition of `key`, whose object name is `name`. Ends with [`Error::ShutDown`]
    /// as soon as the client shuts down.
    pub(crate) async fn acquire_named(
        &self,
        key: LockKey,
        name: ObjectName,
        mode: Mode,
    ) -> Result<LockGuard, Error> {
        match self.enter_named(key, name, mode, false).await? {
            Entered::Lock(guard) => Ok(guard),
            // Not handed back without `records`.
            Entered::Record(_) => Err(Error::Held { remaining: None }),
        }
    }

    /// [`acquire_named`](Self::acquire_named), or (with `records`) the live completed record
    /// found under `name` instead.
    pub(crate) async fn enter_named(
        &self,
        key: LockKey,
        name: ObjectName,
        mode: Mode,
        records: bool,
    ) -> Result<Entered, Error> {
        let ticket = self.inner.pending.enter().ok_or(Error::ShutDown)?;
        tokio::select! {
            biased;
            () = self.inner.shutdown.wait() => Err(Error::ShutDown),
            result = self.acquire_ticketed(key, name, mode, ticket, records) => result,
        }
    }

    async fn acquire_ticketed(
        &self,
        key: LockKey,
        name: ObjectName,
        mode: Mode,
        ticket: Ticket,
        records: bool,
    ) -> Result<Entered, Error> {
        let local = &self.inner.local;
        let _turn = match mode {
            Mode::Try => {
                if let Some(remaining) = local.held_for(&name) {
                    return Err(Error::Held {
                        remaining: Some(remaining),
                    });
                }
                None
            }
            // Waiters of this client queue locally; only the head of the queue talks to the
            // backend, and not while a lease of ours holds the key.
            Mode::WaitUntil(deadline) => {
                let turn = local.queue(&name, deadline).await;
                let turn = turn.ok_or_else(|| self.held_here(&name))?;
                // Until the driver is done with it: a waiter that went on as soon as the lease
                // was over would meet its delete in flight.
                while let Some(lease) = local.holder(&name) {
                    let finished = lease.finished();
                    if tokio::time::timeout_at(deadline.into(), finished)
                        .await
                        .is_err()
                    {
                        return Err(Error::Held {
                            remaining: Some(local::remaining(&lease)),
                        });
                    }
                }
                Some(turn)
            }
        };
        let owner = new_owner(&self.inner.identity);
        let mut attempt = Attempt {
            driver: self.inner.driver(),
            name: name.to_string(),
            owner: owner.clone(),
            ticket: Some(ticket),
            trace: Trace::default(),
        };
        let p = &*self.inner.protocol;
        let entry = acquire::acquire(p, &name, &owner, mode, &mut attempt.trace, records).await?;
        let acquired = match entry {
            Entry::Lock(acquired) => acquired,
            // A write of ours that may have landed is cleaned up as the attempt is dropped.
            Entry::Record(state) => return Ok(Entered::Record(state)),
        };
        let ticket = attempt.done();
        tracing::debug!(target: "dimutex", key_id = crate::key_id(&key), how = ?acquired.how, elapsed_ms = acquired.sent.elapsed().as_millis() as u64, "acquired");
        let guard = self.hold(key, name, owner, acquired, ticket, &attempt.driver);
        Ok(Entered::Lock(guard))
    }

    /// A lock taken: registered here, and handed to the lease driver.
    fn hold(
        &self,
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        acquired: Acquired,
        ticket: Ticket,
        driver: &DriverHandle,
    ) -> LockGuard {
        let s = self.inner.protocol.settings();
        let Acquired { state, sent, .. } = acquired;
        let known = Known::new(state.version(), sent);
        let lease = Lease::new(key, name, owner, known, s.ttl, s.margin(), ticket);
        let lease = Arc::new(lease);
        let local = &self.inner.local;
        local.insert(lease.clone());
        driver.keep(Kept::new(lease.clone(), local.clone(), sent));
        LockGuard::new(lease, driver.clone())
    }

    /// "Held" for a waiter whose deadline passed in the local queue.
    fn held_here(&self, name: &str) -> Error {
        Error::Held {
            remaining: self.held_here_for(name),
        }
    }
}

impl Inner {
    /// The lease driver, started on the current runtime if there is none (or its runtime
    /// has stopped).
    fn driver(&self) -> DriverHandle {
        let mut driver = self.driver.lock().unwrap_or_else(|e| e.into_inner());
        match &*driver {
            Some(handle) if !handle.is_closed() => handle.clone(),
            _ => {
                let handle = driver::spawn(
                    self.protocol.clone(),
                    self.local.clone(),
                    self.shutdown.clone(),
                );
                *driver = Some(handle.clone());
                handle
            }
        }
    }
}

/// How an acquisition that may find a record ends well.
#[derive(Debug)]
pub(crate) enum Entered {
    Lock(LockGuard),
    /// A live completed record.
    Record(ObjectState),
}

/// An acquisition under way. Dropped before it is [`done`](Self::done) (its future dropped,
/// or an error returned) while a write of it may have landed, it hands the object's name and
/// its owner id to the lease driver, which deletes our object if it is there.
struct Attempt {
    driver: DriverHandle,
    name: String,
    owner: Arc<str>,
    ticket: Option<Ticket>,
    trace: Trace,
}

impl Attempt {
    /// The lock is taken: its ticket, for the lease.
    fn done(&mut self) -> Ticket {
        self.ticket.take().expect("an attempt is done once")
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        if self.trace.is_unresolved() {
            self.driver.send(Job::CleanUp {
                name: std::mem::take(&mut self.name),
                owner: self.owner.clone(),
                ticket,
            });
        }
    }
}

/// A fresh owner id: the readable identity and a random 128-bit nonce.
fn new_owner(identity: &str) -> Arc<str> {
    format!("{identity}#{:032x}", crate::random::bits()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_unique_and_carry_the_identity() {
        let a = new_owner("host:1");
        let nonce = a.strip_prefix("host:1#").expect("the identity, then #");
        assert_eq!(nonce.len(), 32);
        assert!(
            nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let owners: std::collections::HashSet<Arc<str>> =
            (0..1000).map(|_| new_owner("h")).collect();
        assert_eq!(owners.len(), 1000);
    }
}
