//! [`IdempotencyLayer`]: the configuration of the middleware.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use tower_layer::Layer;

use super::service::IdempotencyService;
use super::settings::Settings;
use crate::client::Client;
use crate::layer::{FromHeader, KeyExtractor, OnRejection, ProblemJson};

/// Runs each request with a given idempotency key once, and answers its duplicates with the
/// stored response; see the [module docs](super) for the outcomes.
///
/// ```
/// use std::time::Duration;
/// use dimutex::{Client, backend::MemoryBackend, idempotency::IdempotencyLayer};
///
/// let client = Client::new(MemoryBackend::new());
/// let layer = IdempotencyLayer::new(client)           // the `Idempotency-Key` header, required
///     .retention(Duration::from_secs(6 * 3600))       // records kept 6 h (default 24 h)
///     .wait_up_to(Duration::from_secs(5))             // a duplicate waits for the first answer
///     .fingerprint_headers(["x-tenant"]);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct IdempotencyLayer<K = FromHeader, R = ProblemJson> {
    client: Client,
    extractor: K,
    on_rejection: R,
    settings: Settings,
}

impl IdempotencyLayer {
    /// A layer keeping its records with `client`, keyed by the `Idempotency-Key` header (a
    /// request without one: 400). Defaults: duplicates in flight get 409 at once, records are
    /// kept 24 h, request and response bodies are buffered up to 1 MiB, the fingerprint covers
    /// method, path, query and body, [`ProblemJson`] rejections.
    pub fn new(client: Client) -> Self {
        Self::with_key(client, FromHeader::new("idempotency-key"))
    }
}

impl<K> IdempotencyLayer<K> {
    /// A layer whose keys come from `extractor` (a webhook's delivery id, a job id from the
    /// path); an extractor that gives no key passes the request through.
    pub fn with_key(client: Client, extractor: K) -> Self {
        Self {
            client,
            extractor,
            on_rejection: ProblemJson,
            settings: Settings::default(),
        }
    }
}

impl<K, R> IdempotencyLayer<K, R> {
    /// A duplicate that arrives while the first request runs waits up to `wait` for its
    /// record (then gets the replay), instead of 409 at once.
    pub fn wait_up_to(mut self, wait: Duration) -> Self {
        self.settings.wait = Some(wait);
        self
    }

    /// How long a completed record answers duplicates, judged on the server's clock
    /// (default 24 h; within 1 s and 10 years, longer or shorter values are clamped). An older
    /// record is taken over, and the request runs again.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.settings.retention = retention;
        self
    }

    /// The largest request body buffered (default 1 MiB); a larger one gets 413.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.settings.max_request_body = bytes;
        self
    }

    /// The largest response body stored (default 1 MiB); a larger response is sent, not
    /// stored (a warning is logged), and the key is free again.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.settings.max_response_body = bytes;
        self
    }

    /// Also fingerprints these request headers (method, path, query and body always count).
    ///
    /// # Panics
    /// When a name is not a valid header name (a programming error).
    pub fn fingerprint_headers<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: AsRef<str>,
    {
        let names: Vec<HeaderName> = names
            .into_iter()
            .map(|n| HeaderName::try_from(n.as_ref()).expect("a valid header name"))
            .collect();
        self.settings.fingerprint = Some(names.into());
        self
    }

    /// No fingerprint: a duplicate gets the stored response whatever its body (no 422).
    pub fn without_fingerprint(mut self) -> Self {
        self.settings.fingerprint = None;
        self
    }

    /// Which responses are stored, by status (default: 2xx and 4xx except 408, 409, 425 and
    /// 429). A response not stored frees the key: a retry runs again.
    pub fn store_if(mut self, store: impl Fn(StatusCode) -> bool + Send + Sync + 'static) -> Self {
        self.settings.store_if = Arc::new(store);
        self
    }

    /// Scopes keys by what `scope` derives from the request (a tenant, a principal), on top
    /// of method and route: two scopes never share a record. `Ok(None)` is the empty scope;
    /// an error rejects the request with 400.
    pub fn scope<S: KeyExtractor>(mut self, scope: S) -> Self {
        self.settings.scope = Some(Arc::new(move |parts| scope.extract(parts)));
        self
    }

    /// Builds rejection responses with `on_rejection` instead of [`ProblemJson`].
    pub fn on_rejection<R2: OnRejection>(self, on_rejection: R2) -> IdempotencyLayer<K, R2> {
        IdempotencyLayer {
            client: self.client,
            extractor: self.extractor,
            on_rejection,
            settings: self.settings,
        }
    }

    /// The lock client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl<S, K: Clone, R: Clone> Layer<S> for IdempotencyLayer<K, R> {
    type Service = IdempotencyService<S, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(
            inner,
            self.client.clone(),
            self.extractor.clone(),
            self.on_rejection.clone(),
            self.settings.clone(),
        )
    }
}
