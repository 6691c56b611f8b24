//! The fake GCS server: an HTTP/1.1 front on [`Store`].

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

use super::fault::{self, Fault, FaultPlan, FaultRule};
use super::multipart;
use super::wire::{self, Query};
use crate::backend::Metadata;
use crate::backend::store::{MetadataPatch, Preconditions, Store, StoreError};

type Body = Full<Bytes>;

/// An in-process fake of the Google Cloud Storage JSON API, served over HTTP/1.1 on
/// `127.0.0.1` at a free port.
///
/// It serves the subset a lock needs — multipart and media uploads, object reads (metadata and
/// `alt=media`), lists by prefix, metadata `PATCH`, `DELETE` — with GCS's semantics:
/// generations, metagenerations, all four preconditions on every write (`ifGenerationMatch`,
/// `ifGenerationNotMatch`, `ifMetagenerationMatch`, `ifMetagenerationNotMatch`), int64 fields
/// as JSON strings, RFC 3339 timestamps with milliseconds, a `Date` header on every response
/// (from the fake's clock, see [`set_clock_offset_ms`](FakeGcs::set_clock_offset_ms)), GCS
/// error bodies (`{"error":{"code":412,"errors":[{"reason":"conditionNotMet",..}],..}}`), and
/// optionally GCS's limit of one mutation per second per object name
/// ([`set_throttle`](FakeGcs::set_throttle)). On top, it injects faults ([`Fault`]) and logs
/// every request ([`requests`](FakeGcs::requests)).
///
/// Object names in paths must be percent-encoded as one path segment (`locks%2Fa` for
/// `locks/a`), as GCS requires; `+` in a path is a literal `+`. Bodies over 8 MiB (by default)
/// are refused with 413. Unknown buckets are 404, unknown routes 404, wrong methods 405.
///
/// Point a `GcsBackend` (feature `gcs`), or any GCS client, at
/// [`endpoint`](FakeGcs::endpoint). Dropping the `FakeGcs` stops the server and closes its
/// connections. It must be started inside a Tokio runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// use dimutex::testing::FakeGcs;
///
/// let fake = FakeGcs::start().await?;
/// assert!(fake.endpoint().starts_with("http://127.0.0.1:"));
///
/// // Any HTTP client works; here, a bare HTTP/1.1 request.
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
/// tcp.write_all(b"GET /storage/v1/b/test-bucket/o/locks%2Fa HTTP/1.1\r\n\
///                 Host: fake\r\nConnection: close\r\n\r\n").await?;
/// let mut reply = String::new();
/// tcp.read_to_string(&mut reply).await?;
/// assert!(reply.starts_with("HTTP/1.1 404"));
/// assert!(reply.contains("\"reason\":\"notFound\""));
///
/// let log = fake.requests();
/// assert_eq!(log[0].object(), Some("locks/a"));
/// assert_eq!(log[0].status(), Some(404));
/// # Ok(()) }
/// ```
#[must_use = "dropping the FakeGcs stops its server"]
pub struct FakeGcs {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: AbortHandle,
    /// Dropped with the fake: requests still being handled (in a delay) are abandoned.
    _stop: watch::Sender<()>,
}

impl fmt::Debug for FakeGcs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeGcs")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

/// Configures a [`FakeGcs`] before it starts. Made by [`FakeGcs::builder`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// use dimutex::testing::FakeGcs;
///
/// let fake = FakeGcs::builder()
///     .bucket("other-bucket")
///     .throttle(true)
///     .clock_offset_ms(-60_000)
///     .max_body_bytes(1 << 20)
///     .log_capacity(1_000)
///     .start()
///     .await?;
/// assert_eq!(fake.object_count("other-bucket"), 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct FakeGcsBuilder {
    buckets: Vec<String>,
    throttle: bool,
    clock_offset_ms: i64,
    max_body_bytes: usize,
    log_capacity: usize,
}

impl Default for FakeGcsBuilder {
    fn default() -> Self {
        Self {
            buckets: vec![FakeGcs::DEFAULT_BUCKET.to_owned()],
            throttle: false,
            clock_offset_ms: 0,
            max_body_bytes: FakeGcs::DEFAULT_MAX_BODY_BYTES,
            log_capacity: FakeGcs::DEFAULT_LOG_CAPACITY,
        }
    }
}

impl FakeGcsBuilder {
    /// Adds a bucket (besides [`FakeGcs::DEFAULT_BUCKET`], which always exists).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::builder().bucket("b2").start().await?;
    /// assert!(fake.object_names("b2").is_empty());
    /// # Ok(()) }
    /// ```
    pub fn bucket(mut self, name: impl Into<String>) -> Self {
        self.buckets.push(name.into());
        self
    }

    /// Starts with the one-mutation-per-second throttle on or off (default off); see
    /// [`FakeGcs::set_throttle`].
    ///
    /// ```
    /// let builder = dimutex::testing::FakeGcs::builder().throttle(true);
    /// # drop(builder);
    /// ```
    pub fn throttle(mut self, on: bool) -> Self {
        self.throttle = on;
        self
    }

    /// Starts with the server clock this many milliseconds off this machine's clock; see
    /// [`FakeGcs::set_clock_offset_ms`].
    ///
    /// ```
    /// let builder = dimutex::testing::FakeGcs::builder().clock_offset_ms(5_000);
    /// # drop(builder);
    /// ```
    pub fn clock_offset_ms(mut self, offset_ms: i64) -> Self {
        self.clock_offset_ms = offset_ms;
        self
    }

    /// The largest request body accepted; larger ones are answered 413 (default
    /// [`FakeGcs::DEFAULT_MAX_BODY_BYTES`], 8 MiB).
    ///
    /// ```
    /// let builder = dimutex::testing::FakeGcs::builder().max_body_bytes(64 * 1024);
    /// # drop(builder);
    /// ```
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// How many of the most recent requests [`FakeGcs::requests`] keeps (default
    /// [`FakeGcs::DEFAULT_LOG_CAPACITY`]); [`FakeGcs::request_count`] counts them all.
    ///
    /// ```
    /// let builder = dimutex::testing::FakeGcs::builder().log_capacity(10);
    /// # drop(builder);
    /// ```
    pub fn log_capacity(mut self, entries: usize) -> Self {
        self.log_capacity = entries;
        self
    }

    /// Binds `127.0.0.1:0` and spawns the server on the current Tokio runtime.
    ///
    /// # Errors
    ///
    /// When the listening socket cannot be bound.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::builder().start().await?;
    /// assert_ne!(fake.addr().port(), 0);
    /// # Ok(()) }
    /// ```
    pub async fn start(self) -> std::io::Result<FakeGcs> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let clock = Store::default();
        clock.set_clock_offset(self.clock_offset_ms);
        let shared = Arc::new(Shared {
            buckets: RwLock::new(HashMap::new()),
            clock,
            throttle: AtomicBool::new(self.throttle),
            clock_offset_ms: AtomicI64::new(self.clock_offset_ms),
            log: Mutex::new(RequestLog {
                entries: VecDeque::new(),
                total: 0,
                capacity: self.log_capacity,
            }),
            faults: Mutex::new(FaultPlan::default()),
            max_body_bytes: self.max_body_bytes,
        });
        for bucket in self.buckets {
            shared.create_bucket(bucket);
        }
        let (stop, stopped) = watch::channel(());
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped)).abort_handle();
        tracing::debug!(%addr, "fake GCS server listening");
        Ok(FakeGcs {
            shared,
            addr,
            task,
            _stop: stop,
        })
    }
}

impl FakeGcs {
    /// The bucket every fake starts with.
    ///
    /// ```
    /// assert_eq!(dimutex::testing::FakeGcs::DEFAULT_BUCKET, "test-bucket");
    /// ```
    pub const DEFAULT_BUCKET: &'static str = "test-bucket";

    /// The default bound on request bodies: 8 MiB.
    ///
    /// ```
    /// assert_eq!(dimutex::testing::FakeGcs::DEFAULT_MAX_BODY_BYTES, 8 * 1024 * 1024);
    /// ```
    pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

    /// How many requests the log keeps by default.
    ///
    /// ```
    /// assert!(dimutex::testing::FakeGcs::DEFAULT_LOG_CAPACITY >= 10_000);
    /// ```
    pub const DEFAULT_LOG_CAPACITY: usize = 100_000;

    /// Starts a fake with the default settings: bucket [`DEFAULT_BUCKET`](Self::DEFAULT_BUCKET),
    /// throttle off, no clock offset, no faults.
    ///
    /// # Errors
    ///
    /// When the listening socket cannot be bound.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert_eq!(fake.object_count(dimutex::testing::FakeGcs::DEFAULT_BUCKET), 0);
    /// # Ok(()) }
    /// ```
    pub async fn start() -> std::io::Result<FakeGcs> {
        Self::builder().start().await
    }

    /// A builder for a fake with more buckets or other settings.
    ///
    /// ```
    /// let builder = dimutex::testing::FakeGcs::builder();
    /// # drop(builder);
    /// ```
    pub fn builder() -> FakeGcsBuilder {
        FakeGcsBuilder::default()
    }

    /// The base URL of the server, `http://127.0.0.1:PORT` (no trailing slash). GCS clients take
    /// it as their endpoint and append `/storage/v1/...` and `/upload/storage/v1/...`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert_eq!(fake.endpoint(), format!("http://{}", fake.addr()));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address the server listens on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert!(fake.addr().ip().is_loopback());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates an empty bucket; does nothing if it exists.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.create_bucket("second");
    /// assert_eq!(fake.object_count("second"), 0);
    /// # Ok(()) }
    /// ```
    pub fn create_bucket(&self, name: impl Into<String>) {
        self.shared.create_bucket(name.into());
    }

    /// Turns GCS's limit of one mutation per second per object name on or off, in every bucket
    /// (default off). When on, a second create, overwrite, patch or delete of one object name
    /// within a second is answered 429 with reason `rateLimitExceeded`, and does not happen.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.set_throttle(true);
    /// # Ok(()) }
    /// ```
    pub fn set_throttle(&self, on: bool) {
        self.shared.throttle.store(on, Ordering::SeqCst);
        for store in self.shared.read_buckets().values() {
            store.set_throttle(on);
        }
    }

    /// Sets the server clock `offset_ms` milliseconds off this machine's clock (negative: behind).
    /// It drives the `Date` header, `timeCreated` and `updated`, as a skewed GCS clock would.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.set_clock_offset_ms(3_600_000);
    /// assert!(fake.server_time() > std::time::SystemTime::now());
    /// # Ok(()) }
    /// ```
    pub fn set_clock_offset_ms(&self, offset_ms: i64) {
        self.shared
            .clock_offset_ms
            .store(offset_ms, Ordering::SeqCst);
        self.shared.clock.set_clock_offset(offset_ms);
        for store in self.shared.read_buckets().values() {
            store.set_clock_offset(offset_ms);
        }
    }

    /// The fake's clock now: this machine's clock plus the offset.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.set_clock_offset_ms(-3_600_000);
    /// assert!(fake.server_time() < std::time::SystemTime::now());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn server_time(&self) -> SystemTime {
        self.shared.clock.now()
    }

    /// The most recent requests, oldest first (at most the builder's
    /// [`log_capacity`](FakeGcsBuilder::log_capacity)). A request is logged when its response is
    /// handed to the connection (or the connection is dropped), so a client that has its answer
    /// finds it here.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert!(fake.requests().is_empty());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.shared.lock_log().entries.iter().cloned().collect()
    }

    /// How many requests were answered (or dropped) since the start or the last
    /// [`clear_log`](Self::clear_log), including requests the bounded log no longer holds.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert_eq!(fake.request_count(), 0);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn request_count(&self) -> u64 {
        self.shared.lock_log().total
    }

    /// Empties the request log and resets [`request_count`](Self::request_count).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.clear_log();
    /// assert_eq!(fake.request_count(), 0);
    /// # Ok(()) }
    /// ```
    pub fn clear_log(&self) {
        let mut log = self.shared.lock_log();
        log.entries.clear();
        log.total = 0;
    }

    /// The names of the objects in `bucket`, sorted (empty for an unknown bucket).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert!(fake.object_names("test-bucket").is_empty());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn object_names(&self, bucket: &str) -> Vec<String> {
        self.shared
            .bucket(bucket)
            .map(|s| s.list("").into_iter().map(|o| o.name.to_string()).collect())
            .unwrap_or_default()
    }

    /// How many objects `bucket` holds (0 for an unknown bucket).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert_eq!(fake.object_count("no-such-bucket"), 0);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn object_count(&self, bucket: &str) -> usize {
        self.shared.bucket(bucket).map_or(0, |s| s.len())
    }

    /// The custom metadata of an object, if it exists.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert_eq!(fake.object_metadata("test-bucket", "locks/a"), None);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn object_metadata(&self, bucket: &str, name: &str) -> Option<Metadata> {
        self.shared
            .bucket(bucket)
            .and_then(|s| s.get(name).ok())
            .map(|o| o.metadata.clone())
    }

    /// Queues a one-shot fault: it applies to the next request matching the rule, then is used
    /// up. Rules are tried in the order they were queued; the first match wins. A plain
    /// [`Fault`] matches any request. See [`Fault`] for what each kind does.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// use dimutex::testing::{FakeGcs, Fault, FaultRule};
    /// use http::Method;
    ///
    /// let fake = FakeGcs::start().await?;
    /// fake.inject(Fault::FailBefore(503));
    /// fake.inject(FaultRule::new(Fault::CommitThenDrop).with_method(Method::POST));
    /// assert_eq!(fake.pending_faults(), 2);
    /// # Ok(()) }
    /// ```
    pub fn inject(&self, rule: impl Into<FaultRule>) {
        self.shared.lock_faults().push(rule.into());
    }

    /// How many queued one-shot faults have not been used yet.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert_eq!(fake.pending_faults(), 0);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn pending_faults(&self) -> usize {
        self.shared.lock_faults().pending()
    }

    /// Injects random faults: each mutation (`POST`, `PATCH`, `DELETE`) that no queued rule
    /// claimed gets, with probability `rate` (clamped to 0..=1), a fault drawn uniformly from
    /// `kinds`, using a random generator seeded with `seed` (the same seed and the same request
    /// order give the same faults). Reads are spared unless
    /// [`set_read_faults`](Self::set_read_faults) is on. A rate of 0 or no kinds turns random
    /// faults off; calling again restarts the generator.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// use dimutex::testing::{FakeGcs, Fault};
    ///
    /// let fake = FakeGcs::start().await?;
    /// fake.set_fault_rate(0.2, vec![Fault::FailBefore(503), Fault::CommitThenDrop], 42);
    /// # Ok(()) }
    /// ```
    pub fn set_fault_rate(&self, rate: f64, kinds: Vec<Fault>, seed: u64) {
        self.shared.lock_faults().set_random(rate, kinds, seed);
    }

    /// Whether random faults ([`set_fault_rate`](Self::set_fault_rate)) also hit reads and lists
    /// (`GET`); default off.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.set_read_faults(true);
    /// # Ok(()) }
    /// ```
    pub fn set_read_faults(&self, on: bool) {
        self.shared.lock_faults().set_include_reads(on);
    }

    /// Drops the queued one-shot faults and turns random faults off. The
    /// [`faults_injected`](Self::faults_injected) count stays.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.inject(dimutex::testing::Fault::FailBefore(503));
    /// fake.clear_faults();
    /// assert_eq!(fake.pending_faults(), 0);
    /// # Ok(()) }
    /// ```
    pub fn clear_faults(&self) {
        self.shared.lock_faults().clear();
    }

    /// How many faults (scripted and random) have been applied to requests so far.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// let fake = dimutex::testing::FakeGcs::start().await?;
    /// assert_eq!(fake.faults_injected(), 0);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn faults_injected(&self) -> u64 {
        self.shared.lock_faults().injected()
    }
}

/// One request the fake served, as recorded in [`FakeGcs::requests`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// use dimutex::testing::FakeGcs;
/// use http::Method;
///
/// let fake = FakeGcs::start().await?;
/// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
/// # tcp.write_all(b"DELETE /storage/v1/b/test-bucket/o/a%2Fb?ifGenerationMatch=7 HTTP/1.1\r\n\
/// #                 Host: fake\r\nConnection: close\r\n\r\n").await?;
/// # tcp.read_to_end(&mut Vec::new()).await?;
/// // ... after `DELETE /storage/v1/b/test-bucket/o/a%2Fb?ifGenerationMatch=7`:
/// let request = &fake.requests()[0];
/// assert_eq!(request.method(), &Method::DELETE);
/// assert_eq!(request.path(), "/storage/v1/b/test-bucket/o/a%2Fb");
/// assert_eq!(request.query(), "ifGenerationMatch=7");
/// assert_eq!(request.query_param("ifGenerationMatch").as_deref(), Some("7"));
/// assert_eq!(request.bucket(), Some("test-bucket"));
/// assert_eq!(request.object(), Some("a/b"));
/// assert_eq!(request.status(), Some(404));
/// assert!(request.is_mutation());
/// assert_eq!(request.fault(), None);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    method: Method,
    path: String,
    query: String,
    bucket: Option<String>,
    object: Option<String>,
    status: Option<u16>,
    fault: Option<Fault>,
}

impl LoggedRequest {
    /// The HTTP method.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert_eq!(fake.requests()[0].method(), &http::Method::GET);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request path as sent (still percent-encoded).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert_eq!(fake.requests()[0].path(), "/storage/v1/b/test-bucket/o");
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query string (without `?`; empty when there is none).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o?prefix=a%2F HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert_eq!(fake.requests()[0].query(), "prefix=a%2F");
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn query(&self) -> &str {
        &self.query
    }

    /// The first value of a query parameter, decoded (`None` if absent or undecodable).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o?prefix=a%2F HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert_eq!(fake.requests()[0].query_param("prefix").as_deref(), Some("a/"));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn query_param(&self, name: &str) -> Option<String> {
        Query::parse(&self.query)
            .ok()
            .and_then(|q| q.get(name).map(str::to_owned))
    }

    /// The bucket named in the path, decoded, if the path had the shape of a GCS route.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/nope/o HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert_eq!(fake.requests()[0].bucket(), Some("nope"));
    /// assert_eq!(fake.requests()[0].status(), Some(404));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn bucket(&self) -> Option<&str> {
        self.bucket.as_deref()
    }

    /// The object the request is about, decoded: from the path, or for uploads from the `name`
    /// parameter or the metadata part (once the body parsed). `None` for lists and bucket reads.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o/a%2Bb+c HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert_eq!(fake.requests()[0].object(), Some("a+b+c"));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }

    /// The response status; `None` when the connection was dropped without a response
    /// ([`Fault::CommitThenDrop`]).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert_eq!(fake.requests()[0].status(), Some(200));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The fault injected into this request, if any.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// fake.inject(dimutex::testing::Fault::FailBefore(503));
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// let request = &fake.requests()[0];
    /// assert_eq!(request.fault(), Some(&dimutex::testing::Fault::FailBefore(503)));
    /// assert_eq!(request.status(), Some(503));
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn fault(&self) -> Option<&Fault> {
        self.fault.as_ref()
    }

    /// Whether the method changes objects (`POST`, `PATCH`, `DELETE`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// # let fake = dimutex::testing::FakeGcs::start().await?;
    /// # use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await?;
    /// # tcp.write_all(b"GET /storage/v1/b/test-bucket/o HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n").await?;
    /// # tcp.read_to_end(&mut Vec::new()).await?;
    /// assert!(!fake.requests()[0].is_mutation());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn is_mutation(&self) -> bool {
        fault::is_mutation(&self.method)
    }
}

// ---------------------------------------------------------------------------------------------
// Server internals.

#[derive(Debug)]
struct RequestLog {
    entries: VecDeque<LoggedRequest>,
    total: u64,
    capacity: usize,
}

#[derive(Debug)]
struct Shared {
    buckets: RwLock<HashMap<String, Arc<Store>>>,
    /// The server clock for `Date` headers (an empty store with the common offset).
    clock: Store,
    throttle: AtomicBool,
    clock_offset_ms: AtomicI64,
    log: Mutex<RequestLog>,
    faults: Mutex<FaultPlan>,
    max_body_bytes: usize,
}

/// The service error that makes hyper close the connection without a response.
#[derive(Debug)]
struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fault injected: connection dropped without a response")
    }
}

impl std::error::Error for DropConnection {}

/// An error answer with a GCS error body.
#[derive(Debug)]
struct ApiError {
    status: u16,
    message: String,
    close: bool,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            close: false,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// Also closes the connection (the request body may be unread).
    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    fn response(&self) -> Response<Body> {
        let mut response = error_response(self.status, &self.message);
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// What a request resolved to.
enum Resource {
    Bucket,
    Objects,
    Upload,
    Object(String),
}

/// A validated request, ready to run against the store.
struct Prepared {
    bucket: String,
    store: Arc<Store>,
    op: Op,
}

enum Op {
    Bucket,
    List {
        prefix: String,
    },
    Get {
        object: String,
        media: bool,
        pre: Preconditions,
    },
    Insert {
        object: String,
        metadata: Metadata,
        cache_control: Option<String>,
        content_type: Option<String>,
        data: Vec<u8>,
        pre: Preconditions,
    },
    Patch {
        object: String,
        patch: MetadataPatch,
        pre: Preconditions,
    },
    Delete {
        object: String,
        pre: Preconditions,
    },
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stopped: watch::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(
                        stream,
                        Arc::clone(&shared),
                        stopped.clone(),
                    ));
                }
                Err(error) => {
                    tracing::debug!(%error, "fake GCS server: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, stopped: watch::Receiver<()>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        // Each request is handled in its own task, so that it runs to completion (delays and
        // all) even if the client disconnects meanwhile, as a request that reached a server
        // does; dropping the fake abandons it.
        let shared = Arc::clone(&shared);
        let mut stopped = stopped.clone();
        let handling = tokio::spawn(async move {
            tokio::select! {
                result = shared.serve(request) => result,
                _ = stopped.changed() => Err(DropConnection),
            }
        });
        async move { handling.await.unwrap_or(Err(DropConnection)) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // Keep idle keep-alive connections open for as long as the client pools them.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(error) = connection.await {
        tracing::debug!(%error, "fake GCS server: connection ended");
    }
}

impl Shared {
    fn read_buckets(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Store>>> {
        self.buckets.read().unwrap_or_else(|e| e.into_inner())
    }

    fn bucket(&self, name: &str) -> Option<Arc<Store>> {
        self.read_buckets().get(name).cloned()
    }

    fn create_bucket(&self, name: String) {
        let mut buckets = self.buckets.write().unwrap_or_else(|e| e.into_inner());
        buckets.entry(name).or_insert_with(|| {
            let store = Store::default();
            store.set_throttle(self.throttle.load(Ordering::SeqCst));
            store.set_clock_offset(self.clock_offset_ms.load(Ordering::SeqCst));
            Arc::new(store)
        });
    }

    fn lock_log(&self) -> MutexGuard<'_, RequestLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_faults(&self) -> MutexGuard<'_, FaultPlan> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, entry: LoggedRequest) {
        let mut log = self.lock_log();
        log.total += 1;
        if log.capacity == 0 {
            return;
        }
        if log.entries.len() >= log.capacity {
            log.entries.pop_front();
        }
        log.entries.push_back(entry);
    }

    /// Serves one request: handles it, stamps `Date`, logs it.
    async fn serve(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, DropConnection> {
        let mut entry = LoggedRequest {
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().unwrap_or_default().to_owned(),
            bucket: None,
            object: None,
            status: None,
            fault: None,
        };
        let mut result = self.handle(request, &mut entry).await;
        if let Ok(response) = &mut result {
            let date = httpdate::fmt_http_date(self.clock.now());
            if let Ok(date) = HeaderValue::from_str(&date) {
                response.headers_mut().insert(header::DATE, date);
            }
            entry.status = Some(response.status().as_u16());
        }
        tracing::debug!(
            method = %entry.method,
            path = %entry.path,
            query = %entry.query,
            status = ?entry.status,
            fault = ?entry.fault,
            "fake GCS request"
        );
        self.record(entry);
        result
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        entry: &mut LoggedRequest,
    ) -> Result<Response<Body>, DropConnection> {
        let prepared = match self.prepare(request, entry).await {
            Ok(prepared) => prepared,
            Err(error) => return Ok(error.response()),
        };
        let fault = self
            .lock_faults()
            .pick(&entry.method, entry.object.as_deref());
        entry.fault.clone_from(&fault);
        let Some(fault) = fault else {
            return Ok(execute(prepared));
        };
        match fault {
            Fault::FailBefore(status) => Ok(error_response(
                status,
                &format!("Injected fault: HTTP {status} before the request took effect."),
            )),
            Fault::CommitThen(status) => {
                let _ = execute(prepared);
                Ok(error_response(
                    status,
                    &format!("Injected fault: HTTP {status} after the request took effect."),
                ))
            }
            Fault::CommitThenDrop => {
                let _ = execute(prepared);
                Err(DropConnection)
            }
            Fault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                Ok(execute(prepared))
            }
            Fault::CommitThenDelay(delay) => {
                let response = execute(prepared);
                tokio::time::sleep(delay).await;
                Ok(response)
            }
        }
    }

    /// Routes, validates and reads a request; errors are complete answers.
    async fn prepare(
        &self,
        request: Request<Incoming>,
        entry: &mut LoggedRequest,
    ) -> Result<Prepared, ApiError> {
        let (parts, body) = request.into_parts();
        // Read the body first, so that an error answer leaves the connection reusable.
        let body = self.read_body(&parts.headers, body).await?;
        let (bucket, resource) = route(parts.uri.path())?;
        entry.bucket = Some(bucket.clone());
        if let Resource::Object(object) = &resource {
            entry.object = Some(object.clone());
        }
        let allowed = match resource {
            Resource::Bucket | Resource::Objects => parts.method == Method::GET,
            Resource::Upload => parts.method == Method::POST,
            Resource::Object(_) => {
                matches!(parts.method, Method::GET | Method::PATCH | Method::DELETE)
            }
        };
        if !allowed {
            return Err(ApiError::new(
                405,
                format!(
                    "Method {} is not allowed on {}",
                    parts.method,
                    parts.uri.path()
                ),
            ));
        }
        let query =
            Query::parse(parts.uri.query().unwrap_or_default()).map_err(ApiError::invalid)?;
        let store = self
            .bucket(&bucket)
            .ok_or_else(|| ApiError::new(404, "The specified bucket does not exist."))?;
        let op = match resource {
            Resource::Bucket => Op::Bucket,
            Resource::Objects => Op::List {
                prefix: query.get("prefix").unwrap_or_default().to_owned(),
            },
            Resource::Upload => {
                let op = upload(&query, &parts.headers, &body)?;
                if let Op::Insert { object, .. } = &op {
                    entry.object = Some(object.clone());
                }
                op
            }
            Resource::Object(object) => match parts.method {
                Method::PATCH => Op::Patch {
                    patch: metadata_patch(&body)?,
                    pre: query.preconditions().map_err(ApiError::invalid)?,
                    object,
                },
                Method::DELETE => Op::Delete {
                    pre: query.preconditions().map_err(ApiError::invalid)?,
                    object,
                },
                _ => Op::Get {
                    media: query.get("alt") == Some("media"),
                    pre: query.preconditions().map_err(ApiError::invalid)?,
                    object,
                },
            },
        };
        Ok(Prepared { bucket, store, op })
    }

    /// Reads the body up to the limit. A larger body is still read (and discarded) up to
    /// [`DRAIN_BYTES`] beyond the limit, so that the client, still sending, reads the 413
    /// instead of a reset connection; beyond that the connection is closed.
    async fn read_body(&self, headers: &HeaderMap, mut body: Incoming) -> Result<Bytes, ApiError> {
        let limit = self.max_body_bytes;
        let drain_limit = limit.saturating_add(DRAIN_BYTES);
        let too_large = || {
            ApiError::new(
                413,
                format!("The request body exceeds the fake's limit of {limit} bytes."),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > drain_limit as u64) {
            return Err(too_large().closing());
        }
        let mut data = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                ApiError::invalid(format!("Could not read the request body: {error}")).closing()
            })?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            seen = seen.saturating_add(chunk.len());
            if seen > drain_limit {
                return Err(too_large().closing());
            }
            if seen <= limit {
                data.extend_from_slice(&chunk);
            }
        }
        if seen > limit {
            return Err(too_large());
        }
        Ok(Bytes::from(data))
    }
}

/// How far past the body limit a request body is drained before the connection is closed.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;

/// Parses a path into its bucket and resource. Object names must be one path segment.
fn route(path: &str) -> Result<(String, Resource), ApiError> {
    let not_found = || ApiError::new(404, format!("Not Found: {path}"));
    let (upload, rest) = if let Some(rest) = path.strip_prefix("/upload/storage/v1/b/") {
        (true, rest)
    } else if let Some(rest) = path.strip_prefix("/storage/v1/b/") {
        (false, rest)
    } else {
        return Err(not_found());
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let resource = match (upload, segments.as_slice()) {
        (false, [_]) => Resource::Bucket,
        (false, [_, "o"]) => Resource::Objects,
        (true, [_, "o"]) => Resource::Upload,
        (false, [_, "o", object]) => {
            let object = wire::decode_path_segment(object).map_err(ApiError::invalid)?;
            validate_object_name(&object)?;
            Resource::Object(object)
        }
        _ => return Err(not_found()),
    };
    let bucket = wire::decode_path_segment(segments[0]).map_err(ApiError::invalid)?;
    if bucket.is_empty() {
        return Err(not_found());
    }
    Ok((bucket, resource))
}

/// GCS object-name rules: 1 to 1024 bytes of UTF-8, no CR or LF.
fn validate_object_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid("Object name is required."));
    }
    if name.len() > 1024 {
        return Err(ApiError::invalid("Object name is longer than 1024 bytes."));
    }
    if name.contains(['\r', '\n']) {
        return Err(ApiError::invalid(
            "Object name contains a carriage return or line feed.",
        ));
    }
    Ok(())
}

/// An upload (`uploadType=multipart` or `uploadType=media`) as an insert.
fn upload(query: &Query, headers: &HeaderMap, body: &[u8]) -> Result<Op, ApiError> {
    let pre = query.preconditions().map_err(ApiError::invalid)?;
    let query_name = query.get("name").map(str::to_owned);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (object, metadata, cache_control, content_type, data) = match query.get("uploadType") {
        Some("multipart") => {
            let content_type = content_type
                .ok_or_else(|| ApiError::invalid("A multipart upload needs a Content-Type."))?;
            let boundary = multipart::boundary(&content_type).map_err(ApiError::invalid)?;
            let parts = multipart::parse(body, &boundary).map_err(ApiError::invalid)?;
            let [meta, media] = parts.as_slice() else {
                return Err(ApiError::invalid(format!(
                    "A multipart upload has exactly two parts (metadata, media), not {}.",
                    parts.len()
                )));
            };
            let resource: Value = serde_json::from_slice(meta.body())
                .map_err(|e| ApiError::invalid(format!("Invalid object metadata JSON: {e}")))?;
            let resource = resource
                .as_object()
                .ok_or_else(|| ApiError::invalid("Object metadata must be a JSON object."))?;
            let name = query_name.or(string_field(resource, "name")?);
            let metadata = insert_metadata(resource.get("metadata"))?;
            let cache_control = string_field(resource, "cacheControl")?;
            let content_type = string_field(resource, "contentType")?
                .or_else(|| media.header("content-type").map(str::to_owned));
            (
                name,
                metadata,
                cache_control,
                content_type,
                media.body().to_vec(),
            )
        }
        Some("media") => (
            query_name,
            Metadata::new(),
            None,
            content_type,
            body.to_vec(),
        ),
        Some("resumable") => {
            return Err(ApiError::invalid(
                "The fake GCS server does not support resumable uploads.",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(format!("Invalid upload type {other:?}.")));
        }
        None => {
            return Err(ApiError::invalid(
                "Upload requests must include an uploadType URL parameter and a URL-encoded \
                 object name.",
            ));
        }
    };
    let object = object.ok_or_else(|| ApiError::invalid("Required: the object name."))?;
    validate_object_name(&object)?;
    Ok(Op::Insert {
        object,
        metadata,
        cache_control,
        content_type,
        data,
        pre,
    })
}

/// A string field of a JSON resource: absent or `null` is `None`.
fn string_field(resource: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match resource.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::invalid(format!(
            "Invalid value for {key}: {other} is not a string."
        ))),
    }
}

/// A metadata value: strings as they are, numbers and booleans in their JSON spelling.
fn metadata_value(key: &str, value: &Value) -> Result<Option<String>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        _ => Err(ApiError::invalid(format!(
            "Invalid value for metadata.{key}: it must be a string."
        ))),
    }
}

fn metadata_map(value: &Value) -> Result<&Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| ApiError::invalid("Invalid value for metadata: it must be a JSON object."))
}

/// The `metadata` of an uploaded resource; `null` entries are left out.
fn insert_metadata(value: Option<&Value>) -> Result<Metadata, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Metadata::new());
    };
    let mut entries = Vec::new();
    for (key, value) in metadata_map(value)? {
        if let Some(value) = metadata_value(key, value)? {
            entries.push((key.clone(), value));
        }
    }
    Ok(entries.into_iter().collect())
}

/// The `metadata` change of a PATCH body; `null` values remove keys. Other fields are ignored.
fn metadata_patch(body: &[u8]) -> Result<MetadataPatch, ApiError> {
    let resource: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Invalid JSON in the request body: {e}")))?;
    let resource = resource
        .as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    match resource.get("metadata") {
        None => Ok(MetadataPatch::new()),
        Some(Value::Null) => Err(ApiError::invalid(
            "The fake GCS server does not support \"metadata\": null; remove keys one by one.",
        )),
        Some(value) => metadata_map(value)?
            .iter()
            .map(|(key, value)| {
                let value = metadata_value(key, value)?;
                Ok((key.clone(), value))
            })
            .collect(),
    }
}

/// Runs a validated request against its store.
fn execute(prepared: Prepared) -> Response<Body> {
    let Prepared { bucket, store, op } = prepared;
    match op {
        Op::Bucket => json_response(
            StatusCode::OK,
            &json!({
                "kind": "storage#bucket",
                "id": bucket,
                "name": bucket,
                "location": "US",
                "storageClass": "STANDARD",
            }),
        ),
        Op::List { prefix } => {
            let items: Vec<Value> = store
                .list(&prefix)
                .iter()
                .map(|o| wire::object_resource(&bucket, o))
                .collect();
            let mut list = Map::new();
            list.insert("kind".into(), "storage#objects".into());
            if !items.is_empty() {
                list.insert("items".into(), Value::Array(items));
            }
            json_response(StatusCode::OK, &Value::Object(list))
        }
        Op::Get { object, media, pre } => match store.get_checked(&object, pre) {
            Ok(o) if media => media_response(
                o.data.to_vec(),
                o.content_type.as_deref().map(str::to_owned),
                o.generation,
                o.metageneration,
            ),
            Ok(o) => json_response(StatusCode::OK, &wire::object_resource(&bucket, &o)),
            Err(e) => store_error(e, &bucket, &object),
        },
        Op::Insert {
            object,
            metadata,
            cache_control,
            content_type,
            data,
            pre,
        } => match store.insert(
            &object,
            metadata,
            cache_control.map(Cow::Owned),
            content_type.map(Cow::Owned),
            Cow::Owned(data),
            pre,
        ) {
            Ok(o) => json_response(StatusCode::OK, &wire::object_resource(&bucket, &o)),
            Err(e) => store_error(e, &bucket, &object),
        },
        Op::Patch { object, patch, pre } => match store.patch(&object, patch, pre) {
            Ok(o) => json_response(StatusCode::OK, &wire::object_resource(&bucket, &o)),
            Err(e) => store_error(e, &bucket, &object),
        },
        Op::Delete { object, pre } => match store.delete(&object, pre) {
            Ok(()) => {
                let mut response = Response::new(Body::default());
                *response.status_mut() = StatusCode::NO_CONTENT;
                response
            }
            Err(e) => store_error(e, &bucket, &object),
        },
    }
}

fn store_error(error: StoreError, bucket: &str, object: &str) -> Response<Body> {
    match error {
        StoreError::NotFound => error_response(404, &format!("No such object: {bucket}/{object}")),
        StoreError::PreconditionFailed => error_response(
            412,
            "At least one of the pre-conditions you specified did not hold.",
        ),
        StoreError::NotModified => {
            let mut response = Response::new(Body::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        }
        StoreError::RateLimited => error_response(
            429,
            &format!(
                "The object {bucket}/{object} exceeded the rate limit for object mutation \
                 operations (create, update, and delete). Please reduce your request rate. \
                 See https://cloud.google.com/storage/docs/gcs429."
            ),
        ),
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Body::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}

fn error_response(status: u16, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &wire::error_body(status.as_u16(), message))
}

fn media_response(
    data: Vec<u8>,
    content_type: Option<String>,
    generation: i64,
    metageneration: i64,
) -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from(data)));
    let headers = response.headers_mut();
    let content_type = content_type
        .and_then(|ct| HeaderValue::from_str(&ct).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert("x-goog-generation", HeaderValue::from(generation));
    headers.insert("x-goog-metageneration", HeaderValue::from(metageneration));
    response
}
