//! The storage side of the lock: one small trait whose methods are the five requests of the
//! lock protocol (and two more for the completed records of the idempotency layer), and the
//! two backends that implement it.
//!
//! The lock algorithm ([`Client`](crate::Client)) is written once above [`Backend`]; a backend
//! only performs single requests and reports what the server said. Retries, ambiguity
//! resolution and expiry judgement all live in the client, so every backend gets them the same.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

#[cfg(feature = "gcs")]
mod gcs;
mod memory;
pub(crate) mod store;

#[cfg(feature = "gcs")]
pub use gcs::{GCS_ENDPOINT, GcsBackend, GcsBackendBuilder, GcsConfigError, SCOPE};
pub use memory::MemoryBackend;

/// What each [`Backend`] method returns: a boxed, sendable future of the server's answer.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The custom metadata of a lock object (`metadata` in the GCS object resource): string keys
/// to string values.
///
/// ```
/// let md = dimutex::backend::Metadata::from([("ttl".to_owned(), "30".to_owned())]);
/// assert_eq!(md.get("ttl").map(String::as_str), Some("30"));
/// ```
pub type Metadata = BTreeMap<String, String>;

/// The two version numbers of a GCS object that every conditional write names.
///
/// The generation changes when the object is created or overwritten; the metageneration starts
/// at 1 for each generation and increases with every metadata update.
///
/// ```
/// use dimutex::backend::Version;
/// let v = Version::new(1700000000000001, 2);
/// assert_eq!(v.generation(), 1700000000000001);
/// assert_eq!(v.metageneration(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    generation: i64,
    metageneration: i64,
}

impl Version {
    /// A version from its generation and metageneration.
    pub fn new(generation: i64, metageneration: i64) -> Self {
        Self {
            generation,
            metageneration,
        }
    }

    /// The object generation.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// The object metageneration.
    pub fn metageneration(&self) -> i64 {
        self.metageneration
    }
}

/// What a backend knows about a stored lock object.
///
/// ```
/// use dimutex::backend::{ObjectState, Version};
/// use std::time::SystemTime;
/// let state = ObjectState::new(Version::new(5, 1), SystemTime::UNIX_EPOCH, Default::default());
/// assert_eq!(state.version().generation(), 5);
/// assert!(state.metadata().is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectState {
    version: Version,
    updated: SystemTime,
    created: Option<SystemTime>,
    metadata: Metadata,
}

impl ObjectState {
    /// An object state from its parts.
    pub fn new(version: Version, updated: SystemTime, metadata: Metadata) -> Self {
        Self {
            version,
            updated,
            created: None,
            metadata,
        }
    }

    /// Records when this generation was created (`timeCreated`).
    ///
    /// ```
    /// use dimutex::backend::{ObjectState, Version};
    /// use std::time::SystemTime;
    /// let s = ObjectState::new(Version::new(5, 1), SystemTime::UNIX_EPOCH, Default::default())
    ///     .with_created(SystemTime::UNIX_EPOCH);
    /// assert_eq!(s.created(), Some(SystemTime::UNIX_EPOCH));
    /// ```
    pub fn with_created(mut self, created: SystemTime) -> Self {
        self.created = Some(created);
        self
    }

    /// When this generation was created (`timeCreated`), if the server said.
    pub fn created(&self) -> Option<SystemTime> {
        self.created
    }

    /// Generation and metageneration.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The server's `updated` timestamp: creation or last metadata change.
    pub fn updated(&self) -> SystemTime {
        self.updated
    }

    /// The custom metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }
}

/// A server reply: the object (if any) and the server's clock reading (`Date`), if it sent one.
///
/// ```
/// use dimutex::backend::Reply;
/// let reply: Reply<()> = Reply::new((), None);
/// assert!(reply.server_time().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<T> {
    value: T,
    server_time: Option<SystemTime>,
}

impl<T> Reply<T> {
    /// A reply carrying `value`, read at `server_time` by the server's clock.
    pub fn new(value: T, server_time: Option<SystemTime>) -> Self {
        Self { value, server_time }
    }

    /// The value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Consumes the reply, giving the value.
    pub fn into_value(self) -> T {
        self.value
    }

    /// The server's clock when it answered (the `Date` header), if known.
    pub fn server_time(&self) -> Option<SystemTime> {
        self.server_time
    }
}

/// Why a backend request did not succeed.
///
/// The client retries [`BackendError::is_transient`] errors; the rest are answers.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// A precondition (`ifGenerationMatch`/`ifMetagenerationMatch`) did not hold (HTTP 412).
    #[error("precondition failed")]
    PreconditionFailed,
    /// The object does not exist (HTTP 404 on an object).
    #[error("object not found")]
    NotFound,
    /// The bucket does not exist (HTTP 404 on the bucket); not retried.
    #[error("bucket not found")]
    BucketNotFound,
    /// A failure worth retrying: 408, 429, 5xx, a timeout or a broken connection. The request
    /// may or may not have taken effect.
    #[error("transient backend failure: {message}")]
    Transient {
        /// The HTTP status, if a response arrived.
        status: Option<u16>,
        /// How long the server asked us to wait (`Retry-After`), if it did.
        retry_after: Option<Duration>,
        /// What happened, for humans.
        message: String,
    },
    /// Any other failure (401, 403, 400, a malformed reply...); not retried.
    #[error("backend failure: {message}")]
    Fatal {
        /// The HTTP status, if a response arrived.
        status: Option<u16>,
        /// What happened, for humans.
        message: String,
    },
}

impl BackendError {
    /// Whether the client should retry the request.
    ///
    /// ```
    /// use dimutex::backend::BackendError;
    /// assert!(!BackendError::PreconditionFailed.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Transient { .. })
    }

    /// Whether this is a rate-limit answer (HTTP 429).
    pub fn is_rate_limited(&self) -> bool {
        matches!(
            self,
            BackendError::Transient {
                status: Some(429),
                ..
            }
        )
    }
}

/// The five requests of the lock protocol.
///
/// Each method performs **one** request and reports what the server answered; it does not
/// retry. Implementations map HTTP 412 to [`BackendError::PreconditionFailed`], a missing object
/// to [`BackendError::NotFound`], and failures worth retrying to [`BackendError::Transient`].
///
/// The crate ships [`GcsBackend`] (feature `gcs`) and
/// [`MemoryBackend`]; implement this trait to put locks elsewhere.
///
/// ```
/// use dimutex::backend::{Backend, MemoryBackend};
/// fn takes_any_backend(_: impl Backend) {}
/// takes_any_backend(MemoryBackend::new());
/// ```
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Creates the object only if no live object has this name (`ifGenerationMatch=0`), with
    /// the given metadata, in one request.
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>>;

    /// Reads the object; `None` when there is none.
    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>>;

    /// Overwrites the object in one request, only if it is still at `expected`.
    fn takeover<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>>;

    /// Merges `metadata` into the object's metadata, only if it is still at `expected`.
    fn refresh<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>>;

    /// Deletes the object, only if it is still at `expected`.
    fn release<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>>;

    /// Overwrites the object with `metadata` and the contents `data` in one request, only if
    /// it is still at `expected`: how a held lock becomes a completed record
    /// ([`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)).
    ///
    /// The default refuses with [`BackendError::Fatal`]: a backend without it serves locks,
    /// not records.
    fn record<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let _ = (name, expected, metadata, data);
        Box::pin(std::future::ready(Err(records_unsupported())))
    }

    /// Reads the contents of the object, only if it is still at `generation`
    /// ([`BackendError::PreconditionFailed`] otherwise, [`BackendError::NotFound`] when it is
    /// gone).
    ///
    /// The default refuses with [`BackendError::Fatal`], as [`record`](Self::record) does.
    fn contents<'a>(
        &'a self,
        name: &'a str,
        generation: i64,
    ) -> BoxFuture<'a, Result<Reply<bytes::Bytes>, BackendError>> {
        let _ = (name, generation);
        Box::pin(std::future::ready(Err(records_unsupported())))
    }
}

fn records_unsupported() -> BackendError {
    BackendError::Fatal {
        status: None,
        message: "this backend does not store records".to_owned(),
    }
}

impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        (**self).create(name, metadata)
    }

    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        (**self).inspect(name)
    }

    fn takeover<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        (**self).takeover(name, expected, metadata)
    }

    fn refresh<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        (**self).refresh(name, expected, metadata)
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        (**self).release(name, expected)
    }

    fn record<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        (**self).record(name, expected, metadata, data)
    }

    fn contents<'a>(
        &'a self,
        name: &'a str,
        generation: i64,
    ) -> BoxFuture<'a, Result<Reply<bytes::Bytes>, BackendError>> {
        (**self).contents(name, generation)
    }
}
