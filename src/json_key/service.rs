//! [`JsonKeyService`]: the middleware itself, and the [`BodyKey`] it adds.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower_service::Service;

use crate::layer::{KeyRejection, OnRejection, Rejection};

/// The key [`JsonKeyLayer`](super::JsonKeyLayer) read from the body: a request extension,
/// for [`FromExtension::<BodyKey>`](crate::layer::FromExtension).
///
/// ```
/// let key = dimutex::json_key::BodyKey::new("cus_42");
/// assert_eq!(key.as_ref(), "cus_42");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyKey(String);

impl BodyKey {
    /// A key read from a body.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
}

impl AsRef<str> for BodyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The service made by [`JsonKeyLayer`](super::JsonKeyLayer).
///
/// ```
/// use tower::Layer;
/// let service = dimutex::json_key::JsonKeyLayer::new("/id").layer(tower::service_fn(
///     |_: http::Request<axum::body::Body>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
///     },
/// ));
/// ```
#[derive(Debug, Clone)]
pub struct JsonKeyService<S, R> {
    inner: S,
    pointer: Arc<str>,
    max_body: usize,
    optional: bool,
    on_rejection: R,
}

impl<S, R> JsonKeyService<S, R> {
    pub(crate) fn new(
        inner: S,
        pointer: Arc<str>,
        max_body: usize,
        optional: bool,
        on_rejection: R,
    ) -> Self {
        Self {
            inner,
            pointer,
            max_body,
            optional,
            on_rejection,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the middleware, giving the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

type Output<B, E> = Result<Response<B>, E>;

/// The response future of [`JsonKeyService`]: the body is read first.
pub struct ResponseFuture<B, E> {
    inner: Pin<Box<dyn Future<Output = Output<B, E>> + Send>>,
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Output<B, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// The key at `pointer` of a JSON `body`: a string as it is, an integer in decimal. Other
/// numbers are no key: read as floating point, two different ones could become one.
fn key_at(body: &[u8], pointer: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    match value.pointer(pointer)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for JsonKeyService<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    R: OnRejection,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The instance polled ready serves this request; the service keeps a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (pointer, limit, optional) = (self.pointer.clone(), self.max_body, self.optional);
        let on_rejection = self.on_rejection.clone();
        let respond = async move {
            let reject = |r: Rejection| Ok(on_rejection.response(&r).map(ResBody::from));
            let (mut parts, body) = request.into_parts();
            let body = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return reject(Rejection::BodyTooLarge { limit });
                }
                Err(_) => return reject(Rejection::BodyUnreadable),
            };
            match key_at(&body, &pointer) {
                Some(key) => {
                    parts.extensions.insert(BodyKey(key));
                }
                None if optional => {}
                None => {
                    let missing = format!("JSON field {pointer} in the body");
                    return reject(Rejection::BadKey(KeyRejection::Missing(missing.into())));
                }
            }
            inner
                .call(Request::from_parts(parts, ReqBody::from(body)))
                .await
        };
        ResponseFuture {
            inner: Box::pin(respond),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_at_the_pointer() {
        let body = br#"{"data":{"object":{"customer":"cus_42","amount":700,"paid":true}}}"#;
        assert_eq!(
            key_at(body, "/data/object/customer").as_deref(),
            Some("cus_42")
        );
        assert_eq!(key_at(body, "/data/object/amount").as_deref(), Some("700"));
        assert_eq!(
            key_at(body, "/data/object/paid"),
            None,
            "not a string or number"
        );
        assert_eq!(key_at(body, "/data/missing"), None);
        assert_eq!(key_at(b"not json", "/data"), None);
        assert_eq!(key_at(br#""whole""#, "").as_deref(), Some("whole"));
    }
}
