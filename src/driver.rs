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
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::error::Error;
use crate::lease::{Cause, Lease, ReleaseReply};
use crate::local::Local;
use crate::pending::Ticket;
use crate::protocol::Protocol;
use crate::protocol::cleanup::clean_up;
use crate::protocol::refresh::{Known, Refreshed, refresh};
use crate::protocol::release::release;

/// Work for the driver.
pub(crate) enum Job {
    /// A lease just taken, to keep.
    Keep(Kept),
    /// An acquisition abandoned while a write of it may have landed: delete our object, if
    /// it is there.
    CleanUp {
        name: String,
        owner: Arc<str>,
        ticket: Ticket,
    },
}

/// A lease in the driver's care. Dropped (its work done, or its runtime stopped), it leaves
/// the local registry, is marked lost if it was not over yet, and gives back its ticket.
pub(crate) struct Kept {
    lease: Arc<Lease>,
    known: Known,
    local: Arc<Local>,
    /// `None` once finished.
    ticket: Option<Ticket>,
}

impl Kept {
    pub(crate) fn new(lease: Arc<Lease>, known: Known, local: Arc<Local>, ticket: Ticket) -> Self {
        Self {
            lease,
            known,
            local,
            ticket: Some(ticket),
        }
    }

    /// The lease is over: out of the local registry, and no longer counted.
    fn finish(&mut self) {
        self.local.remove(&self.lease);
        self.lease.finish();
        self.ticket = None;
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if self.lease.lose(Cause::DriverStopped) {
            tracing::warn!(target: "dimutex", key_id = crate::key_id(self.lease.key()), "lease lost: the runtime of the lease driver stopped");
        }
        self.finish();
    }
}

/// Where jobs are sent to a running driver.
#[derive(Clone)]
pub(crate) struct DriverHandle {
    jobs: mpsc::UnboundedSender<Job>,
}

impl DriverHandle {
    /// Whether the driver is gone (its runtime stopped).
    pub(crate) fn is_closed(&self) -> bool {
        self.jobs.is_closed()
    }

    /// Hands `job` over; a job the driver can no longer take is dropped (a lease then counts
    /// as lost, and an abandoned write is left to expire).
    pub(crate) fn send(&self, job: Job) {
        let _ = self.jobs.send(job);
    }
}

/// Starts a driver on the current runtime.
pub(crate) fn spawn(p: Arc<Protocol>, shutdown: watch::Receiver<bool>) -> DriverHandle {
    let (jobs, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(p, rx, shutdown));
    DriverHandle { jobs }
}

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs jobs until every handle is gone and every job is done.
async fn run(
    p: Arc<Protocol>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    shutdown: watch::Receiver<bool>,
) {
    let mut work: FuturesUnordered<Work> = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(Job::Keep(kept)) => work.push(Box::pin(keep(p.clone(), kept, shutdown.clone()))),
                Some(Job::CleanUp { name, owner, ticket }) => {
                    let p = p.clone();
                    work.push(Box::pin(async move {
                        clean_up(&p, &name, &owner).await;
                        drop(ticket);
                    }));
                }
                None => break,
            },
            Some(()) = work.next(), if !work.is_empty() => {}
        }
    }
    while work.next().await.is_some() {}
}

/// The steps of a kept lease.
enum Step {
    Wait,
    Refresh,
    Release(ReleaseReply),
    Revoke,
    Expire,
    /// Ran out: not refreshed any more, and deleted (conditionally) once its guard goes.
    Lost,
    Over,
}

/// Keeps one lease until it is over.
async fn keep(p: Arc<Protocol>, mut kept: Kept, mut shutdown: watch::Receiver<bool>) {
    let interval = p.settings().refresh_interval;
    // The first refresh of each lease comes at a random point of its first interval: leases
    // taken together are not refreshed together ever after.
    let mut refresh_at = kept.known.sent + interval.mul_f64(rand::random_range(0.25..=1.0));
    let mut step = Step::Wait;
    loop {
        step = match step {
            Step::Wait => wait(&kept, refresh_at, &mut shutdown).await,
            Step::Refresh => {
                let (next, at) = refresh_step(&p, &mut kept, &mut shutdown).await;
                refresh_at = at;
                next
            }
            Step::Release(reply) => {
                // A lost lease stays lost: `released` only ends a live one.
                kept.lease.released();
                let result = release_step(&p, &mut kept).await;
                // Finished before the answer: the caller of `release` finds the key free here.
                kept.finish();
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                Step::Over
            }
            Step::Revoke => {
                kept.lease.lose(Cause::Revoked);
                let _ = release_step(&p, &mut kept).await;
                Step::Over
            }
            Step::Expire => {
                if kept.lease.lose(Cause::DeadlinePassed) {
                    tracing::warn!(target: "dimutex", key_id = crate::key_id(kept.lease.key()), "lease lost: no refresh succeeded before its deadline");
                }
                Step::Lost
            }
            Step::Lost => lost(&kept, &mut shutdown).await,
            Step::Over => return,
        }
    }
}

/// A lease that ran out waits for its guard (or shutdown) before its conditional delete: by
/// then the backend may answer again, and a refresh of ours whose outcome we never learned is
/// resolved by it. The lost signal has fired already.
async fn lost(kept: &Kept, shutdown: &mut watch::Receiver<bool>) -> Step {
    tokio::select! {
        biased;
        () = shut_down(shutdown) => Step::Revoke,
        reply = kept.lease.release_asked() => Step::Release(reply),
    }
}

/// Waits for whatever comes first: shutdown, the guard's release, the deadline, the refresh.
async fn wait(kept: &Kept, refresh_at: Instant, shutdown: &mut watch::Receiver<bool>) -> Step {
    let deadline = kept.lease.deadline();
    tokio::select! {
        biased;
        () = shut_down(shutdown) => Step::Revoke,
        reply = kept.lease.release_asked() => Step::Release(reply),
        () = tokio::time::sleep_until(deadline.into()) => Step::Expire,
        () = tokio::time::sleep_until(refresh_at.into()) => Step::Refresh,
    }
}

/// One refresh, and the step and refresh time after it. A shutdown meanwhile marks the lease
/// lost at once (the refresh then finishes, and the lease is released).
async fn refresh_step(
    p: &Protocol,
    kept: &mut Kept,
    shutdown: &mut watch::Receiver<bool>,
) -> (Step, Instant) {
    let Kept { lease, known, .. } = kept;
    let deadline = lease.deadline();
    let mut revoked = false;
    let refreshed = {
        let refreshing = refresh(p, lease.name(), lease.owner(), known, deadline);
        tokio::pin!(refreshing);
        loop {
            tokio::select! {
                refreshed = &mut refreshing => break refreshed,
                () = shut_down(shutdown), if !revoked => {
                    lease.lose(Cause::Revoked);
                    revoked = true;
                }
            }
        }
    };
    let s = p.settings();
    let retry_at = Instant::now() + s.retry.backoff().max().min(s.refresh_interval / 2);
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

/// The conditional delete of a lease that is over, logged.
async fn release_step(p: &Protocol, kept: &mut Kept) -> Result<bool, Error> {
    let Kept { lease, known, .. } = kept;
    let result = release(p, lease.name(), lease.owner(), known).await;
    let key_id = crate::key_id(lease.key());
    match &result {
        Ok(held) => tracing::debug!(target: "dimutex", key_id, held, "released"),
        Err(e) => {
            tracing::warn!(target: "dimutex", key_id, error = %e, "release failed; the lock will expire")
        }
    }
    result
}

/// Resolves once the client shuts down (never, if the client is gone: its guards release
/// their leases themselves).
pub(crate) async fn shut_down(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}
