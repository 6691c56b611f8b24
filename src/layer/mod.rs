//! Tower middleware that runs each request under a distributed lock named from the request.
//!
//! [`LockLayer`] derives a [`LockKey`](crate::LockKey) from each request with a
//! [`KeyExtractor`], takes the lock before the inner service runs, and releases it after the
//! response: by default when the response body has been sent (the guard rides in the
//! [`LockBody`]), or as soon as the inner service answers with
//! [`LockLayer::release_on_response`]. A request whose future is dropped (the client went away)
//! or whose handler panics releases too.
//!
//! | outcome | response |
//! |---|---|
//! | lock taken | the inner service's, with [`HeldLock`](crate::HeldLock) in the request extensions |
//! | no key (`Ok(None)`) | the inner service's, no lock |
//! | held elsewhere | **409** `application/problem+json`, `Retry-After` when the lease's end is known |
//! | backend throttled or unreachable | **503** with `Retry-After` (or the inner service, with [`LockLayer::fail_open`]) |
//! | bad key | **400** `application/problem+json`, before any backend request |
//!
//! Every outcome is an `Ok(Response)`: the service keeps the inner service's error type.
//! Rejections are rendered by an [`OnRejection`] hook, [`ProblemJson`] by default.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use dimutex::{Client, backend::MemoryBackend, layer::{FromHeader, LockLayer}};
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let client = Client::new(MemoryBackend::new());
//! let service = ServiceBuilder::new()
//!     .layer(LockLayer::new(client, FromHeader::new("x-delivery-id")))
//!     .service_fn(|_req: Request<String>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(String::from("processed")))
//!     });
//! let request = Request::builder().header("x-delivery-id", "d-1").body(String::new()).unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::OK);
//! # }
//! ```

mod body;
mod future;
mod key;
#[allow(clippy::module_inception)]
mod layer;
mod rejection;
mod service;
mod settings;

pub use body::LockBody;
pub use future::ResponseFuture;
#[cfg(feature = "axum")]
pub use key::FromPathParam;
pub use key::{FromExtension, FromHeader, KeyExtractor, KeyRejection};
pub use layer::LockLayer;
pub use rejection::{OnRejection, ProblemJson, Rejection};
pub use service::LockService;
