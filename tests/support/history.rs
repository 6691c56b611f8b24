//! A history of lock operations on one monotonic clock, and a checker that judges it.
//!
//! The method is Jepsen's: record every operation a client performs — including those whose
//! outcome it cannot know — and let an independent checker decide afterwards whether the run
//! kept the promises. Two sources feed one [`History`]:
//!
//! - the test's own client-level operations: `acquire`, `release`, entering and leaving the
//!   critical section, and a lost-lease signal seen while holding;
//! - every backend request the library sends, seen by [`Recording`], a [`Backend`] wrapper:
//!   creates, inspects, takeovers, refreshes and deletes, with their outcome (`ok`, `failed` when
//!   the server refused it, `unknown` when it may or may not have taken effect: a 5xx, a dropped
//!   connection, a timeout) and what the server said (generation, `updated`, `Date`).
//!
//! Writes to a [`Resource`](super::fenced::Resource) are recorded there and read by the checker
//! too. [`Checker::check`] reports overlapping critical sections per key, superseded fencing
//! tokens accepted by a store, lost updates, leaked lock objects, unresolved ambiguous
//! operations and spurious lost-lease signals, and [`Report::print`] prints a summary table.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dimutex::backend::{Backend, BackendError, BoxFuture, Metadata, ObjectState, Reply, Version};

use super::fenced::Resource;

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    // Client-level operations, recorded by the test.
    /// `try_acquire` / `acquire` (or the layer's acquisition, seen from the handler).
    Acquire,
    /// `LockGuard::release`.
    Release,
    /// Entering the critical section (after the acquisition returned).
    Enter,
    /// Leaving the critical section (before the release is asked for).
    Exit,
    /// The lost-lease signal, observed while holding.
    Lost,
    // Backend requests, recorded by [`Recording`].
    /// Create with `ifGenerationMatch=0`.
    Create,
    /// Read of the lock object.
    Inspect,
    /// Overwrite of an expired lock.
    Takeover,
    /// Metadata patch of a held lock.
    Refresh,
    /// Conditional delete.
    Delete,
}

impl Kind {
    /// A backend request that changes the lock object.
    pub fn is_backend_write(self) -> bool {
        matches!(
            self,
            Kind::Create | Kind::Takeover | Kind::Refresh | Kind::Delete
        )
    }

    pub fn is_backend(self) -> bool {
        self.is_backend_write() || self == Kind::Inspect
    }
}

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It took effect.
    Ok,
    /// It certainly did not take effect (refused, held, precondition failed, 429).
    Failed,
    /// It may or may not have taken effect (5xx, dropped connection, timeout).
    Unknown,
}

/// One operation: an interval on the history's monotonic clock.
#[derive(Debug, Clone)]
pub struct Event {
    /// When it was invoked, since the history's origin.
    pub start: Duration,
    /// When it completed (equal to `start` for point events).
    pub end: Duration,
    pub kind: Kind,
    /// The lock key (the object name less the prefix for backend requests).
    pub key: String,
    /// Who did it.
    pub client: String,
    /// The fencing token concerned: the acquired one; for refreshes and deletes the generation
    /// they were conditional on; for creates and takeovers the generation they wrote.
    pub token: Option<i64>,
    pub outcome: Outcome,
    /// The version a conditional request expected.
    pub expected: Option<Version>,
    /// The object's `updated` after a successful write (server clock).
    pub updated: Option<SystemTime>,
    /// The response's `Date` (server clock).
    pub server_date: Option<SystemTime>,
    pub detail: String,
    /// The owner id a create or takeover wrote; empty for other events.
    pub owner: String,
}

/// The recorder: append-only, shared by every client of a run.
pub struct History {
    origin: Instant,
    events: Mutex<Vec<Event>>,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("events", &self.len())
            .finish()
    }
}

impl History {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: tokio::time::Instant::now().into_std(),
            events: Mutex::new(Vec::new()),
        })
    }

    /// Time since the origin, on tokio's clock (which paused test time moves).
    pub fn now(&self) -> Duration {
        tokio::time::Instant::now()
            .into_std()
            .saturating_duration_since(self.origin)
    }

    /// The instant `at` (since the origin) stands for.
    pub fn instant(&self, at: Duration) -> Instant {
        self.origin + at
    }

    /// Records a completed operation invoked at `start` (from [`now`](Self::now)). The end time
    /// is taken under the recorder's lock, so events are ordered as they completed.
    #[allow(clippy::too_many_arguments)]
    pub fn complete(
        &self,
        start: Duration,
        kind: Kind,
        key: &str,
        client: &str,
        token: Option<i64>,
        outcome: Outcome,
        detail: impl Into<String>,
    ) {
        self.push(Event {
            start,
            end: Duration::ZERO,
            kind,
            key: key.to_owned(),
            client: client.to_owned(),
            token,
            outcome,
            expected: None,
            updated: None,
            server_date: None,
            detail: detail.into(),
            owner: String::new(),
        });
    }

    /// Releases `guard` and records it: `ok` when the lock was still ours, `failed` when it
    /// was not, `unknown` when the release failed (expiry frees the lock then).
    pub async fn release(
        &self,
        guard: dimutex::LockGuard,
        id: &str,
    ) -> Result<bool, dimutex::Error> {
        let start = self.now();
        let key = guard.key().as_str().to_owned();
        let token = guard.token().get();
        let result = guard.release().await;
        let outcome = match &result {
            Ok(true) => Outcome::Ok,
            Ok(false) => Outcome::Failed,
            Err(_) => Outcome::Unknown,
        };
        let detail = format!("{result:?}");
        self.complete(start, Kind::Release, &key, id, Some(token), outcome, detail);
        result
    }

    /// Records an instantaneous event (enter, exit, lost) now.
    pub fn point(&self, kind: Kind, key: &str, client: &str, token: Option<i64>) {
        let mut events = self.lock();
        let now = self.now();
        events.push(Event {
            start: now,
            end: now,
            kind,
            key: key.to_owned(),
            client: client.to_owned(),
            token,
            outcome: Outcome::Ok,
            expected: None,
            updated: None,
            server_date: None,
            detail: String::new(),
            owner: String::new(),
        });
    }

    /// Records a fully described event; its `end` is set to now (under the lock) when zero.
    pub fn push(&self, mut event: Event) {
        let mut events = self.lock();
        if event.end.is_zero() {
            event.end = self.now().max(event.start);
        }
        events.push(event);
    }

    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------------------------
// The recording backend.

/// A [`Backend`] that records every request of one client into a [`History`].
pub struct Recording {
    inner: Arc<dyn Backend>,
    history: Arc<History>,
    client: String,
    prefix: String,
}

impl fmt::Debug for Recording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recording")
            .field("client", &self.client)
            .field("inner", &self.inner)
            .finish()
    }
}

impl Recording {
    /// Records the requests `client` sends through `inner`; object names lose `prefix` to
    /// become keys.
    pub fn new(
        inner: impl Backend,
        history: Arc<History>,
        client: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        Self {
            inner: Arc::new(inner),
            history,
            client: client.into(),
            prefix: prefix.into(),
        }
    }

    fn pending(&self, kind: Kind, name: &str, expected: Option<Version>) -> Pending {
        Pending {
            history: self.history.clone(),
            event: Some(Event {
                start: self.history.now(),
                end: Duration::ZERO,
                kind,
                key: name.strip_prefix(&self.prefix).unwrap_or(name).to_owned(),
                client: self.client.clone(),
                token: expected.map(|v| v.generation()),
                outcome: Outcome::Unknown,
                expected,
                updated: None,
                server_date: None,
                detail: "cancelled (client timeout)".into(),
                owner: String::new(),
            }),
        }
    }
}

/// An in-flight request: recorded as `unknown` if its future is dropped (the client's request
/// timeout, or a runtime going away), else with its outcome.
struct Pending {
    history: Arc<History>,
    event: Option<Event>,
}

impl Pending {
    /// Notes the owner id a create or takeover writes.
    fn writing(mut self, metadata: &Metadata) -> Self {
        if let Some(event) = &mut self.event {
            event.owner = metadata.get("owner").cloned().unwrap_or_default();
        }
        self
    }

    fn finish<T>(
        mut self,
        result: &Result<Reply<T>, BackendError>,
        state: fn(&T) -> Option<&ObjectState>,
    ) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        match result {
            Ok(reply) => {
                event.outcome = Outcome::Ok;
                event.server_date = reply.server_time();
                event.detail = String::new();
                if let Some(s) = state(reply.value()) {
                    if matches!(event.kind, Kind::Create | Kind::Takeover) {
                        event.token = Some(s.version().generation());
                    }
                    if event.kind.is_backend_write() {
                        event.updated = Some(s.updated());
                    }
                    if event.kind == Kind::Inspect {
                        event.token = Some(s.version().generation());
                        event.detail = s.metadata().get("owner").cloned().unwrap_or_default();
                    }
                }
            }
            Err(e) => {
                event.outcome = classify(e);
                event.detail = e.to_string();
            }
        }
        self.history.push(event);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            self.history.push(event);
        }
    }
}

fn written(state: &ObjectState) -> Option<&ObjectState> {
    Some(state)
}

fn read(state: &Option<ObjectState>) -> Option<&ObjectState> {
    state.as_ref()
}

fn deleted(_: &()) -> Option<&ObjectState> {
    None
}

/// Whether a failed request may have taken effect.
pub fn classify(e: &BackendError) -> Outcome {
    match e {
        // GCS refuses a rate-limited request before applying it.
        BackendError::Transient { .. } if e.is_rate_limited() => Outcome::Failed,
        BackendError::Transient { .. } => Outcome::Unknown,
        _ => Outcome::Failed,
    }
}

impl Backend for Recording {
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let pending = self.pending(Kind::Create, name, None).writing(metadata);
        Box::pin(async move {
            let r = self.inner.create(name, metadata).await;
            pending.finish(&r, written);
            r
        })
    }

    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        let pending = self.pending(Kind::Inspect, name, None);
        Box::pin(async move {
            let r = self.inner.inspect(name).await;
            pending.finish(&r, read);
            r
        })
    }

    fn takeover<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let pending = self
            .pending(Kind::Takeover, name, Some(expected))
            .writing(metadata);
        Box::pin(async move {
            let r = self.inner.takeover(name, expected, metadata).await;
            pending.finish(&r, written);
            r
        })
    }

    fn refresh<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let pending = self.pending(Kind::Refresh, name, Some(expected));
        Box::pin(async move {
            let r = self.inner.refresh(name, expected, metadata).await;
            pending.finish(&r, written);
            r
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        let pending = self.pending(Kind::Delete, name, Some(expected));
        Box::pin(async move {
            let r = self.inner.release(name, expected).await;
            pending.finish(&r, deleted);
            r
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The checker.

/// What the checker is given besides the history.
pub struct Checker<'a> {
    history: &'a History,
    stores: Vec<&'a Resource>,
    leftovers: Vec<String>,
    faults_injected: u64,
    requests: u64,
    ttl: Duration,
    retry_slack: Duration,
    shutdowns: Vec<(String, Duration, Duration)>,
    paused: Vec<String>,
    settled: bool,
}

/// Two critical sections of one key that overlap in time.
#[derive(Debug, Clone)]
pub struct Overlap {
    pub key: String,
    pub first: (String, Option<i64>, Duration, Duration),
    pub second: (String, Option<i64>, Duration, Duration),
}

/// A write a store accepted from a holder whose token had been superseded: a newer token of
/// the same key had been granted before the write.
#[derive(Debug, Clone)]
pub struct Superseded {
    pub store: &'static str,
    pub key: String,
    pub client: String,
    pub token: i64,
    pub newer: i64,
    pub at: Duration,
}

/// A lost-lease signal that nothing in the history explains.
#[derive(Debug, Clone)]
pub struct SpuriousLost {
    pub key: String,
    pub client: String,
    pub token: Option<i64>,
    pub at: Duration,
    /// The lease's local deadline implied by its last acknowledged write.
    pub deadline: Option<Duration>,
}

/// The checker's findings.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Client-level operations (acquire, release, critical sections, store writes).
    pub operations: usize,
    /// Backend requests the clients sent.
    pub backend_requests: usize,
    /// Requests the server answered (when known).
    pub server_requests: u64,
    pub faults_injected: u64,
    /// Successful acquisitions.
    pub acquisitions: usize,
    /// Cycles that ended with the owner's own delete removing its lock object (judged from the
    /// history, not from what `release()` returned).
    pub owner_releases: usize,
    /// Cycles whose lock was freed otherwise (expiry, takeover) or not at all.
    pub other_releases: usize,
    /// Releases that claimed too much: `release()` said "ours" although the owner's delete
    /// did not remove the object. Always a violation.
    pub release_misreports: Vec<Event>,
    /// Releases that claimed too little: the owner's delete removed the object but
    /// `release()` said "not ours", although its answer came within the ttl of the lease's
    /// last acknowledged write (after that, `false` is all it can say: it cannot tell its own
    /// landed delete from a takeover); a violation only above 5 % of releases.
    pub release_underclaims: Vec<Event>,
    pub overlaps: Vec<Overlap>,
    pub store_writes: usize,
    pub store_rejected: usize,
    pub superseded_accepted: Vec<Superseded>,
    /// Accepted read-modify-writes whose read was stale: an increment was lost.
    pub lost_updates: usize,
    pub leftovers: Vec<String>,
    /// Backend writes whose outcome the client could not know.
    pub ambiguous: usize,
    /// How each was resolved.
    pub resolved: BTreeMap<&'static str, usize>,
    pub unresolved: Vec<Event>,
    pub lost_signals: usize,
    pub spurious_lost: Vec<SpuriousLost>,
    /// Refreshes acknowledged by the server.
    pub refreshes: usize,
}

impl<'a> Checker<'a> {
    pub fn new(history: &'a History, ttl: Duration) -> Self {
        Self {
            history,
            stores: Vec::new(),
            leftovers: Vec::new(),
            faults_injected: 0,
            requests: 0,
            ttl,
            retry_slack: Duration::from_secs(2),
            shutdowns: Vec::new(),
            paused: Vec::new(),
            settled: false,
        }
    }

    /// The history ends with every client shut down and the store's objects listed (the
    /// [`leftovers`](Self::leftovers)): an ambiguous write that nothing later answered is
    /// judged by that final state, since an object it left behind would be a leftover.
    pub fn settled(mut self) -> Self {
        self.settled = true;
        self
    }

    /// A client's `shutdown()`, from its call to its return: the lost signals of that client
    /// in between have their cause (shutdown gives up every lease it holds).
    pub fn shutdown(mut self, client: &str, start: Duration, end: Duration) -> Self {
        self.shutdowns.push((client.to_owned(), start, end));
        self
    }

    /// Critical sections and store writes recorded under `client` are a paused holder's: a
    /// holder that stopped past its ttl may overlap the next one, and its late writes are
    /// refused by a fenced store; what it must never get is a write accepted with a
    /// superseded token, which is still checked.
    pub fn paused_holder(mut self, client: &str) -> Self {
        self.paused.push(client.to_owned());
        self
    }

    /// How early before its local deadline a lease may be given up when its last refresh
    /// attempts failed transiently: the clients' longest retry delay (the library stops
    /// retrying when the next delay would end past the deadline). Default 2 s, the default
    /// retry policy's.
    pub fn retry_slack(mut self, slack: Duration) -> Self {
        self.retry_slack = slack;
        self
    }

    pub fn store(mut self, store: &'a Resource) -> Self {
        self.stores.push(store);
        self
    }

    /// Lock objects that exist after quiescence (and the ttl).
    pub fn leftovers(mut self, names: Vec<String>) -> Self {
        self.leftovers = names;
        self
    }

    pub fn faults(mut self, injected: u64) -> Self {
        self.faults_injected = injected;
        self
    }

    pub fn server_requests(mut self, requests: u64) -> Self {
        self.requests = requests;
        self
    }

    pub fn check(&self) -> Report {
        let mut events = self.history.events();
        events.sort_by_key(|e| (e.start, e.end));
        let mut report = Report {
            faults_injected: self.faults_injected,
            server_requests: self.requests,
            leftovers: self.leftovers.clone(),
            ..Report::default()
        };
        report.operations = events.iter().filter(|e| !e.kind.is_backend()).count()
            + self.stores.iter().map(|s| s.writes().len()).sum::<usize>();
        report.backend_requests = events.iter().filter(|e| e.kind.is_backend()).count();
        report.acquisitions = events
            .iter()
            .filter(|e| e.kind == Kind::Acquire && e.outcome == Outcome::Ok)
            .count();
        for r in events.iter().filter(|e| e.kind == Kind::Release) {
            let removed = owner_delete_landed(&events, r);
            if removed {
                report.owner_releases += 1;
            } else {
                report.other_releases += 1;
            }
            // After its client's shutdown began, the lease was the shutdown's to give up.
            let after_shutdown = self
                .shutdowns
                .iter()
                .any(|(c, start, _)| *c == r.client && r.end >= *start);
            // A paused holder's lease ran out long before: it cannot tell its delete from a
            // takeover.
            let paused = events.iter().any(|e| {
                e.kind == Kind::Enter
                    && e.key == r.key
                    && e.token == r.token
                    && self.paused.contains(&e.client)
            });
            // Its answer came after the lease's ttl since its last acknowledged write: a
            // takeover could have happened by then, and `false` is all it can say.
            let unsure =
                last_acknowledged_send(&events, r).is_none_or(|sent| r.end >= sent + self.ttl);
            let paused = paused || unsure;
            // An error claims nothing either way.
            match (removed, r.outcome) {
                (false, Outcome::Ok) => report.release_misreports.push(r.clone()),
                (true, Outcome::Failed) if !after_shutdown && !paused => {
                    report.release_underclaims.push(r.clone())
                }
                _ => {}
            }
        }
        report.refreshes = events
            .iter()
            .filter(|e| e.kind == Kind::Refresh && e.outcome == Outcome::Ok)
            .count();
        report.overlaps = overlaps(&events, self.history.now());
        report
            .overlaps
            .retain(|o| !self.paused.contains(&o.first.0) && !self.paused.contains(&o.second.0));
        self.check_stores(&events, &mut report);
        check_ambiguous(&events, self.settled, &mut report);
        self.check_lost(&events, &mut report);
        report
    }

    fn check_stores(&self, events: &[Event], report: &mut Report) {
        // When each token was granted (its acquisition returned), per key.
        let mut grants: HashMap<&str, Vec<(Duration, i64)>> = HashMap::new();
        for e in events {
            if e.kind == Kind::Acquire && e.outcome == Outcome::Ok {
                if let Some(t) = e.token {
                    grants.entry(e.key.as_str()).or_default().push((e.end, t));
                }
            }
        }
        for store in &self.stores {
            // Per key, whether the last accepted write was a paused holder's.
            let mut after_paused: HashMap<String, bool> = HashMap::new();
            for w in store.writes() {
                report.store_writes += 1;
                let paused_before = w.accepted
                    && after_paused
                        .insert(w.key.clone(), self.paused.contains(&w.client))
                        .unwrap_or(false);
                if !w.accepted {
                    if !self.paused.contains(&w.client) {
                        report.store_rejected += 1;
                    }
                    continue;
                }
                // A paused holder's late write between the next holder's read and write is
                // lost: fencing refuses writes older than the newest written, not reads.
                if w.stale_read && !paused_before {
                    report.lost_updates += 1;
                }
                let newer = if self.paused.contains(&w.client) {
                    // A paused holder may write before the next holder's first write, and
                    // fencing cannot refuse that; after it, the store must.
                    let writes = store.writes();
                    writes
                        .iter()
                        .filter(|o| {
                            o.key == w.key && o.accepted && o.at < w.at && o.token > w.token
                        })
                        .map(|o| o.token)
                        .max()
                } else {
                    grants.get(w.key.as_str()).and_then(|g| {
                        g.iter()
                            .filter(|(at, t)| *at < w.at && *t > w.token)
                            .map(|(_, t)| *t)
                            .max()
                    })
                };
                if let Some(newer) = newer {
                    report.superseded_accepted.push(Superseded {
                        store: store.name(),
                        key: w.key.clone(),
                        client: w.client.clone(),
                        token: w.token,
                        newer,
                        at: w.at,
                    });
                }
            }
        }
    }

    /// A lost signal is explained when another client wrote the key's object first (it was
    /// taken over or broken), or when the lease's local deadline — the send time of its last
    /// acknowledged write + ttl − ttl/10 — had passed. Anything else is spurious: for instance
    /// a refresh that landed but was reported lost.
    fn check_lost(&self, events: &[Event], report: &mut Report) {
        let live = self.ttl - self.ttl / 10;
        let tolerance = Duration::from_millis(100);
        for lost in events.iter().filter(|e| e.kind == Kind::Lost) {
            report.lost_signals += 1;
            let foreign_write = events.iter().any(|e| {
                e.key == lost.key
                    && e.client != lost.client
                    && matches!(e.kind, Kind::Create | Kind::Takeover | Kind::Delete)
                    && e.outcome != Outcome::Failed
                    && e.start < lost.start
            });
            let shut_down = self
                .shutdowns
                .iter()
                .any(|(c, start, end)| *c == lost.client && (*start..=*end).contains(&lost.start));
            if foreign_write || shut_down {
                continue;
            }
            let acked = last_acknowledged_send(events, lost);
            let deadline = acked.map(|sent| sent + live);
            // Gave up early because no retry fitted before the deadline: only after a transient
            // failure (a definite "precondition failed" needs a foreign write to explain it).
            let last_attempt = events
                .iter()
                .filter(|e| {
                    e.key == lost.key
                        && e.client == lost.client
                        && matches!(e.kind, Kind::Refresh | Kind::Inspect)
                        && e.end <= lost.start + tolerance
                        && acked.is_some_and(|a| e.start >= a)
                })
                .max_by_key(|e| e.end);
            let transient = last_attempt
                .is_some_and(|e| e.outcome == Outcome::Unknown || e.detail.contains("429"));
            let slack = if transient {
                self.retry_slack
            } else {
                Duration::ZERO
            };
            match deadline {
                Some(d) if lost.start + tolerance + slack < d => {
                    report.spurious_lost.push(SpuriousLost {
                        key: lost.key.clone(),
                        client: lost.client.clone(),
                        token: lost.token,
                        at: lost.start,
                        deadline,
                    });
                }
                _ => {}
            }
        }
    }
}

/// The send time of the last write of `lost`'s lease acknowledged before `lost`, as the library
/// counts it: the attempt of a create or takeover that succeeded, then refreshes.
fn last_acknowledged_send(events: &[Event], lost: &Event) -> Option<Duration> {
    let token = lost.token?;
    let mine = |e: &&Event| e.key == lost.key && e.client == lost.client && e.start < lost.start;
    let acquire = events
        .iter()
        .filter(mine)
        .rfind(|e| e.kind == Kind::Acquire && e.token == Some(token))?;
    // The acquisition: the attempt of the create or takeover that succeeded (any earlier one
    // that landed would have made it fail); for an adopted write (no attempt succeeded
    // visibly), the first write of the acquisition.
    let inside: Vec<&Event> = events
        .iter()
        .filter(mine)
        .filter(|e| {
            matches!(e.kind, Kind::Create | Kind::Takeover | Kind::Inspect)
                && e.start >= acquire.start
                && e.end <= acquire.end
        })
        .collect();
    let mut acked = match inside
        .iter()
        .rposition(|e| e.kind != Kind::Inspect && e.outcome == Outcome::Ok)
    {
        Some(i) => inside[i].start,
        None => inside
            .iter()
            .find(|e| e.kind != Kind::Inspect)
            .map_or(acquire.start, |e| e.start),
    };
    // Refreshes, grouped by the version they expected (one group is one refresh call and its
    // retries): a group is acknowledged when one of its attempts succeeded or a later request
    // of the lease expected another version (the library moves on only after a success).
    let mut groups: Vec<(Version, Duration, bool)> = Vec::new();
    for e in events.iter().filter(mine).filter(|e| {
        matches!(e.kind, Kind::Refresh | Kind::Delete)
            && e.start > acquire.end
            && e.token == Some(token)
    }) {
        let Some(v) = e.expected else { continue };
        let ok = e.kind == Kind::Refresh && e.outcome == Outcome::Ok && e.end <= lost.start;
        match groups.last_mut() {
            Some((gv, _, g_ok)) if *gv == v => *g_ok |= ok,
            _ => groups.push((v, e.start, ok)),
        }
    }
    for (i, (_, start, ok)) in groups.iter().enumerate() {
        if *ok || i + 1 < groups.len() {
            acked = acked.max(*start);
        }
    }
    Some(acked)
}

/// Whether the owner's delete removed its lock object during `release`: a delete attempt of the
/// release succeeded, or one had an unknown outcome and the next write of the key that
/// succeeded was a create (the object was gone: nobody else deletes a lock that is not theirs;
/// an expired lock is overwritten, not deleted).
fn owner_delete_landed(events: &[Event], release: &Event) -> bool {
    let deletes: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.kind == Kind::Delete
                && e.client == release.client
                && e.key == release.key
                && e.token == release.token
                && e.start >= release.start
                && e.start <= release.end
        })
        .collect();
    if deletes.iter().any(|d| d.outcome == Outcome::Ok) {
        return true;
    }
    let Some(first_unknown) = deletes.iter().find(|d| d.outcome == Outcome::Unknown) else {
        return false;
    };
    // A retry answered 404 (not found) after an unknown attempt: ours landed.
    if deletes.iter().any(|d| {
        d.start > first_unknown.start
            && d.outcome == Outcome::Failed
            && d.detail.contains("not found")
    }) {
        return true;
    }
    events
        .iter()
        .filter(|e| {
            e.key == release.key
                && matches!(e.kind, Kind::Create | Kind::Takeover)
                && e.end >= first_unknown.start
                && landed(events, e)
        })
        .min_by_key(|e| e.start)
        .is_some_and(|e| e.kind == Kind::Create)
}

/// Whether a write took effect: it succeeded, or its outcome was unknown and a later read
/// found the key at a generation no successful write made, owned by the write's client.
fn landed(events: &[Event], write: &Event) -> bool {
    match write.outcome {
        Outcome::Ok => true,
        Outcome::Failed => false,
        Outcome::Unknown => events.iter().any(|read| {
            read.kind == Kind::Inspect
                && read.key == write.key
                && read.outcome == Outcome::Ok
                && read.start >= write.start
                && read.detail.split('#').next() == Some(write.client.as_str())
                && read.token.is_some_and(|g| {
                    !events.iter().any(|w| {
                        matches!(w.kind, Kind::Create | Kind::Takeover)
                            && w.outcome == Outcome::Ok
                            && w.token == Some(g)
                    })
                })
        }),
    }
}

/// Pairs enter/exit per (key, client, token) and finds intersecting intervals per key.
fn overlaps(events: &[Event], end_of_history: Duration) -> Vec<Overlap> {
    type Id = (String, String, Option<i64>);
    let mut open: HashMap<Id, Duration> = HashMap::new();
    type Section = (Duration, Duration, String, Option<i64>);
    let mut intervals: BTreeMap<String, Vec<Section>> = BTreeMap::new();
    let mut points: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind, Kind::Enter | Kind::Exit))
        .collect();
    points.sort_by_key(|e| e.start);
    for e in points {
        let id = (e.key.clone(), e.client.clone(), e.token);
        match e.kind {
            Kind::Enter => {
                open.insert(id, e.start);
            }
            _ => {
                if let Some(start) = open.remove(&id) {
                    intervals
                        .entry(id.0)
                        .or_default()
                        .push((start, e.start, id.1, id.2));
                }
            }
        }
    }
    // A section never left (its holder crashed without a record) lasts to the end.
    for ((key, client, token), start) in open {
        intervals
            .entry(key)
            .or_default()
            .push((start, end_of_history, client, token));
    }
    let mut found = Vec::new();
    for (key, mut list) in intervals {
        list.sort_by_key(|i| (i.0, i.1));
        // Compare each section with the one reaching furthest among those before it.
        let mut furthest: Option<&Section> = None;
        for i in &list {
            if let Some(f) = furthest {
                if i.0 < f.1 {
                    found.push(Overlap {
                        key: key.clone(),
                        first: (f.2.clone(), f.3, f.0, f.1),
                        second: (i.2.clone(), i.3, i.0, i.1),
                    });
                }
            }
            if furthest.is_none_or(|f| i.1 > f.1) {
                furthest = Some(i);
            }
        }
    }
    found
}

/// Every backend write with an unknown outcome must be resolved by what followed:
/// - `adopted`: the acquisition it was part of returned the lock (the library re-read the
///   object and found its own write, or retried into a definite answer);
/// - `refused`: the acquisition it was part of ended "held": the object belonged to another;
/// - `confirmed`: a later request of the same lease got a definite answer about the object;
/// - `superseded`: a later acquisition of the key (by anyone) succeeded, so whatever the write
///   did, it no longer holds the lock (expired and taken over, or never landed).
fn check_ambiguous(events: &[Event], settled: bool, report: &mut Report) {
    for e in events
        .iter()
        .filter(|e| e.kind.is_backend_write() && e.outcome == Outcome::Unknown)
    {
        report.ambiguous += 1;
        let enclosing = events.iter().find(|a| {
            a.kind == Kind::Acquire
                && a.client == e.client
                && a.key == e.key
                && a.start <= e.start
                && e.end <= a.end
        });
        let how = match (e.kind, enclosing.map(|a| a.outcome)) {
            (Kind::Create | Kind::Takeover, Some(Outcome::Ok)) => Some("adopted"),
            (Kind::Create | Kind::Takeover, Some(Outcome::Failed)) => Some("refused"),
            _ => None,
        };
        let how = how.or_else(|| {
            let same_lease = |l: &Event| {
                l.client == e.client
                    && l.key == e.key
                    && l.start >= e.end
                    && l.outcome != Outcome::Unknown
                    && matches!(l.kind, Kind::Refresh | Kind::Delete | Kind::Inspect)
                    && (l.kind == Kind::Inspect || l.token == e.token)
            };
            let later_acquire = |l: &Event| {
                l.key == e.key
                    && l.kind == Kind::Acquire
                    && l.outcome == Outcome::Ok
                    && l.start >= e.end
            };
            // The client's background work re-read the key (an acquisition dropped while its
            // write was in flight is cleaned up that way), outside any acquisition of its own.
            let cleaned_up = |l: &Event| {
                l.client == e.client
                    && l.key == e.key
                    && l.start >= e.end
                    && l.outcome != Outcome::Unknown
                    && matches!(l.kind, Kind::Inspect | Kind::Delete)
                    && !events.iter().any(|a| {
                        a.kind == Kind::Acquire
                            && a.client == e.client
                            && a.key == e.key
                            && a.start <= l.start
                            && l.end <= a.end
                    })
            };
            // Conditional on a generation that another write had already replaced: it could not
            // take effect.
            let replaced_before = |l: &Event| {
                l.key == e.key
                    && matches!(l.kind, Kind::Create | Kind::Takeover)
                    && l.outcome == Outcome::Ok
                    && l.end <= e.start
                    && l.token
                        .zip(e.expected)
                        .is_some_and(|(t, x)| t > x.generation())
            };
            if matches!(e.kind, Kind::Refresh | Kind::Delete) && events.iter().any(same_lease) {
                Some("confirmed")
            } else if matches!(e.kind, Kind::Refresh | Kind::Delete)
                && events.iter().any(replaced_before)
            {
                Some("moot")
            } else if matches!(e.kind, Kind::Create | Kind::Takeover)
                && events.iter().any(cleaned_up)
            {
                Some("cleaned up")
            } else if events.iter().any(later_acquire) {
                Some("superseded")
            } else if settled {
                Some("settled")
            } else {
                None
            }
        });
        match how {
            Some(how) => *report.resolved.entry(how).or_default() += 1,
            None => report.unresolved.push(e.clone()),
        }
    }
}

impl Report {
    /// Releases by the owner as a share of the cycles that asked for a release, in percent.
    pub fn owner_release_pct(&self) -> f64 {
        let cycles = self.owner_releases + self.other_releases;
        if cycles == 0 {
            return 100.0;
        }
        100.0 * self.owner_releases as f64 / cycles as f64
    }

    pub fn resolved_total(&self) -> usize {
        self.resolved.values().sum()
    }

    /// The summary table.
    pub fn print(&self, label: &str) {
        let resolved = self
            .resolved
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!("┌─ {label}");
        eprintln!(
            "│ operations {:>6}   backend requests {:>6}   server requests {:>6}   faults injected {:>5}",
            self.operations, self.backend_requests, self.server_requests, self.faults_injected
        );
        eprintln!(
            "│ acquisitions {:>4}   owner releases {:>4}/{} ({:.1} %, overclaimed {}, underclaimed {})   refreshes {:>4}   lost signals {} (spurious {})",
            self.acquisitions,
            self.owner_releases,
            self.owner_releases + self.other_releases,
            self.owner_release_pct(),
            self.release_misreports.len(),
            self.release_underclaims.len(),
            self.refreshes,
            self.lost_signals,
            self.spurious_lost.len()
        );
        eprintln!(
            "│ overlaps {:>3}   store writes {:>5} (rejected {}, superseded accepted {}, lost updates {})   leftovers {}",
            self.overlaps.len(),
            self.store_writes,
            self.store_rejected,
            self.superseded_accepted.len(),
            self.lost_updates,
            self.leftovers.len()
        );
        eprintln!(
            "└ ambiguous {:>3}   resolved {:>3} [{resolved}]   unresolved {}",
            self.ambiguous,
            self.resolved_total(),
            self.unresolved.len()
        );
        for o in self.overlaps.iter().take(5) {
            eprintln!("  overlap: {o:?}");
        }
        for s in self.superseded_accepted.iter().take(5) {
            eprintln!("  superseded token accepted: {s:?}");
        }
        for s in self.spurious_lost.iter().take(5) {
            eprintln!("  spurious lost signal: {s:?}");
        }
        for u in self.unresolved.iter().take(5) {
            eprintln!("  unresolved ambiguous: {u:?}");
        }
        for l in self.leftovers.iter().take(5) {
            eprintln!("  leftover: {l}");
        }
    }

    /// What breaks the invariants of a correct lock with well-behaved holders, one line each.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.overlaps.is_empty() {
            v.push(format!(
                "overlapping critical sections: {:?}",
                self.overlaps
            ));
        }
        if !self.superseded_accepted.is_empty() {
            v.push(format!(
                "a store accepted a superseded token: {:?}",
                self.superseded_accepted
            ));
        }
        if self.store_rejected > 0 {
            v.push(format!(
                "a store saw {} writes by a stale holder",
                self.store_rejected
            ));
        }
        if self.lost_updates > 0 {
            v.push(format!("{} lost updates", self.lost_updates));
        }
        if !self.leftovers.is_empty() {
            v.push(format!("leaked lock objects: {:?}", self.leftovers));
        }
        if !self.unresolved.is_empty() {
            v.push(format!(
                "unresolved ambiguous operations: {:?}",
                self.unresolved
            ));
        }
        if !self.release_misreports.is_empty() {
            v.push(format!(
                "{} releases claimed a lock the history shows was not theirs: {:?}",
                self.release_misreports.len(),
                self.release_misreports
            ));
        }
        let releases = self.owner_releases + self.other_releases;
        if self.release_underclaims.len() * 20 > releases {
            v.push(format!(
                "{} of {releases} releases said \"not ours\" although their delete removed the lock: {:?}",
                self.release_underclaims.len(),
                self.release_underclaims
            ));
        }
        if !self.spurious_lost.is_empty() {
            v.push(format!(
                "spurious lost-lease signals: {:?}",
                self.spurious_lost
            ));
        }
        v
    }

    /// Panics with every violation found.
    pub fn assert_clean(&self, label: &str) {
        let v = self.violations();
        assert!(v.is_empty(), "{label}:\n{}", v.join("\n"));
    }
}
