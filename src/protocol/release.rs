//! Releasing a held lease: a delete conditional on the version we know.

use std::time::{Duration, Instant};

use super::refresh::Known;
use super::retry::On429;
use super::{MUTATION_WINDOW, Protocol};
use crate::backend::{BackendError, Reply};
use crate::error::Error;
use crate::object;

/// How many times a release reads the object after a 412 and deletes again.
const REREADS: usize = 3;

/// A little more than nothing: a delete sent a mutation window after our last write, by our
/// clock, must not reach the server a hair early.
const SEND_MARGIN: Duration = Duration::from_millis(100);

/// Deletes our lock object if it is still ours: `Ok(true)` when our delete removed it,
/// `Ok(false)` when someone else changed or removed it first. Transient failures are retried
/// until the lease's deadline (at least for the retry policy's budget); after that the error
/// is returned, and expiry frees the lock.
pub(crate) async fn release(
    p: &Protocol,
    name: &str,
    owner: &str,
    known: &mut Known,
) -> Result<bool, Error> {
    if p.recently_throttled() {
        // The backend enforces about one mutation per second per object: a delete sooner
        // after our last write would only be refused.
        tokio::time::sleep_until((known.sent + MUTATION_WINDOW + SEND_MARGIN).into()).await;
    }
    // Retried while the lease is ours, and at least for the policy's budget: a delete right
    // after the create meets GCS's limit of one mutation per second per object.
    let s = p.settings();
    let deadline = known.sent + s.ttl - s.margin();
    let give_up_at = deadline.max(super::after(s.retry.max_elapsed()));
    let mut ambiguous = false;
    for _ in 0..REREADS {
        let version = known.version;
        let a = p
            .send(
                || p.backend().release(name, version),
                give_up_at,
                On429::Retry,
            )
            .await;
        ambiguous |= a.ambiguous;
        match a.result {
            Ok(_) => return Ok(true),
            Err(BackendError::NotFound) => return Ok(deleted_by_us(p, ambiguous, known.sent)),
            Err(BackendError::PreconditionFailed) => {}
            Err(e) => return Err(p.failure(e)),
        }
        // Changed: by a create after a delete of ours that landed, by someone else after the
        // lease ended, or by a refresh of ours whose outcome we never learned. Only the last
        // leaves it ours (at a metageneration we did not know), and the delete is sent again.
        let read = p.send_within_policy(|| p.backend().inspect(name)).await;
        match read.result.map(Reply::into_value) {
            Ok(Some(state)) if known.wrote(&state, owner) => known.caught_up(state.version()),
            // Our generation, changed by somebody else: not ours, and not deleted by us.
            Ok(Some(state)) if object::is_lease(&state, known.version, owner) => return Ok(false),
            Ok(_) => return Ok(deleted_by_us(p, ambiguous, known.sent)),
            Err(e) => return Err(p.failure(e)),
        }
    }
    // Still ours, and changed again at every try: expiry frees it.
    Ok(false)
}

/// Whether a delete of ours removed the object, now that it is gone (404) or another's,
/// after attempts of which one may have landed. Nobody else can take the lock over before
/// the server judges it expired (`updated` + ttl plus a second before `Date`), and `updated`
/// is no earlier than `sent` (our last write cannot land before we sent it): an answer
/// received before `sent` + ttl describes a server on which no takeover could have happened
/// yet, so the change was our own delete (404), or a create after it.
fn deleted_by_us(p: &Protocol, ambiguous: bool, sent: Instant) -> bool {
    ambiguous && crate::clock::now() < sent + p.settings().ttl
}
