//! [`IdempotencyService`]: the middleware itself.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::IdempotentBody;
use super::fingerprint::record_key;
use super::future::{self, Call, ResponseFuture};
use super::settings::Settings;
use crate::client::Client;
use crate::layer::{KeyExtractor, KeyRejection, OnRejection, Rejection};

/// The service made by [`IdempotencyLayer`](super::IdempotencyLayer); see the
/// [module docs](super).
///
/// ```
/// use dimutex::{Client, backend::MemoryBackend, idempotency::IdempotencyLayer};
/// use tower::Layer;
/// let layer = IdempotencyLayer::new(Client::new(MemoryBackend::new()));
/// let service = layer.layer(tower::service_fn(|_: http::Request<axum::body::Body>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// }));
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyService<S, K, R> {
    inner: S,
    client: Client,
    extractor: K,
    on_rejection: R,
    settings: Settings,
}

impl<S, K, R> IdempotencyService<S, K, R> {
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

impl<S, K, R, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S, K, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    K: KeyExtractor,
    R: OnRejection,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Response<IdempotentBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let reject = |r: Rejection| {
            tracing::debug!(target: "dimutex::idempotency", reason = ?r, "rejected");
            ResponseFuture::reject(self.on_rejection.response(&r))
        };
        let key = match self.extractor.extract(&parts) {
            Ok(Some(key)) => key,
            Ok(None) => {
                let response = self.inner.call(Request::from_parts(parts, body));
                return ResponseFuture::pass(response);
            }
            Err(rejection) => return reject(Rejection::BadKey(rejection)),
        };
        let scope = match self.settings.scope.as_ref().map(|scope| scope(&parts)) {
            None => None,
            Some(Ok(scope)) => scope,
            Some(Err(rejection)) => return reject(Rejection::BadKey(rejection)),
        };
        let key = record_key(&parts, scope.as_ref(), &key);
        let name = match self.client.name_of(&key) {
            Ok(name) => name,
            Err(e) => return reject(Rejection::BadKey(KeyRejection::Invalid(e))),
        };
        if self.settings.wait.is_none() {
            // The first request runs in this process: 409 without reading the body or the
            // backend.
            if let Some(remaining) = self.client.held_here_for(&name) {
                return reject(Rejection::Held {
                    remaining: Some(remaining),
                });
            }
        }
        // The instance polled ready serves this request; the service keeps a clone.
        let clone = self.inner.clone();
        let call = Call {
            inner: std::mem::replace(&mut self.inner, clone),
            client: self.client.clone(),
            on_rejection: self.on_rejection.clone(),
            settings: self.settings.clone(),
            key,
            name,
        };
        ResponseFuture::new(future::respond(call, parts, body))
    }
}
