//! One held lease, as the guard, the client's local registry and the lease driver share it:
//! the lock's identity, until when it is ours, and how it ended.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::key::{LockKey, ObjectName};
use crate::signal::Signal;
use crate::token::FencingToken;

/// Where the lease driver sends the outcome of a release, if anyone waits for it.
pub(crate) type ReleaseReply = Option<oneshot::Sender<Result<bool, Error>>>;

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

/// A release asked for by the guard, waiting for the driver.
enum Release {
    NotAsked,
    Asked(ReleaseReply),
    /// Taken up by the driver.
    Taken,
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
    /// The send time of our last successful write plus the ttl.
    expires_at: Instant,
    end: End,
    release: Release,
    /// The driver is done with it (a release's delete has been answered, say).
    finished: bool,
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
    /// Notified when the release is asked for and when the lease ends.
    changed: Signal,
}

impl Lease {
    /// A lease whose first write was sent at `sent`.
    pub(crate) fn new(
        key: LockKey,
        name: ObjectName,
        owner: Arc<str>,
        token: FencingToken,
        sent: Instant,
        ttl: Duration,
        margin: Duration,
    ) -> Self {
        Self {
            key,
            name,
            owner,
            token,
            ttl,
            margin,
            state: Mutex::new(State {
                expires_at: sent + ttl,
                end: End::Live,
                release: Release::NotAsked,
                finished: false,
            }),
            changed: Signal::default(),
        }
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
    /// time of our last successful write plus the ttl.
    pub(crate) fn expires_at(&self) -> Instant {
        self.state().expires_at
    }

    /// Past this, the holder no longer believes in the lease: `expires_at` minus the margin.
    pub(crate) fn deadline(&self) -> Instant {
        self.expires_at() - self.margin
    }

    /// A write of ours sent at `sent` succeeded.
    pub(crate) fn renewed(&self, sent: Instant) {
        let mut state = self.state();
        state.expires_at = state.expires_at.max(sent + self.ttl);
    }

    /// How much longer the lease is ours, if it is live and healthy.
    pub(crate) fn healthy_for(&self) -> Option<Duration> {
        let state = self.state();
        if state.end != End::Live {
            return None;
        }
        let left = (state.expires_at - self.margin).checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some(left)
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy_for().is_some()
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
            }
            was_live
        };
        self.changed.notify();
        was_live
    }

    /// The guard asks for the release. Refused once the driver is done with the lease (then
    /// nobody will answer `reply`): `Err` with the cause it was lost for, if any.
    pub(crate) fn ask_release(&self, reply: ReleaseReply) -> Result<(), Option<Cause>> {
        {
            let mut state = self.state();
            if state.finished {
                return Err(state.cause());
            }
            if matches!(state.release, Release::NotAsked) {
                state.release = Release::Asked(reply);
            }
        }
        self.changed.notify();
        Ok(())
    }

    /// Resolves once the guard asks for the release; its reply channel, taken.
    pub(crate) async fn release_asked(&self) -> ReleaseReply {
        self.changed
            .wait_until(|| matches!(self.state().release, Release::Asked(_)))
            .await;
        match std::mem::replace(&mut self.state().release, Release::Taken) {
            Release::Asked(reply) => reply,
            _ => None,
        }
    }

    /// Resolves once the lease is lost or has ended.
    pub(crate) async fn over(&self) {
        self.changed.wait_until(|| self.is_over()).await
    }

    /// The driver is done with the lease: nothing of it is in flight any more.
    /// A release asked for and not taken up (the lease ended another way first) is answered
    /// here: `false` for a lease someone else changed or that ran out, "shut down" for one the
    /// client gave up.
    pub(crate) fn finish(&self) {
        let unanswered = {
            let mut state = self.state();
            state.finished = true;
            match std::mem::replace(&mut state.release, Release::Taken) {
                Release::Asked(Some(reply)) => Some((reply, state.cause())),
                _ => None,
            }
        };
        if let Some((reply, cause)) = unanswered {
            let _ = reply.send(match cause {
                Some(Cause::Refused | Cause::DeadlinePassed) => Ok(false),
                _ => Err(Error::ShutDown),
            });
        }
        self.changed.notify();
    }

    /// Resolves once the driver is done with the lease.
    pub(crate) async fn finished(&self) {
        self.changed.wait_until(|| self.state().finished).await
    }
}

#[cfg(test)]
impl Lease {
    /// A lease on `name` whose first write was sent at `sent`: ttl 30 s, margin 3 s.
    pub(crate) fn for_test(name: &str, sent: Instant) -> Self {
        Self::new(
            LockKey::new("k").unwrap(),
            name.into(),
            "test#1".into(),
            FencingToken::from_generation(1),
            sent,
            Duration::from_secs(30),
            Duration::from_secs(3),
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
    fn lost_once_and_a_release_asked_after_it_is_answered_at_the_finish() {
        let l = lease(Instant::now());
        assert!(l.lose(Cause::DeadlinePassed));
        assert!(!l.lose(Cause::Refused), "the first cause stays");
        assert!(!l.is_healthy());
        // Lost, not finished: the driver still deletes it when the guard asks.
        let (tx, mut rx) = oneshot::channel();
        assert_eq!(l.ask_release(Some(tx)), Ok(()));
        // Finished another way first: the request is answered, and later ones refused.
        l.finish();
        assert!(!rx.try_recv().unwrap().unwrap(), "ran out: not ours");
        assert_eq!(l.ask_release(None), Err(Some(Cause::DeadlinePassed)));
    }

    #[tokio::test]
    async fn a_release_asked_reaches_the_driver_with_its_reply() {
        let l = lease(Instant::now());
        let (tx, mut rx) = oneshot::channel();
        l.ask_release(Some(tx)).unwrap();
        let reply = l.release_asked().await.expect("the reply channel");
        reply.send(Ok(true)).unwrap();
        assert!(rx.try_recv().unwrap().unwrap());
        l.released();
        l.over().await;
        l.finish();
        l.finished().await;
        assert_eq!(l.ask_release(None), Err(None));
    }
}
