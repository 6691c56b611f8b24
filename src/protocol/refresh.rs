//! Refreshing a held lease: a metadata write conditional on the version we know.

use std::time::Instant;

use super::Protocol;
use super::retry::{Attempted, On429};
use crate::backend::{BackendError, ObjectState, Reply, Version};
use crate::object;

/// What the holder knows of its lock object.
#[derive(Debug, Clone)]
pub(crate) struct Known {
    /// The object's version after our last write whose outcome we know.
    pub(crate) version: Version,
    /// When our last successful write was sent.
    pub(crate) sent: Instant,
    /// The `expires` values of our writes since then whose outcome we never learned (a
    /// refresh cut off by its deadline, say). Only a state carrying one of them is ours.
    pub(crate) unknown: Vec<String>,
}

impl Known {
    pub(crate) fn new(version: Version, sent: Instant) -> Self {
        Self {
            version,
            sent,
            unknown: Vec::new(),
        }
    }

    /// Whether `state` is our lock object in a state we wrote since `version`: the same
    /// generation and owner id, and an `expires` value one of our unknown writes sent. A
    /// metadata write by anyone else (a peer that refreshes a lock it no longer owns, say)
    /// makes it somebody else's.
    pub(crate) fn wrote(&self, state: &ObjectState, owner: &str) -> bool {
        object::is_lease(state, self.version, owner)
            && state
                .metadata()
                .get(object::EXPIRES)
                .is_some_and(|e| self.unknown.iter().any(|u| u == e))
    }

    fn landed(&mut self, version: Version, sent: Instant) {
        self.version = version;
        self.sent = sent;
        self.unknown.clear();
    }

    /// An earlier write of ours (one of `unknown`) landed and made `version`. The lease stays
    /// timed from the last write whose send time we know.
    pub(crate) fn caught_up(&mut self, version: Version) {
        self.landed(version, self.sent);
    }
}

/// The outcome of a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refreshed {
    /// `Known` moved on.
    Done,
    /// Someone else changed or removed the object: the lease is lost.
    Refused,
    /// The deadline passed without an answer about the lock.
    Expired,
    /// Failed without an answer about the lock (a 403, transient errors until the retry
    /// budget ran out): try again later, before the deadline.
    Failed,
}

/// How many times a refresh reads the object after a 412 and writes again.
const REREADS: usize = 2;

/// Refreshes the lease of `owner` on `name`, retrying until `deadline` (the lease's local
/// deadline), and cut off there.
pub(crate) async fn refresh(
    p: &Protocol,
    name: &str,
    owner: &str,
    known: &mut Known,
    deadline: Instant,
) -> Refreshed {
    let work = refresh_until(p, name, owner, known, deadline);
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(refreshed) => refreshed,
        Err(_) => Refreshed::Expired,
    }
}

async fn refresh_until(
    p: &Protocol,
    name: &str,
    owner: &str,
    known: &mut Known,
    deadline: Instant,
) -> Refreshed {
    let s = p.settings();
    for _ in 0..=REREADS {
        let md = object::refresh_metadata(s.ttl, (s.clock)());
        let expires = md.get(object::EXPIRES).cloned().unwrap_or_default();
        // Recorded before the send: should this future be cut off, the write may still land.
        known.unknown.push(expires.clone());
        let version = known.version;
        let a = p
            .send(
                || p.backend().refresh(name, version, &md),
                deadline,
                On429::Retry,
            )
            .await;
        match a.result {
            Ok(reply) => {
                known.landed(reply.value().version(), a.first_sent);
                return Refreshed::Done;
            }
            Err(BackendError::NotFound) => return Refreshed::Refused,
            Err(BackendError::PreconditionFailed) => {}
            Err(_) => return failed_before(deadline),
        }
        // Changed: by someone else, or by a write of ours whose outcome we never learned.
        let read: Attempted<Reply<Option<ObjectState>>> = p
            .send(|| p.backend().inspect(name), deadline, On429::Retry)
            .await;
        let state = match read.result.map(Reply::into_value) {
            Ok(Some(state)) if known.wrote(&state, owner) => state,
            Ok(_) => return Refreshed::Refused,
            Err(_) => return failed_before(deadline),
        };
        let landed_now = state.metadata().get(object::EXPIRES) == Some(&expires);
        if landed_now {
            // This refresh landed, on an attempt whose answer was lost.
            known.landed(state.version(), a.first_sent);
            return Refreshed::Done;
        }
        // An earlier write of ours landed: write again, from the version we now know.
        known.caught_up(state.version());
    }
    failed_before(deadline)
}

/// A refresh that failed without an answer about the lock is a lost lease only once its
/// deadline has passed.
fn failed_before(deadline: Instant) -> Refreshed {
    if crate::clock::now() >= deadline {
        Refreshed::Expired
    } else {
        Refreshed::Failed
    }
}
