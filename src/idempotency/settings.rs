//! What an [`IdempotencyLayer`](super::IdempotencyLayer) is told besides its client, key
//! extractor and rejection hook.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, StatusCode};

use crate::key::LockKey;
use crate::layer::KeyRejection;

/// Derives the scope of a request's key (a tenant, a principal).
pub(crate) type Scope = Arc<dyn Fn(&Parts) -> Result<Option<LockKey>, KeyRejection> + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Settings {
    /// `None`: 409 at once while the first request runs; `Some(d)`: wait up to `d` for its
    /// record (or its lock).
    pub(crate) wait: Option<Duration>,
    pub(crate) retention: Duration,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    /// The headers the fingerprint covers; `None`: no fingerprint.
    pub(crate) fingerprint: Option<Arc<[HeaderName]>>,
    pub(crate) store_if: Arc<dyn Fn(StatusCode) -> bool + Send + Sync>,
    pub(crate) scope: Option<Scope>,
}

/// The default of what is stored: 2xx and 4xx, except 408, 409, 425 and 429 (a retry of
/// those may well succeed).
pub(crate) fn stored_by_default(status: StatusCode) -> bool {
    let transient = [408, 409, 425, 429].contains(&status.as_u16());
    (status.is_success() || status.is_client_error()) && !transient
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            wait: None,
            retention: Duration::from_secs(24 * 3600),
            max_request_body: 1 << 20,
            max_response_body: 1 << 20,
            fingerprint: Some(Arc::from(Vec::new())),
            store_if: Arc::new(stored_by_default),
            scope: None,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("wait", &self.wait)
            .field("retention", &self.retention)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("fingerprint", &self.fingerprint)
            .field("scoped", &self.scope.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_2xx_and_4xx_are_stored_but_not_transient_answers() {
        for stored in [200, 201, 204, 400, 404, 422] {
            assert!(
                stored_by_default(StatusCode::from_u16(stored).unwrap()),
                "{stored}"
            );
        }
        for not in [100, 301, 408, 409, 425, 429, 500, 503] {
            assert!(
                !stored_by_default(StatusCode::from_u16(not).unwrap()),
                "{not}"
            );
        }
    }
}
