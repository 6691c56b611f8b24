//! The in-process backend: the GCS semantics of [`store`](super::store), no network.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

use super::store::{Preconditions, Store, StoreError, StoredObject};
use super::{Backend, BackendError, BoxFuture, Metadata, ObjectState, Reply, Version};

/// A lock backend that keeps lock objects in this process, with the semantics of GCS:
/// generations, metagenerations, preconditions, a server clock, and (optionally) GCS's limit of
/// about one mutation per second per object name. Its replies carry the server clock's reading
/// as GCS's `Date` does, except a delete's (nothing reads it, and the clock read would be the
/// dearest part of the delete).
///
/// The server clock is the wall clock of the backend's creation moved on by tokio's clock:
/// on a runtime with paused time (`tokio::time::pause`), leases expire as the paused time
/// advances, and a test can run a ttl in no time.
///
/// Use it for examples and to test your own application without GCS. Clones share the same
/// objects, so two [`Client`](crate::Client)s built from clones of one `MemoryBackend` contend
/// like two processes sharing a bucket.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// use dimutex::{Client, backend::MemoryBackend};
///
/// let backend = MemoryBackend::new();
/// let client = Client::new(backend.clone());
/// let guard = client.try_acquire("report-2026-11").await?;
/// assert_eq!(backend.object_count(), 1);
/// assert!(guard.release().await?);
/// assert_eq!(backend.object_count(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    store: Arc<Store>,
}

impl MemoryBackend {
    /// An empty backend with the throttle off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns GCS's one-mutation-per-second-per-object limit on or off (default off). When on, a
    /// second mutation of one object name within a second is refused as HTTP 429 would be.
    ///
    /// ```
    /// let backend = dimutex::backend::MemoryBackend::new();
    /// backend.set_throttle(true);
    /// ```
    pub fn set_throttle(&self, on: bool) {
        self.store.set_throttle(on);
    }

    /// Moves the backend's server clock by `offset_ms` milliseconds from this machine's clock.
    ///
    /// ```
    /// let backend = dimutex::backend::MemoryBackend::new();
    /// backend.set_clock_offset_ms(-300_000);
    /// ```
    pub fn set_clock_offset_ms(&self, offset_ms: i64) {
        self.store.set_clock_offset(offset_ms);
    }

    /// How many lock objects exist now.
    ///
    /// ```
    /// assert_eq!(dimutex::backend::MemoryBackend::new().object_count(), 0);
    /// ```
    pub fn object_count(&self) -> usize {
        self.store.len()
    }

    /// The names of the objects that exist now, sorted.
    ///
    /// ```
    /// assert!(dimutex::backend::MemoryBackend::new().object_names().is_empty());
    /// ```
    pub fn object_names(&self) -> Vec<String> {
        self.store
            .list("")
            .into_iter()
            .map(|o| o.name.clone())
            .collect()
    }

    /// How many requests (of the five [`Backend`] methods) this backend has served.
    ///
    /// ```
    /// assert_eq!(dimutex::backend::MemoryBackend::new().request_count(), 0);
    /// ```
    pub fn request_count(&self) -> u64 {
        self.store.operations()
    }

    fn reply<T>(&self, value: T) -> Reply<T> {
        Reply::new(value, Some(self.store.now()))
    }

    /// Creates or overwrites a lock object (the create and takeover requests).
    fn write_lock(
        &self,
        name: &str,
        metadata: &Metadata,
        pre: Preconditions,
    ) -> Result<Reply<ObjectState>, BackendError> {
        self.write_object(name, metadata, pre, Cow::Borrowed(LOCK_BODY))
    }

    /// Creates or overwrites an object with `data` as its contents.
    fn write_object(
        &self,
        name: &str,
        metadata: &Metadata,
        pre: Preconditions,
        data: Cow<'static, [u8]>,
    ) -> Result<Reply<ObjectState>, BackendError> {
        let result = self.store.insert(
            name,
            metadata.clone(),
            Some(Cow::Borrowed("no-store")),
            Some(Cow::Borrowed("text/plain")),
            data,
            pre,
        );
        self.write_result(result)
    }

    fn write_result(
        &self,
        result: Result<Arc<StoredObject>, StoreError>,
    ) -> Result<Reply<ObjectState>, BackendError> {
        // The server's time of the write is the object's `updated`: no second clock read.
        result
            .map(|o| {
                let at = o.updated;
                Reply::new(state(o), Some(at))
            })
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: StoreError) -> BackendError {
        match e {
            StoreError::NotFound => BackendError::NotFound,
            StoreError::PreconditionFailed => BackendError::PreconditionFailed,
            StoreError::NotModified => BackendError::Fatal {
                status: Some(304),
                message: "not modified".into(),
            },
            StoreError::RateLimited => BackendError::Transient {
                status: Some(429),
                retry_after: None,
                message: "rateLimitExceeded: the object is mutated more than once per second"
                    .into(),
            },
        }
    }
}

fn state(o: Arc<StoredObject>) -> ObjectState {
    ObjectState::new(
        Version::new(o.generation, o.metageneration),
        o.updated,
        o.metadata.clone(),
    )
    .with_created(o.created)
}

fn matching(expected: Version) -> Preconditions {
    Preconditions {
        if_generation_match: Some(expected.generation()),
        if_metageneration_match: Some(expected.metageneration()),
        ..Preconditions::default()
    }
}

const LOCK_BODY: &[u8] = b"lock";

impl Backend for MemoryBackend {
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let pre = Preconditions {
            if_generation_match: Some(0),
            ..Preconditions::default()
        };
        let out = self.write_lock(name, metadata, pre);
        Box::pin(std::future::ready(out))
    }

    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        let out = match self.store.get(name) {
            Ok(o) => Ok(self.reply(Some(state(o)))),
            Err(StoreError::NotFound) => Ok(self.reply(None)),
            Err(e) => Err(self.error(e)),
        };
        Box::pin(std::future::ready(out))
    }

    fn takeover<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let out = self.write_lock(name, metadata, matching(expected));
        Box::pin(std::future::ready(out))
    }

    fn refresh<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let patch = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        let result = self.store.patch(name, patch, matching(expected));
        let out = self.write_result(result);
        Box::pin(std::future::ready(out))
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        // Without a server time: nothing reads a delete's, and the clock read would be the
        // dearest part of it.
        let out = self
            .store
            .delete(name, matching(expected))
            .map(|()| Reply::new((), None))
            .map_err(|e| self.error(e));
        Box::pin(std::future::ready(out))
    }

    fn record<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        let data = Cow::Owned(data.to_vec());
        let out = self.write_object(name, metadata, matching(expected), data);
        Box::pin(std::future::ready(out))
    }

    fn contents<'a>(
        &'a self,
        name: &'a str,
        generation: i64,
    ) -> BoxFuture<'a, Result<Reply<Bytes>, BackendError>> {
        let pre = Preconditions {
            if_generation_match: Some(generation),
            ..Preconditions::default()
        };
        let out = match self.store.get_checked(name, pre) {
            Ok(o) => Ok(self.reply(Bytes::copy_from_slice(&o.data))),
            Err(e) => Err(self.error(e)),
        };
        Box::pin(std::future::ready(out))
    }
}
