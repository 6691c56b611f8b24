//! The lock client: configuration, acquisition, and shutdown.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::backend::{Backend, BackendError, BackendFuture, MetadataValue, ObjectState, Reply};
use crate::backoff::{Backoff, RetryPolicy};
use crate::deadline;
use crate::error::{ConfigError, Error, ShutdownTimeout};
use crate::guard::{LeaseShared, LockGuard};
use crate::key::{self, KeyError, LockKey, ObjectName};
use crate::lease;
use crate::local::{self, Local};
use crate::object::{self, Verdict};
use crate::shards::Count;
use crate::signal::Signal;

/// A source of wall-clock time.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

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
///
/// On cache lines of its own, apart from its `Arc`'s counts: every lease clones the `Arc`
/// (twice) and every request reads the fields, on every worker thread.
#[repr(align(128))]
pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: Config,
    /// The number of leases held or still being released, in parts by lease id block (by the
    /// thread that took the lease).
    live: Count,
    /// Notified when `live` drops to zero.
    drained: Signal,
    /// Where new leases wait for the lease driver.
    pub(crate) inbox: Arc<lease::Inbox>,
    /// The lease driver of this client (started on the first acquisition, and again if the
    /// runtime it ran on has stopped).
    driver: std::sync::Mutex<Option<lease::DriverHandle>>,
    /// Set once by [`Client::shutdown`].
    pub(crate) shutdown: watch::Sender<bool>,
    /// `shutdown`'s value, read by every acquisition without the watch's lock (a write to a
    /// cache line every replica thread shares).
    shut: AtomicBool,
    /// The leases held here and the local queues of waiters.
    pub(crate) local: Local,
    /// When the backend last answered 429, in nanoseconds since the lease clock's origin
    /// plus one; 0: never. Read by every release, written only on a 429.
    throttled_at: AtomicU64,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) prefix: String,
    pub(crate) ttl: Duration,
    /// `ttl` as the lock object's metadata writes it (shared by every lock's metadata).
    pub(crate) ttl_text: MetadataValue,
    pub(crate) refresh_interval: Duration,
    pub(crate) identity: String,
    pub(crate) request_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) poll: Backoff,
    pub(crate) clock: WallClock,
}

impl Config {
    /// How long before the lease's end (counted from the send time of the last successful
    /// write) the holder considers it lost: a tenth of the ttl.
    pub(crate) fn margin(&self) -> Duration {
        self.ttl / 10
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.inner.config;
        f.debug_struct("Client")
            .field("backend", &self.inner.backend)
            .field("prefix", &c.prefix)
            .field("ttl", &c.ttl)
            .field("refresh_interval", &c.refresh_interval)
            .field("identity", &c.identity)
            .field("request_timeout", &c.request_timeout)
            .field("retry", &c.retry)
            .field("poll", &c.poll)
            .finish_non_exhaustive()
    }
}

/// An acquisition begun by [`Client::acquire_in_place`].
pub(crate) enum InPlace {
    /// Over: the lock taken, or the reason not.
    Done(Result<LockGuard, Error>),
    /// The rest of it, to await.
    Rest(Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send>>),
}

/// How an acquisition ends when the lock is held elsewhere.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Contention {
    Fail,
    WaitUntil(Instant),
}

#[derive(Clone, Copy)]
enum Step {
    Create,
    Inspect,
    Takeover(crate::backend::Version),
}

/// The outcome of one request, retried on transient failures.
pub(crate) struct Attempted<T> {
    pub(crate) result: Result<T, BackendError>,
    /// Whether an earlier attempt failed in a way that may have taken effect.
    pub(crate) ambiguous: bool,
    /// When the first attempt was sent.
    pub(crate) first_sent: Instant,
}

/// In try mode, how many times the lock may vanish between our create and our inspect
/// before we report it as held (a hot key changing hands under us). In wait mode the
/// deadline bounds this.
const TRY_ROUNDS: usize = 4;

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
        &self.inner.config.prefix
    }

    /// The lease length.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.ttl(), std::time::Duration::from_secs(30));
    /// ```
    pub fn ttl(&self) -> Duration {
        self.inner.config.ttl
    }

    /// How often a held lease is refreshed.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.refresh_interval(), std::time::Duration::from_secs(10));
    /// ```
    pub fn refresh_interval(&self) -> Duration {
        self.inner.config.refresh_interval
    }

    /// The readable part of the owner recorded in lock objects.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert!(!client.identity().is_empty());
    /// ```
    pub fn identity(&self) -> &str {
        &self.inner.config.identity
    }

    /// The backend.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// println!("{:?}", client.backend());
    /// ```
    pub fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
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
        key::object_name(&self.inner.config.prefix, key)
    }

    /// How many leases this client holds or is still releasing: a snapshot, which leases that
    /// open or end while it is read may or may not be in.
    ///
    /// ```
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert_eq!(client.active_leases(), 0);
    /// ```
    pub fn active_leases(&self) -> usize {
        self.inner.live.total()
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
        self.acquire_with(key, Contention::Fail).await
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
        self.acquire_with(key, Contention::WaitUntil(deadline))
            .await
    }

    /// Releases every lock this client holds and waits (up to `timeout`) until all releases,
    /// including those handed over by dropped guards, are done. After it, acquisitions fail
    /// with [`Error::ShutDown`].
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
        self.inner.shut.store(true, Ordering::SeqCst);
        self.inner.shutdown.send_replace(true);
        let inner = &self.inner;
        let drained = inner.drained.wait_until(|| inner.live.total() == 0);
        if tokio::time::timeout(timeout, drained).await.is_ok() {
            Ok(())
        } else {
            Err(ShutdownTimeout {
                pending: self.active_leases(),
            })
        }
    }

    async fn acquire_with(&self, key: LockKey, contention: Contention) -> Result<LockGuard, Error> {
        let name = key::object_name(&self.inner.config.prefix, &key)?;
        if let (Contention::Fail, Some(remaining)) = (contention, self.held_here_for(&name)) {
            return Err(Error::Held {
                remaining: Some(remaining),
            });
        }
        self.acquire_named(key, name, contention).await
    }

    /// An acquisition of `key`, whose object name `name` is known. A caller that fails fast
    /// has looked for a local holder already ([`held_here_for`](Self::held_here_for)): this
    /// looks again only for waiters.
    pub(crate) async fn acquire_named(
        &self,
        key: LockKey,
        name: ObjectName,
        contention: Contention,
    ) -> Result<LockGuard, Error> {
        if self.inner.shut.load(Ordering::SeqCst) {
            return Err(Error::ShutDown);
        }
        let cfg = &self.inner.config;
        let local = &self.inner.local;
        // Waiters of this client queue locally; only the head of the queue talks to the
        // backend. Fail-fast callers do not queue.
        let _turn = match contention {
            Contention::Fail => None,
            // Boxed (as is every wait below): only waiters pay for the room these take.
            Contention::WaitUntil(deadline) => match Box::pin(local.queue(&name, deadline)).await {
                Some(turn) => Some(turn),
                None => return Err(self.held_here(&name)),
            },
        };
        // Held by a healthy lease of ours: certainly held, no request needed.
        if let Contention::WaitUntil(deadline) = contention {
            while let Some(lease) = local.healthy_holder(&name) {
                Box::pin(self.wait_for_local(&lease, deadline)).await?
            }
        }
        let owner = new_owner(&cfg.identity);
        self.create_first(key, name, owner, contention).await
    }

    /// A fail-fast acquisition of `key` (object `name`; the caller has looked for a local
    /// holder already), done here and now when the backend answers at once: its create is
    /// polled once, without a waker, and a lock taken needs no acquisition future (only the
    /// backend's own). Anything else (the lock is held, the backend failed or throttles, or
    /// it did not answer at once after all) is handed on as the rest of the acquisition,
    /// which goes on exactly as the acquisition's future would have from that create.
    pub(crate) fn acquire_in_place(&self, key: LockKey, name: ObjectName) -> InPlace {
        let inner = &self.inner;
        if inner.shut.load(Ordering::SeqCst) {
            return InPlace::Done(Err(Error::ShutDown));
        }
        let cfg = &inner.config;
        let owner = new_owner(&cfg.identity);
        // A lock taken here may start the lease driver, which needs a runtime; and with the
        // throttle seen lately, a create is likely refused and then waits anyway.
        if !inner.backend.answers_at_once() || inner.recently_throttled() || !lease::on_runtime() {
            let client = self.clone();
            return InPlace::Rest(Box::pin(async move {
                client
                    .create_first(key, name, owner, Contention::Fail)
                    .await
            }));
        }
        let md = object::lock_metadata(cfg.ttl, &cfg.ttl_text, &owner, (cfg.clock)());
        let sent = Instant::now();
        let polled = inner.backend.create(&name, &md).answer_now();
        let known = match polled {
            Poll::Ready(Ok(reply)) => {
                return InPlace::Done(Ok(self.took(key, name, owner, reply.into_value(), sent)));
            }
            Poll::Ready(Err(e)) if !e.is_transient() => {
                let first = Attempted {
                    result: Err(e),
                    ambiguous: false,
                    first_sent: sent,
                };
                let client = self.clone();
                return InPlace::Rest(Box::pin(async move {
                    let contention = Contention::Fail;
                    client
                        .contended(key, name, owner, contention, sent, false, Some(first))
                        .await
                }));
            }
            // Retried below as the acquisition's future retries it: after the same pause,
            // within the same budget.
            Poll::Ready(Err(e)) => Some(e),
            // A backend that did not answer at once after all: its request is dropped
            // half-way and sent again below by the same owner, so that a create of ours that
            // landed after all is found (412, then our owner id) and adopted.
            Poll::Pending => None,
        };
        let client = self.clone();
        InPlace::Rest(Box::pin(async move {
            client.create_again(key, name, owner, sent, known).await
        }))
    }

    /// The rest of an in-place acquisition whose create, sent at `sent`, failed with the
    /// transient error `known` (or got no answer: `None`).
    async fn create_again(
        &self,
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        sent: Instant,
        mut known: Option<BackendError>,
    ) -> Result<LockGuard, Error> {
        let inner = &*self.inner;
        let cfg = &inner.config;
        let backend = &*inner.backend;
        let md = object::lock_metadata(cfg.ttl, &cfg.ttl_text, &owner, (cfg.clock)());
        let give_up_at = sent + cfg.retry.max_elapsed();
        let unanswered = known.is_none();
        let op = || match known.take() {
            Some(e) => BackendFuture::ready(Err(e)),
            None => backend.create(&name, &md),
        };
        let a = inner.call_with(op, Some(give_up_at), true).await;
        // `sent` stands for every create of this acquisition: the first may have landed, and
        // the lease is timed from the earliest.
        let first = Attempted {
            ambiguous: a.ambiguous || unanswered,
            first_sent: sent,
            ..a
        };
        match first.result {
            Ok(reply) => Ok(self.took(key, name, owner, reply.into_value(), sent)),
            Err(_) => {
                let contention = Contention::Fail;
                self.contended(key, name, owner, contention, sent, false, Some(first))
                    .await
            }
        }
    }

    /// An acquisition by `owner` from its first create on.
    async fn create_first(
        &self,
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        contention: Contention,
    ) -> Result<LockGuard, Error> {
        // A waiter on a throttled backend: the lock may have been released (deleted) a moment
        // ago, and a create now would be refused. It reads first, and creates after the
        // absence window.
        let throttled =
            matches!(contention, Contention::WaitUntil(_)) && self.inner.recently_throttled();
        let mut first = None;
        if !throttled {
            // Most acquisitions are this one create: only it lives in this future, and the
            // rest of the protocol (contention, ambiguity, takeover) in a boxed one.
            let a = self.write(&name, &owner, contention, None).await;
            match a.result {
                Ok(reply) => {
                    return Ok(self.took(key, name, owner, reply.into_value(), a.first_sent));
                }
                Err(e) => {
                    first = Some(Attempted {
                        result: Err(e),
                        ambiguous: a.ambiguous,
                        first_sent: a.first_sent,
                    })
                }
            }
        }
        // The acquisition began when its first write was sent (no clock read before it).
        let started = first.as_ref().map_or_else(Instant::now, |a| a.first_sent);
        let rest = self.contended(key, name, owner, contention, started, throttled, first);
        Box::pin(rest).await
    }

    /// One write of a fresh lock object: a create, or a takeover of the object at `expired`
    /// (a waiter does not retry a throttled write: it goes back to reading).
    fn write<'a>(
        &'a self,
        name: &'a str,
        owner: &Arc<str>,
        contention: Contention,
        expired: Option<crate::backend::Version>,
    ) -> impl Future<Output = Attempted<Reply<ObjectState>>> + 'a {
        let cfg = &self.inner.config;
        let md = object::lock_metadata(cfg.ttl, &cfg.ttl_text, owner, (cfg.clock)());
        let retry_429 = matches!(contention, Contention::Fail);
        let backend = &*self.inner.backend;
        async move {
            match expired {
                Some(v) => {
                    self.call(|| backend.takeover(name, v, &md), retry_429)
                        .await
                }
                None => self.call(|| backend.create(name, &md), retry_429).await,
            }
        }
    }

    /// The rest of an acquisition once its `first` create did not take the lock (or, for a
    /// waiter on a throttled backend, before any create).
    #[allow(clippy::too_many_arguments)]
    async fn contended(
        &self,
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        contention: Contention,
        started: Instant,
        throttled: bool,
        mut first: Option<Attempted<Reply<ObjectState>>>,
    ) -> Result<LockGuard, Error> {
        let cfg = &self.inner.config;
        let backend = &*self.inner.backend;
        let local = &self.inner.local;
        let mut polls = cfg.poll.delays();
        let mut first_write: Option<Instant> = None;
        let mut rounds = 0;
        // Wait mode: whether we saw another holder, and are taking a second look at its absence.
        let mut seen_held = throttled;
        let mut confirming = false;
        // Wait mode: when the last read that found the lock held was sent. The next look comes
        // no later than a poll cap after it (the cap bounds a waiter's hand-over).
        let mut held_look: Option<Instant> = None;
        // Wait mode, backend throttling: since when, and for how long, the lock must be seen
        // absent before we create.
        let mut absent: Option<(Instant, Duration)> = None;
        let mut step = if throttled {
            Step::Inspect
        } else {
            Step::Create
        };
        loop {
            match step {
                Step::Create | Step::Takeover(_) => {
                    let a = match (step, first.take()) {
                        (Step::Create, Some(a)) => a,
                        (Step::Takeover(v), _) => {
                            self.write(&name, &owner, contention, Some(v)).await
                        }
                        _ => self.write(&name, &owner, contention, None).await,
                    };
                    first_write.get_or_insert(a.first_sent);
                    match a.result {
                        Ok(reply) => {
                            tracing::debug!(target: "dimutex", key_id = crate::key_id(&key), elapsed_ms = started.elapsed().as_millis() as u64, "acquired");
                            return Ok(self.hold(
                                key,
                                name,
                                owner,
                                reply.into_value(),
                                a.first_sent,
                            ));
                        }
                        Err(BackendError::PreconditionFailed) => step = Step::Inspect,
                        Err(BackendError::NotFound) if matches!(step, Step::Takeover(_)) => {
                            step = Step::Inspect
                        }
                        Err(BackendError::NotFound) => {
                            return Err(Error::Backend(BackendError::BucketNotFound));
                        }
                        Err(e) if e.is_rate_limited() => {
                            // Waiting: the object was mutated within the last second (the
                            // lock just changed hands). Read again once that window is over
                            // instead of sending more writes.
                            let Contention::WaitUntil(deadline) = contention else {
                                return Err(self.failure(e));
                            };
                            let now = Instant::now();
                            if now >= deadline {
                                return Err(self.failure(e));
                            }
                            let pause = jitter(MUTATION_WINDOW / 2);
                            Box::pin(tokio::time::sleep(pause.min(deadline - now))).await;
                            seen_held = true;
                            step = Step::Inspect;
                        }
                        Err(e) => return Err(self.failure(e)),
                    }
                }
                Step::Inspect => {
                    let a = self.call(|| backend.inspect(&name), true).await;
                    let sent = a.first_sent;
                    let reply = a.result.map_err(|e| self.failure(e))?;
                    let server_now = reply.server_time().unwrap_or_else(SystemTime::now);
                    let Some(state) = reply.into_value() else {
                        if seen_held && self.inner.recently_throttled() {
                            // The backend enforces its mutation limit, and the lock was just
                            // released: create only once it has been seen absent for a whole
                            // (jittered) window, reading at least twice a second. A holder
                            // lives at least that window (its delete waits it out too), so a
                            // create-and-delete of another waiter cannot slip between two
                            // reads, and our create cannot meet a 429. The jitter lets one of
                            // many waiters go first; the others read the new holder.
                            let now = Instant::now();
                            let (since, window) = *absent.get_or_insert_with(|| {
                                (now, MUTATION_WINDOW + jitter(MUTATION_WINDOW))
                            });
                            let waited = now.duration_since(since);
                            if waited < window {
                                let mut pause = (window - waited).min(MUTATION_WINDOW / 2);
                                if let Contention::WaitUntil(deadline) = contention {
                                    pause = pause.min(deadline.saturating_duration_since(now));
                                }
                                Box::pin(tokio::time::sleep(pause)).await;
                                if matches!(contention, Contention::WaitUntil(d) if Instant::now() < d)
                                {
                                    continue;
                                }
                            }
                            absent = None;
                        } else if seen_held && !confirming {
                            // A waiter that saw the lock go: wait a random moment and look
                            // again, so that of many waiters one creates and the others read
                            // the new holder, instead of all sending creates at once.
                            // The moment comes out of the poll cap, not on top of it.
                            confirming = true;
                            if let Contention::WaitUntil(deadline) = contention {
                                let mut until =
                                    deadline.min(Instant::now() + jitter(cfg.poll.min()));
                                if let Some(look) = held_look {
                                    until = until.min(look + cfg.poll.max());
                                }
                                Box::pin(tokio::time::sleep_until(until.into())).await;
                            }
                            continue;
                        }
                        confirming = false;
                        rounds += 1;
                        let give_up = match contention {
                            Contention::Fail => rounds >= TRY_ROUNDS,
                            Contention::WaitUntil(deadline) => Instant::now() >= deadline,
                        };
                        if give_up {
                            return Err(Error::Held { remaining: None });
                        }
                        step = Step::Create;
                        continue;
                    };
                    if object::owner_of(&state) == Some(&*owner) {
                        // One of our own writes landed although its reply was lost.
                        let sent = first_write.unwrap_or(started);
                        if sent + cfg.ttl - cfg.margin() > Instant::now() {
                            tracing::debug!(target: "dimutex", key_id = crate::key_id(&key), "adopted our own landed write");
                            return Ok(self.hold(key, name, owner, state, sent));
                        }
                        step = Step::Takeover(state.version());
                        continue;
                    }
                    confirming = false;
                    absent = None;
                    match object::judge(&state, server_now, cfg.ttl) {
                        Verdict::Expired => step = Step::Takeover(state.version()),
                        Verdict::Held { remaining } => match contention {
                            Contention::Fail => {
                                return Err(Error::Held {
                                    remaining: Some(remaining),
                                });
                            }
                            Contention::WaitUntil(deadline) => {
                                seen_held = true;
                                let now = Instant::now();
                                if now >= deadline {
                                    return Err(Error::Held {
                                        remaining: Some(remaining),
                                    });
                                }
                                if let Some(lease) = local.healthy_holder(&name) {
                                    // Taken by another task of ours meanwhile: wait for its
                                    // release instead of polling.
                                    Box::pin(self.wait_for_local(&lease, deadline)).await?;
                                    step = Step::Create;
                                    continue;
                                }
                                // Counted from this read's send, so reads are at most a cap
                                // apart; but no sooner than the poll minimum after its answer,
                                // so a slow backend is not read back to back.
                                held_look = Some(sent);
                                let next = (sent + polls.next_delay())
                                    .max(Instant::now() + cfg.poll.min())
                                    .min(deadline);
                                Box::pin(tokio::time::sleep_until(next.into())).await;
                                if self.inner.shut.load(Ordering::SeqCst) {
                                    return Err(Error::ShutDown);
                                }
                            }
                        },
                    }
                }
            }
        }
    }

    /// Waits (until `deadline`) for a lease of this client to end; "held" at the deadline.
    async fn wait_for_local(
        &self,
        lease: &Arc<LeaseShared>,
        deadline: Instant,
    ) -> Result<(), Error> {
        match tokio::time::timeout_at(deadline.into(), lease.ended()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::Held {
                remaining: Some(local::remaining(lease, self.inner.config.margin())),
            }),
        }
    }

    /// How long the lock object `name` may stay held, if a healthy lease of this client
    /// holds it.
    pub(crate) fn held_here_for(&self, name: &ObjectName) -> Option<Duration> {
        self.inner
            .local
            .held_for(name.as_bytes(), self.inner.config.margin())
    }

    /// "Held" for a waiter whose deadline passed in the local queue.
    fn held_here(&self, name: &ObjectName) -> Error {
        Error::Held {
            remaining: self.held_here_for(name),
        }
    }

    /// Turns a backend error that ends an acquisition into the client's error.
    fn failure(&self, e: BackendError) -> Error {
        self.inner.failure(e)
    }

    /// The lock taken by the create sent at `sent` (its only write): logged, and held.
    fn took(
        &self,
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        state: ObjectState,
        sent: Instant,
    ) -> LockGuard {
        tracing::debug!(target: "dimutex", key_id = crate::key_id(&key), elapsed_ms = sent.elapsed().as_millis() as u64, "acquired");
        self.hold(key, name, owner, state, sent)
    }

    fn hold(
        &self,
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        state: ObjectState,
        sent: Instant,
    ) -> LockGuard {
        let inner = &self.inner;
        let cfg = &inner.config;
        let id = lease::next_id();
        let shared = Arc::new(LeaseShared::new(
            id,
            key,
            name,
            owner,
            state.version(),
            sent,
            sent + cfg.ttl - cfg.margin(),
        ));
        inner.local.insert(shared.clone());
        inner.hold(id, lease::Lease::new(inner.clone(), shared.clone()), sent);
        LockGuard::new(shared, inner.clone())
    }

    /// [`Inner::call_with`] with the policy's deadline (its future itself: no wrapper).
    fn call<'a, T, F>(
        &'a self,
        op: F,
        retry_rate_limited: bool,
    ) -> impl Future<Output = Attempted<T>> + 'a
    where
        F: FnMut() -> BackendFuture<'a, Result<T, BackendError>> + 'a,
        T: 'a,
    {
        self.inner.call_with(op, None, retry_rate_limited)
    }
}

impl Inner {
    /// Hands lease `id` (its acquisition sent at `sent`) to the lease driver, started on the
    /// current runtime if there is none (or its runtime has stopped).
    fn hold(&self, id: u64, lease: lease::Lease, sent: Instant) {
        if !self.inbox.post(id, lease, sent) {
            return;
        }
        let mut driver = self.driver.lock().unwrap_or_else(|e| e.into_inner());
        match &*driver {
            Some(handle) if !handle.is_closed() => handle.wake(),
            _ => {
                *driver = Some(lease::spawn_driver(
                    self.inbox.clone(),
                    self.shutdown.subscribe(),
                ))
            }
        }
    }

    /// The lease driver, for a guard's release that needs it; never starts one (a guard may
    /// be dropped anywhere). Sending to a driver whose runtime stopped fails: the lease then
    /// expires.
    pub(crate) fn driver(&self) -> Option<lease::DriverHandle> {
        self.driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts lease `id` among the live ones.
    pub(crate) fn lease_opened(&self, id: u64) {
        self.live.add(lease::part_of(id));
    }

    /// Takes lease `id` off the live ones.
    pub(crate) fn lease_closed(&self, id: u64) {
        if self.live.remove(lease::part_of(id)) {
            self.drained.notify();
        }
    }

    /// Sends one request, retrying transient failures per the retry policy until `give_up_at`
    /// (default: the policy's `max_elapsed` from now).
    pub(crate) fn call<'a, T, F>(
        &'a self,
        op: F,
        give_up_at: Option<Instant>,
    ) -> impl Future<Output = Attempted<T>> + 'a
    where
        F: FnMut() -> BackendFuture<'a, Result<T, BackendError>> + 'a,
        T: 'a,
    {
        self.call_with(op, give_up_at, true)
    }

    /// [`call`](Self::call), retrying 429s only if `retry_rate_limited`.
    pub(crate) async fn call_with<'a, T, F>(
        &self,
        mut op: F,
        give_up_at: Option<Instant>,
        retry_rate_limited: bool,
    ) -> Attempted<T>
    where
        F: FnMut() -> BackendFuture<'a, Result<T, BackendError>>,
    {
        let first_sent = Instant::now();
        let give_up_at = give_up_at.unwrap_or(first_sent + self.config.retry.max_elapsed());
        let mut delays = self.config.retry.backoff().delays();
        let mut ambiguous = false;
        loop {
            let result = match deadline::within(self.config.request_timeout, op()).await {
                Some(result) => result,
                None => Err(BackendError::Transient {
                    status: None,
                    retry_after: None,
                    message: format!("no reply within {:?}", self.config.request_timeout),
                }),
            };
            if matches!(&result, Err(e) if e.is_rate_limited()) {
                self.note_throttled();
            }
            // The reply is not kept across the pause: a smaller future for every acquisition.
            let delay = match result {
                Err(e) if e.is_transient() && (retry_rate_limited || !e.is_rate_limited()) => {
                    // A 429 is refused before it is applied; anything else may have landed.
                    ambiguous |= !e.is_rate_limited();
                    let mut delay = delays.next_delay();
                    if e.is_rate_limited() {
                        // About one mutation per second per object: sooner is refused again.
                        delay = delay.max(MUTATION_WINDOW);
                    }
                    if let BackendError::Transient {
                        retry_after: Some(after),
                        ..
                    } = &e
                    {
                        delay = delay.max((*after).min(self.config.retry.backoff().max()));
                    }
                    if Instant::now() + delay > give_up_at {
                        return Attempted {
                            result: Err(e),
                            ambiguous,
                            first_sent,
                        };
                    }
                    tracing::debug!(target: "dimutex", error = %e, delay_ms = delay.as_millis() as u64, "transient failure; retrying");
                    delay
                }
                result => {
                    return Attempted {
                        result,
                        ambiguous,
                        first_sent,
                    };
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Remembers that the backend enforces its per-object mutation limit.
    pub(crate) fn note_throttled(&self) {
        let at = lease::since_origin(Instant::now()).saturating_add(1);
        self.throttled_at.store(at, Ordering::Relaxed);
    }

    /// Whether the backend answered 429 in the last minute.
    pub(crate) fn recently_throttled(&self) -> bool {
        match self.throttled_at.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let elapsed = lease::since_origin(Instant::now()).saturating_sub(at - 1);
                elapsed < THROTTLE_MEMORY.as_nanos() as u64
            }
        }
    }

    pub(crate) fn failure(&self, e: BackendError) -> Error {
        match e {
            BackendError::Transient { retry_after, .. } => Error::Unavailable {
                retry_after: retry_after.or(Some(self.config.retry.backoff().max())),
                source: e,
            },
            e => Error::Backend(e),
        }
    }
}

/// GCS allows about one mutation per second per object name.
pub(crate) const MUTATION_WINDOW: Duration = Duration::from_secs(1);

/// How long a 429 makes waiters of this client wait out the mutation window after a release
/// before they create.
const THROTTLE_MEMORY: Duration = Duration::from_secs(60);

/// A random delay up to `max`.
fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::random_range(0.0..=1.0))
}

/// A fresh owner: the readable identity and a random 128-bit nonce.
fn new_owner(identity: &str) -> Arc<str> {
    let nonce = nonce();
    if identity.len() > MAX_IDENTITY_LEN {
        return format!("{identity}#{nonce:032x}").into();
    }
    // Written in place: one allocation.
    let mut buf = [0u8; MAX_IDENTITY_LEN + 33];
    let (name, rest) = buf.split_at_mut(identity.len());
    name.copy_from_slice(identity.as_bytes());
    rest[0] = b'#';
    for (pair, byte) in rest[1..33].chunks_exact_mut(2).zip(nonce.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte) * 2..][..2]);
    }
    // The identity (UTF-8) and ASCII.
    Arc::from(std::str::from_utf8(&buf[..identity.len() + 33]).unwrap_or_default())
}

/// "000102…feff": a byte's two hex digits at twice its value.
const HEX_PAIRS: [u8; 512] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 512];
    let mut i = 0;
    while i < 256 {
        out[2 * i] = HEX[i >> 4];
        out[2 * i + 1] = HEX[i & 0xf];
        i += 1;
    }
    out
};

/// A 128-bit value never handed out before in this process, nor (but with a chance of
/// 2^-64) in another: a random half chosen once per thread, and a count. An owner id only
/// has to be unique per acquisition (it tells our own landed write from anyone else's);
/// drawing 128 fresh random bits for each cost more than the rest of the id.
fn nonce() -> u128 {
    thread_local! {
        /// This thread's random half (0: not drawn yet) and its count.
        static NONCE: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    NONCE
        .try_with(|n| {
            let (mut half, count) = n.get();
            if half == 0 {
                half = rand::random::<u64>() | 1;
            }
            n.set((half, count.wrapping_add(1)));
            (u128::from(half) << 64) | u128::from(count)
        })
        // A thread being torn down: fresh random bits.
        .unwrap_or_else(|_| rand::random())
}

/// The longest identity [`ClientBuilder::identity`] accepts, in bytes.
const MAX_IDENTITY_LEN: usize = 256;

/// Configures a [`Client`]. Invalid settings are reported by [`build`](Self::build), never
/// silently adjusted.
///
/// ```
/// use std::time::Duration;
/// use dimutex::{Backoff, Client, RetryPolicy, backend::MemoryBackend};
///
/// let client = Client::builder(MemoryBackend::new())
///     .prefix("locks/")
///     .ttl(Duration::from_secs(15))
///     .refresh_interval(Duration::from_secs(5))
///     .identity("worker-3")
///     .request_timeout(Duration::from_secs(3))
///     .retry(RetryPolicy::new(Backoff::default(), Duration::from_secs(4)))
///     .poll(Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 3.0)?)
///     .build()?;
/// # Ok::<(), dimutex::ConfigError>(())
/// ```
#[must_use]
pub struct ClientBuilder {
    backend: Arc<dyn Backend>,
    prefix: String,
    ttl: Duration,
    refresh_interval: Option<Duration>,
    identity: Option<String>,
    request_timeout: Duration,
    retry: RetryPolicy,
    poll: Backoff,
    clock: WallClock,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("backend", &self.backend)
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The shortest allowed lease.
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// The shortest allowed refresh interval.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

impl ClientBuilder {
    fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            prefix: "dimutex/".into(),
            ttl: Duration::from_secs(30),
            refresh_interval: None,
            identity: None,
            request_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            poll: Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 3.0)
                .expect("valid default"),
            clock: Arc::new(SystemTime::now),
        }
    }

    /// The prefix of lock object names (default `dimutex/`). Prefix and key together must fit
    /// in 1024 bytes.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The lease length (default 30 s; at least [`MIN_TTL`]). A holder that cannot refresh
    /// loses its lease this long after its last successful write was sent (minus a tenth of
    /// the ttl as a safety margin); others may take the lock over 1 s after that by the
    /// server's clock.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How often a held lease is refreshed (default a third of the ttl; at least
    /// [`MIN_REFRESH_INTERVAL`] and at most half the ttl).
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = Some(interval);
        self
    }

    /// The readable part of the owner written into lock objects (default `hostname:pid`); a
    /// random nonce per acquisition is appended. At most 256 bytes, no control characters,
    /// no `#`.
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// How long one request may take before it counts as a transient failure (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How transient failures are retried (default [`RetryPolicy::default`]: 100 ms to 2 s
    /// backoff, giving up after 5 s).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How [`Client::acquire`] polls a held lock (default 50 ms to 1 s, multiplier 3).
    ///
    /// Reads of a lock held elsewhere are sent at most the backoff's maximum apart (counted
    /// from send to send; at least the minimum after the previous answer, should a read take
    /// longer than the difference), and a waiter that sees the lock go creates it within that
    /// maximum of its last read that found it held (plus the requests' round trips): the
    /// maximum bounds how long a released lock stays free before a waiter in another process
    /// takes it.
    pub fn poll(mut self, poll: Backoff) -> Self {
        self.poll = poll;
        self
    }

    /// The wall clock used to write the `expires` field that Python `dimutex` reads (default
    /// the system clock). Expiry of this crate's locks is judged on the server's clock only, so
    /// a wrong clock here affects only Python `dimutex` peers.
    pub fn wall_clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Checks the configuration and builds the client.
    pub fn build(self) -> Result<Client, ConfigError> {
        // Started before any of this client's leases: their times are all later.
        lease::since_origin(Instant::now());
        key::validate_prefix(&self.prefix).map_err(|e| ConfigError(format!("prefix: {e}")))?;
        if self.ttl < MIN_TTL {
            return Err(ConfigError(format!(
                "ttl must be at least {MIN_TTL:?}, got {:?}",
                self.ttl
            )));
        }
        if self.ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(ConfigError("ttl must be at most 7 days".into()));
        }
        let refresh_interval = self
            .refresh_interval
            .unwrap_or((self.ttl / 3).max(MIN_REFRESH_INTERVAL));
        if refresh_interval < MIN_REFRESH_INTERVAL || refresh_interval > self.ttl / 2 {
            return Err(ConfigError(format!(
                "refresh interval must be between {MIN_REFRESH_INTERVAL:?} and ttl/2 ({:?}), got {refresh_interval:?}",
                self.ttl / 2
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError("request timeout must be positive".into()));
        }
        let identity = self.identity.unwrap_or_else(default_identity);
        if identity.is_empty()
            || identity.len() > MAX_IDENTITY_LEN
            || identity.contains('#')
            || identity.chars().any(char::is_control)
        {
            return Err(ConfigError(
                "identity must be 1-256 bytes without control characters or '#'".into(),
            ));
        }
        let config = Config {
            prefix: self.prefix,
            ttl: self.ttl,
            ttl_text: object::format_ttl(self.ttl).into(),
            refresh_interval,
            identity,
            request_timeout: self.request_timeout,
            retry: self.retry,
            poll: self.poll,
            clock: self.clock,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                backend: self.backend,
                config,
                live: Count::default(),
                drained: Signal::default(),
                inbox: Arc::new(lease::Inbox::new()),
                driver: std::sync::Mutex::new(None),
                shutdown: watch::Sender::new(false),
                shut: AtomicBool::new(false),
                local: Local::default(),
                throttled_at: AtomicU64::new(0),
            }),
        })
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['#', ':'], "_"))
        .filter(|h| !h.is_empty() && h.len() <= 200 && !h.chars().any(char::is_control))
        .unwrap_or_else(|| "unknown".into());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    #[test]
    fn invalid_configuration_is_an_error() {
        let b = || Client::builder(MemoryBackend::new());
        assert!(b().ttl(Duration::from_secs(1)).build().is_err());
        assert!(
            b().ttl(Duration::from_secs(10))
                .refresh_interval(Duration::from_secs(6))
                .build()
                .is_err()
        );
        assert!(
            b().refresh_interval(Duration::from_millis(500))
                .build()
                .is_err()
        );
        assert!(b().request_timeout(Duration::ZERO).build().is_err());
        assert!(b().identity("").build().is_err());
        assert!(b().identity("a#b").build().is_err());
        assert!(b().prefix("bad\nprefix").build().is_err());
        let ok = b().ttl(Duration::from_secs(3)).build().unwrap();
        assert_eq!(ok.refresh_interval(), Duration::from_secs(1));
    }

    #[test]
    fn owners_are_unique_and_carry_the_identity() {
        let a = new_owner("host:1");
        assert!(a.starts_with("host:1#"));
        let nonce = &a["host:1#".len()..];
        assert_eq!(nonce.len(), 32);
        assert!(
            nonce
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(a, new_owner("host:1"));
        // Unique across threads and acquisitions.
        let owners: Vec<Arc<str>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..1000).map(|_| new_owner("h")).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("owner thread"))
                .collect()
        });
        let distinct: std::collections::HashSet<&str> = owners.iter().map(|o| &**o).collect();
        assert_eq!(distinct.len(), owners.len());
        // The longest identity, multi-byte characters, and (not accepted by the builder, but
        // handled) a longer one.
        for identity in [
            "é".repeat(MAX_IDENTITY_LEN / 2),
            "x".repeat(MAX_IDENTITY_LEN + 1),
        ] {
            let owner = new_owner(&identity);
            assert_eq!(owner.len(), identity.len() + 33);
            assert!(owner.starts_with(&format!("{identity}#")));
        }
    }
}
