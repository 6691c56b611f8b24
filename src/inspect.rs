//! Looking at a lock from outside, and breaking a stuck one: what operators need.

use std::time::{Duration, SystemTime};

use crate::backend::{BackendError, ObjectState, Reply};
use crate::client::Client;
use crate::error::Error;
use crate::key::LockKey;
use crate::object::{self, ExpirySource};
use crate::token::FencingToken;

/// What a lock object says about its holder, read with [`Client::status`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// let client = dimutex::Client::builder(dimutex::backend::MemoryBackend::new())
///     .identity("worker-7")
///     .build()
///     .unwrap();
/// let guard = client.try_acquire("nightly").await?;
/// let status = client.status("nightly").await?.expect("held");
/// assert_eq!(status.owner(), Some("worker-7"));
/// assert_eq!(status.token(), guard.token());
/// assert!(status.is_live());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockStatus {
    token: FencingToken,
    owner: Option<String>,
    since: Option<SystemTime>,
    expires: SystemTime,
    server_time: SystemTime,
    written_by_python: bool,
}

impl LockStatus {
    /// The fencing token of the current holder (the object generation).
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The readable part of the owner (the identity of the holding client; its per-acquisition
    /// nonce is not shown). `None` for locks written by Python `dimutex`, which records none.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// When the current holder acquired the lock (server time), when known.
    pub fn since(&self) -> Option<SystemTime> {
        self.since
    }

    /// When the lease ends unless refreshed (server time), by the rule used for takeover.
    pub fn expires(&self) -> SystemTime {
        self.expires
    }

    /// The server's clock when the status was read.
    pub fn server_time(&self) -> SystemTime {
        self.server_time
    }

    /// Whether the lease is live at [`server_time`](Self::server_time); an expired lock
    /// object may be taken over by the next acquirer.
    pub fn is_live(&self) -> bool {
        self.expires > self.server_time
    }

    /// How long the lease lasts at most, from [`server_time`](Self::server_time).
    pub fn remaining(&self) -> Duration {
        self.expires
            .duration_since(self.server_time)
            .unwrap_or(Duration::ZERO)
    }

    /// Whether the lock was written by Python `dimutex` (judged by its `expires`).
    pub fn written_by_python(&self) -> bool {
        self.written_by_python
    }
}

impl Client {
    /// Reads the lock object of `key`: `None` when there is none (free). One request.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// assert!(client.status("free").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn status<K>(&self, key: K) -> Result<Option<LockStatus>, Error>
    where
        K: TryInto<LockKey>,
        K::Error: Into<Error>,
    {
        let key = key.try_into().map_err(Into::into)?;
        let name = self.object_name(&key)?;
        let reply = self.read(&name).await?;
        let server_time = reply.server_time().unwrap_or_else(SystemTime::now);
        Ok(reply
            .into_value()
            .map(|state| self.describe(&state, server_time)))
    }

    /// Reads a lock object, retrying transient failures.
    async fn read(&self, name: &str) -> Result<Reply<Option<ObjectState>>, Error> {
        let p = &*self.inner.protocol;
        p.send_within_policy(|| p.backend().inspect(name))
            .await
            .result
            .map_err(|e| p.failure(e))
    }

    fn describe(&self, state: &ObjectState, server_time: SystemTime) -> LockStatus {
        let (expires, source) = object::lease_end(state, self.ttl());
        LockStatus {
            token: FencingToken::from_generation(state.version().generation()),
            owner: object::owner_of(state)
                .map(|o| o.rsplit_once('#').map_or(o, |(id, _)| id).to_owned()),
            since: state.created(),
            expires,
            server_time,
            written_by_python: source == ExpirySource::Expires,
        }
    }

    /// Breaks the lock of `key`, whoever holds it: deletes its object, conditionally on
    /// `token` when given, so that a newer holder's lock is never deleted by accident.
    /// Returns whether a lock was deleted (`false`: there was none, or its token differs).
    ///
    /// The holder finds out at its next refresh (its lost signal fires). Use this for stuck
    /// locks; normal code releases through its [`LockGuard`](crate::LockGuard).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("stuck").await?;
    /// let token = guard.token();
    /// std::mem::forget(guard); // as if its process hung
    /// assert!(client.force_release("stuck", Some(token)).await?);
    /// assert!(!client.force_release("stuck", None).await?);
    /// # Ok(()) }
    /// ```
    pub async fn force_release<K>(&self, key: K, token: Option<FencingToken>) -> Result<bool, Error>
    where
        K: TryInto<LockKey>,
        K::Error: Into<Error>,
    {
        let key: LockKey = key.try_into().map_err(Into::into)?;
        let name = self.object_name(&key)?;
        let p = &*self.inner.protocol;
        // A refresh may move the metageneration between our read and our delete: read again.
        for _ in 0..8 {
            let Some(state) = self.read(&name).await?.into_value() else {
                return Ok(false);
            };
            if token.is_some_and(|t| t.get() != state.version().generation()) {
                return Ok(false);
            }
            let version = state.version();
            let a = p
                .send_within_policy(|| p.backend().release(&name, version))
                .await;
            match a.result {
                Ok(_) => return Ok(true),
                Err(BackendError::NotFound) => return Ok(a.ambiguous),
                Err(BackendError::PreconditionFailed) => continue,
                Err(e) => return Err(p.failure(e)),
            }
        }
        Err(Error::Held { remaining: None })
    }
}
