//! Tower middleware that takes a lock key from a field of a JSON request body.
//!
//! Webhooks carry the resource they concern in their payload (Stripe's
//! `/data/object/customer`, GitHub's `/repository/full_name`); serializing their handlers per
//! resource needs a key from the body. [`JsonKeyLayer`] buffers the body (up to a cap), reads
//! the field at a JSON pointer, puts it in the request extensions as a [`BodyKey`], and hands
//! the inner service the same bytes. Put it outside [`LockLayer`](crate::layer::LockLayer) or
//! [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) and key those with
//! [`FromExtension::<BodyKey>`](crate::layer::FromExtension).
//!
//! | request | response |
//! |---|---|
//! | the field is a string or an integer | the inner service's, with [`BodyKey`] in the extensions |
//! | not JSON, or no such field | **400** `application/problem+json`; or, with [`JsonKeyLayer::optional`], the inner service's without a `BodyKey` |
//! | body over the cap (default 1 MiB) | **413** |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use bytes::Bytes;
//! use dimutex::{Client, backend::MemoryBackend, json_key::{BodyKey, JsonKeyLayer}};
//! use dimutex::layer::{FromExtension, LockLayer};
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let service = ServiceBuilder::new()
//!     .layer(JsonKeyLayer::new("/data/object/customer"))
//!     .layer(LockLayer::new(Client::new(MemoryBackend::new()), FromExtension::<BodyKey>::new()))
//!     .service_fn(|req: Request<Full<Bytes>>| async move {
//!         let lock = req.extensions().get::<dimutex::HeldLock>().unwrap();
//!         Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(lock.key().as_str().to_owned()))))
//!     });
//! let body = r#"{"type":"invoice.paid","data":{"object":{"customer":"cus_42"}}}"#;
//! let response = service.oneshot(Request::post("/hook").body(Full::from(body)).unwrap()).await.unwrap();
//! assert_eq!(response.status(), 200);
//! # }
//! ```

mod layer;
mod service;

pub use layer::JsonKeyLayer;
pub use service::{BodyKey, JsonKeyService, ResponseFuture};
