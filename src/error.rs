//! The errors of the lock client.

use std::time::Duration;

use crate::backend::BackendError;
use crate::key::KeyError;

/// Why a lock operation did not succeed.
///
/// "Held by someone else" is [`Error::Held`], a normal outcome to match on, not a failure of the
/// library:
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use dimutex::{Client, Error, backend::MemoryBackend};
///
/// let client = Client::new(MemoryBackend::new());
/// let _held = client.try_acquire("nightly-report").await.unwrap();
/// match client.try_acquire("nightly-report").await {
///     Err(Error::Held { remaining }) => assert!(remaining.is_some()),
///     other => panic!("expected Held, got {other:?}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another owner holds the lock. `remaining` is how long its lease lasts at most, by the
    /// server's clock, when known (use it for `Retry-After`).
    #[error("the lock is held by another owner")]
    Held {
        /// The longest the current lease can still last, if known.
        remaining: Option<Duration>,
    },
    /// The key is not a valid lock key; no request was sent.
    #[error("invalid lock key: {0}")]
    InvalidKey(#[from] KeyError),
    /// The backend kept failing with transient errors (timeouts, 429, 5xx) until the retry
    /// policy gave up. The outcome of the last write is unknown; expiry is the backstop.
    #[error("lock backend unavailable: {source}")]
    Unavailable {
        /// How long the backend asked us to wait, if it did.
        retry_after: Option<Duration>,
        /// The last error.
        #[source]
        source: BackendError,
    },
    /// The backend refused the request for good (missing bucket, permissions, bad reply).
    #[error("lock backend error: {0}")]
    Backend(#[source] BackendError),
    /// The client has been shut down; no new locks are taken.
    #[error("the lock client has been shut down")]
    ShutDown,
}

impl From<std::convert::Infallible> for Error {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

impl Error {
    /// Whether the lock is held by another owner.
    ///
    /// ```
    /// assert!(dimutex::Error::Held { remaining: None }.is_held());
    /// ```
    pub fn is_held(&self) -> bool {
        matches!(self, Error::Held { .. })
    }

    /// How long to wait before trying again, when known: the remaining lease for
    /// [`Error::Held`], the server's `Retry-After` for [`Error::Unavailable`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let e = dimutex::Error::Held { remaining: Some(Duration::from_secs(3)) };
    /// assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Held { remaining } => *remaining,
            Error::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// An invalid client configuration.
///
/// ```
/// use std::time::Duration;
/// use dimutex::{Client, backend::MemoryBackend};
/// let err = Client::builder(MemoryBackend::new()).ttl(Duration::ZERO).build().unwrap_err();
/// assert!(err.to_string().contains("ttl"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid dimutex configuration: {0}")]
pub struct ConfigError(pub(crate) String);

/// [`Client::shutdown`](crate::Client::shutdown) ran out of time with releases still pending.
///
/// ```
/// # async fn f(client: dimutex::Client) {
/// if let Err(e) = client.shutdown(std::time::Duration::from_secs(1)).await {
///     eprintln!("{} releases did not finish; their leases will expire", e.pending());
/// }
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shutdown timed out with {pending} lock release(s) pending")]
pub struct ShutdownTimeout {
    pub(crate) pending: usize,
}

impl ShutdownTimeout {
    /// How many leases were still being released.
    pub fn pending(&self) -> usize {
        self.pending
    }
}
