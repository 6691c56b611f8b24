//! [`JsonKeyLayer`]: the configuration of the middleware.

use std::sync::Arc;

use tower_layer::Layer;

use super::service::JsonKeyService;
use crate::layer::{OnRejection, ProblemJson};

/// Reads a lock key from a JSON request body; see the [module docs](super).
///
/// ```
/// let layer = dimutex::json_key::JsonKeyLayer::new("/repository/full_name")
///     .max_body(256 * 1024)
///     .optional();
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct JsonKeyLayer<R = ProblemJson> {
    pointer: Arc<str>,
    max_body: usize,
    optional: bool,
    on_rejection: R,
}

impl JsonKeyLayer {
    /// Keys from the field at the JSON pointer `pointer` (RFC 6901: `/data/object/customer`;
    /// `""` is the whole body). Defaults: bodies up to 1 MiB, a body without the field is a 400.
    pub fn new(pointer: impl Into<Arc<str>>) -> Self {
        Self {
            pointer: pointer.into(),
            max_body: 1 << 20,
            optional: false,
            on_rejection: ProblemJson,
        }
    }
}

impl<R> JsonKeyLayer<R> {
    /// The largest body read (default 1 MiB); a larger one gets 413.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// A body that is not JSON or lacks the field passes through without a
    /// [`BodyKey`](super::BodyKey) (no lock, with an optional extractor) instead of a 400.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// Builds rejection responses with `on_rejection` instead of [`ProblemJson`].
    pub fn on_rejection<R2: OnRejection>(self, on_rejection: R2) -> JsonKeyLayer<R2> {
        JsonKeyLayer {
            pointer: self.pointer,
            max_body: self.max_body,
            optional: self.optional,
            on_rejection,
        }
    }
}

impl<S, R: Clone> Layer<S> for JsonKeyLayer<R> {
    type Service = JsonKeyService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        JsonKeyService::new(
            inner,
            self.pointer.clone(),
            self.max_body,
            self.optional,
            self.on_rejection.clone(),
        )
    }
}
