//! Completed records: a held lease turned into one by a single overwrite, conditional on the
//! version we know (no delete comes first: there is no moment at which neither the lock nor
//! the record exists), and a record's contents read back.

use std::time::Instant;

use super::Protocol;
use super::refresh::Known;
use super::retry::On429;
use bytes::Bytes;

use crate::backend::{BackendError, Metadata, ObjectState, Reply};
use crate::error::Error;
use crate::object;

/// How many times a completion reads the object after a 412 and writes again.
const REREADS: usize = 2;

/// Overwrites our lock object `name` with the record `metadata` + `data`, if it is still
/// ours: `Ok(true)` when the record is stored, `Ok(false)` when the lock was changed or
/// removed by someone else first (nothing stored). Transient failures are retried until
/// `give_up_at`; an error then means the outcome is unknown, after one more read found
/// neither our record nor another's change.
pub(crate) async fn complete(
    p: &Protocol,
    name: &str,
    owner: &str,
    known: &mut Known,
    (metadata, data): (&Metadata, &[u8]),
    give_up_at: Instant,
) -> Result<bool, Error> {
    for _ in 0..=REREADS {
        let version = known.version;
        let a = p
            .send(
                || p.backend().record(name, version, metadata, data),
                give_up_at,
                On429::Retry,
            )
            .await;
        let failed = match a.result {
            Ok(_) => return Ok(true),
            // Not even a lost reply of ours can explain a 404 without an ambiguous attempt.
            Err(BackendError::NotFound) if !a.ambiguous => return Ok(false),
            Err(BackendError::PreconditionFailed | BackendError::NotFound) => None,
            Err(e) if a.ambiguous || e.is_transient() => Some(e),
            Err(e) => return Err(p.failure(e)),
        };
        // Changed (or perhaps not, after a transient failure): by our own record whose reply
        // was lost, by a refresh of ours whose outcome we never learned (then we write again),
        // or by someone else.
        let read = p.send_within_policy(|| p.backend().inspect(name)).await;
        let state = match read.result.map(Reply::into_value) {
            Ok(Some(state)) => state,
            Ok(None) => return Ok(false),
            Err(e) => return Err(p.failure(failed.unwrap_or(e))),
        };
        if is_our_record(&state, owner) {
            return Ok(true);
        }
        if known.wrote(&state, owner) {
            known.caught_up(state.version());
            continue;
        }
        return match failed {
            // Our lock as we knew it: the write has not landed (yet). The caller's release,
            // conditional on this version, settles it either way.
            Some(e) if state.version() == known.version => Err(p.failure(e)),
            _ => Ok(false),
        };
    }
    // Ours, and changed again at every try: not stored.
    Ok(false)
}

/// Whether `state` is a record written by the lease of `owner` (owner ids are unique per
/// acquisition: only our completion can have written it).
fn is_our_record(state: &ObjectState, owner: &str) -> bool {
    object::is_record(state) && object::owner_of(state) == Some(owner)
}

/// The contents of the record `name`, if it is still at `generation` (`None` once it is gone
/// or replaced).
pub(crate) async fn contents(
    p: &Protocol,
    name: &str,
    generation: i64,
) -> Result<Option<Bytes>, Error> {
    let a = p
        .send_within_policy(|| p.backend().contents(name, generation))
        .await;
    match a.result {
        Ok(reply) => Ok(Some(reply.into_value())),
        Err(BackendError::NotFound | BackendError::PreconditionFailed) => Ok(None),
        Err(e) => Err(p.failure(e)),
    }
}
