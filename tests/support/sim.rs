//! One seeded run of the simulation: replicas of a service, each a [`Client`] with a few
//! workers, contend for a few keys over a [`Link`] to one [`MemoryBackend`], on a
//! current-thread runtime with paused time. Everything a run does follows from its seed:
//!
//! - the plan ([`Plan::draw`]): replicas, workers, keys, ttl (the default or 10 s), length,
//!   the rate of random faults, outage and 429 windows, and each client's wall clock (off by
//!   up to ±300 s);
//! - each worker's operations: `try_acquire` or `acquire` with a deadline and a hold of random
//!   length (some longer than the ttl, so refreshes run), a release or a dropped guard; an
//!   acquisition dropped at a random moment; a request through [`LockLayer`] whose client
//!   disconnects at a random moment; a paused holder (its replica's link frozen past the
//!   ttl, then a late write to the fenced store);
//! - each replica's life: it is shut down (grace 5 s or 30 s) at a random moment, in the
//!   middle of its workers' operations, and restarts under a new identity; at the end every
//!   replica is shut down in calm conditions.
//!
//! The randomness and clocks of the library follow too: tokio's paused clock is the library's
//! monotonic clock and the store's server clock, and [`dimutex::testing::seed_random`] seeds
//! its nonces and jitter. The history goes to the reliability suite's [`Checker`], with what
//! only the simulation knows: shutdowns (the cause of lost signals), paused holders, and the
//! checks of [`World::judge`].

#![allow(dead_code)]

use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dimutex::backend::{Backend, MemoryBackend};
use dimutex::layer::{FromHeader, LockLayer};
use dimutex::{Client, Error, HeldLock, LockGuard};
use http::{Request, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

use super::fenced::Resource;
use super::history::{Checker, Event, History, Kind, Outcome, Recording};
use super::sim_backend::{Blind, Link, Network, Window};

const PREFIX: &str = "sim/";

/// What a run's seed decided.
#[derive(Debug, Clone)]
pub struct Plan {
    pub replicas: usize,
    pub workers: usize,
    pub keys: usize,
    /// `None`: the client's default (30 s).
    pub ttl: Option<Duration>,
    pub length: Duration,
    pub fault_per_mille: u32,
    pub outages: Vec<Window>,
    pub throttles: Vec<Window>,
    /// Each replica's wall clock, off by this many seconds.
    pub skews: Vec<i64>,
}

impl Plan {
    pub fn draw(rng: &mut StdRng) -> Self {
        let replicas = rng.random_range(2..=4);
        let length = Duration::from_secs(rng.random_range(120..=600));
        let windows = |rng: &mut StdRng, n: usize, longest: u64| -> Vec<Window> {
            (0..n)
                .map(|_| {
                    let from = Duration::from_secs(rng.random_range(0..length.as_secs()));
                    let to = from + Duration::from_millis(rng.random_range(500..=longest * 1000));
                    Window { from, to }
                })
                .collect()
        };
        let outages = rng.random_range(0..=2);
        let throttles = rng.random_range(0..=2);
        Plan {
            replicas,
            workers: rng.random_range(1..=3),
            keys: rng.random_range(1..=3),
            ttl: rng.random_bool(0.5).then(|| Duration::from_secs(10)),
            length,
            fault_per_mille: [0, 20, 50, 100][rng.random_range(0..4)],
            outages: windows(rng, outages, 40),
            throttles: windows(rng, throttles, 20),
            skews: (0..replicas)
                .map(|_| rng.random_range(-300..=300))
                .collect(),
        }
    }

    fn ttl(&self) -> Duration {
        self.ttl.unwrap_or(Duration::from_secs(30))
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Verdict {
    pub seed: u64,
    pub plan: Plan,
    pub violations: Vec<String>,
    /// A hash of the whole history: equal on every run of one seed.
    pub digest: u64,
    /// Client-level operations and backend requests.
    pub operations: usize,
    pub simulated: Duration,
    pub faults: u64,
    /// The history, for a seed run alone.
    pub events: Vec<Event>,
}

/// Runs seed `seed` to its end on a runtime of its own; `blind` puts the store that ignores
/// preconditions behind every client.
pub fn run(seed: u64, blind: bool) -> Verdict {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    dimutex::testing::seed_random(seed);
    runtime.block_on(simulate(seed, blind))
}

async fn simulate(seed: u64, blind: bool) -> Verdict {
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = Plan::draw(&mut rng);
    let memory = MemoryBackend::new();
    let store: Arc<dyn Backend> = if blind {
        Arc::new(Blind::new(memory.clone()))
    } else {
        Arc::new(memory.clone())
    };
    let network = Network::new(
        rng.random(),
        plan.fault_per_mille,
        plan.outages.clone(),
        plan.throttles.clone(),
        Duration::from_secs(5),
    );
    let history = History::new();
    let world = Arc::new(World {
        resource: Resource::fenced(history.clone()),
        history,
        store,
        network,
        start: Instant::now(),
        // A fixed moment: the `expires` the clients write (to the second) then round alike on
        // every run.
        wall_start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        plan,
        shutdowns: Mutex::default(),
        paused: Mutex::default(),
        violations: Mutex::default(),
    });
    let replicas: Vec<_> = (0..world.plan.replicas)
        .map(|i| tokio::spawn(replica(world.clone(), i, rng.random())))
        .collect();
    for r in replicas {
        if let Err(e) = r.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    world.judge(seed, &memory).await
}

/// A `shutdown()` as the simulation saw it.
#[derive(Debug, Clone)]
struct Shutdown {
    client: String,
    start: Duration,
    end: Duration,
    ok: bool,
}

/// One run's shared state.
pub struct World {
    history: Arc<History>,
    resource: Resource,
    store: Arc<dyn Backend>,
    network: Arc<Network>,
    start: Instant,
    wall_start: SystemTime,
    plan: Plan,
    shutdowns: Mutex<Vec<Shutdown>>,
    paused: Mutex<Vec<String>>,
    violations: Mutex<Vec<String>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    fn running(&self) -> bool {
        self.start.elapsed() < self.plan.length
    }

    fn violation(&self, v: String) {
        locked(&self.violations).push(v);
    }

    fn client(&self, id: &str, link: Link, skew: i64) -> Client {
        let (start, wall_start) = (self.start, self.wall_start);
        let clock = move || {
            let now = wall_start + start.elapsed();
            let off = Duration::from_secs(skew.unsigned_abs());
            if skew < 0 { now - off } else { now + off }
        };
        let backend = Recording::new(link, self.history.clone(), id, PREFIX);
        let mut builder = Client::builder(backend)
            .prefix(PREFIX)
            .identity(id)
            .wall_clock(clock);
        if let Some(ttl) = self.plan.ttl {
            builder = builder.ttl(ttl);
        }
        builder.build().expect("a valid client")
    }

    /// A waiting acquisition keeps trying until its deadline: one that reports the backend
    /// unavailable sooner than a backoff step (2 s by default) and a request (5 s) before it,
    /// as one with a 5 s budget did (issue 16, hole 2), is a violation.
    fn gave_up_early(
        &self,
        id: &str,
        key: &str,
        result: &Result<LockGuard, Error>,
        deadline: Instant,
    ) {
        const SLACK: Duration = Duration::from_secs(7);
        let Err(e) = result else { return };
        let left = deadline.saturating_duration_since(Instant::now());
        if !e.is_held() && !matches!(e, Error::ShutDown) && left > SLACK {
            self.violation(format!(
                "{id}: acquire({key}) gave up {left:?} before its deadline: {e}"
            ));
        }
    }

    async fn shut_down(&self, client: &Client, id: &str, grace: Duration) -> bool {
        let start = self.history.now();
        let ok = client.shutdown(grace).await.is_ok();
        let end = self.history.now();
        locked(&self.shutdowns).push(Shutdown {
            client: id.to_owned(),
            start,
            end,
            ok,
        });
        ok
    }

    /// Records an acquisition; `Err` once the client is shut down.
    fn record_acquire(
        &self,
        start: Duration,
        id: &str,
        key: &str,
        result: Result<LockGuard, Error>,
    ) -> Result<Option<LockGuard>, ()> {
        let h = &self.history;
        match result {
            Ok(guard) => {
                let token = guard.token().get();
                h.complete(start, Kind::Acquire, key, id, Some(token), Outcome::Ok, "");
                Ok(Some(guard))
            }
            Err(e) => {
                let outcome = if e.is_held() || matches!(e, Error::ShutDown) {
                    Outcome::Failed
                } else {
                    Outcome::Unknown
                };
                h.complete(start, Kind::Acquire, key, id, None, outcome, e.to_string());
                if matches!(e, Error::ShutDown) {
                    Err(())
                } else {
                    Ok(None)
                }
            }
        }
    }

    async fn release(&self, guard: LockGuard, id: &str) {
        let _ = self.history.release(guard, id).await;
    }

    /// The critical section of a well-behaved holder: it increments the fenced counter, keeps
    /// the lock for `hold`, and stops at once when the lease is lost.
    async fn hold(&self, guard: LockGuard, id: &str, rng: &mut StdRng) {
        let key = guard.key().as_str().to_owned();
        let token = guard.token().get();
        let ttl = self.plan.ttl();
        let hold = match rng.random_range(0..10) {
            0..6 => Duration::from_millis(rng.random_range(0..2_000)),
            6..9 => ttl.mul_f64(rng.random_range(0.1..2.0)),
            _ => ttl.mul_f64(rng.random_range(2.0..4.0)),
        };
        let think = Duration::from_millis(rng.random_range(0..50));
        let section = Section::enter(&self.history, &key, id, token);
        let work = async {
            self.resource.increment(&key, id, token, think).await;
            tokio::time::sleep(hold).await;
        };
        tokio::select! {
            biased;
            () = guard.lost() => self.history.point(Kind::Lost, &key, id, Some(token)),
            () = work => {}
        }
        drop(section);
        if rng.random_bool(0.75) {
            self.release(guard, id).await;
        }
    }

    /// A holder whose process stops for longer than the ttl: its link is frozen and it does
    /// nothing; then it writes what it read before, as a holder that does not look at its
    /// lease would, and releases.
    async fn paused(&self, guard: LockGuard, id: &str, link: &Link, rng: &mut StdRng) {
        let key = guard.key().as_str().to_owned();
        let token = guard.token().get();
        let as_paused = format!("{id}~paused");
        locked(&self.paused).push(as_paused.clone());
        let section = Section::enter(&self.history, &key, &as_paused, token);
        let read = self.resource.read(&key);
        let pause = self.plan.ttl().mul_f64(rng.random_range(1.2..2.5));
        link.freeze_for(pause);
        tokio::time::sleep(pause).await;
        let taken = self.history.events().iter().any(|e| {
            e.kind == Kind::Acquire
                && e.key == key
                && e.outcome == Outcome::Ok
                && e.token.is_some_and(|t| t > token)
        });
        if taken && guard.is_healthy() {
            self.violation(format!(
                "{id} believed it held {key} (token {token}) after a pause of {pause:?}, when another had taken it"
            ));
        }
        self.resource.write(&key, &as_paused, token, read);
        drop(section);
        self.release(guard, id).await;
    }

    /// The whole history, hashed. Tokens (generations: the server clock's microseconds,
    /// which start from the real wall clock) count by their order only.
    fn digest(&self) -> u64 {
        let events = self.history.events();
        let mut tokens: Vec<i64> = events.iter().filter_map(|e| e.token).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let rank = |t: Option<i64>| t.map(|t| tokens.binary_search(&t).unwrap_or(usize::MAX));
        let mut h = DefaultHasher::new();
        for e in &events {
            (
                e.start,
                e.end,
                e.kind,
                &e.key,
                &e.client,
                rank(e.token),
                e.outcome,
            )
                .hash(&mut h);
        }
        h.finish()
    }

    /// Judges the finished run: the checker, and what only the simulation knows.
    async fn judge(&self, seed: u64, memory: &MemoryBackend) -> Verdict {
        let shutdowns = locked(&self.shutdowns).clone();
        let events = self.history.events();
        for s in shutdowns.iter().filter(|s| s.ok) {
            if let Some(e) = events.iter().find(|e| {
                e.client == s.client
                    && matches!(e.kind, Kind::Create | Kind::Takeover)
                    && e.start >= s.end
            }) {
                self.violation(format!(
                    "{} wrote {} ({:?} at {:?}) after its shutdown returned Ok at {:?}",
                    s.client, e.key, e.kind, e.start, s.end
                ));
            }
        }
        // What is left after every replica's last shutdown: only what the library said it
        // gave up on (see `gave_up`).
        let mut leftovers = Vec::new();
        for name in memory.object_names() {
            let (owner, generation) = match memory.inspect(&name).await.map(|r| r.into_value()) {
                Ok(Some(state)) => (
                    state.metadata().get("owner").cloned().unwrap_or_default(),
                    state.version().generation(),
                ),
                _ => continue,
            };
            let identity = owner.split('#').next().unwrap_or_default();
            let key = name.strip_prefix(PREFIX).unwrap_or(&name);
            let shutdown_failed = shutdowns.iter().any(|s| !s.ok && s.client == identity);
            if !shutdown_failed && !gave_up(&events, identity, &owner, key, generation) {
                leftovers.push(format!("{name} (owner {identity})"));
            }
        }
        let mut checker = Checker::new(&self.history, self.plan.ttl())
            .store(&self.resource)
            .leftovers(leftovers)
            .settled()
            .faults(self.network.injected());
        for s in &shutdowns {
            checker = checker.shutdown(&s.client, s.start, s.end);
        }
        for p in locked(&self.paused).iter() {
            checker = checker.paused_holder(p);
        }
        let report = checker.check();
        let mut violations = report.violations();
        if !report.release_underclaims.is_empty()
            && violations.iter().all(|v| !v.contains("not ours"))
        {
            violations.push(format!(
                "releases said \"not ours\" within the ttl although their delete removed the lock: {:?}",
                report.release_underclaims
            ));
        }
        violations.extend(locked(&self.violations).iter().cloned());
        Verdict {
            seed,
            plan: self.plan.clone(),
            violations,
            digest: self.digest(),
            operations: report.operations + report.backend_requests,
            simulated: self.start.elapsed(),
            faults: self.network.injected(),
            events,
        }
    }
}

/// Whether `client` gave its object of `key` (written by `owner`, at `generation`) up to
/// expiry, as the library does when the backend stays unreachable past the retry budget:
/// - the last refresh or delete of that generation failed transiently (no reply, a 429 or a
///   5xx), or met a 412 and the read that follows a 412 got no reply;
/// - or, for an object no such request concerns (a write whose reply never came), the
///   clean-up that follows the acquisition that wrote it (`owner`'s writes) read without a
///   reply: an Inspect of `key` by `client` without an answer, after the write and at most
///   [`CLEAN_UP`] after that acquisition's end. (The history does not say which acquisition
///   or clean-up sent a read, so a read of the acquisition itself may excuse it too; with the
///   clean-up of a dropped acquisition removed, the CI block still fails, see issue 18's
///   note.) An acquisition that was dropped or failed is not excused otherwise.
fn gave_up(events: &[Event], client: &str, owner: &str, key: &str, generation: i64) -> bool {
    let mine = |e: &&Event| e.client == client && e.key == key;
    if let Some(last) = events
        .iter()
        .filter(mine)
        .filter(|e| matches!(e.kind, Kind::Refresh | Kind::Delete) && e.token == Some(generation))
        .max_by_key(|e| e.end)
    {
        if last.outcome == Outcome::Failed && last.detail.contains("precondition") {
            // A 412 is read before it is believed: given up if that read got no reply.
            return events
                .iter()
                .filter(mine)
                .filter(|e| e.kind == Kind::Inspect && e.start >= last.end)
                .min_by_key(|e| e.start)
                .is_some_and(|read| read.outcome == Outcome::Unknown);
        }
        return last.outcome == Outcome::Unknown
            || (last.outcome == Outcome::Failed && last.detail.starts_with("transient"));
    }
    let Some(write) = events
        .iter()
        .filter(mine)
        .filter(|e| e.kind.is_backend_write() && e.owner == owner)
        .min_by_key(|e| e.start)
    else {
        return false;
    };
    // The acquisition that wrote it: of those that span the write, the last to end (an
    // acquisition queued behind it may span it too, and ends later only by waiting). A
    // request through the layer that never reached its handler has no acquisition event: its
    // clean-up follows the write.
    let ended = events
        .iter()
        .filter(mine)
        .filter(|a| a.kind == Kind::Acquire && a.start <= write.start && write.end <= a.end)
        .map(|a| a.end)
        .max()
        .unwrap_or(write.end);
    events.iter().filter(mine).any(|e| {
        e.kind == Kind::Inspect
            && e.outcome == Outcome::Unknown
            && e.start >= write.end
            && e.start <= ended + CLEAN_UP
    })
}

/// How long a clean-up may take with the default settings: two reads and a delete, each
/// retried for 5 s with 5 s per request, and 5 s between the reads.
const CLEAN_UP: Duration = Duration::from_secs(35);

/// A critical section: entered when made, left when dropped (so that a handler dropped with
/// its request leaves it at that moment).
struct Section {
    history: Arc<History>,
    key: String,
    client: String,
    token: i64,
}

impl Section {
    fn enter(history: &Arc<History>, key: &str, client: &str, token: i64) -> Self {
        history.point(Kind::Enter, key, client, Some(token));
        Self {
            history: history.clone(),
            key: key.to_owned(),
            client: client.to_owned(),
            token,
        }
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        let (key, client) = (&self.key, &self.client);
        self.history
            .point(Kind::Exit, key, client, Some(self.token));
    }
}

/// One replica: a client and its workers, shut down and restarted under a new identity at
/// random moments, and shut down for good at the end of the run.
async fn replica(world: Arc<World>, index: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for generation in 1.. {
        let id = format!("r{index}.{generation}");
        let link = Link::new(world.store.clone(), world.network.clone());
        let client = world.client(&id, link.clone(), world.plan.skews[index]);
        let retired = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..world.plan.workers)
            .map(|_| {
                let worker = Worker {
                    world: world.clone(),
                    client: client.clone(),
                    link: link.clone(),
                    id: id.clone(),
                    retired: retired.clone(),
                    rng: StdRng::seed_from_u64(rng.random()),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        let life = Duration::from_secs(rng.random_range(20..=300));
        let end = world.start + world.plan.length;
        let last = Instant::now() + life >= end;
        tokio::time::sleep_until(end.min(Instant::now() + life)).await;
        // Operations in flight go on into the shutdown; no new one starts. A paused process
        // shuts down once it runs again.
        retired.store(true, Ordering::Relaxed);
        link.thaw().await;
        if last {
            world.network.calm();
            // Long enough for any pause and the retries of the last requests.
            if !world
                .shut_down(&client, &id, Duration::from_secs(300))
                .await
            {
                world.violation(format!("{id}: the final shutdown, without faults, failed"));
            }
        } else {
            let grace = Duration::from_secs([5, 30][rng.random_range(0..2)]);
            world.shut_down(&client, &id, grace).await;
        }
        for w in workers {
            if let Err(e) = w.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        if last {
            break;
        }
    }
}

/// One task of a replica, running operations until its client is shut down.
struct Worker {
    world: Arc<World>,
    client: Client,
    link: Link,
    id: String,
    /// Set when the replica's shutdown begins.
    retired: Arc<AtomicBool>,
    rng: StdRng,
}

impl Worker {
    async fn run(mut self) {
        while self.world.running() && !self.retired.load(Ordering::Relaxed) {
            let key = format!("k{}", self.rng.random_range(0..self.world.plan.keys));
            let go_on = match self.rng.random_range(0..100) {
                0..30 => self.acquire(&key, None).await,
                30..55 => {
                    let wait = Duration::from_millis(self.rng.random_range(0..20_000));
                    self.acquire(&key, Some(wait)).await
                }
                55..72 => self.dropped_acquisition(&key).await,
                72..92 => self.through_the_layer(&key).await,
                92..96 => self.paused_holder(&key).await,
                _ => {
                    let idle = Duration::from_millis(self.rng.random_range(0..5_000));
                    tokio::time::sleep(idle).await;
                    true
                }
            };
            if !go_on {
                break;
            }
            let think = Duration::from_millis(self.rng.random_range(1..200));
            tokio::time::sleep(think).await;
        }
    }

    async fn acquire_recorded(
        &mut self,
        key: &str,
        wait: Option<Duration>,
    ) -> Result<Option<LockGuard>, ()> {
        let start = self.world.history.now();
        let result = match wait {
            Some(wait) => {
                let deadline = tokio::time::Instant::now() + wait;
                let result = self.client.acquire(key, deadline.into_std()).await;
                self.world.gave_up_early(&self.id, key, &result, deadline);
                result
            }
            None => self.client.try_acquire(key).await,
        };
        self.world.record_acquire(start, &self.id, key, result)
    }

    /// `try_acquire` or `acquire`, then a hold; `false` once the client is shut down.
    async fn acquire(&mut self, key: &str, wait: Option<Duration>) -> bool {
        match self.acquire_recorded(key, wait).await {
            Ok(Some(guard)) => {
                let world = self.world.clone();
                world.hold(guard, &self.id, &mut self.rng).await;
                true
            }
            Ok(None) => true,
            Err(()) => false,
        }
    }

    /// An acquisition whose future is dropped after a random moment (a caller's timeout).
    async fn dropped_acquisition(&mut self, key: &str) -> bool {
        let patience = Duration::from_millis(self.rng.random_range(0..400));
        let wait = Duration::from_millis(self.rng.random_range(0..10_000));
        let start = self.world.history.now();
        let deadline = (tokio::time::Instant::now() + wait).into_std();
        let client = self.client.clone();
        match tokio::time::timeout(patience, client.acquire(key, deadline)).await {
            Ok(result) => match self.world.record_acquire(start, &self.id, key, result) {
                Ok(Some(guard)) => {
                    let world = self.world.clone();
                    world.hold(guard, &self.id, &mut self.rng).await;
                    true
                }
                Ok(None) => true,
                Err(()) => false,
            },
            Err(_) => {
                let h = &self.world.history;
                h.complete(
                    start,
                    Kind::Acquire,
                    key,
                    &self.id,
                    None,
                    Outcome::Unknown,
                    "dropped",
                );
                true
            }
        }
    }

    /// A request through [`LockLayer`] (fail fast, or waiting up to 2 s) whose client may go
    /// away at a random moment; the handler is a critical section.
    async fn through_the_layer(&mut self, key: &str) -> bool {
        let world = self.world.clone();
        let id = self.id.clone();
        let handler = service_fn(move |request: Request<String>| {
            let (world, id) = (world.clone(), id.clone());
            async move {
                let held = request
                    .extensions()
                    .get::<HeldLock>()
                    .cloned()
                    .expect("the layer hands the handler its lock");
                let think = Duration::from_millis(request.body().parse().unwrap_or(0));
                world.handle(&held, &id, think).await;
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        });
        let mut layer = LockLayer::new(self.client.clone(), FromHeader::new("x-job"));
        if self.rng.random_bool(0.5) {
            layer = layer.wait_up_to(Duration::from_secs(2));
        }
        let think = self.rng.random_range(0..3_000u64);
        let request = Request::builder()
            .header("x-job", key)
            .body(think.to_string())
            .expect("a request");
        let patience = Duration::from_millis(self.rng.random_range(0..4_000));
        let _ = tokio::time::timeout(patience, layer.layer(handler).oneshot(request)).await;
        true
    }

    async fn paused_holder(&mut self, key: &str) -> bool {
        match self.acquire_recorded(key, None).await {
            Ok(Some(guard)) => {
                let world = self.world.clone();
                world
                    .paused(guard, &self.id, &self.link, &mut self.rng)
                    .await;
                true
            }
            Ok(None) => true,
            Err(()) => false,
        }
    }
}

impl World {
    /// The layer's handler: a critical section of `think`, left at once if the lease is lost.
    async fn handle(&self, held: &HeldLock, id: &str, think: Duration) {
        let key = held.key().as_str();
        let token = held.token().get();
        let now = self.history.now();
        self.history.complete(
            now,
            Kind::Acquire,
            key,
            id,
            Some(token),
            Outcome::Ok,
            "layer",
        );
        let _section = Section::enter(&self.history, key, id, token);
        tokio::select! {
            biased;
            () = held.lost() => self.history.point(Kind::Lost, key, id, Some(token)),
            _ = self.resource.increment(key, id, token, think) => {}
        }
    }
}
