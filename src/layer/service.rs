//! [`LockService`]: the middleware itself.

use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use tower_service::Service;

use crate::client::Client;
use crate::protocol::acquire::Mode;

use super::body::LockBody;
use super::future::{Acquire, AcquireLog, ResponseFuture};
use super::key::KeyExtractor;
use super::rejection::{OnRejection, Rejection};
use super::settings::Settings;

/// The service made by [`LockLayer`](super::LockLayer); see the [module docs](super).
///
/// The inner service polled ready serves the next request that reaches it: moved into the
/// response future (a clone taking its place) while the lock is acquired, and kept, still
/// ready, when the request is answered without it (a bad key, a lock held in this process),
/// so capacity that readiness reserved (a concurrency limit's
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
    client: Client,
    extractor: K,
    on_rejection: R,
    settings: Settings,
}

impl<S, K, R> LockService<S, K, R> {
    pub(crate) fn new(
        inner: S,
        client: Client,
        extractor: K,
        on_rejection: R,
        settings: Settings,
    ) -> Self {
        Self {
            inner,
            client,
            extractor,
            on_rejection,
            settings,
        }
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
        let key = match self.extractor.extract(&parts) {
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
                return ResponseFuture::reject(self.on_rejection.response(&rejection));
            }
        };
        let wait = self.settings.wait;
        let client = &self.client;
        let name = client.name_of(&key);
        if let (None, Ok(name)) = (wait, &name) {
            // Held by another request of this process: answered here, without a request and
            // without the acquisition's future.
            if let Some(remaining) = client.held_here_for(name) {
                tracing::debug!(target: "dimutex::layer", key_id = crate::key_id(&key), outcome = "held", "lock for request");
                let rejection = Rejection::Held {
                    remaining: Some(remaining),
                };
                return ResponseFuture::reject(self.on_rejection.response(&rejection));
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
        let on_rejection = self.on_rejection.clone();
        let settings = self.settings;
        let client = client.clone();
        let acquisition: Acquire = Box::pin(async move {
            let mode = match wait {
                None => Mode::Try,
                Some(wait) => Mode::WaitUntil(crate::protocol::after(wait)),
            };
            client.acquire_named(key, name?, mode).await
        });
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
