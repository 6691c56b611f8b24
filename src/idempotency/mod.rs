//! Tower middleware that runs each request with an idempotency key once, and answers its
//! duplicates with the stored response.
//!
//! [`IdempotencyLayer`] keys each request (by default the `Idempotency-Key` header, scoped by
//! method and route, and by a scope of your choice) and takes the key's lock before the
//! handler runs. When the handler's response is one to keep, **the lock becomes the record**:
//! one write, conditional on the lock's generation and metageneration, replaces the lock
//! object with the stored response. A record is a lock whose ttl is the retention: it answers
//! duplicates until it is older than that (by the server's clock), and is then taken over like
//! an expired lock.
//!
//! | request | response |
//! |---|---|
//! | first with its key | the handler's, with [`HeldLock`](crate::HeldLock) in the request extensions; stored if 2xx/4xx (not 408, 409, 425, 429) |
//! | duplicate while the first runs | **409** `application/problem+json` with `Retry-After` (or, with [`IdempotencyLayer::wait_up_to`], the replay once it is stored) |
//! | duplicate after it completed | the stored status, headers and body, with `Idempotent-Replayed: true`; the handler does not run |
//! | same key, another request (method, path, query, body, chosen headers) | **422** `application/problem+json` |
//! | no key | **400**, or the handler's response unstored with an optional extractor |
//! | request body over the cap | **413** |
//! | lock backend throttled or unreachable | **503** with `Retry-After` |
//!
//! What is run and what is stored:
//! - **At most one at a time, exactly one stored answer, at least once.** A handler that
//!   panics, a client that goes away, a response not to be stored (5xx, 429, over the body
//!   cap; its lock is held until its body has been sent) or a lease lost before the record is
//!   written leave no record: the key is free again, and a retry runs the handler again. "One
//!   at a time" is the lock's lease: a handler still running after its lease was lost (the
//!   backend unreachable for a whole ttl) may overlap the next; long handlers watch
//!   [`HeldLock::lost`](crate::HeldLock::lost) and pass the fencing token on.
//! - **The answer comes after the record.** A stored response is sent once its record is
//!   written, so a retry after it gets the replay. If the write fails (the backend refusing,
//!   or unreachable for the retry policy's budget), the response is still sent, a warning is
//!   logged, and the lock is released: a retry runs again, or, if the write landed after all,
//!   gets the record.
//! - **Cost.** The first request costs a lock cycle's two mutations (create, then the record
//!   write instead of the delete). A replay changes nothing in the bucket: the create is
//!   refused (412) and one read returns the record, with its response when that is small
//!   (headers and base64 body up to 3 KiB each ride in the object's metadata); a larger one
//!   is the object's contents, one read more.
//! - Replays are byte for byte the first response's status, body and headers, except
//!   `Set-Cookie`, `Date`, hop-by-hop headers and values that are not UTF-8. Put compression
//!   outside this layer, or the encoding the first client asked for is replayed to all.
//! - Records stay in the bucket after their retention until a later request takes them
//!   over; a bucket lifecycle rule (delete objects older than N days under the client's
//!   prefix + `idempotency/`) cleans them up.
//!
//! The layer buffers request bodies (for the fingerprint) and hands the inner service one
//! rebuilt from the bytes: request bodies are any `http_body::Body` that is `From<Bytes>`
//! (axum's `Body`, `http_body_util::Full<Bytes>`); response bodies any `Body<Data = Bytes>`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use dimutex::{Client, backend::MemoryBackend, idempotency::IdempotencyLayer};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let runs = Arc::new(AtomicUsize::new(0));
//! let service = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(Client::new(MemoryBackend::new())))
//!     .service_fn({
//!         let runs = runs.clone();
//!         move |_req: Request<Full<Bytes>>| {
//!             let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
//!             async move { Ok::<_, std::convert::Infallible>(Response::new(format!("run {n}"))) }
//!         }
//!     });
//! let post = || Request::post("/jobs/report/run").header("idempotency-key", "k-1").body(Full::default()).unwrap();
//! let first = service.clone().oneshot(post()).await.unwrap();
//! assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "run 1");
//! let again = service.oneshot(post()).await.unwrap();
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), "run 1");
//! assert_eq!(runs.load(Ordering::SeqCst), 1);
//! # }
//! ```

mod body;
mod fingerprint;
mod future;
#[allow(clippy::module_inception)]
mod layer;
mod record;
mod service;
mod settings;

pub use body::IdempotentBody;
pub use future::ResponseFuture;
pub use layer::IdempotencyLayer;
pub use service::IdempotencyService;
