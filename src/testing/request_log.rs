//! The request log: [`LoggedRequest`], one served request as a test reads it, and the bounded
//! log the server appends to.

use std::collections::VecDeque;

use http::Method;

use super::fault::{self, Fault};
use super::wire::Query;

/// One request the fake served, as recorded in
/// [`FakeGcs::requests`](super::FakeGcs::requests).
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
    // Filled in by the server as it handles the request (see `serve`).
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query: String,
    pub(super) bucket: Option<String>,
    pub(super) object: Option<String>,
    pub(super) status: Option<u16>,
    pub(super) fault: Option<Fault>,
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

/// The most recent requests (at most `capacity`), and how many there were in all.
#[derive(Debug)]
pub(super) struct RequestLog {
    entries: VecDeque<LoggedRequest>,
    total: u64,
    capacity: usize,
}

impl RequestLog {
    /// An empty log that keeps at most `capacity` entries.
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            total: 0,
            capacity,
        }
    }

    /// Counts a request and keeps it, dropping the oldest entry when full.
    pub(super) fn record(&mut self, entry: LoggedRequest) {
        self.total += 1;
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// The kept entries, oldest first.
    pub(super) fn entries(&self) -> Vec<LoggedRequest> {
        self.entries.iter().cloned().collect()
    }

    /// How many requests were recorded since the start or the last [`clear`](Self::clear).
    pub(super) fn total(&self) -> u64 {
        self.total
    }

    /// Forgets every entry and resets the count.
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.total = 0;
    }
}
