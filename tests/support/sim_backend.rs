//! The simulated network between the simulation's clients and its store.
//!
//! [`Network`] holds what one run's seed decided about faults: a rate of random faults per
//! request, outage windows (every request refused) and 429 windows (every mutation refused),
//! all on tokio's paused clock. [`Link`] is one client's [`Backend`]: each request waits out
//! its client's pause ([`Link::freeze_for`]: a stopped process sends and hears nothing), takes
//! a few simulated milliseconds each way, and may meet a fault decided when it is sent:
//!
//! | fault | what the client sees | landed |
//! |---|---|---|
//! | outage, 429 window, refused | a transient error | no |
//! | committed then error | a 503 | yes |
//! | reply lost | nothing, until its own timeout | yes |
//! | late reply | the reply, later than the request timeout | yes |
//!
//! [`Blind`] is the deliberately broken store of the harness's own test: every write ignores
//! its preconditions.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dimutex::backend::{
    Backend, BackendError, BoxFuture, MemoryBackend, Metadata, ObjectState, Reply, Version,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// A window of simulated time, from the run's start.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from: Duration,
    pub to: Duration,
}

impl Window {
    fn contains(&self, at: Duration) -> bool {
        (self.from..self.to).contains(&at)
    }
}

/// What a request meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Outage,
    Throttled,
    Refused,
    CommittedThenError,
    ReplyLost,
    LateReply(Duration),
}

/// The faults of one run, shared by every client's link.
#[derive(Debug)]
pub struct Network {
    origin: Instant,
    rng: Mutex<StdRng>,
    /// Random faults per request, in per mille.
    rate: u32,
    outages: Vec<Window>,
    throttles: Vec<Window>,
    /// How late a late reply is: the clients' request timeout and up to 5 s more.
    request_timeout: Duration,
    calm: AtomicBool,
    injected: AtomicU64,
}

impl Network {
    pub fn new(
        seed: u64,
        rate_per_mille: u32,
        outages: Vec<Window>,
        throttles: Vec<Window>,
        request_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            rate: rate_per_mille,
            outages,
            throttles,
            request_timeout,
            calm: AtomicBool::new(false),
            injected: AtomicU64::new(0),
        })
    }

    /// From now on, no request meets a fault (the run's quiet end).
    pub fn calm(&self) {
        self.calm.store(true, Ordering::Relaxed);
    }

    /// Faults applied so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn rng(&self) -> std::sync::MutexGuard<'_, StdRng> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A one-way trip: 1 to 20 simulated milliseconds.
    fn latency(&self) -> Duration {
        Duration::from_millis(self.rng().random_range(1..=20))
    }

    fn draw(&self, mutation: bool) -> Option<Fault> {
        if self.calm.load(Ordering::Relaxed) {
            return None;
        }
        let at = self.origin.elapsed();
        let fault = if self.outages.iter().any(|w| w.contains(at)) {
            Some(Fault::Outage)
        } else if mutation && self.throttles.iter().any(|w| w.contains(at)) {
            Some(Fault::Throttled)
        } else {
            let mut rng = self.rng();
            if rng.random_range(0..1000) >= self.rate {
                None
            } else {
                Some(match rng.random_range(0..4) {
                    0 => Fault::Refused,
                    1 => Fault::CommittedThenError,
                    2 => Fault::ReplyLost,
                    _ => Fault::LateReply(
                        self.request_timeout + Duration::from_millis(rng.random_range(1..5_000)),
                    ),
                })
            }
        };
        if fault.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fault
    }
}

fn transient(status: Option<u16>, message: &str) -> BackendError {
    BackendError::Transient {
        status,
        retry_after: None,
        message: message.to_owned(),
    }
}

/// One client's way to the store.
#[derive(Debug, Clone)]
pub struct Link {
    store: Arc<dyn Backend>,
    network: Arc<Network>,
    frozen_until: Arc<Mutex<Option<Instant>>>,
}

impl Link {
    pub fn new(store: Arc<dyn Backend>, network: Arc<Network>) -> Self {
        Self {
            store,
            network,
            frozen_until: Arc::default(),
        }
    }

    /// Nothing of this client's gets out or back for `pause` (a stopped process).
    pub fn freeze_for(&self, pause: Duration) {
        *self.frozen_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + pause);
    }

    /// Waits until the client's pause is over.
    pub async fn thaw(&self) {
        let until = *self.frozen_until.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    async fn request<'a, T>(
        &'a self,
        mutation: bool,
        send: impl FnOnce(&'a dyn Backend) -> BoxFuture<'a, Result<Reply<T>, BackendError>>,
    ) -> Result<Reply<T>, BackendError> {
        self.thaw().await;
        let fault = self.network.draw(mutation);
        tokio::time::sleep(self.network.latency()).await;
        match fault {
            Some(Fault::Outage) => return Err(transient(None, "simulated outage")),
            Some(Fault::Throttled) => return Err(transient(Some(429), "simulated 429")),
            Some(Fault::Refused) => return Err(transient(Some(503), "simulated 503")),
            _ => {}
        }
        let result = send(self.store.as_ref()).await;
        match fault {
            Some(Fault::CommittedThenError) => {
                return Err(transient(Some(503), "landed, then 503"));
            }
            Some(Fault::ReplyLost) => std::future::pending::<()>().await,
            Some(Fault::LateReply(late)) => tokio::time::sleep(late).await,
            _ => tokio::time::sleep(self.network.latency()).await,
        }
        self.thaw().await;
        result
    }
}

impl Backend for Link {
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(self.request(true, move |s| s.create(name, metadata)))
    }

    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        Box::pin(self.request(false, move |s| s.inspect(name)))
    }

    fn takeover<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(self.request(true, move |s| s.takeover(name, expected, metadata)))
    }

    fn refresh<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(self.request(true, move |s| s.refresh(name, expected, metadata)))
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        Box::pin(self.request(true, move |s| s.release(name, expected)))
    }
}

/// A store whose writes ignore their preconditions: a create overwrites a live object, and
/// takeovers, refreshes and deletes apply to whatever generation is there.
#[derive(Debug, Clone)]
pub struct Blind {
    inner: MemoryBackend,
}

impl Blind {
    pub fn new(inner: MemoryBackend) -> Self {
        Self { inner }
    }

    async fn current(&self, name: &str) -> Result<Option<Version>, BackendError> {
        Ok(self
            .inner
            .inspect(name)
            .await?
            .into_value()
            .map(|s| s.version()))
    }
}

impl Backend for Blind {
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(async move {
            match self.current(name).await? {
                Some(v) => self.inner.takeover(name, v, metadata).await,
                None => self.inner.create(name, metadata).await,
            }
        })
    }

    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        self.inner.inspect(name)
    }

    fn takeover<'a>(
        &'a self,
        name: &'a str,
        _expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        self.create(name, metadata)
    }

    fn refresh<'a>(
        &'a self,
        name: &'a str,
        _expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(async move {
            let v = self.current(name).await?.ok_or(BackendError::NotFound)?;
            self.inner.refresh(name, v, metadata).await
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        _expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        Box::pin(async move {
            let v = self.current(name).await?.ok_or(BackendError::NotFound)?;
            self.inner.release(name, v).await
        })
    }
}
