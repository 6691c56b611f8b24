//! The life of a held lease: periodic refresh, the lost-lease rule, and the release.
//!
//! One task per lease, started when the lock is acquired. The guard talks to it through a
//! oneshot channel: sending on it (or dropping it, when the guard is dropped) asks for the
//! release, so `Drop` does no work of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::backend::{BackendError, Version};
use crate::client::{Inner, MUTATION_WINDOW};
use crate::error::Error;
use crate::guard::{LeaseShared, ReleaseRequest};
use crate::object;

/// A client handle counted in the client's number of live leases while it exists.
pub(crate) struct Counted(Arc<Inner>);

impl Counted {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        inner.leases.send_modify(|n| *n += 1);
        Self(inner)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.leases.send_modify(|n| *n -= 1);
    }
}

pub(crate) struct Lease {
    pub(crate) client: Counted,
    pub(crate) shared: Arc<LeaseShared>,
    pub(crate) name: String,
    pub(crate) owner: String,
    pub(crate) version: Version,
    /// When the last successful write was sent.
    pub(crate) sent: Instant,
    pub(crate) lost: watch::Sender<bool>,
    pub(crate) release: oneshot::Receiver<ReleaseRequest>,
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

/// The first refresh comes after a random 25–100 % of the interval, the later ones a whole
/// interval apart: locks taken in a burst do not all refresh in the same second.
fn first_refresh_delay(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.25..=1.0))
}

/// Between a request's send time and its taking effect, at most (on top of the window).
const SEND_MARGIN: Duration = Duration::from_millis(100);

/// How long to wait before retrying a refresh that failed for good.
const FAILED_REFRESH_RETRY: Duration = Duration::from_secs(1);

pub(crate) async fn run(mut lease: Lease) {
    let inner = lease.client.0.clone();
    let cfg = &inner.config;
    let key_id = crate::key_id(lease.shared.key());
    let mut shutdown = inner.shutdown.subscribe();
    let mut next_refresh = lease.sent + first_refresh_delay(cfg.refresh_interval);
    // None while held; Some(gone) once lost.
    let mut lost: Option<bool> = None;
    let reply: ReleaseRequest = loop {
        let deadline = lease.shared.deadline();
        tokio::select! {
            biased;
            request = &mut lease.release => break request.ok().flatten(),
            _ = shut_down(&mut shutdown) => break None,
            _ = tokio::time::sleep_until(deadline.into()), if lost.is_none() => {
                tracing::warn!(target: "dimutex", key_id, "lease lost: no successful refresh before the local deadline");
                lost = Some(false);
                lease.lost.send_replace(true);
            }
            _ = tokio::time::sleep_until(next_refresh.into()), if lost.is_none() => {
                match refresh(&inner, &lease, deadline).await {
                    Refresh::Done { version, sent } => {
                        lease.version = version;
                        lease.sent = sent;
                        lease.shared.set_deadline(sent + cfg.ttl - cfg.margin());
                        next_refresh = sent + cfg.refresh_interval;
                        tracing::trace!(target: "dimutex", key_id, "refreshed");
                    }
                    Refresh::Failed => next_refresh = Instant::now() + FAILED_REFRESH_RETRY,
                    Refresh::Gone => {
                        tracing::warn!(target: "dimutex", key_id, "lease lost: the lock object was changed by another owner");
                        lost = Some(true);
                        lease.lost.send_replace(true);
                    }
                    Refresh::Expired => {
                        tracing::warn!(target: "dimutex", key_id, "lease lost: refresh failed until the local deadline");
                        lost = Some(false);
                        lease.lost.send_replace(true);
                    }
                }
            }
        }
    };
    let result = release(&inner, &lease, lost == Some(true)).await;
    match &result {
        Ok(held) => tracing::debug!(target: "dimutex", key_id, held, "released"),
        Err(e) => {
            tracing::warn!(target: "dimutex", key_id, error = %e, "release failed; the lease will expire")
        }
    }
    inner.local.remove(&lease.name, &lease.shared);
    lease.lost.send_replace(true);
    if let Some(reply) = reply {
        let _ = reply.send(result);
    }
}

/// Resolves once the client is shut down (the `watch::Ref` is dropped at once: it is not `Send`).
async fn shut_down(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn refresh(inner: &Inner, lease: &Lease, deadline: Instant) -> Refresh {
    let cfg = &inner.config;
    let md = object::refresh_metadata(cfg.ttl, (cfg.clock)());
    let backend = &*inner.backend;
    let name = lease.name.as_str();
    let version = lease.version;
    let attempt = inner.call(|| backend.refresh(name, version, &md), Some(deadline));
    let Ok(a) = tokio::time::timeout_at(deadline.into(), attempt).await else {
        return Refresh::Expired;
    };
    match a.result {
        Ok(reply) => Refresh::Done {
            version: reply.value().version(),
            sent: a.first_sent,
        },
        Err(BackendError::PreconditionFailed | BackendError::NotFound) if a.ambiguous => {
            // Perhaps an earlier attempt of ours landed and this 412 is about our own write.
            let check = inner.call(|| backend.inspect(name), Some(deadline));
            let Ok(c) = tokio::time::timeout_at(deadline.into(), check).await else {
                return Refresh::Expired;
            };
            match c.result {
                Ok(reply) => match reply.into_value() {
                    Some(state)
                        if state.version().generation() == version.generation()
                            && object::owner_of(&state) == Some(lease.owner.as_str())
                            && state.metadata().get(object::EXPIRES) == md.get(object::EXPIRES) =>
                    {
                        Refresh::Done {
                            version: state.version(),
                            sent: a.first_sent,
                        }
                    }
                    _ => Refresh::Gone,
                },
                Err(_) => Refresh::failed_before(deadline),
            }
        }
        Err(BackendError::PreconditionFailed | BackendError::NotFound) => Refresh::Gone,
        Err(_) => Refresh::failed_before(deadline),
    }
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

async fn release(inner: &Inner, lease: &Lease, gone: bool) -> Result<bool, Error> {
    if gone {
        return Ok(false);
    }
    let backend = &*inner.backend;
    let name = lease.name.as_str();
    let version = lease.version;
    if inner.recently_throttled() {
        // The backend enforces about one mutation per second per object: a delete sooner
        // after our last write would only be refused.
        tokio::time::sleep_until((lease.sent + MUTATION_WINDOW + SEND_MARGIN).into()).await;
    }
    // Keep trying while the lease is ours (a delete right after the create meets GCS's
    // one-mutation-per-second limit); after that, expiry frees the lock anyway.
    let give_up = (Instant::now() + inner.config.retry.max_elapsed()).max(lease.shared.deadline());
    let a = inner
        .call(|| backend.release(name, version), Some(give_up))
        .await;
    // Changed or gone, after an attempt of ours that may have landed: while our lease was
    // live nobody else could take the lock over (takeover needs the server-judged expiry,
    // which comes after our local deadline), so the change was our own delete.
    let ours = a.ambiguous && Instant::now() < lease.shared.deadline();
    match a.result {
        Ok(_) => Ok(true),
        Err(BackendError::NotFound | BackendError::PreconditionFailed) => Ok(ours),
        Err(e) => Err(inner.failure(e)),
    }
}
