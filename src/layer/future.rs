//! [`ResponseFuture`]: acquire, then call the inner service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::LockBody;
use super::rejection::{OnRejection, Rejection};
use super::settings::Settings;
use crate::error::Error;
use crate::guard::LockGuard;

/// An acquisition the layer awaits.
pub(crate) type Acquire = Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send>>;

/// What the debug line of a request's acquisition names: the key's id, and when it began
/// (read only when that line is on).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AcquireLog {
    pub(crate) key_id: u64,
    pub(crate) started: Option<Instant>,
}

impl AcquireLog {
    /// The debug line of the acquisition's `result` (and a warning when the backend failed).
    fn outcome(self, result: &Result<LockGuard, Error>) {
        let key_id = self.key_id;
        let outcome = match result {
            Ok(_) => "acquired",
            Err(e) if e.is_held() => "held",
            Err(_) => "failed",
        };
        tracing::debug!(
            target: "dimutex::layer",
            key_id,
            outcome,
            elapsed_us = self.started.map_or(0, |t| t.elapsed().as_micros() as u64),
            "lock for request"
        );
        if let Err(e) = result {
            if !e.is_held() {
                tracing::warn!(target: "dimutex::layer", key_id, error = %e, "lock backend failed");
            }
        }
    }
}

pin_project! {
    /// The response future of [`LockService`](super::LockService).
    ///
    /// Dropping it (the client disconnected) drops the guard it holds, which releases the
    /// lock; so does a panic in the inner service, as the future is dropped while unwinding.
    pub struct ResponseFuture<S, ReqBody, R>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, R>
    where
        S: Service<Request<ReqBody>>,
    {
        Acquiring {
            acquire: Acquire,
            pending: Option<Pending<S, ReqBody, R>>,
        },
        Calling {
            #[pin]
            future: S::Future,
            guard: Option<LockGuard>,
            release_on_response: bool,
        },
        Rejected {
            response: Option<Response<Bytes>>,
        },
    }
}

struct Pending<S, ReqBody, R> {
    request: Request<ReqBody>,
    inner: S,
    on_rejection: R,
    settings: Settings,
    log: AcquireLog,
}

impl<S, ReqBody, R> Pending<S, ReqBody, R>
where
    S: Service<Request<ReqBody>>,
    R: OnRejection,
{
    fn after(self, result: Result<LockGuard, Error>) -> State<S, ReqBody, R> {
        let Pending {
            request,
            mut inner,
            on_rejection,
            settings,
            log,
        } = self;
        after(request, &mut inner, &on_rejection, settings, log, result)
    }
}

/// The request's next state once its acquisition is over: `inner` (ready) called, with the
/// lock in the request's extensions, or the rejection.
fn after<S, ReqBody, R>(
    mut request: Request<ReqBody>,
    inner: &mut S,
    on_rejection: &R,
    settings: Settings,
    log: AcquireLog,
    result: Result<LockGuard, Error>,
) -> State<S, ReqBody, R>
where
    S: Service<Request<ReqBody>>,
    R: OnRejection,
{
    log.outcome(&result);
    match result {
        Ok(guard) => {
            request.extensions_mut().insert(guard.held_lock());
            State::Calling {
                future: inner.call(request),
                guard: Some(guard),
                release_on_response: settings.release_on_response,
            }
        }
        Err(e) => {
            let rejection = Rejection::from(e);
            if settings.fail_open && matches!(rejection, Rejection::Unavailable { .. }) {
                tracing::warn!(target: "dimutex::layer", "lock backend unavailable; running the request without the lock (fail open)");
                State::Calling {
                    future: inner.call(request),
                    guard: None,
                    release_on_response: false,
                }
            } else {
                State::Rejected {
                    response: Some(on_rejection.response(&rejection)),
                }
            }
        }
    }
}

impl<S, ReqBody, R> ResponseFuture<S, ReqBody, R>
where
    S: Service<Request<ReqBody>>,
    R: OnRejection,
{
    /// The response to `request` after `acquisition`, from `inner` (polled ready): `inner`
    /// moves into the future, to be called once the acquisition's future is over, and a clone
    /// takes its place.
    pub(crate) fn new(
        acquire: Acquire,
        request: Request<ReqBody>,
        inner: &mut S,
        on_rejection: R,
        settings: Settings,
        log: AcquireLog,
    ) -> Self
    where
        S: Clone,
    {
        // The instance polled ready serves this request once the lock is taken; the service
        // keeps a clone for the next one.
        let clone = inner.clone();
        let state = State::Acquiring {
            acquire,
            pending: Some(Pending {
                request,
                inner: std::mem::replace(inner, clone),
                on_rejection,
                settings,
                log,
            }),
        };
        Self { state }
    }
}

impl<S, ReqBody, R> ResponseFuture<S, ReqBody, R>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn call(
        future: S::Future,
        guard: Option<LockGuard>,
        release_on_response: bool,
    ) -> Self {
        Self {
            state: State::Calling {
                future,
                guard,
                release_on_response,
            },
        }
    }

    pub(crate) fn reject(response: Response<Bytes>) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<S, ReqBody, R, ResBody> Future for ResponseFuture<S, ReqBody, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    R: OnRejection,
{
    type Output = Result<Response<LockBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Acquiring { acquire, pending } => {
                    let result = ready!(acquire.as_mut().poll(cx));
                    let pending = pending
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let next = pending.after(result);
                    state.set(next);
                }
                StateProj::Calling {
                    future,
                    guard,
                    release_on_response,
                } => {
                    let result = ready!(future.poll(cx));
                    let guard = guard.take();
                    // On an error, or when releasing on response, the guard is dropped here,
                    // which releases the lock.
                    let keep = if *release_on_response { None } else { guard };
                    return Poll::Ready(
                        result.map(|response| response.map(|body| LockBody::new(body, keep))),
                    );
                }
                StateProj::Rejected { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response.map(LockBody::rejection)));
                }
            }
        }
    }
}

impl<S, ReqBody, R> fmt::Debug for ResponseFuture<S, ReqBody, R>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
