//! Taking a lock: a small state machine of named steps.
//!
//! ```text
//!            ┌──────── 412 ────────┐
//!  Create ───┤                     ▼
//!    ▲       └─ 200: acquired    Inspect ── ours (a lost reply) ──▶ adopted
//!    │                             │  │
//!    └──── absent (wait a moment ──┘  ├── expired ──▶ Takeover ── 200: acquired
//!          if we saw it held)         │                  └── 412/404 ──▶ Inspect
//!                                     ├── a live record, if asked for ──▶ Record
//!                                     └── held: try ──▶ Held; wait ──▶ sleep, Inspect
//! ```
//!
//! In try mode a held lock ends the acquisition at once; in wait mode it is polled with
//! reads (never by repeating the create) until the deadline. Transient failures are retried
//! within the retry policy's budget (try mode) or until the deadline (wait mode). An
//! acquisition that gives up while a write of ours may have landed reads the object once more
//! and adopts it if it is ours; what it cannot resolve, its [`Trace`] tells the caller.
//!
//! A completed record (the idempotency layer's) is a lock whose ttl is its retention: held
//! while it is live, taken over once it has expired. An acquisition that asks for records
//! ends at a live one and hands it back.

use std::time::{Duration, Instant, SystemTime};

use super::retry::{Attempted, On429};
use super::{MUTATION_WINDOW, Protocol, jitter};
use crate::backend::{BackendError, ObjectState, Reply, Version};
use crate::backoff::Delays;
use crate::error::Error;
use crate::object::{self, Verdict};

/// How an acquisition ends when the lock is held elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// At once: [`Error::Held`].
    Try,
    /// Polling until the deadline.
    WaitUntil(Instant),
}

/// In try mode, how many times the lock may vanish between our create and our inspect, or be
/// found expired and changed again before our takeover, before we report it as held (a hot
/// key changing hands under us, or a peer that keeps writing a lock that looks expired).
const TRY_ROUNDS: usize = 4;

/// What an acquisition has written, for whoever must clean up after it.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    first_write: Option<Instant>,
    in_flight: bool,
    may_have_landed: bool,
}

impl Trace {
    /// Whether a write of ours is in flight, or may have landed without a read since that
    /// shows otherwise: the object may be ours, and must be looked at before it is left.
    pub(crate) fn is_unresolved(&self) -> bool {
        self.in_flight || self.may_have_landed
    }
}

/// How the lock was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    Created,
    TookOver,
    /// A write of ours had landed although its reply was lost.
    Adopted,
}

/// A lock taken.
#[derive(Debug)]
pub(crate) struct Acquired {
    pub(crate) state: ObjectState,
    /// When the write that made the object was sent (for an adopted object, the first write
    /// of the acquisition): the lease is timed from it.
    pub(crate) sent: Instant,
    pub(crate) how: How,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Create,
    Takeover(Version),
    Inspect,
}

enum Next {
    Step(Step),
    Acquired(Acquired),
    Record(ObjectState),
}

/// How an acquisition that asked for records ends well.
#[derive(Debug)]
pub(crate) enum Entry {
    Lock(Acquired),
    /// A live completed record was found instead.
    Record(ObjectState),
}

/// Takes the lock `name` for `owner`, or (with `records`) finds the live record there.
pub(crate) async fn acquire(
    p: &Protocol,
    name: &str,
    owner: &str,
    mode: Mode,
    trace: &mut Trace,
    records: bool,
) -> Result<Entry, Error> {
    let mut a = Acquisition::new(p, name, owner, mode, trace);
    a.records = records;
    // A waiter on a throttled backend: the lock may have been deleted a moment ago, and a
    // create now would be refused. It reads first.
    let mut step = if a.waits() && p.recently_throttled() {
        a.seen_held = true;
        Step::Inspect
    } else {
        Step::Create
    };
    let result = loop {
        let next = match step {
            Step::Create => a.write(None).await,
            Step::Takeover(expired) => a.write(Some(expired)).await,
            Step::Inspect => a.inspect().await,
        };
        match next {
            Ok(Next::Step(next)) => step = next,
            Ok(Next::Acquired(acquired)) => break Ok(Entry::Lock(acquired)),
            Ok(Next::Record(state)) => break Ok(Entry::Record(state)),
            Err(e) => break Err(e),
        }
    };
    match result {
        Err(e) if a.trace.may_have_landed => a.resolve(e).await.map(Entry::Lock),
        result => result,
    }
}

struct Acquisition<'a> {
    p: &'a Protocol,
    name: &'a str,
    owner: &'a str,
    mode: Mode,
    trace: &'a mut Trace,
    /// Whether a live record ends the acquisition (else it is a held lock).
    records: bool,
    polls: Delays,
    /// Try mode: how often the lock vanished between our write and our read.
    rounds: usize,
    /// Wait mode: we saw another holder (or a throttled backend), so an absent lock is
    /// looked at twice before we create.
    seen_held: bool,
    /// Taking that second look.
    confirming: bool,
    /// Wait mode: when the last read that found the lock held was sent. The next look comes
    /// no later than a poll cap after it (the cap bounds a waiter's hand-over).
    held_look: Option<Instant>,
    /// Wait mode, backend throttling: since when, and for how long, the lock must be seen
    /// absent before we create.
    absent: Option<(Instant, Duration)>,
    /// Replies without a `Date`: the version we read and when we first saw it.
    unchanged_since: Option<(Version, Instant)>,
}

impl<'a> Acquisition<'a> {
    fn new(
        p: &'a Protocol,
        name: &'a str,
        owner: &'a str,
        mode: Mode,
        trace: &'a mut Trace,
    ) -> Self {
        Self {
            p,
            name,
            owner,
            mode,
            trace,
            records: false,
            polls: p.settings().poll.delays(),
            rounds: 0,
            seen_held: false,
            confirming: false,
            held_look: None,
            absent: None,
            unchanged_since: None,
        }
    }

    fn waits(&self) -> bool {
        matches!(self.mode, Mode::WaitUntil(_))
    }

    /// When retries of one request stop: the policy's budget from now, or the deadline.
    fn give_up_at(&self) -> Instant {
        match self.mode {
            Mode::Try => super::after(self.p.settings().retry.max_elapsed()),
            Mode::WaitUntil(deadline) => deadline,
        }
    }

    fn past_deadline(&self) -> bool {
        matches!(self.mode, Mode::WaitUntil(d) if crate::clock::now() >= d)
    }

    /// The step Create (`over` = `None`) or Takeover (`over` = the expired object's version).
    async fn write(&mut self, over: Option<Version>) -> Result<Next, Error> {
        let (p, name, owner) = (self.p, self.name, self.owner);
        let s = p.settings();
        // A waiter does not repeat a throttled write: it goes back to reading.
        let on_429 = if self.waits() {
            On429::GiveUp
        } else {
            On429::Retry
        };
        self.trace.in_flight = true;
        let backend = p.backend();
        let a = p
            .send(
                || {
                    // Each attempt says when it expires: a create retried through an outage
                    // must not write an `expires` that is past already.
                    let md = object::lock_metadata(s.ttl, owner, (s.clock)());
                    async move {
                        match over {
                            Some(v) => backend.takeover(name, v, &md).await,
                            None => backend.create(name, &md).await,
                        }
                    }
                },
                self.give_up_at(),
                on_429,
            )
            .await;
        self.trace.in_flight = false;
        self.trace.may_have_landed |= a.ambiguous;
        self.trace.first_write.get_or_insert(a.first_sent);
        match a.result {
            // The attempt that answered made the object: an earlier one that landed would
            // have changed what this one's precondition expects (none, or the expired
            // version), and this one would have been refused. The lease is timed from it.
            Ok(reply) => Ok(Next::Acquired(Acquired {
                state: reply.into_value(),
                sent: a.last_sent,
                how: if over.is_some() {
                    How::TookOver
                } else {
                    How::Created
                },
            })),
            Err(BackendError::PreconditionFailed) => Ok(Next::Step(Step::Inspect)),
            Err(BackendError::NotFound) if over.is_some() => Ok(Next::Step(Step::Inspect)),
            Err(BackendError::NotFound) => Err(Error::Backend(BackendError::BucketNotFound)),
            Err(e) if e.is_rate_limited() && self.waits() && !self.past_deadline() => {
                // The object was mutated within the last second (the lock just changed
                // hands): read again once that window is over instead of writing more.
                self.sleep(jitter(MUTATION_WINDOW / 2)).await;
                self.seen_held = true;
                Ok(Next::Step(Step::Inspect))
            }
            Err(e) => Err(p.failure(e)),
        }
    }

    /// The step Inspect: read the object and decide.
    async fn inspect(&mut self) -> Result<Next, Error> {
        let (p, name) = (self.p, self.name);
        let a: Attempted<Reply<Option<ObjectState>>> = p
            .send(
                || p.backend().inspect(name),
                self.give_up_at(),
                On429::Retry,
            )
            .await;
        let read_sent = a.first_sent;
        let reply = a.result.map_err(|e| p.failure(e))?;
        let server_now = reply.server_time();
        match reply.into_value() {
            // Neither answer rules a write of ours out: one delayed on its way to the server
            // may land later (once the object is gone). `may_have_landed` stays set, and an
            // acquisition that ends without the lock leaves a clean-up behind.
            None => self.absent_lock().await,
            Some(state) if object::owner_of(&state) == Some(self.owner) => Ok(self.ours(state)),
            Some(state) => {
                self.confirming = false;
                self.absent = None;
                match self.verdict(&state, server_now) {
                    Verdict::Expired
                        if matches!(self.mode, Mode::Try) && self.try_rounds_spent() =>
                    {
                        Err(Error::Held { remaining: None })
                    }
                    Verdict::Expired => Ok(Next::Step(Step::Takeover(state.version()))),
                    Verdict::Held { .. } if self.records && object::is_record(&state) => {
                        Ok(Next::Record(state))
                    }
                    Verdict::Held { remaining } => self.held(remaining, read_sent).await,
                }
            }
        }
    }

    /// The object is gone (released, or never there).
    async fn absent_lock(&mut self) -> Result<Next, Error> {
        if self.seen_held && self.p.recently_throttled() {
            // The backend enforces its mutation limit, and the lock was just released: create
            // only once it has been seen absent for a whole (jittered) window, reading at least
            // twice a second. A holder lives at least that window (its delete waits it out
            // too), so a create-and-delete of another waiter cannot slip between two reads,
            // and our create meets no 429. The jitter lets one of many waiters go first.
            let now = crate::clock::now();
            let (since, window) = *self
                .absent
                .get_or_insert_with(|| (now, MUTATION_WINDOW + jitter(MUTATION_WINDOW)));
            let waited = now.duration_since(since);
            if waited < window {
                self.sleep((window - waited).min(MUTATION_WINDOW / 2)).await;
                if !self.past_deadline() {
                    return Ok(Next::Step(Step::Inspect));
                }
            }
            self.absent = None;
        } else if self.seen_held && !self.confirming {
            // A waiter that saw the lock go: wait a random moment and look again, so that of
            // many waiters one creates and the others read the new holder. The moment comes
            // out of the poll cap, not on top of it.
            self.confirming = true;
            let s = self.p.settings();
            let mut until = super::after(jitter(s.poll.min()));
            if let Some(look) = self.held_look {
                until = until.min(look + s.poll.max());
            }
            self.sleep_until(until).await;
            return Ok(Next::Step(Step::Inspect));
        }
        self.confirming = false;
        let give_up = match self.mode {
            Mode::Try => self.try_rounds_spent(),
            Mode::WaitUntil(deadline) => crate::clock::now() >= deadline,
        };
        if give_up {
            return Err(Error::Held { remaining: None });
        }
        Ok(Next::Step(Step::Create))
    }

    /// The object carries our owner id: a write of ours landed although its reply was lost.
    /// Adopted while the lease it began leaves us time; else taken over afresh.
    fn ours(&mut self, state: ObjectState) -> Next {
        let s = self.p.settings();
        let sent = self.trace.first_write.unwrap_or_else(crate::clock::now);
        if sent + s.ttl - s.margin() > crate::clock::now() {
            tracing::debug!(target: "dimutex", "adopted our own landed write");
            return Next::Acquired(Acquired {
                state,
                sent,
                how: How::Adopted,
            });
        }
        Next::Step(Step::Takeover(state.version()))
    }

    /// Another owner's lock, live for at most `remaining`; the read was sent at `read_sent`.
    async fn held(&mut self, remaining: Duration, read_sent: Instant) -> Result<Next, Error> {
        let held = || Error::Held {
            remaining: Some(remaining),
        };
        let Mode::WaitUntil(deadline) = self.mode else {
            return Err(held());
        };
        self.seen_held = true;
        let now = crate::clock::now();
        if now >= deadline {
            return Err(held());
        }
        // Counted from this read's send, so reads are at most a cap apart; but no sooner than
        // the poll minimum after its answer, so a slow backend is not read back to back.
        self.held_look = Some(read_sent);
        let next = (read_sent + self.polls.next_delay()).max(now + self.p.settings().poll.min());
        self.sleep_until(next).await;
        Ok(Next::Step(Step::Inspect))
    }

    /// The verdict on another owner's lock. Judged on the server's clock; a reply without a
    /// `Date` is judged on ours, from the moment we first saw this version of the object
    /// (its `updated` is no later than that), so that the lease never looks shorter than it is.
    fn verdict(&mut self, state: &ObjectState, server_now: Option<SystemTime>) -> Verdict {
        let ttl = self.p.settings().ttl;
        if let Some(server_now) = server_now {
            return object::judge(state, server_now, ttl);
        }
        let (end, _) = object::lease_end(state, ttl);
        let length = end.duration_since(state.updated()).unwrap_or_default();
        let since = match self.unchanged_since {
            Some((version, since)) if version == state.version() => since,
            _ => {
                self.unchanged_since
                    .insert((state.version(), crate::clock::now()))
                    .1
            }
        };
        match (since + length).checked_duration_since(crate::clock::now()) {
            Some(remaining) if !remaining.is_zero() => Verdict::Held { remaining },
            _ => Verdict::Expired,
        }
    }

    /// The acquisition failed with `e` while a write of ours may have landed: one more read,
    /// and the lock adopted if it is ours after all.
    async fn resolve(&mut self, e: Error) -> Result<Acquired, Error> {
        let (p, name) = (self.p, self.name);
        let a = p.send_within_policy(|| p.backend().inspect(name)).await;
        match a.result.map(Reply::into_value) {
            Ok(Some(state)) if object::owner_of(&state) == Some(self.owner) => {
                match self.ours(state) {
                    Next::Acquired(acquired) => Ok(acquired),
                    // Ours, but too old to hold: the caller cleans it up.
                    Next::Step(_) | Next::Record(_) => Err(e),
                }
            }
            // Not there, or another's: ours may still land; the caller cleans up.
            _ => Err(e),
        }
    }

    /// Counts one more round of a fail-fast try (the lock vanished under us, or was found
    /// expired and changed before our takeover); whether the try's rounds are spent.
    fn try_rounds_spent(&mut self) -> bool {
        self.rounds += 1;
        self.rounds >= TRY_ROUNDS
    }

    /// Sleeps for `pause`, but not past the deadline.
    async fn sleep(&self, pause: Duration) {
        self.sleep_until(super::after(pause)).await
    }

    async fn sleep_until(&self, mut until: Instant) {
        if let Mode::WaitUntil(deadline) = self.mode {
            until = until.min(deadline);
        }
        tokio::time::sleep_until(until.into()).await
    }
}
