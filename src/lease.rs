//! One held lease, as the guard, the client's local registry and the lease driver share it:
//! the lock's identity, until when it is ours, and how it ended.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::key::{LockKey, ObjectName};
use crate::pending::Ticket;
use crate::protocol::refresh::Known;
use crate::signal::Signal;
use crate::token::FencingToken;

/// Why a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// Someone else changed or removed the lock object.
    Refused,
    /// No refresh succeeded before the lease's local deadline.
    DeadlinePassed,
    /// The client gave the lock up: shut down.
    Revoked,
    /// The runtime of the lease driver stopped: nobody refreshes or releases it any more.
    DriverStopped,
}

/// How a lease ended (or that it has not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Live,
    /// Released at its guard's request.
    Released,
    Lost(Cause),
}

impl State {
    fn cause(&self) -> Option<Cause> {
        match self.end {
            End::Lost(cause) => Some(cause),
            _ => None,
        }
    }
}

struct State {
    /// The send time of our last successful write plus the ttl; the loss, for a lease
    /// refused or revoked.
    expires_at: Instant,
    end: End,
    /// A dropped guard asked the driver for the release.
    release_asked: bool,
    /// Nothing of it is in flight any more (a release's delete has been answered, say).
    finished: bool,
    /// Counts the lease as the client's unfinished work until it is finished.
    ticket: Option<Ticket>,
}

pub(crate) struct Lease {
    key: LockKey,
    name: ObjectName,
    /// This acquisition's owner id, as written in the object's metadata.
    owner: Arc<str>,
    token: FencingToken,
    ttl: Duration,
    /// How long before `expires_at` the holder stops believing in the lease.
    margin: Duration,
    state: Mutex<State>,
    /// What we know of the lock object. Whoever writes it (a refresh, a release) holds
    /// this lock for the whole write, so that writes of one lease never overlap.
    known: tokio::sync::Mutex<Known>,
    /// Notified when the release is asked for and when the lease ends.
    changed: Signal,
}

impl Lease {
    /// A lease whose first write, sent at `known.sent`, made `known.version` (whose
    /// generation is the fencing token).
    pub(crate) fn new(
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        known: Known,
        ttl: Duration,
        margin: Duration,
        ticket: Ticket,
    ) -> Self {
        Self {
            key,
            name,
            owner,
            token: FencingToken::from_generation(known.version.generation()),
            ttl,
            margin,
            state: Mutex::new(State {
                expires_at: known.sent + ttl,
                end: End::Live,
                release_asked: false,
                finished: false,
                ticket: Some(ticket),
            }),
            known: tokio::sync::Mutex::new(known),
            changed: Signal::default(),
        }
    }

    /// The right to write the lock object, and what we know of it: waits for a write in
    /// flight.
    pub(crate) async fn writer(&self) -> tokio::sync::MutexGuard<'_, Known> {
        self.known.lock().await
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn key(&self) -> &LockKey {
        &self.key
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    pub(crate) fn token(&self) -> FencingToken {
        self.token
    }

    /// The earliest moment another owner could take the lock over, by our clock: the send
    /// time of our last successful write plus the ttl; no later than the loss of a lease
    /// refused or revoked.
    pub(crate) fn expires_at(&self) -> Instant {
        self.state().expires_at
    }

    /// Past this, the holder no longer believes in the lease: `expires_at` minus the margin.
    pub(crate) fn deadline(&self) -> Instant {
        let expires = self.expires_at();
        expires.checked_sub(self.margin).unwrap_or(expires)
    }

    /// A write of ours sent at `sent` succeeded.
    pub(crate) fn renewed(&self, sent: Instant) {
        let mut state = self.state();
        if state.end == End::Live {
            state.expires_at = state.expires_at.max(sent + self.ttl);
        }
    }

    /// How much longer the lease is ours, if it is live and healthy.
    pub(crate) fn healthy_for(&self) -> Option<Duration> {
        let state = self.state();
        if state.end != End::Live {
            return None;
        }
        let left = (state.expires_at - self.margin).checked_duration_since(crate::clock::now())?;
        (!left.is_zero()).then_some(left)
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy_for().is_some()
    }

    /// Whether the lock object may still be ours: the lease is live, or ran out without
    /// anybody else's change seen (a write conditional on our version may still land).
    pub(crate) fn may_still_be_ours(&self) -> bool {
        let state = self.state();
        !state.finished && matches!(state.end, End::Live | End::Lost(Cause::DeadlinePassed))
    }

    /// Lost or ended.
    pub(crate) fn is_over(&self) -> bool {
        self.state().end != End::Live
    }

    /// Marks the lease lost for `cause`, unless it is over already; whether it was live.
    pub(crate) fn lose(&self, cause: Cause) -> bool {
        self.end(End::Lost(cause))
    }

    /// Marks the lease released at its guard's request.
    pub(crate) fn released(&self) {
        self.end(End::Released);
    }

    fn end(&self, end: End) -> bool {
        let was_live = {
            let mut state = self.state();
            let was_live = state.end == End::Live;
            if was_live {
                state.end = end;
                // The object is another's, or is being deleted: another owner may take the
                // lock from now on, not only once our last write's ttl has run out.
                if let End::Lost(Cause::Refused | Cause::Revoked) = end {
                    state.expires_at = state.expires_at.min(crate::clock::now());
                }
            }
            was_live
        };
        self.changed.notify();
        was_live
    }

    /// A dropped guard asks the driver for the release.
    pub(crate) fn ask_release(&self) {
        self.state().release_asked = true;
        self.changed.notify();
    }

    /// Resolves once a dropped guard has asked for the release.
    pub(crate) async fn release_asked(&self) {
        self.changed.wait_until(|| self.state().release_asked).await
    }

    /// Resolves once the lease is lost or has ended.
    pub(crate) async fn over(&self) {
        self.changed.wait_until(|| self.is_over()).await
    }

    /// Nothing of the lease is in flight any more: it no longer counts as the client's work.
    pub(crate) fn finish(&self) {
        let ticket = {
            let mut state = self.state();
            state.finished = true;
            state.ticket.take()
        };
        drop(ticket);
        self.changed.notify();
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.state().finished
    }

    /// What a release asked of a lease finished another way answers: `false` for a lease
    /// someone else changed or that ran out, "shut down" for one the client gave up.
    pub(crate) fn outcome_when_finished(&self) -> Result<bool, Error> {
        match self.state().cause() {
            Some(Cause::Revoked | Cause::DriverStopped) => Err(Error::ShutDown),
            _ => Ok(false),
        }
    }

    /// Resolves once the lease is finished.
    pub(crate) async fn finished(&self) {
        self.changed.wait_until(|| self.is_finished()).await
    }
}

#[cfg(test)]
impl Lease {
    /// A lease on `name` whose first write was sent at `sent`: ttl 30 s, margin 3 s.
    pub(crate) fn for_test(name: &str, sent: Instant) -> Self {
        let pending = Arc::new(crate::pending::Pending::default());
        Self::new(
            LockKey::new("k").unwrap(),
            name.into(),
            "test#1".into(),
            Known::new(crate::backend::Version::new(1, 1), sent),
            Duration::from_secs(30),
            Duration::from_secs(3),
            pending.enter().unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(sent: Instant) -> Lease {
        Lease::for_test("dimutex/k", sent)
    }

    #[test]
    fn healthy_until_the_margin_before_expiry() {
        let now = Instant::now();
        let l = lease(now);
        assert_eq!(l.expires_at(), now + Duration::from_secs(30));
        let left = l.healthy_for().unwrap();
        assert!(left <= Duration::from_secs(27) && left > Duration::from_secs(26));
        let stale = lease(now - Duration::from_secs(28));
        assert!(!stale.is_healthy(), "inside the margin");
        stale.renewed(now);
        assert!(stale.is_healthy(), "a refresh moves it on");
        stale.renewed(now - Duration::from_secs(60));
        assert_eq!(
            stale.expires_at(),
            now + Duration::from_secs(30),
            "never back"
        );
    }

    #[test]
    fn a_lease_refused_or_revoked_expires_when_lost_one_run_out_keeps_its_time() {
        let sent = Instant::now();
        for cause in [Cause::Refused, Cause::Revoked] {
            let l = lease(sent);
            l.lose(cause);
            assert!(l.expires_at() <= Instant::now(), "{cause:?}");
            l.renewed(Instant::now());
            assert!(
                l.expires_at() <= Instant::now(),
                "{cause:?}: no refresh revives it"
            );
        }
        for cause in [Cause::DeadlinePassed, Cause::DriverStopped] {
            let l = lease(sent);
            l.lose(cause);
            assert_eq!(l.expires_at(), sent + Duration::from_secs(30), "{cause:?}");
        }
    }

    #[test]
    fn lost_once_and_a_release_of_a_finished_lease_answers_by_its_cause() {
        let l = lease(Instant::now());
        assert!(l.lose(Cause::DeadlinePassed));
        assert!(!l.lose(Cause::Refused), "the first cause stays");
        assert!(!l.is_healthy());
        l.finish();
        assert!(!l.outcome_when_finished().unwrap(), "ran out: not ours");
        let revoked = lease(Instant::now());
        revoked.lose(Cause::Revoked);
        assert!(matches!(
            revoked.outcome_when_finished(),
            Err(Error::ShutDown)
        ));
    }

    #[tokio::test]
    async fn a_release_asked_and_the_end_reach_their_waiters_and_the_ticket_goes() {
        let pending = Arc::new(crate::pending::Pending::default());
        let l = Lease::new(
            LockKey::new("k").unwrap(),
            "dimutex/k".into(),
            "test#1".into(),
            Known::new(crate::backend::Version::new(1, 1), Instant::now()),
            Duration::from_secs(30),
            Duration::from_secs(3),
            pending.enter().unwrap(),
        );
        assert_eq!(pending.count(), 1);
        l.ask_release();
        l.release_asked().await;
        l.released();
        l.over().await;
        assert!(!l.is_finished());
        l.finish();
        l.finished().await;
        assert_eq!(
            pending.count(),
            0,
            "a finished lease is no longer pending work"
        );
    }
}
