//! Work done once per period: a lock that, once its work succeeded, stays behind as a
//! completed record for a retention period, and what a later acquisition finds of it.

use std::time::{Duration, SystemTime};

use crate::backend::ObjectState;
use crate::guard::LockGuard;
use crate::object;

/// What [`Client::try_acquire_unless_done`](crate::Client::try_acquire_unless_done) got: the
/// lock, or the record of work completed within its retention.
#[derive(Debug)]
#[must_use]
pub enum Acquisition {
    /// The lock: no live record of the work exists. Complete it with
    /// [`LockGuard::complete`] once the work succeeded.
    Lock(LockGuard),
    /// The work was completed within the retention of its record.
    Done(Done),
}

/// A live completed record: when the work was completed, and until when the record stands.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// use std::time::Duration;
/// use dimutex::{Acquisition, Client, backend::MemoryBackend};
/// let client = Client::new(MemoryBackend::new());
/// if let Acquisition::Lock(guard) = client.try_acquire_unless_done("nightly-report").await? {
///     // ... the report ...
///     guard.complete(Duration::from_secs(20 * 3600)).await?;
/// }
/// let Acquisition::Done(done) = client.try_acquire_unless_done("nightly-report").await? else {
///     panic!("completed a moment ago");
/// };
/// assert!(done.until() > done.completed_at());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    completed_at: SystemTime,
    until: SystemTime,
}

impl Done {
    pub(crate) fn of(state: &ObjectState, fallback_ttl: Duration) -> Self {
        let (end, _) = object::lease_end(state, fallback_ttl);
        Self {
            completed_at: state.updated(),
            until: end,
        }
    }

    /// When the work was completed (the record's write), by the server's clock.
    pub fn completed_at(&self) -> SystemTime {
        self.completed_at
    }

    /// When the record expires, by the server's clock: after this, the work may run again.
    pub fn until(&self) -> SystemTime {
        self.until
    }
}
