//! [`ClientBuilder`]: a client's configuration, checked when it is built.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{Client, Inner};
use crate::backend::Backend;
use crate::backoff::{Backoff, RetryPolicy};
use crate::error::ConfigError;
use crate::key;
use crate::protocol::{Protocol, Settings, WallClock};

/// The longest identity [`ClientBuilder::identity`] accepts, in bytes.
const MAX_IDENTITY_LEN: usize = 256;

/// Configures a [`Client`]. Invalid settings are reported by [`build`](Self::build), never
/// silently adjusted.
///
/// ```
/// use std::time::Duration;
/// use dimutex::{Backoff, Client, RetryPolicy, backend::MemoryBackend};
///
/// let client = Client::builder(MemoryBackend::new())
///     .prefix("locks/")
///     .ttl(Duration::from_secs(15))
///     .refresh_interval(Duration::from_secs(5))
///     .identity("worker-3")
///     .request_timeout(Duration::from_secs(3))
///     .retry(RetryPolicy::new(Backoff::default(), Duration::from_secs(4)))
///     .poll(Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 3.0)?)
///     .build()?;
/// # Ok::<(), dimutex::ConfigError>(())
/// ```
#[must_use]
pub struct ClientBuilder {
    backend: Arc<dyn Backend>,
    prefix: String,
    ttl: Duration,
    refresh_interval: Option<Duration>,
    identity: Option<String>,
    request_timeout: Duration,
    retry: RetryPolicy,
    poll: Backoff,
    clock: WallClock,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("backend", &self.backend)
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The shortest allowed lease.
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// The shortest allowed refresh interval.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

impl ClientBuilder {
    pub(super) fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            prefix: "dimutex/".into(),
            ttl: Duration::from_secs(30),
            refresh_interval: None,
            identity: None,
            request_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            poll: Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 3.0)
                .expect("valid default"),
            clock: Arc::new(SystemTime::now),
        }
    }

    /// The prefix of lock object names (default `dimutex/`). Prefix and key together must fit
    /// in 1024 bytes.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The lease length (default 30 s; at least [`MIN_TTL`]). A holder that cannot refresh
    /// loses its lease this long after its last successful write was sent (minus a tenth of
    /// the ttl as a safety margin); others may take the lock over 1 s after that by the
    /// server's clock.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How often a held lease is refreshed (default a third of the ttl; at least
    /// [`MIN_REFRESH_INTERVAL`] and at most half the ttl).
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = Some(interval);
        self
    }

    /// The readable part of the owner written into lock objects (default `hostname:pid`); a
    /// random nonce per acquisition is appended. At most 256 bytes, no control characters,
    /// no `#`.
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// How long one request may take before it counts as a transient failure (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How transient failures are retried (default [`RetryPolicy::default`]: 100 ms to 2 s
    /// backoff, giving up after 5 s).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How [`Client::acquire`] polls a held lock (default 50 ms to 1 s, multiplier 3).
    ///
    /// Reads of a lock held elsewhere are sent at most the backoff's maximum apart (counted
    /// from send to send; at least the minimum after the previous answer, should a read take
    /// longer than the difference), and a waiter that sees the lock go creates it within that
    /// maximum of its last read that found it held (plus the requests' round trips): the
    /// maximum bounds how long a released lock stays free before a waiter in another process
    /// takes it.
    pub fn poll(mut self, poll: Backoff) -> Self {
        self.poll = poll;
        self
    }

    /// The wall clock used to write the `expires` field that Python `dimutex` reads (default
    /// the system clock). Expiry of this crate's locks is judged on the server's clock only, so
    /// a wrong clock here affects only Python `dimutex` peers.
    pub fn wall_clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Checks the configuration and builds the client.
    pub fn build(self) -> Result<Client, ConfigError> {
        key::validate_prefix(&self.prefix).map_err(|e| ConfigError(format!("prefix: {e}")))?;
        if self.ttl < MIN_TTL {
            return Err(ConfigError(format!(
                "ttl must be at least {MIN_TTL:?}, got {:?}",
                self.ttl
            )));
        }
        if self.ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(ConfigError("ttl must be at most 7 days".into()));
        }
        let refresh_interval = self
            .refresh_interval
            .unwrap_or((self.ttl / 3).max(MIN_REFRESH_INTERVAL));
        if refresh_interval < MIN_REFRESH_INTERVAL || refresh_interval > self.ttl / 2 {
            return Err(ConfigError(format!(
                "refresh interval must be between {MIN_REFRESH_INTERVAL:?} and ttl/2 ({:?}), got {refresh_interval:?}",
                self.ttl / 2
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError("request timeout must be positive".into()));
        }
        let identity = self.identity.unwrap_or_else(default_identity);
        if identity.is_empty()
            || identity.len() > MAX_IDENTITY_LEN
            || identity.contains('#')
            || identity.chars().any(char::is_control)
        {
            return Err(ConfigError(
                "identity must be 1-256 bytes without control characters or '#'".into(),
            ));
        }
        let settings = Settings {
            ttl: self.ttl,
            refresh_interval,
            request_timeout: self.request_timeout,
            retry: self.retry,
            poll: self.poll,
            clock: self.clock,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                protocol: Arc::new(Protocol::new(self.backend, settings)),
                prefix: self.prefix,
                identity,
                local: Arc::default(),
                pending: Arc::default(),
                driver: Mutex::new(None),
                shutdown: Arc::default(),
            }),
        })
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace(['#', ':'], "_"))
        .filter(|h| !h.is_empty() && h.len() <= 200 && !h.chars().any(char::is_control))
        .unwrap_or_else(|| "unknown".into());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    #[test]
    fn invalid_configuration_is_an_error() {
        let b = || Client::builder(MemoryBackend::new());
        assert!(b().ttl(Duration::from_secs(1)).build().is_err());
        assert!(
            b().ttl(Duration::from_secs(10))
                .refresh_interval(Duration::from_secs(6))
                .build()
                .is_err()
        );
        assert!(
            b().refresh_interval(Duration::from_millis(500))
                .build()
                .is_err()
        );
        assert!(b().request_timeout(Duration::ZERO).build().is_err());
        assert!(b().identity("").build().is_err());
        assert!(b().identity("a#b").build().is_err());
        assert!(b().prefix("bad\nprefix").build().is_err());
        let ok = b().ttl(Duration::from_secs(3)).build().unwrap();
        assert_eq!(ok.refresh_interval(), Duration::from_secs(1));
    }
}
