//! axum extractors (feature `axum`): [`HeldLock`] from the request extensions, and [`Lock`],
//! which takes the lock itself.

use std::fmt;

use axum::extract::{FromRef, FromRequestParts, OptionalFromRequestParts, Path};
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use crate::client::Client;
use crate::guard::{HeldLock, LockGuard};
use crate::key::{KeyError, LockKey};
use crate::layer::{KeyRejection, Rejection};

/// Renders a [`Rejection`] as its problem+json response.
impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        self.to_problem_response().map(axum::body::Body::from)
    }
}

/// The lock that [`LockLayer`](crate::layer::LockLayer) took for this request. Extracting it
/// where no lock was taken is a 500 (a wiring mistake); use `Option<HeldLock>` where the layer
/// may have let the request through unlocked.
///
/// ```
/// use dimutex::HeldLock;
/// async fn handler(lock: HeldLock) -> String {
///     format!("holding {} with token {}", lock.key(), lock.token())
/// }
/// let app: axum::Router = axum::Router::new().route("/jobs/{id}", axum::routing::post(handler));
/// ```
impl<S: Send + Sync> FromRequestParts<S> for HeldLock {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<HeldLock>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "no lock was taken for this request (is LockLayer installed on this route?)",
        ))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for HeldLock {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<HeldLock>().cloned())
    }
}

/// Something a lock key is made from; see [`Lock`].
///
/// ```
/// use dimutex::{KeyError, LockKey, extract::ToLockKey};
/// struct TenantId(String);
/// impl ToLockKey for TenantId {
///     fn to_lock_key(&self) -> Result<LockKey, KeyError> {
///         LockKey::new(format!("tenant/{}", self.0))
///     }
/// }
/// ```
pub trait ToLockKey {
    /// The lock key.
    fn to_lock_key(&self) -> Result<LockKey, KeyError>;
}

impl ToLockKey for LockKey {
    fn to_lock_key(&self) -> Result<LockKey, KeyError> {
        Ok(self.clone())
    }
}

impl<T: fmt::Display> ToLockKey for Path<T> {
    fn to_lock_key(&self) -> Result<LockKey, KeyError> {
        LockKey::new(self.0.to_string())
    }
}

/// Takes a lock in the handler's extractors: `T` is extracted first (a `Path`, or your own
/// extractor), made into a key with [`ToLockKey`], and locked with the [`Client`] taken from
/// the state (`Client: FromRef<S>`). Held elsewhere → 409, backend unavailable → 503, bad key
/// → 400, all as problem+json.
///
/// The lock is released when the `Lock` is dropped — when the handler returns, **before** a
/// streamed response body is sent. Use [`LockLayer`](crate::layer::LockLayer) to hold the lock
/// until the body ends.
///
/// ```
/// use axum::{Router, extract::Path, routing::post};
/// use dimutex::{Client, backend::MemoryBackend, extract::Lock};
///
/// async fn export(lock: Lock<Path<String>>) -> String {
///     format!("exporting tenant {} under token {}", lock.value().0, lock.guard().token())
/// }
///
/// let client = Client::new(MemoryBackend::new());
/// let app: Router = Router::new()
///     .route("/tenants/{tenant}/export", post(export))
///     .with_state(client);
/// ```
#[must_use]
pub struct Lock<T> {
    value: T,
    guard: LockGuard,
}

impl<T> Lock<T> {
    /// What the key was made from.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The guard: key, fencing token, lost signal.
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }

    /// Both parts, to release explicitly with [`LockGuard::release`].
    pub fn into_parts(self) -> (T, LockGuard) {
        (self.value, self.guard)
    }
}

impl<T: fmt::Debug> fmt::Debug for Lock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("value", &self.value)
            .field("guard", &self.guard)
            .finish()
    }
}

/// Why [`Lock`] could not be extracted.
#[derive(Debug)]
#[non_exhaustive]
pub enum LockRejection<R> {
    /// Extracting `T` failed; its own rejection is answered.
    Value(R),
    /// The lock was not taken.
    Lock(Rejection),
}

impl<R: IntoResponse> IntoResponse for LockRejection<R> {
    fn into_response(self) -> Response {
        match self {
            LockRejection::Value(r) => r.into_response(),
            LockRejection::Lock(r) => r.into_response(),
        }
    }
}

impl<S, T> FromRequestParts<S> for Lock<T>
where
    S: Send + Sync,
    Client: FromRef<S>,
    T: FromRequestParts<S> + ToLockKey + Send,
{
    type Rejection = LockRejection<T::Rejection>;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let value = T::from_request_parts(parts, state)
            .await
            .map_err(LockRejection::Value)?;
        let key = value
            .to_lock_key()
            .map_err(|e| LockRejection::Lock(Rejection::BadKey(KeyRejection::Invalid(e))))?;
        let guard = Client::from_ref(state)
            .try_acquire(key)
            .await
            .map_err(|e| LockRejection::Lock(Rejection::from(e)))?;
        parts.extensions.insert(guard.held_lock());
        Ok(Lock { value, guard })
    }
}
