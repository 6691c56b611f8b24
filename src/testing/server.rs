//! The fake's handle: [`FakeGcs`], which starts, configures and inspects a running fake, and
//! [`FakeGcsBuilder`]. The server itself is in `serve` (HTTP) and `api` (the GCS JSON API).

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::fault::{Fault, FaultPlan, FaultRule};
use super::request_log::{LoggedRequest, RequestLog};
use super::serve::{Shared, accept_loop};
use crate::backend::Metadata;
use crate::backend::store::Store;

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
            log: Mutex::new(RequestLog::new(self.log_capacity)),
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
        self.shared.lock_log().entries()
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
        self.shared.lock_log().total()
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
        self.shared.lock_log().clear();
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
