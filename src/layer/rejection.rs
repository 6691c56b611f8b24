//! Why a request was not let through, and how that is answered.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::key::KeyRejection;
use crate::error::Error;

/// Why [`LockLayer`](super::LockLayer) (or
/// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)) answered instead of the inner
/// service.
///
/// ```
/// use std::time::Duration;
/// use dimutex::layer::Rejection;
/// let r = Rejection::from(dimutex::Error::Held { remaining: Some(Duration::from_millis(2500)) });
/// assert_eq!(r.status(), http::StatusCode::CONFLICT);
/// assert_eq!(r.retry_after_secs(), Some(3));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Rejection {
    /// Another owner holds the lock (409).
    Held {
        /// The longest the current lease may last, when known.
        remaining: Option<Duration>,
    },
    /// The lock backend is throttled or unreachable (503).
    Unavailable {
        /// When to try again, when known.
        retry_after: Option<Duration>,
    },
    /// No valid key could be derived from the request (400).
    BadKey(KeyRejection),
    /// The idempotency key was used before with another request (422): a different method,
    /// path, query, body or fingerprinted header. Names neither the key nor the first request.
    KeyReused,
    /// The request body is larger than the idempotency layer buffers (413).
    BodyTooLarge {
        /// The most the layer buffers, in bytes.
        limit: usize,
    },
    /// The request body could not be read (400).
    BodyUnreadable,
    /// The lock backend refused for good (misconfiguration, permissions) or the client is shut
    /// down (503). Details are logged, not sent.
    Failed,
}

impl From<Error> for Rejection {
    fn from(e: Error) -> Self {
        match e {
            Error::Held { remaining } => Rejection::Held { remaining },
            Error::InvalidKey(k) => Rejection::BadKey(KeyRejection::Invalid(k)),
            Error::Unavailable { retry_after, .. } => Rejection::Unavailable { retry_after },
            Error::Backend(_) | Error::ShutDown => Rejection::Failed,
        }
    }
}

impl Rejection {
    /// The status code: 409, 503, 400, 422 or 413.
    ///
    /// ```
    /// let r = dimutex::layer::Rejection::Unavailable { retry_after: None };
    /// assert_eq!(r.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    /// ```
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::Held { .. } => StatusCode::CONFLICT,
            Rejection::Unavailable { .. } | Rejection::Failed => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::BadKey(_) | Rejection::BodyUnreadable => StatusCode::BAD_REQUEST,
            Rejection::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Rejection::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// `Retry-After` in whole seconds (rounded up, at least 1), when known.
    ///
    /// ```
    /// let r = dimutex::layer::Rejection::Held { remaining: None };
    /// assert_eq!(r.retry_after_secs(), None);
    /// ```
    pub fn retry_after_secs(&self) -> Option<u64> {
        let d = match self {
            Rejection::Held { remaining } => (*remaining)?,
            Rejection::Unavailable { retry_after } => (*retry_after)?,
            _ => return None,
        };
        Some(d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// The default answer: an RFC 9457 `application/problem+json` body that names neither the
    /// lock object nor its holder, and `Retry-After` when known.
    ///
    /// ```
    /// let response = dimutex::layer::Rejection::Held { remaining: None }.to_problem_response();
    /// assert_eq!(response.headers()["content-type"], "application/problem+json");
    /// ```
    pub fn to_problem_response(&self) -> Response<Bytes> {
        let status = self.status();
        // The fixed bodies are written out (the 409 of a busy key is the hot path); a test
        // checks them against the JSON they stand for.
        let body = match self {
            Rejection::Held { .. } => Bytes::from_static(HELD_BODY.as_bytes()),
            Rejection::Unavailable { .. } => Bytes::from_static(UNAVAILABLE_BODY.as_bytes()),
            Rejection::Failed => Bytes::from_static(FAILED_BODY.as_bytes()),
            Rejection::BadKey(reason) => {
                problem_body(status, &format!("The request cannot be locked: {reason}."))
            }
            Rejection::KeyReused => problem_body(
                status,
                "This idempotency key was already used with a different request.",
            ),
            Rejection::BodyTooLarge { limit } => problem_body(
                status,
                &format!("The request body is larger than {limit} bytes."),
            ),
            Rejection::BodyUnreadable => {
                problem_body(status, "The request body could not be read.")
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

const HELD_BODY: &str = r#"{"detail":"Another request holds the lock for this resource; try again later.","status":409,"title":"Conflict","type":"about:blank"}"#;
const UNAVAILABLE_BODY: &str = r#"{"detail":"The lock service is busy or unreachable; try again later.","status":503,"title":"Service Unavailable","type":"about:blank"}"#;
const FAILED_BODY: &str = r#"{"detail":"The lock service cannot serve this request.","status":503,"title":"Service Unavailable","type":"about:blank"}"#;

/// An RFC 9457 problem document.
fn problem_body(status: StatusCode, detail: &str) -> Bytes {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    Bytes::from(body.to_string())
}

/// Builds the response for a [`Rejection`]. Closures `Fn(&Rejection) -> Response<Bytes>`
/// implement it.
///
/// ```
/// use dimutex::layer::{OnRejection, Rejection};
/// let plain = |r: &Rejection| {
///     let mut response = http::Response::new(bytes::Bytes::from_static(b"busy"));
///     *response.status_mut() = r.status();
///     response
/// };
/// assert_eq!(plain.response(&Rejection::Held { remaining: None }).status(), 409);
/// ```
pub trait OnRejection: Clone + Send + Sync + 'static {
    /// The response for `rejection`.
    fn response(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> OnRejection for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Clone + Send + Sync + 'static,
{
    fn response(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

/// The default [`OnRejection`]: [`Rejection::to_problem_response`].
///
/// ```
/// use dimutex::layer::{OnRejection, ProblemJson, Rejection};
/// assert_eq!(ProblemJson.response(&Rejection::Failed).status(), 503);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

impl OnRejection for ProblemJson {
    fn response(&self, rejection: &Rejection) -> Response<Bytes> {
        rejection.to_problem_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELD_DETAIL: &str = "Another request holds the lock for this resource; try again later.";
    const UNAVAILABLE_DETAIL: &str = "The lock service is busy or unreachable; try again later.";
    const FAILED_DETAIL: &str = "The lock service cannot serve this request.";

    #[test]
    fn fixed_bodies_are_the_json_they_stand_for() {
        for (body, status, detail) in [
            (HELD_BODY, StatusCode::CONFLICT, HELD_DETAIL),
            (
                UNAVAILABLE_BODY,
                StatusCode::SERVICE_UNAVAILABLE,
                UNAVAILABLE_DETAIL,
            ),
            (FAILED_BODY, StatusCode::SERVICE_UNAVAILABLE, FAILED_DETAIL),
        ] {
            assert_eq!(body.as_bytes(), &problem_body(status, detail)[..]);
        }
    }

    #[test]
    fn problem_body_names_no_holder_or_object() {
        let r = Rejection::Held {
            remaining: Some(Duration::from_millis(100)),
        };
        let response = r.to_problem_response();
        assert_eq!(response.status(), 409);
        assert_eq!(response.headers()["retry-after"], "1");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["status"], 409);
        assert_eq!(body["title"], "Conflict");
        let text = response.body().escape_ascii().to_string();
        assert!(
            !text.contains("dimutex/") && !text.contains("owner"),
            "{text}"
        );
    }
}
