//! [`LockLayer`]: the configuration of the middleware.

use std::time::Duration;

use tower_layer::Layer;

use super::rejection::{OnRejection, ProblemJson};
use super::service::LockService;
use super::settings::Settings;
use crate::client::Client;

/// Runs each request under a lock named by a [`KeyExtractor`](super::KeyExtractor); see the
/// [module docs](super) for the outcomes.
///
/// ```
/// use std::time::Duration;
/// use dimutex::{Client, backend::MemoryBackend, layer::{FromHeader, LockLayer}};
///
/// let client = Client::new(MemoryBackend::new());
/// let layer = LockLayer::new(client, FromHeader::new("x-job-id"))
///     .wait_up_to(Duration::from_secs(2)) // queue instead of answering 409 at once
///     .release_on_response();             // release before the body is streamed
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct LockLayer<K, R = ProblemJson> {
    client: Client,
    extractor: K,
    on_rejection: R,
    settings: Settings,
}

impl<K> LockLayer<K> {
    /// A layer taking locks from `client`, named by `extractor`. Defaults: fail fast (409 when
    /// held), release when the response body ends, fail closed (503 when the backend is
    /// unavailable), [`ProblemJson`] rejections.
    pub fn new(client: Client, extractor: K) -> Self {
        Self {
            client,
            extractor,
            on_rejection: ProblemJson,
            settings: Settings::default(),
        }
    }
}

impl<K, R> LockLayer<K, R> {
    /// Waits up to `wait` for a held lock instead of answering 409 at once. Waiters in this
    /// process queue locally; only the first polls the backend.
    pub fn wait_up_to(mut self, wait: Duration) -> Self {
        self.settings.wait = Some(wait);
        self
    }

    /// Releases the lock as soon as the inner service returns its response, instead of after
    /// the response body has been sent.
    pub fn release_on_response(mut self) -> Self {
        self.settings.release_on_response = true;
        self
    }

    /// When the lock backend is unavailable (throttled, unreachable), runs the request
    /// **without** the lock instead of answering 503. Only for work where running twice is
    /// acceptable and running zero times is not.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.settings.fail_open = fail_open;
        self
    }

    /// Builds rejection responses with `on_rejection` instead of [`ProblemJson`].
    pub fn on_rejection<R2: OnRejection>(self, on_rejection: R2) -> LockLayer<K, R2> {
        LockLayer {
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

impl<S, K: Clone, R: Clone> Layer<S> for LockLayer<K, R> {
    type Service = LockService<S, K, R>;

    fn layer(&self, inner: S) -> Self::Service {
        LockService::new(
            inner,
            self.client.clone(),
            self.extractor.clone(),
            self.on_rejection.clone(),
            self.settings,
        )
    }
}
