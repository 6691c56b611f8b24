//! [`ResponseFuture`]: the steps of one request with an idempotency key.
//!
//! ```text
//!  read the body (413 over the cap) ─▶ fingerprint ─▶ lock or record?
//!    ├── lock taken ─▶ run the handler ─▶ storable and under the cap?
//!    │                   ├── yes: our lock becomes the record (one write); the response
//!    │                   └── no: release; the response, streamed
//!    ├── a live record ─▶ same fingerprint? ─▶ the stored response (else 422)
//!    └── held (the first request runs) ─▶ 409; or the failure (503, 400)
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Limited};
use tower_service::Service;

use super::body::IdempotentBody;
use super::fingerprint::fingerprint;
use super::record::{self, Layout, Stored};
use super::settings::Settings;
use crate::backend::ObjectState;
use crate::client::{Client, Entered};
use crate::driver::Completion;
use crate::guard::LockGuard;
use crate::key::{LockKey, ObjectName};
use crate::layer::{OnRejection, Rejection};
use crate::protocol::acquire::Mode;

type Output<B, E> = Result<Response<IdempotentBody<B>>, E>;

/// The response future of [`IdempotencyService`](super::IdempotencyService).
///
/// Dropping it (the client went away) while the handler runs drops the lock's guard, which
/// releases the lock: no record is written, and a retry runs again.
pub struct ResponseFuture<B: Body, E> {
    inner: Pin<Box<dyn Future<Output = Output<B, E>> + Send>>,
}

impl<B, E> ResponseFuture<B, E>
where
    B: Body + Send + 'static,
    B::Error: Send,
    E: Send + 'static,
{
    pub(crate) fn new(respond: impl Future<Output = Output<B, E>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(respond),
        }
    }

    pub(crate) fn reject(response: Response<Bytes>) -> Self {
        Self::new(std::future::ready(Ok(response.map(IdempotentBody::full))))
    }

    /// The inner service's response to a request without a key, as it is.
    pub(crate) fn pass<F>(response: F) -> Self
    where
        F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    {
        Self::new(async move { Ok(response.await?.map(streamed)) })
    }
}

impl<B: Body, E> Future for ResponseFuture<B, E> {
    type Output = Output<B, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B: Body, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// What a request's future needs: the inner service (polled ready), and the record's key.
pub(crate) struct Call<S, R> {
    pub(crate) inner: S,
    pub(crate) client: Client,
    pub(crate) on_rejection: R,
    pub(crate) settings: Settings,
    pub(crate) key: LockKey,
    pub(crate) name: ObjectName,
}

/// The answer to one request with a key.
pub(crate) async fn respond<S, R, ReqBody, ResBody>(
    call: Call<S, R>,
    parts: Parts,
    body: ReqBody,
) -> Output<ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    R: OnRejection,
    ReqBody: Body + From<Bytes>,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: Body<Data = Bytes>,
{
    let Call {
        inner,
        client,
        on_rejection,
        settings,
        key,
        name,
    } = call;
    let reject = |r: Rejection| Ok(on_rejection.response(&r).map(IdempotentBody::full));
    let limit = settings.max_request_body;
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return reject(Rejection::BodyTooLarge { limit });
        }
        Err(_) => return reject(Rejection::BodyUnreadable),
    };
    let print = match &settings.fingerprint {
        Some(headers) => fingerprint(&parts, headers, &body),
        None => NO_FINGERPRINT.to_owned(),
    };
    let mode = match settings.wait {
        None => Mode::Try,
        Some(wait) => Mode::WaitUntil(crate::protocol::after(wait)),
    };
    let key_id = crate::key_id(&key);
    match client.enter_named(key, name.clone(), mode, true).await {
        Ok(Entered::Lock(guard)) => {
            let request = Request::from_parts(parts, ReqBody::from(body));
            run(inner, request, guard, &print, &settings).await
        }
        Ok(Entered::Record(state)) => match replay(&client, &name, state, &print).await {
            Ok(response) => {
                tracing::debug!(target: "dimutex::idempotency", key_id, "replayed");
                Ok(response.map(IdempotentBody::full))
            }
            Err(rejection) => reject(rejection),
        },
        Err(e) => {
            if !e.is_held() {
                tracing::warn!(target: "dimutex::idempotency", key_id, error = %e, "lock backend failed");
            }
            reject(Rejection::from(e))
        }
    }
}

/// The fingerprint of a record written without one: it matches every request.
const NO_FINGERPRINT: &str = "-";

/// The stored response of the live record `state`, for a request with fingerprint `print`.
async fn replay(
    client: &Client,
    name: &str,
    state: ObjectState,
    print: &str,
) -> Result<Response<Bytes>, Rejection> {
    // Replaced since it was read (expired and taken over), or not readable by this
    // version: the key is busy for now.
    let busy = Rejection::Held {
        remaining: Some(Duration::from_secs(1)),
    };
    let Some(decoded) = record::decode(state.metadata()) else {
        tracing::warn!(target: "dimutex::idempotency", "a record this crate cannot read is in the way");
        return Err(busy);
    };
    let unprinted = print == NO_FINGERPRINT || decoded.fingerprint == NO_FINGERPRINT;
    if !unprinted && decoded.fingerprint != print {
        return Err(Rejection::KeyReused);
    }
    let contents = match decoded.layout {
        Layout::Inline { .. } => None,
        Layout::Contents { .. } => {
            let generation = state.version().generation();
            client
                .record_contents(name, generation)
                .await
                .map_err(Rejection::from)?
        }
    };
    decoded.replay(contents).ok_or(busy)
}

/// Runs the handler under the lock, and stores its response if it should be.
async fn run<S, ReqBody, ResBody>(
    mut inner: S,
    mut request: Request<ReqBody>,
    guard: LockGuard,
    print: &str,
    settings: &Settings,
) -> Output<ResBody, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    request.extensions_mut().insert(guard.held_lock());
    let key_id = crate::key_id(guard.key());
    // An error or a panic drops the guard: released, nothing stored.
    let (parts, body) = inner.call(request).await?.into_parts();
    if !(settings.store_if)(parts.status) {
        // Not stored: the lock is held until the body has been sent, then released.
        let body = IdempotentBody::resumed(VecDeque::new(), Some(Box::pin(body)), None);
        return Ok(Response::from_parts(parts, body.holding(guard)));
    }
    let (head, rest, error) = match collect_capped(body, settings.max_response_body).await {
        Collected::Whole(bytes) => {
            let stored = Stored::new(parts.status, &parts.headers, bytes.clone());
            let (fields, data) = stored.encode(print);
            let record = Completion {
                fields,
                data: &data,
                retention: settings.retention,
            };
            match guard.complete_with(record).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(target: "dimutex::idempotency", key_id, "response not stored: the lock was lost first")
                }
                // Logged by the lease driver.
                Err(_) => {}
            }
            return Ok(Response::from_parts(parts, IdempotentBody::full(bytes)));
        }
        Collected::Partial { head, rest, error } => (head, rest, error),
    };
    tracing::warn!(target: "dimutex::idempotency", key_id, limit = settings.max_response_body, "response not stored: its body is over the limit, has trailers or failed");
    let body = IdempotentBody::resumed(head, rest, error);
    Ok(Response::from_parts(parts, body.holding(guard)))
}

fn streamed<B: Body>(body: B) -> IdempotentBody<B> {
    IdempotentBody::resumed(VecDeque::new(), Some(Box::pin(body)), None)
}

/// A response body read up to a cap.
enum Collected<B: Body> {
    /// All of it, data only, within the cap.
    Whole(Bytes),
    /// What was read, and the rest (or the error that ended it).
    Partial {
        head: VecDeque<Frame<Bytes>>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    },
}

async fn collect_capped<B: Body<Data = Bytes>>(body: B, cap: usize) -> Collected<B> {
    let mut body = Box::pin(body);
    let mut head = VecDeque::new();
    let mut len = 0;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                let data = frame.data_ref().map(Bytes::len);
                head.push_back(frame);
                len += data.unwrap_or(0);
                if data.is_none() || len > cap {
                    return Collected::Partial {
                        head,
                        rest: Some(body),
                        error: None,
                    };
                }
            }
            Some(Err(e)) => {
                return Collected::Partial {
                    head,
                    rest: None,
                    error: Some(e),
                };
            }
        }
    }
    let mut whole = BytesMut::with_capacity(len);
    for frame in head {
        if let Ok(data) = frame.into_data() {
            whole.extend_from_slice(&data);
        }
    }
    Collected::Whole(whole.freeze())
}
