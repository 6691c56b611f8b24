//! The lease driver: one task per client that keeps the client's leases (refreshes them,
//! signals a lost one, releases them when their guards ask or the client shuts down) and
//! cleans up after acquisitions abandoned while a write of theirs may have landed.
//!
//! Each lease is one future inside the driver task, a small state machine:
//!
//! ```text
//!   Wait ── refresh due ──▶ Refresh ── done / failed (retry soon) ──▶ Wait
//!    │                        └── refused: lost ─┐   └── deadline passed ──▶ Expire
//!    ├── guard asks ──▶ Release ──────────────────┤
//!    ├── shutdown ───▶ Revoke: lost, then delete ─┤
//!    └── deadline ───▶ Expire: lost ─▶ Lost: guard goes or shutdown ─▶ delete ─▶ over
//! ```
//!
//! A lease is marked lost *before* the request that frees it is sent, so that no guard
//! believes in a lock another owner may already hold. Should the driver's runtime stop,
//! every lease in its care is marked lost as its future is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

use crate::backend::Metadata;
use crate::error::Error;
use crate::lease::{Cause, Lease};
use crate::local::Local;
use crate::object;
use crate::pending::Ticket;
use crate::protocol::Protocol;
use crate::protocol::cleanup::clean_up;
use crate::protocol::record::complete;
use crate::protocol::refresh::{Refreshed, refresh};
use crate::protocol::release::release;
use crate::signal::Latch;

/// Work for the driver, besides new leases.
pub(crate) enum Job {
    /// Take the new leases in now: a dropped guard asks for its release.
    TakeIn,
    /// An acquisition abandoned while a write of it may have landed: delete our object, if
    /// it is there.
    CleanUp {
        name: String,
        owner: Arc<str>,
        ticket: Ticket,
    },
}

/// A lease in the driver's care. Dropped (its work done, or its runtime stopped), it leaves
/// the local registry, is marked lost if it was not over yet, and is finished.
pub(crate) struct Kept {
    lease: Arc<Lease>,
    local: Arc<Local>,
    /// When the lease's first write was sent.
    sent: Instant,
}

impl Kept {
    pub(crate) fn new(lease: Arc<Lease>, local: Arc<Local>, sent: Instant) -> Self {
        Self { lease, local, sent }
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if self.lease.lose(Cause::DriverStopped) {
            tracing::warn!(target: "dimutex", key_id = crate::key_id(self.lease.key()), "lease lost: the runtime of the lease driver stopped");
        }
        finish(&self.local, &self.lease);
    }
}

/// The lease is over: out of the local registry, and no longer counted.
fn finish(local: &Local, lease: &Arc<Lease>) {
    local.remove(lease);
    lease.finish();
}

/// Releases `lease` (after the write in flight, if there is one): the conditional delete,
/// then the lease is finished. What a guard's `release` runs in its caller's task, and the
/// driver for a dropped guard, or at shutdown once the lease is marked lost.
pub(crate) async fn release_lease(
    p: &Protocol,
    local: &Local,
    lease: &Arc<Lease>,
) -> Result<bool, Error> {
    let mut known = lease.writer().await;
    if lease.is_finished() {
        return lease.outcome_when_finished();
    }
    // A lost lease stays lost: `released` only ends a live one.
    lease.released();
    let result = release(p, lease.name(), lease.owner(), &mut known).await;
    let key_id = crate::key_id(lease.key());
    match &result {
        Ok(held) => tracing::debug!(target: "dimutex", key_id, held, "released"),
        Err(e) => {
            tracing::warn!(target: "dimutex", key_id, error = %e, "release failed; the lock will expire")
        }
    }
    // Finished before the answer: the caller of `release` finds the key free here.
    finish(local, lease);
    result
}

/// Turns `lease` into a completed record kept for `retention`, with the record's `fields` and
/// contents `data` (after the write in flight, if there is one): `Ok(true)` when it is
/// stored, and the lease is finished; `Ok(false)` when the lease was revoked or refused, or
/// its lock changed by someone else first (nothing stored, the lease lost); an error when the
/// outcome is unknown (the lease stays, and its release settles it). A lease that only ran
/// out is still tried: the write lands only if nobody took the lock over meanwhile.
pub(crate) async fn complete_lease(
    p: &Protocol,
    local: &Local,
    lease: &Arc<Lease>,
    record: Completion<'_>,
) -> Result<bool, Error> {
    let mut known = lease.writer().await;
    if !lease.may_still_be_ours() {
        return Ok(false);
    }
    let s = p.settings();
    let metadata =
        object::record_metadata(record.retention, lease.owner(), (s.clock)(), record.fields);
    // The response waits for this write: retried for the policy's budget, not the lease's.
    let give_up_at = lease
        .deadline()
        .min(crate::protocol::after(s.retry.max_elapsed()));
    let written = (&metadata, record.data);
    let result = complete(
        p,
        lease.name(),
        lease.owner(),
        &mut known,
        written,
        give_up_at,
    )
    .await;
    let key_id = crate::key_id(lease.key());
    match &result {
        Ok(true) => {
            tracing::debug!(target: "dimutex", key_id, "completed");
            lease.released();
            finish(local, lease);
        }
        Ok(false) => {
            if lease.lose(Cause::Refused) {
                tracing::warn!(target: "dimutex", key_id, "lease lost before its record was written: the lock object was changed or removed by someone else");
            }
        }
        Err(e) => {
            tracing::warn!(target: "dimutex", key_id, error = %e, "record write failed; the lock is released")
        }
    }
    result
}

/// A completed record to be written: its own metadata fields, its contents, and how long it
/// is kept (its ttl).
pub(crate) struct Completion<'a> {
    pub(crate) fields: Metadata,
    pub(crate) data: &'a [u8],
    pub(crate) retention: Duration,
}

/// Where jobs are sent to a running driver, and what a guard needs to release its lease
/// itself.
#[derive(Clone)]
pub(crate) struct DriverHandle {
    fresh: mpsc::UnboundedSender<Kept>,
    jobs: mpsc::UnboundedSender<Job>,
    protocol: Arc<Protocol>,
    local: Arc<Local>,
}

impl DriverHandle {
    /// Whether the driver is gone (its runtime stopped).
    pub(crate) fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }

    /// Hands `job` over; a job the driver can no longer take is dropped (an abandoned write
    /// is then left to expire).
    pub(crate) fn send(&self, job: Job) {
        let _ = self.jobs.send(job);
    }

    /// Hands a new lease over, to be taken in at the driver's next intake; one the driver can
    /// no longer take is dropped, and counts as lost.
    pub(crate) fn keep(&self, kept: Kept) {
        let _ = self.fresh.send(kept);
    }

    /// Has the driver take its new leases in now (a dropped guard's among them).
    pub(crate) fn take_in(&self) {
        self.send(Job::TakeIn);
    }

    /// Releases `lease` from the caller's task; see [`release_lease`].
    pub(crate) async fn release(&self, lease: &Arc<Lease>) -> Result<bool, Error> {
        release_lease(&self.protocol, &self.local, lease).await
    }

    /// Completes `lease` from the caller's task; see [`complete_lease`].
    pub(crate) async fn complete(
        &self,
        lease: &Arc<Lease>,
        record: Completion<'_>,
    ) -> Result<bool, Error> {
        complete_lease(&self.protocol, &self.local, lease, record).await
    }
}

/// Starts a driver on the current runtime.
pub(crate) fn spawn(
    protocol: Arc<Protocol>,
    local: Arc<Local>,
    shutdown: Arc<Latch>,
) -> DriverHandle {
    let (jobs, jobs_rx) = mpsc::unbounded_channel();
    let (fresh, fresh_rx) = mpsc::unbounded_channel();
    tokio::spawn(run(protocol.clone(), jobs_rx, fresh_rx, shutdown));
    DriverHandle {
        fresh,
        jobs,
        protocol,
        local,
    }
}

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs jobs until every handle is gone and every job is done.
///
/// A new lease needs nothing of the driver before its first refresh (a quarter of a refresh
/// interval away at the soonest), and most leases are released by their guards before that:
/// the driver takes new leases in at most once per [`INTAKE`]: the first to arrive sets the
/// intake's time, those taken and released meanwhile cost it no wake-up, and a lease released
/// by the intake no work at all. A dropped guard (whose release the driver sends) and
/// shutdown have it take them in at once.
async fn run(
    p: Arc<Protocol>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut fresh: mpsc::UnboundedReceiver<Kept>,
    shutdown: Arc<Latch>,
) {
    let mut work: FuturesUnordered<Work> = FuturesUnordered::new();
    let grid = Grid::new();
    let start = |kept| -> Work { Box::pin(keep(p.clone(), kept, grid, shutdown.clone())) };
    // The lease whose arrival set the intake's time, taken in with the rest.
    let mut first: Option<Kept> = None;
    let take_in = |first: &mut Option<Kept>,
                   fresh: &mut mpsc::UnboundedReceiver<Kept>,
                   work: &mut FuturesUnordered<Work>| {
        let arrived = first.take().into_iter();
        for kept in arrived.chain(std::iter::from_fn(|| fresh.try_recv().ok())) {
            // A lease its guard has released already is done with as it is dropped.
            if !kept.lease.is_finished() {
                work.push(start(kept));
            }
        }
    };
    // `Some`: new leases wait until then.
    let mut next_intake: Option<Instant> = None;
    let mut shutting_down = false;
    loop {
        let intake_at = next_intake.unwrap_or_else(crate::clock::now);
        // Biased (in the order written), as every `select!` of the driver: which of two ready
        // branches runs first is then the same on every run of a seeded simulation.
        tokio::select! {
            biased;
            job = jobs.recv() => match job {
                Some(Job::TakeIn) => {
                    take_in(&mut first, &mut fresh, &mut work);
                    next_intake = None;
                }
                Some(Job::CleanUp { name, owner, ticket }) => {
                    let p = p.clone();
                    work.push(Box::pin(async move {
                        clean_up(&p, &name, &owner).await;
                        drop(ticket);
                    }));
                }
                None => break,
            },
            Some(kept) = fresh.recv(), if next_intake.is_none() => {
                first = Some(kept);
                if shutting_down {
                    take_in(&mut first, &mut fresh, &mut work);
                } else {
                    next_intake = Some(crate::clock::now() + INTAKE);
                }
            }
            () = tokio::time::sleep_until(intake_at.into()), if next_intake.is_some() => {
                take_in(&mut first, &mut fresh, &mut work);
                next_intake = None;
            }
            () = shutdown.wait(), if !shutting_down => {
                shutting_down = true;
                take_in(&mut first, &mut fresh, &mut work);
                next_intake = None;
            }
            Some(()) = work.next(), if !work.is_empty() => {}
        }
    }
    take_in(&mut first, &mut fresh, &mut work);
    while work.next().await.is_some() {}
}

/// The steps of a kept lease.
enum Step {
    Wait,
    Refresh,
    Release,
    Revoke,
    Expire,
    /// Ran out: not refreshed any more, and deleted (conditionally) once its guard goes.
    Lost,
    Over,
}

/// How long new leases may wait for the driver to take them in: far less than the soonest
/// first refresh (a quarter of the shortest refresh interval, rounded down to the grid:
/// 150 ms), and long enough for the leases taken and released meanwhile to cost the driver
/// nothing. Each intake costs wake-ups: the driver's, and the runtime's for the intake's
/// timer (on a multi-thread runtime, a parked worker's). Lock cycles one after another
/// against fake-gcs-server (`strace -c target/release/examples/bench --cycles ours 2000`)
/// made 0.23–0.31 more of those timer wake-ups per cycle than the bare requests at 10 ms,
/// 0.05–0.08 at 50 ms. The price: a released lease's memory is freed at the next intake, up to 50 ms late.
const INTAKE: Duration = Duration::from_millis(50);

/// Refreshes are due on a grid of this step, so that the driver wakes once for all the
/// leases whose refresh falls in one step, not once for each.
const GRID: Duration = Duration::from_millis(100);

/// The refresh grid of one driver: steps of [`GRID`] from when the driver started (not from a
/// process-wide moment, so that a test runtime with paused time sees the same grid on every run).
#[derive(Debug, Clone, Copy)]
struct Grid {
    epoch: Instant,
}

impl Grid {
    fn new() -> Self {
        Self {
            epoch: crate::clock::now(),
        }
    }

    /// `at`, rounded down to the grid.
    fn at(self, at: Instant) -> Instant {
        let steps = at.saturating_duration_since(self.epoch).as_nanos() / GRID.as_nanos();
        self.epoch + GRID * u32::try_from(steps).unwrap_or(u32::MAX)
    }
}

/// Keeps one lease until it is over.
async fn keep(p: Arc<Protocol>, kept: Kept, grid: Grid, shutdown: Arc<Latch>) {
    let interval = p.settings().refresh_interval;
    let lease = &kept.lease;
    // The first refresh of each lease comes at a random point of its first interval: leases
    // taken together are not refreshed together ever after.
    let mut refresh_at = grid.at(kept.sent + interval.mul_f64(crate::random::in_range(0.25..=1.0)));
    let mut step = Step::Wait;
    loop {
        step = match step {
            Step::Wait => wait(lease, refresh_at, &shutdown).await,
            Step::Refresh => {
                // Boxed, as the releases below: a waiting lease's future stays small.
                let (next, at) = Box::pin(refresh_step(&p, lease, &shutdown)).await;
                refresh_at = grid.at(at);
                next
            }
            Step::Release => {
                let _ = Box::pin(release_lease(&p, &kept.local, lease)).await;
                Step::Over
            }
            Step::Revoke => {
                lease.lose(Cause::Revoked);
                let _ = Box::pin(release_lease(&p, &kept.local, lease)).await;
                Step::Over
            }
            Step::Expire => {
                if lease.lose(Cause::DeadlinePassed) {
                    tracing::warn!(target: "dimutex", key_id = crate::key_id(lease.key()), "lease lost: no refresh succeeded before its deadline");
                }
                Step::Lost
            }
            Step::Lost => lost(lease, &shutdown).await,
            Step::Over => return,
        }
    }
}

/// A lease that ran out waits for its guard (or shutdown) before its conditional delete: by
/// then the backend may answer again, and a refresh of ours whose outcome we never learned is
/// resolved by it. The lost signal has fired already.
async fn lost(lease: &Lease, shutdown: &Latch) -> Step {
    tokio::select! {
        biased;
        () = shutdown.wait() => Step::Revoke,
        () = lease.finished() => Step::Over,
        () = lease.release_asked() => Step::Release,
    }
}

/// Waits for whatever comes first: shutdown, the guard's release (done by the guard, or
/// asked of us by a dropped one), the deadline, the refresh.
async fn wait(lease: &Lease, refresh_at: Instant, shutdown: &Latch) -> Step {
    let deadline = lease.deadline();
    tokio::select! {
        biased;
        () = shutdown.wait() => Step::Revoke,
        () = lease.finished() => Step::Over,
        () = lease.release_asked() => Step::Release,
        () = tokio::time::sleep_until(deadline.min(refresh_at).into()) => {
            if crate::clock::now() >= deadline { Step::Expire } else { Step::Refresh }
        }
    }
}

/// One refresh, and the step and refresh time after it. A shutdown meanwhile marks the lease
/// lost at once (the refresh then finishes, and the lease is released).
async fn refresh_step(p: &Protocol, lease: &Lease, shutdown: &Latch) -> (Step, Instant) {
    let mut known = lease.writer().await;
    if lease.is_finished() {
        return (Step::Over, crate::clock::now());
    }
    if lease.is_over() {
        // Released by a guard whose `release` was dropped before it finished: it has asked
        // for the release, which `Lost` takes up.
        return (Step::Lost, crate::clock::now());
    }
    let deadline = lease.deadline();
    let mut revoked = false;
    let refreshed = {
        let refreshing = refresh(p, lease.name(), lease.owner(), &mut known, deadline);
        tokio::pin!(refreshing);
        loop {
            tokio::select! {
                biased;
                refreshed = &mut refreshing => break refreshed,
                () = shutdown.wait(), if !revoked => {
                    lease.lose(Cause::Revoked);
                    revoked = true;
                }
            }
        }
    };
    let s = p.settings();
    let retry_at = crate::clock::now() + s.retry.backoff().max().min(s.refresh_interval / 2);
    match refreshed {
        Refreshed::Done => {
            lease.renewed(known.sent);
            let next = if revoked { Step::Revoke } else { Step::Wait };
            (next, known.sent + s.refresh_interval)
        }
        Refreshed::Refused => {
            if lease.lose(Cause::Refused) {
                tracing::warn!(target: "dimutex", key_id = crate::key_id(lease.key()), "lease lost: the lock object was changed or removed by someone else");
            }
            (Step::Over, retry_at)
        }
        Refreshed::Expired => (Step::Expire, retry_at),
        Refreshed::Failed if revoked => (Step::Revoke, retry_at),
        Refreshed::Failed => (Step::Wait, retry_at),
    }
}
