//! The lock protocol, in one place: create, inspect and judge, take over, adopt our own
//! landed write, refresh, release, and resolve an outcome lost in transit.
//!
//! It knows the [`Backend`] trait, the lock object's format ([`crate::object`]) and nothing
//! of the client, the guards or the lease driver: each step takes plain values and returns
//! plain values. The rules it follows:
//!
//! - Every write is conditional: a create on `ifGenerationMatch=0`, everything else on the
//!   generation *and* the metageneration we know.
//! - Expiry is judged on the server's clock (`updated` + ttl + 1 s < `Date`); a reply without
//!   a `Date` never shortens a lease (see [`acquire`]).
//! - A write whose answer was lost may have landed. It is resolved by reading the object and
//!   comparing the owner id, unique per acquisition, and the `expires` value, unique per
//!   write: only a state we wrote counts as ours.
//! - Transient failures (timeouts, 408, 429, 5xx) are retried with backoff ([`retry`]); GCS
//!   allows about one mutation per second per object, and a 429 is remembered for a minute.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::{Backend, BackendError};
use crate::backoff::{Backoff, RetryPolicy};
use crate::error::Error;

pub(crate) mod acquire;
pub(crate) mod cleanup;
pub(crate) mod record;
pub(crate) mod refresh;
pub(crate) mod release;
pub(crate) mod retry;

/// A source of wall-clock time.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// GCS allows about one mutation per second per object name.
pub(crate) const MUTATION_WINDOW: Duration = Duration::from_secs(1);

/// How long a 429 makes this client wait out the mutation window before its next write to a
/// lock that was just released.
const THROTTLE_MEMORY: Duration = Duration::from_secs(60);

/// The protocol's settings, checked by [`ClientBuilder`](crate::ClientBuilder).
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) ttl: Duration,
    pub(crate) refresh_interval: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) poll: Backoff,
    pub(crate) clock: WallClock,
}

impl Settings {
    /// How long before the lease's end (counted from the send time of the last successful
    /// write) the holder considers it lost: a tenth of the ttl.
    pub(crate) fn margin(&self) -> Duration {
        self.ttl / 10
    }
}

/// A backend, the settings, and what the protocol remembers between requests.
pub(crate) struct Protocol {
    backend: Arc<dyn Backend>,
    settings: Settings,
    /// When the backend last answered 429.
    throttled_at: Mutex<Option<Instant>>,
}

impl Protocol {
    pub(crate) fn new(backend: Arc<dyn Backend>, settings: Settings) -> Self {
        Self {
            backend,
            settings,
            throttled_at: Mutex::new(None),
        }
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Remembers that the backend enforces its per-object mutation limit.
    pub(crate) fn note_throttled(&self) {
        *self.throttled_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(crate::clock::now());
    }

    /// Whether the backend answered 429 in the last minute.
    pub(crate) fn recently_throttled(&self) -> bool {
        let at = *self.throttled_at.lock().unwrap_or_else(|e| e.into_inner());
        at.is_some_and(|at| at.elapsed() < THROTTLE_MEMORY)
    }

    /// The client's error for a backend error that ends an operation.
    pub(crate) fn failure(&self, e: BackendError) -> Error {
        match e {
            BackendError::Transient { retry_after, .. } => Error::Unavailable {
                retry_after: retry_after.or(Some(self.settings.retry.backoff().max())),
                source: e,
            },
            e => Error::Backend(e),
        }
    }
}

/// A random delay up to `max`.
pub(crate) fn jitter(max: Duration) -> Duration {
    max.mul_f64(crate::random::in_range(0.0..=1.0))
}

/// `d` from now, or far in the future when that is past what the clock can count (a timeout
/// or budget of `Duration::MAX` means "no limit"): never a panic.
pub(crate) fn after(d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    crate::clock::now() + d.min(FAR)
}
