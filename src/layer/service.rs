//! [`LockService`]: the middleware itself.

use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tower_service::Service;

use crate::client::{Contention, InPlace};

use super::body::LockBody;
use super::future::{AcquireLog, ResponseFuture};
use super::key::KeyExtractor;
use super::layer::LockLayer;
use super::rejection::{OnRejection, Rejection};

/// The service made by [`LockLayer`]; see the [module docs](super).
///
/// The inner service polled ready serves the next request that reaches it: called at once when
/// the lock is taken in place, moved into the response future (a clone taking its place) when
/// the acquisition waits, and kept, still ready, when the request is answered without it (a bad
/// key, a lock held elsewhere), so capacity that readiness reserved (a concurrency limit's
/// permit, say) stays reserved for the next request.
///
/// ```
/// use dimutex::{Client, backend::MemoryBackend, layer::{FromHeader, LockLayer}};
/// use tower::Layer;
/// let layer = LockLayer::new(Client::new(MemoryBackend::new()), FromHeader::new("x-job"));
/// let service = layer.layer(tower::service_fn(|_: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// }));
/// ```
#[derive(Debug, Clone)]
pub struct LockService<S, K, R> {
    inner: S,
    layer: LockLayer<K, R>,
}

impl<S, K, R> LockService<S, K, R> {
    pub(crate) fn new(inner: S, layer: LockLayer<K, R>) -> Self {
        Self { inner, layer }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, giving the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, K, R, ReqBody, ResBody> Service<Request<ReqBody>> for LockService<S, K, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    K: KeyExtractor,
    R: OnRejection,
    ReqBody: Send + 'static,
{
    type Response = Response<LockBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The instance polled ready serves this request: called here when no acquisition has
        // to be awaited first (no clone of it, then), else moved into the response future.
        let (parts, body) = request.into_parts();
        let key = match self.layer.extractor.extract(&parts) {
            Ok(Some(key)) => key,
            Ok(None) => {
                return ResponseFuture::call(
                    self.inner.call(Request::from_parts(parts, body)),
                    None,
                    false,
                );
            }
            Err(rejection) => {
                tracing::debug!(target: "dimutex::layer", reason = %rejection, "bad lock key: 400");
                let rejection = Rejection::BadKey(rejection);
                return ResponseFuture::reject(self.layer.on_rejection.response(&rejection));
            }
        };
        let wait = self.layer.settings.wait;
        let client = &self.layer.client;
        let name = client.name_of(&key);
        if let (None, Ok(name)) = (wait, &name) {
            // Held by another request of this process: answered here, without a request and
            // without the acquisition's future.
            if let Some(remaining) = client.held_here_for(name) {
                tracing::debug!(target: "dimutex::layer", key_id = crate::key_id(&key), outcome = "held", "lock for request");
                let rejection = Rejection::Held {
                    remaining: Some(remaining),
                };
                return ResponseFuture::reject(self.layer.on_rejection.response(&rejection));
            }
        }
        // The clock is read for the debug line only.
        let started =
            tracing::enabled!(target: "dimutex::layer", tracing::Level::DEBUG).then(Instant::now);
        let log = AcquireLog {
            key_id: crate::key_id(&key),
            started,
        };
        let request = Request::from_parts(parts, body);
        let on_rejection = self.layer.on_rejection.clone();
        let settings = self.layer.settings;
        let acquisition = match (wait, name) {
            (_, Err(e)) => InPlace::Done(Err(e.into())),
            (None, Ok(name)) => client.acquire_in_place(key, name),
            (Some(wait), Ok(name)) => InPlace::Rest({
                let client = client.clone();
                Box::pin(async move {
                    let deadline = Instant::now() + wait;
                    client
                        .acquire_named(key, name, Contention::WaitUntil(deadline))
                        .await
                })
            }),
        };
        ResponseFuture::new(
            acquisition,
            request,
            &mut self.inner,
            on_rejection,
            settings,
            log,
        )
    }
}
