//! The HTTP side of the fake: the shared server state, the accept loop, one task per
//! connection and per request, and the request path — read the body, route, inject a fault,
//! run the operation, stamp `Date`, log.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::api::{self, ApiError, Body, Op, Prepared, Resource};
use super::fault::{Fault, FaultPlan};
use super::request_log::{LoggedRequest, RequestLog};
use super::wire::Query;
use crate::backend::store::Store;

/// What the server's tasks and the [`FakeGcs`](super::FakeGcs) handle share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) buckets: RwLock<HashMap<String, Arc<Store>>>,
    /// The server clock for `Date` headers (an empty store with the common offset).
    pub(super) clock: Store,
    /// Given to buckets created later.
    pub(super) throttle: AtomicBool,
    /// Given to buckets created later.
    pub(super) clock_offset_ms: AtomicI64,
    pub(super) log: Mutex<RequestLog>,
    pub(super) faults: Mutex<FaultPlan>,
    pub(super) max_body_bytes: usize,
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

/// Accepts connections until the fake is dropped (which aborts this task and, with its
/// `JoinSet`, every connection).
pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stopped: watch::Receiver<()>,
) {
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

/// Serves one connection, each request in its own task.
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
    pub(super) fn read_buckets(&self) -> RwLockReadGuard<'_, HashMap<String, Arc<Store>>> {
        self.buckets.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn bucket(&self, name: &str) -> Option<Arc<Store>> {
        self.read_buckets().get(name).cloned()
    }

    /// Creates an empty bucket with the current throttle and clock offset, unless it exists.
    pub(super) fn create_bucket(&self, name: String) {
        let mut buckets = self.buckets.write().unwrap_or_else(|e| e.into_inner());
        buckets.entry(name).or_insert_with(|| {
            let store = Store::default();
            store.set_throttle(self.throttle.load(Ordering::SeqCst));
            store.set_clock_offset(self.clock_offset_ms.load(Ordering::SeqCst));
            Arc::new(store)
        });
    }

    pub(super) fn lock_log(&self) -> MutexGuard<'_, RequestLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn lock_faults(&self) -> MutexGuard<'_, FaultPlan> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
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
        self.lock_log().record(entry);
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
            return Ok(api::execute(prepared));
        };
        match fault {
            Fault::FailBefore(status) => Ok(api::error_response(
                status,
                &format!("Injected fault: HTTP {status} before the request took effect."),
            )),
            Fault::CommitThen(status) => {
                let _ = api::execute(prepared);
                Ok(api::error_response(
                    status,
                    &format!("Injected fault: HTTP {status} after the request took effect."),
                ))
            }
            Fault::CommitThenDrop => {
                let _ = api::execute(prepared);
                Err(DropConnection)
            }
            Fault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                Ok(api::execute(prepared))
            }
            Fault::CommitThenDelay(delay) => {
                let response = api::execute(prepared);
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
        let (bucket, resource) = api::route(parts.uri.path())?;
        entry.bucket = Some(bucket.clone());
        if let Resource::Object(object) = &resource {
            entry.object = Some(object.clone());
        }
        api::check_method(&parts.method, &resource, parts.uri.path())?;
        let query =
            Query::parse(parts.uri.query().unwrap_or_default()).map_err(ApiError::invalid)?;
        let store = self
            .bucket(&bucket)
            .ok_or_else(|| ApiError::new(404, "The specified bucket does not exist."))?;
        let op = api::operation(resource, &parts.method, &query, &parts.headers, &body)?;
        if let Op::Insert { object, .. } = &op {
            entry.object = Some(object.clone());
        }
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
