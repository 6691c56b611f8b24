//! The life of held leases: one driver task per client refreshes them, signals a lost lease,
//! and releases the ones whose guards were dropped.
//!
//! Acquiring a lock leaves the lease in the client's [`Inbox`], which the driver empties at
//! every wake-up; it is woken for that only when it would not otherwise wake within a
//! [`TICK`] (a lease needs nothing from the driver before its first refresh, at least a
//! quarter of the refresh interval later), so a busy client does not wake it per
//! acquisition, and a lease released before the driver looked never reaches it. The driver
//! keeps one timer for all its leases: each lease has exactly one wake-up in a sorted set (its
//! next refresh, or its local deadline if that comes first), and refresh times are rounded
//! down to a grid of [`TICK`], so the refreshes of many leases go out together. Refreshes and
//! releases run concurrently inside the driver task.
//!
//! A dropped guard sends [`Command::Release`] (only a message: `Drop` does no work of its
//! own), unless the backend answers at once ([`release_on_drop`]).
//! [`LockGuard::release`](crate::LockGuard::release) releases from the caller's task
//! instead, unless a refresh is in flight, and tells the driver to forget the lease through
//! the inbox; if that release is cancelled half-way, the driver takes it over.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::backend::{BackendError, BackendFuture, Reply, Version};
use crate::client::{Attempted, Inner, MUTATION_WINDOW};
use crate::error::Error;
use crate::guard::{Claim, LeaseShared, LeaseState, ReleaseRequest};
use crate::object;

mod inbox;

pub(crate) use inbox::Inbox;
use inbox::Items;

/// What the client and the guards tell the driver.
enum Command {
    /// Something waits in the inbox.
    Adopt,
    /// Release the lease `id`, answering on `reply` if someone waits for the outcome.
    Release { id: u64, reply: ReleaseRequest },
}

/// A freshly acquired lease, as handed to the driver. It counts among the client's live
/// leases until its release ends ([`ended`]) or, at the latest, until it is dropped.
pub(crate) struct Lease {
    client: Arc<Inner>,
    shared: Arc<LeaseShared>,
}

impl Lease {
    pub(crate) fn new(client: Arc<Inner>, shared: Arc<LeaseShared>) -> Self {
        client.lease_opened(shared.id());
        Self { client, shared }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = uncount(&self.client, &self.shared);
    }
}

/// The part of a sharded structure (the inbox, the client's count of live leases) that lease
/// `id` belongs to: by its block of ids, that is by the thread that took it (usually the one
/// that releases it), so that threads working on their own leases write parts of their own.
pub(crate) fn part_of(id: u64) -> usize {
    (id / BLOCK) as usize
}

/// The length of a thread's block of lease ids.
const BLOCK: u64 = 1024;

/// A lease id, unique in this process. Threads take ids from the shared counter in blocks, so
/// acquisitions on different threads do not write one cache line.
pub(crate) fn next_id() -> u64 {
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        /// The next id of this thread's block, and the block's end.
        static IDS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    IDS.try_with(|ids| {
        let (next, end) = ids.get();
        if next < end {
            ids.set((next + 1, end));
            next
        } else {
            let start = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            ids.set((start + 1, start + BLOCK));
            start
        }
    })
    // A thread being torn down: an id of its own.
    .unwrap_or_else(|_| NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed))
}

/// Takes the lease off the client's count of live leases, once; whether the driver must be
/// told to forget it (it has the lease in its care). A lease the driver never took is taken
/// back out of the inbox, and dropped here.
fn uncount(inner: &Inner, shared: &LeaseShared) -> bool {
    match shared.end() {
        Some(watched) => {
            if !watched {
                // Its drop finds the lease ended: it does not come back here. (And all of the
                // inbox's leases are dropped outside its locks.)
                drop(inner.inbox.take(shared.id()));
            }
            inner.lease_closed(shared.id());
            watched
        }
        None => false,
    }
}

/// A lease in the driver's care.
struct Entry {
    lease: Lease,
    /// The one wake-up of this lease in the timer set, if any.
    wake: Option<Instant>,
    /// A release asked for while a refresh was in flight.
    release_wanted: Option<ReleaseRequest>,
    /// The driver's own release is in flight.
    driver_releasing: bool,
    /// Where the release's outcome goes.
    reply: ReleaseRequest,
}

enum Refresh {
    Done {
        version: Version,
        sent: Instant,
    },
    /// Someone else changed or removed the object: it is not ours.
    Gone,
    /// The local deadline passed without a successful refresh.
    Expired,
    /// A non-transient failure (say, permissions); try again later.
    Failed,
}

enum Outcome {
    Refreshed(Refresh),
    Released(Result<bool, Error>),
}

type Op = Pin<Box<dyn Future<Output = (u64, Outcome)> + Send>>;

/// Refresh times are rounded down to this grid, so that one wake-up sends many refreshes.
/// A refresh sent early is always safe; this one is at most a tick early.
const TICK: Duration = Duration::from_millis(100);

/// Between a request's send time and its taking effect, at most (on top of the window).
const SEND_MARGIN: Duration = Duration::from_millis(100);

/// The most commands the driver takes in one go.
const COMMAND_BATCH: usize = 1024;

/// How long to wait before retrying a refresh that failed for good.
const FAILED_REFRESH_RETRY: Duration = Duration::from_secs(1);

/// The first refresh comes after a random 25–100 % of the interval, the later ones a whole
/// interval apart: locks taken in a burst do not all refresh in the same second.
fn first_refresh_delay(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.25..=1.0))
}

/// The reference point of the refresh grid and of the inbox's `looks_by`.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// `t` in nanoseconds since [`origin`] (0 before it: the client starts the clock when it is
/// built, so its leases' times are all later).
pub(crate) fn since_origin(t: Instant) -> u64 {
    t.saturating_duration_since(origin()).as_nanos() as u64
}

/// The instant `nanos` after [`origin`].
pub(crate) fn at_since_origin(nanos: u64) -> Instant {
    origin() + Duration::from_nanos(nanos)
}

/// `t` rounded down to the refresh grid.
fn on_grid(t: Instant) -> Instant {
    let origin = origin();
    match t.checked_duration_since(origin) {
        Some(since) => {
            let tick = TICK.as_nanos();
            let floored = since.as_nanos() / tick * tick;
            origin + Duration::from_nanos(floored as u64)
        }
        None => t,
    }
}

/// The most leases the inbox's spare buffer keeps room for after a burst.
const SPARE_CAPACITY: usize = 1024;

/// Lease ids are our own counter: no need for a DoS-resistant hash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A client's way to its driver.
#[derive(Clone)]
pub(crate) struct DriverHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl DriverHandle {
    /// Whether the driver is gone (its runtime stopped).
    pub(crate) fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// Asks the driver to release lease `id`, answering on `reply`.
    pub(crate) fn release(&self, id: u64, reply: ReleaseRequest) -> bool {
        self.commands.send(Command::Release { id, reply }).is_ok()
    }

    /// Wakes the driver to look in the inbox.
    pub(crate) fn wake(&self) {
        // Refused only if the runtime stops this very moment: the driver's end then tells
        // the next poster to start another.
        let _ = self.commands.send(Command::Adopt);
    }
}

/// Starts a driver on the current runtime. It stops once every sender is gone and its last
/// release is done.
pub(crate) fn spawn_driver(inbox: Arc<Inbox>, shutdown: watch::Receiver<bool>) -> DriverHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let driver = Driver {
        inbox,
        adopt_at: None,
        // Started for a lease.
        asked: true,
        commands: Some(rx),
        shutdown,
        shutting_down: false,
        leases: HashMap::default(),
        timers: BTreeSet::new(),
        spare: Items::default(),
        starting: Vec::new(),
        ops: FuturesUnordered::new(),
    };
    tokio::spawn(driver.run());
    DriverHandle { commands: tx }
}

struct Driver {
    inbox: Arc<Inbox>,
    /// While acquisitions keep coming: when to empty the inbox next.
    adopt_at: Option<Instant>,
    /// Whether acquisitions or releases came since `adopt_at` was last decided (leases found
    /// in the inbox, or a wake-up asked for).
    asked: bool,
    /// `None` once every sender is gone.
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    shutdown: watch::Receiver<bool>,
    shutting_down: bool,
    leases: HashMap<u64, Entry, BuildHasherDefault<IdHasher>>,
    /// (wake-up, lease id), one per lease at most.
    timers: BTreeSet<(Instant, u64)>,
    /// New refreshes and releases, polled once before they join `ops`: those that finish at
    /// once (an in-process backend) skip the queue's allocation and wake-up, and the others
    /// send their request without waiting for the next turn.
    starting: Vec<Op>,
    ops: FuturesUnordered<Op>,
    /// An empty shard's worth of the inbox, to swap with a full one.
    spare: Items,
}

impl Drop for Driver {
    /// The runtime stopped (or the client is gone). The leases in its care, and those whose
    /// release was asked of it, will not be refreshed or released: they are ended, and their
    /// lost signals fired, so that no later driver takes them up and no guard believes in
    /// them.
    fn drop(&mut self) {
        if let Some(mut rx) = self.commands.take() {
            // Closed first: whoever reads "no driver" finds the handle closed, and starts one.
            rx.close();
            while let Ok(command) = rx.try_recv() {
                if let Command::Release { id, .. } = command {
                    // Still in the inbox: never adopted. (The reply is dropped: "shut down".)
                    if let Some(lease) = self.inbox.take(id) {
                        abandoned(&lease.client, &lease.shared);
                    }
                }
            }
        }
        self.inbox.no_driver();
        for (_, entry) in self.leases.drain() {
            let lease = &entry.lease;
            if !lease.shared.is_lost() {
                tracing::warn!(target: "dimutex", key_id = crate::key_id(lease.shared.key()), "lease lost: the runtime of the lease driver stopped");
            }
            abandoned(&lease.client, &lease.shared);
        }
    }
}

impl Driver {
    async fn run(mut self) {
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        loop {
            // While awake, the driver may miss a lease left in the inbox from here on: ask
            // for a wake-up, until it has decided when it sleeps until.
            self.inbox.set_looks_by(inbox::AWAKE);
            self.adopt();
            // Take the commands waiting without spending the task's cooperative budget on
            // each (`recv` would: on a busy runtime the driver would fall behind its clients);
            // then finished work, due timers, and only then wait for more commands.
            self.drain_commands();
            if !self.starting.is_empty() {
                std::future::poll_fn(|cx| {
                    self.start(cx);
                    Poll::Ready(())
                })
                .await;
            }
            let now = Instant::now();
            match self.adopt_at {
                Some(at) if at > now => {}
                // Acquisitions keep coming (it found leases, or was woken for them): it picks
                // the next ones up within a tick, unwoken. Behind a busy layer most leases are
                // released before it looks, and a driver that then slept until woken was woken
                // by nearly every acquisition.
                _ => self.adopt_at = std::mem::take(&mut self.asked).then(|| now + TICK),
            }
            let next = match (self.timers.first().map(|&(at, _)| at), self.adopt_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if next != armed {
                if let Some(at) = next {
                    sleep.as_mut().reset(at.into());
                }
                armed = next;
            }
            if let Some(at) = armed {
                self.inbox.set_looks_by(since_origin(at));
            }
            if self.commands.is_none()
                && self.ops.is_empty()
                && self.leases.is_empty()
                && self.inbox.is_empty()
            {
                return;
            }
            tokio::select! {
                biased;
                Some((id, outcome)) = self.ops.next(), if !self.ops.is_empty() => {
                    self.finish(id, outcome)
                }
                _ = &mut sleep, if armed.is_some() => {
                    armed = None;
                    self.adopt();
                    self.wake(Instant::now());
                }
                _ = shut_down(&mut self.shutdown), if !self.shutting_down => {
                    self.shutting_down = true;
                    self.adopt();
                    let ids: Vec<u64> = self.leases.keys().copied().collect();
                    for id in ids {
                        self.release(id, None);
                    }
                }
                command = recv(&mut self.commands), if self.commands.is_some() => match command {
                    Some(command) => self.command(command),
                    None => self.commands = None,
                },
            }
        }
    }

    /// Polls the new work once: what finishes is done with, the rest joins `ops`.
    fn start(&mut self, cx: &mut Context<'_>) {
        // Finishing may start more (a release that waited for a refresh).
        while let Some(mut op) = self.starting.pop() {
            match op.as_mut().poll(cx) {
                Poll::Ready((id, outcome)) => self.finish(id, outcome),
                Poll::Pending => self.ops.push(op),
            }
        }
    }

    /// Handles the commands already queued (at most a batch, so that finished work and
    /// timers get their turn).
    fn drain_commands(&mut self) {
        let Some(mut rx) = self.commands.take() else {
            return;
        };
        for _ in 0..COMMAND_BATCH {
            match rx.try_recv() {
                Ok(command) => self.command(command),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        self.commands = Some(rx);
    }

    fn command(&mut self, command: Command) {
        match command {
            // The loop empties the inbox at every turn.
            Command::Adopt => self.asked = true,
            Command::Release { id, reply } => {
                if !self.leases.contains_key(&id) {
                    // Left in the inbox after this turn emptied it.
                    self.adopt();
                }
                self.release(id, reply)
            }
        }
    }

    /// Takes over the leases waiting in the inbox and forgets those their guards released.
    fn adopt(&mut self) {
        for i in 0..self.inbox.shard_count() {
            // Swapped with the (empty) spare: the shard keeps allocated space for the next ones.
            let mut items = std::mem::take(&mut self.spare);
            if !self.inbox.swap(i, &mut items) {
                self.spare = items;
                continue;
            }
            self.asked |= !items.leases.is_empty();
            for (_, lease) in items.leases.drain() {
                // Released by its guard since the swap: nothing to watch, and the guard did
                // not post its id.
                if lease.shared.watch() {
                    self.hold(lease);
                }
            }
            for id in items.released.drain(..) {
                // Its guard released it (and took it off the local map); only our entry is
                // left.
                if let Some(entry) = self.leases.remove(&id) {
                    if let Some(at) = entry.wake {
                        self.timers.remove(&(at, id));
                    }
                }
            }
            if items.leases.capacity() <= SPARE_CAPACITY {
                self.spare = items;
            }
        }
    }

    fn hold(&mut self, lease: Lease) {
        let id = lease.shared.id();
        let cfg = &lease.client.config;
        let sent = lease.shared.state().sent;
        let first = on_grid(sent + first_refresh_delay(cfg.refresh_interval));
        self.leases.insert(
            id,
            Entry {
                lease,
                wake: None,
                release_wanted: None,
                driver_releasing: false,
                reply: None,
            },
        );
        if self.shutting_down {
            self.release(id, None);
        } else {
            self.schedule(id, first);
        }
    }

    /// Sets the lease's one wake-up to `refresh_at`, or to its deadline if that comes first.
    fn schedule(&mut self, id: u64, refresh_at: Instant) {
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        if let Some(old) = entry.wake.take() {
            self.timers.remove(&(old, id));
        }
        let at = refresh_at.min(entry.lease.shared.deadline());
        entry.wake = Some(at);
        self.timers.insert((at, id));
    }

    /// Handles every wake-up due at `now`: a refresh to send, or a deadline passed.
    fn wake(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(entry) = self.leases.get_mut(&id) else {
                continue;
            };
            entry.wake = None;
            let shared = entry.lease.shared.clone();
            let (version, deadline) = {
                let mut state = shared.state();
                if state.releasing {
                    // Its guard is releasing it.
                    continue;
                }
                let deadline = shared.deadline();
                if now >= deadline {
                    drop(state);
                    if !shared.is_lost() {
                        tracing::warn!(target: "dimutex", key_id = crate::key_id(shared.key()), "lease lost: no successful refresh before the local deadline");
                        shared.mark_lost();
                    }
                    continue;
                }
                state.refreshing = true;
                (state.version, deadline)
            };
            let inner = entry.lease.client.clone();
            self.starting.push(Box::pin(async move {
                let r = refresh(&inner, shared.name(), shared.owner(), version, deadline).await;
                (id, Outcome::Refreshed(r))
            }));
        }
    }

    /// Starts the release of lease `id` (after its refresh in flight, if any).
    fn release(&mut self, id: u64, reply: ReleaseRequest) {
        let Some(entry) = self.leases.get_mut(&id) else {
            // Already released (the client shut down): `reply` is dropped, the caller sees
            // the shutdown.
            return;
        };
        if entry.driver_releasing {
            if entry.reply.is_none() {
                entry.reply = reply;
            }
            return;
        }
        let state = match entry.lease.shared.claim_release() {
            Claim::Claimed(state) => state,
            Claim::Refreshing => {
                match &mut entry.release_wanted {
                    Some(wanted) if wanted.is_some() => {}
                    wanted => *wanted = Some(reply),
                }
                return;
            }
            // Its guard is releasing it from the caller's task.
            Claim::Releasing => return,
        };
        if let Some(at) = entry.wake.take() {
            self.timers.remove(&(at, id));
        }
        entry.driver_releasing = true;
        entry.reply = reply;
        let inner = entry.lease.client.clone();
        let shared = entry.lease.shared.clone();
        self.starting.push(Box::pin(async move {
            let r = release(&inner, &shared, state).await;
            (id, Outcome::Released(r))
        }));
    }

    fn finish(&mut self, id: u64, outcome: Outcome) {
        match outcome {
            Outcome::Refreshed(refresh) => self.refreshed(id, refresh),
            Outcome::Released(result) => {
                let Some(entry) = self.leases.remove(&id) else {
                    return;
                };
                let lease = &entry.lease;
                // The entry goes right here.
                let _ = ended(&lease.client, &lease.shared, &result);
                if let Some(reply) = entry.reply {
                    let _ = reply.send(result);
                }
                // `entry` goes here (its count in the client's live leases went in `ended`).
            }
        }
    }

    fn refreshed(&mut self, id: u64, refresh: Refresh) {
        let Some(entry) = self.leases.get_mut(&id) else {
            return;
        };
        let shared = &entry.lease.shared;
        let cfg = &entry.lease.client.config;
        // The next refresh, or why the lease is lost.
        let next = {
            let mut state = shared.state();
            state.refreshing = false;
            match refresh {
                Refresh::Done { version, sent } => {
                    state.version = version;
                    state.sent = sent;
                    shared.set_deadline(sent + cfg.ttl - cfg.margin());
                    tracing::trace!(target: "dimutex", key_id = crate::key_id(shared.key()), "refreshed");
                    Ok(on_grid(sent + cfg.refresh_interval))
                }
                Refresh::Failed => Ok(Instant::now() + FAILED_REFRESH_RETRY),
                Refresh::Gone => {
                    state.gone = true;
                    Err("lease lost: the lock object was changed by another owner")
                }
                Refresh::Expired => Err("lease lost: refresh failed until the local deadline"),
            }
        };
        if let Err(why) = next {
            tracing::warn!(target: "dimutex", key_id = crate::key_id(shared.key()), "{why}");
            shared.mark_lost();
        }
        if let Some(reply) = entry.release_wanted.take() {
            self.release(id, reply);
        } else if let Ok(next) = next {
            self.schedule(id, next);
        }
    }
}

/// The next command, or `None` once every sender is gone.
async fn recv(commands: &mut Option<mpsc::UnboundedReceiver<Command>>) -> Option<Command> {
    match commands {
        Some(rx) => rx.recv().await,
        None => None,
    }
}

/// What follows a release, by the driver or by the guard: the log line, the local map, the
/// lost signal.
/// Records the end of a release; whether the driver must be told to forget the lease.
#[must_use]
fn ended(inner: &Inner, shared: &Arc<LeaseShared>, result: &Result<bool, Error>) -> bool {
    match result {
        Ok(held) => {
            tracing::debug!(target: "dimutex", key_id = crate::key_id(shared.key()), held, "released")
        }
        Err(e) => {
            tracing::warn!(target: "dimutex", key_id = crate::key_id(shared.key()), error = %e, "release failed; the lease will expire")
        }
    }
    inner.local.remove(shared);
    shared.mark_lost();
    uncount(inner, shared)
}

/// A dropped [`LockGuard`](crate::LockGuard). With a backend that answers at once (in-process)
/// and no refresh in flight, the release is done right here, in the dropping task: its future
/// is ready on its first poll and needs no timer (a runtime's timers panic once it is shutting
/// down, so a network backend's request is never polled in `drop`). Otherwise the driver
/// releases the lease.
pub(crate) fn release_on_drop(inner: Arc<Inner>, shared: &Arc<LeaseShared>) {
    // Timers need a runtime: a throttled backend makes the release wait before its delete,
    // and a backend that claims to answer at once and does not has its request timed.
    if !inner.backend.answers_at_once() || inner.recently_throttled() || !on_runtime() {
        release_by_driver(&inner, shared);
        return;
    }
    let state = match shared.claim_release() {
        Claim::Claimed(state) => state,
        Claim::Refreshing | Claim::Releasing => {
            release_by_driver(&inner, shared);
            return;
        }
    };
    // The usual case first: the delete alone, polled once, no clock read. Anything but its
    // success is left to the release below (which sends it again), or to the driver.
    if !state.gone {
        let polled = inner
            .backend
            .release(shared.name(), state.version)
            .answer_now();
        match polled {
            Poll::Ready(Ok(_)) => return ended_by_guard(&inner, shared, &Ok(true)),
            Poll::Ready(Err(e)) if e.is_rate_limited() => {
                // Refused before it was applied; the driver waits out the window.
                inner.note_throttled();
                return hand_back(&inner, shared);
            }
            Poll::Ready(Err(_)) => {}
            // Dropped here, half-way, as below.
            Poll::Pending => return hand_back(&inner, shared),
        }
    }
    // Polled once, in place, without a waker: no box, no counted references. Should it wait
    // after all (a backend that claims to answer at once and does not), it is dropped half-way
    // and the driver releases the lease, as when a guard's `release` future is dropped.
    let done = {
        let mut release = std::pin::pin!(release(&inner, shared, state));
        match release
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
        {
            Poll::Ready(result) => Some(result),
            // Dropped here, half-way.
            Poll::Pending => None,
        }
    };
    match done {
        Some(result) => ended_by_guard(&inner, shared, &result),
        None => hand_back(&inner, shared),
    }
}

/// Asks the driver to release the lease. Refused only if the driver is gone (its runtime
/// stopped): the lease then expires, and it is ended here, so that no later driver takes it
/// up (it may still wait in the client's inbox).
fn release_by_driver(inner: &Inner, shared: &Arc<LeaseShared>) {
    let sent = inner
        .driver()
        .is_some_and(|driver| driver.release(shared.id(), None));
    if !sent {
        abandoned(inner, shared);
    }
}

/// Ends a lease nobody will release or refresh any more (its driver is gone): off the local
/// map and the live count, out of the inbox, and its lost signal fired. It expires on the
/// server.
fn abandoned(inner: &Inner, shared: &Arc<LeaseShared>) {
    // Whether a driver had it does not matter: that driver is gone.
    let _ = ended(inner, shared, &Err(Error::ShutDown));
}

/// A release a guard began, dropped half-way: the driver does it over.
fn hand_back(inner: &Inner, shared: &Arc<LeaseShared>) {
    shared.state().releasing = false;
    release_by_driver(inner, shared);
}

/// Records the end of a release a guard did itself, and tells the driver to forget the lease
/// if it has it in its care.
fn ended_by_guard(inner: &Inner, shared: &Arc<LeaseShared>, result: &Result<bool, Error>) {
    if ended(inner, shared, result) && inner.inbox.post_released(shared.id()) {
        if let Some(driver) = inner.driver() {
            driver.wake();
        }
    }
}

/// Whether this thread is in a runtime's context. Inside a task it is, and asking costs a
/// thread-local read; `Handle::try_current` costs an increment and a decrement of the
/// runtime's reference count, a cache line every worker thread writes.
pub(crate) fn on_runtime() -> bool {
    tokio::task::try_id().is_some() || tokio::runtime::Handle::try_current().is_ok()
}

/// [`LockGuard::release`](crate::LockGuard::release): from the caller's task when no refresh
/// is in flight (no hop through the driver), else by the driver.
pub(crate) async fn release_from_guard(
    inner: &Arc<Inner>,
    shared: &Arc<LeaseShared>,
) -> Result<bool, Error> {
    let state = match shared.claim_release() {
        Claim::Claimed(state) => state,
        Claim::Refreshing | Claim::Releasing => {
            // A refresh in flight (the driver releases after it), or the client's shutdown
            // releasing it already: the driver answers.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let sent = inner
                .driver()
                .is_some_and(|driver| driver.release(shared.id(), Some(tx)));
            if !sent {
                // The driver is gone (its runtime stopped), and the lease with it.
                abandoned(inner, shared);
                return Err(Error::ShutDown);
            }
            // No answer: the client was shut down and released the lease already.
            return rx.await.unwrap_or(Err(Error::ShutDown));
        }
    };
    // Should this future be dropped half-way, the driver takes the release over.
    let mut handover = Handover {
        inner,
        shared,
        armed: true,
    };
    let result = release(inner, shared, state).await;
    handover.armed = false;
    ended_by_guard(inner, shared, &result);
    result
}

/// Gives a release begun by a guard back to the driver if it is dropped before the end.
struct Handover<'a> {
    inner: &'a Inner,
    shared: &'a Arc<LeaseShared>,
    armed: bool,
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        if self.armed {
            hand_back(self.inner, self.shared);
        }
    }
}

/// Resolves once the client is shut down (the `watch::Ref` is dropped at once: it is not `Send`).
async fn shut_down(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        // The client is gone; only guards remain, and they release their leases themselves.
        std::future::pending::<()>().await;
    }
}

async fn refresh(
    inner: &Inner,
    name: &str,
    owner: &str,
    version: Version,
    deadline: Instant,
) -> Refresh {
    let cfg = &inner.config;
    let md = object::refresh_metadata(cfg.ttl, (cfg.clock)());
    let backend = &*inner.backend;
    let Some(a) = by_deadline(inner, deadline, || backend.refresh(name, version, &md)).await else {
        return Refresh::Expired;
    };
    match a.result {
        Ok(reply) => Refresh::Done {
            version: reply.value().version(),
            sent: a.first_sent,
        },
        Err(BackendError::PreconditionFailed) => {
            // Changed: by someone else, or by a write of ours whose outcome we never learned
            // (an attempt of this refresh, or an earlier refresh that gave up) — then it is
            // still our lease, at a metageneration we do not know.
            let Some(c) = by_deadline(inner, deadline, || backend.inspect(name)).await else {
                return Refresh::Expired;
            };
            let state = match c.result {
                Ok(reply) => match reply.into_value() {
                    Some(state) if object::is_lease(&state, version, owner) => state,
                    _ => return Refresh::Gone,
                },
                Err(_) => return Refresh::failed_before(deadline),
            };
            if a.ambiguous && state.metadata().get(object::EXPIRES) == md.get(object::EXPIRES) {
                // This refresh landed.
                return Refresh::Done {
                    version: state.version(),
                    sent: a.first_sent,
                };
            }
            // An earlier write of ours landed: refresh again, from the version we now know.
            let again = || backend.refresh(name, state.version(), &md);
            let Some(b) = by_deadline(inner, deadline, again).await else {
                return Refresh::Expired;
            };
            match b.result {
                Ok(reply) => Refresh::Done {
                    version: reply.value().version(),
                    sent: b.first_sent,
                },
                // Changed again, or its outcome unknown: the next refresh looks again.
                Err(_) => Refresh::failed_before(deadline),
            }
        }
        Err(BackendError::NotFound) => Refresh::Gone,
        Err(_) => Refresh::failed_before(deadline),
    }
}

/// `op`, retried per the client's policy until the lease's `deadline` and cut off there:
/// `None` once the deadline has passed.
async fn by_deadline<'a, T, F>(inner: &'a Inner, deadline: Instant, op: F) -> Option<Attempted<T>>
where
    F: FnMut() -> BackendFuture<'a, Result<T, BackendError>> + 'a,
    T: 'a,
{
    tokio::time::timeout_at(deadline.into(), inner.call(op, Some(deadline)))
        .await
        .ok()
}

impl Refresh {
    /// A refresh that failed without an answer about the lock (transient errors until the
    /// retry policy gave up, or a refusal such as 403): the lease is lost only once its
    /// deadline has passed, not before (a 429 asks us to wait a second, say).
    fn failed_before(deadline: Instant) -> Self {
        if Instant::now() >= deadline {
            Refresh::Expired
        } else {
            Refresh::Failed
        }
    }
}

/// Deletes our lock object, if it is still ours: `Ok(true)` when our delete removed it.
async fn release(inner: &Inner, shared: &LeaseShared, state: LeaseState) -> Result<bool, Error> {
    let LeaseState {
        version,
        sent,
        gone,
        ..
    } = state;
    if gone {
        return Ok(false);
    }
    let backend = &*inner.backend;
    let name = shared.name();
    if inner.recently_throttled() {
        // The backend enforces about one mutation per second per object: a delete sooner
        // after our last write would only be refused.
        tokio::time::sleep_until((sent + MUTATION_WINDOW + SEND_MARGIN).into()).await;
    }
    // Keep trying while the lease is ours (a delete right after the create meets GCS's
    // one-mutation-per-second limit); after that, expiry frees the lock anyway.
    let give_up = (Instant::now() + inner.config.retry.max_elapsed()).max(shared.deadline());
    let mut version = version;
    let mut ambiguous = false;
    for _ in 0..RELEASE_REREADS {
        let a = inner
            .call(|| backend.release(name, version), Some(give_up))
            .await;
        ambiguous |= a.ambiguous;
        match a.result {
            Ok(_) => return Ok(true),
            Err(BackendError::PreconditionFailed) => {}
            Err(BackendError::NotFound) => return Ok(deleted_by_us(inner, ambiguous, sent)),
            Err(e) => return Err(inner.failure(e)),
        }
        // Changed: by a create after a delete of ours that landed, by someone else after the
        // lease expired, or by a metadata write of ours whose outcome we never learned (a
        // refresh that gave up): then it is still our lease, at a metageneration we did not
        // know, and the delete is sent again conditional on it.
        let c = inner.call(|| backend.inspect(name), Some(give_up)).await;
        match c.result.map(Reply::into_value) {
            Ok(Some(state)) if object::is_lease(&state, version, shared.owner()) => {
                version = state.version();
            }
            Ok(_) => return Ok(deleted_by_us(inner, ambiguous, sent)),
            Err(e) => return Err(inner.failure(e)),
        }
    }
    // Still ours, and changed again at every try: expiry frees it.
    Ok(false)
}

/// How many times a release reads the object after a 412 and deletes again.
const RELEASE_REREADS: usize = 3;

/// Whether a delete of ours removed the object, when it is now gone (404) or not our lease
/// (412 and another generation or owner), after attempts of which one may have landed.
/// Nobody else can take the lock over before the server judges it expired (`updated` + ttl
/// plus a second before `Date`), and `updated` is no earlier than `sent` (our last write
/// cannot land before we sent it). An answer received before `sent` + ttl therefore
/// describes a server on which no takeover could have happened yet (the rule's extra second
/// is left as a cushion for clocks): the change was our own delete (404), or a create after
/// it (412).
fn deleted_by_us(inner: &Inner, ambiguous: bool, sent: Instant) -> bool {
    ambiguous && Instant::now() < sent + inner.config.ttl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_rounds_down_by_less_than_a_tick() {
        let now = Instant::now();
        for ms in [0u64, 1, 99, 100, 101, 12_345] {
            let t = now + Duration::from_millis(ms);
            let g = on_grid(t);
            assert!(g <= t);
            assert!(t - g < TICK);
            assert_eq!(on_grid(g), g);
        }
    }

    /// On a current-thread runtime the driver cannot run before the test yields: the lease
    /// is still in the inbox when its guard goes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lease_released_before_the_driver_looks_never_reaches_it() {
        let client = crate::Client::new(crate::backend::MemoryBackend::new());
        let guard = client.try_acquire("k").await.unwrap();
        assert!(!client.inner.inbox.is_empty(), "the new lease waits");
        drop(guard);
        assert!(client.inner.inbox.is_empty(), "its guard took it back");
        assert_eq!(client.active_leases(), 0);
        let guard = client.try_acquire("k").await.unwrap();
        tokio::task::yield_now().await;
        assert!(client.inner.inbox.is_empty(), "the driver took this one");
        assert!(guard.release().await.unwrap());
        assert!(
            !client.inner.inbox.is_empty(),
            "its id waits for the driver"
        );
        // The driver looks again within a tick of its last look.
        tokio::time::sleep(TICK * 2).await;
        assert!(client.inner.inbox.is_empty(), "the driver forgot it");
        assert_eq!(client.active_leases(), 0);
    }

    /// Behind a busy layer each lease is released before the driver looks: the driver,
    /// woken for one and finding nothing, keeps looking every tick while acquisitions come,
    /// so the next ones do not wake it; without them it goes back to sleep until woken.
    #[tokio::test(flavor = "current_thread")]
    async fn a_driver_woken_for_nothing_looks_again_within_a_tick_unasked() {
        let client = crate::Client::new(crate::backend::MemoryBackend::new());
        let inbox = &client.inner.inbox;
        // A lease of its own, posted and taken back: whether the post asks for a wake-up.
        let post = |id: u64| {
            let shared = LeaseShared::for_test(id, "dimutex/x", Instant::now() + TICK * 50);
            let woken = inbox.post(
                id,
                Lease::new(client.inner.clone(), Arc::new(shared)),
                Instant::now(),
            );
            assert!(inbox.take(id).is_some());
            woken
        };
        let id = 1 << 40;
        drop(client.try_acquire("k").await.unwrap());
        // The driver, started by that acquisition, runs and finds its lease gone.
        tokio::task::yield_now().await;
        assert!(inbox.is_empty());
        assert!(!post(id), "the driver looks within a tick: no wake-up");
        tokio::time::sleep(TICK * 3).await;
        assert!(
            post(id),
            "no acquisitions for a tick: the driver sleeps until woken"
        );
        // Woken from that sleep by an acquisition whose lease is gone when it looks (the
        // layer's case): it looks again within a tick, unasked.
        drop(client.try_acquire("k").await.unwrap());
        tokio::task::yield_now().await;
        assert!(inbox.is_empty());
        assert!(!post(id), "woken for nothing, it still looks within a tick");
    }
}
