//! The idempotency layer on the in-memory backend: what runs, what is stored, what is replayed.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dimutex::backend::{Backend, BackendError, BoxFuture, MemoryBackend, Metadata, ObjectState};
use dimutex::backend::{Reply, Version};
use dimutex::idempotency::IdempotencyLayer;
use dimutex::{Client, HeldLock};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<Bytes>, Infallible>;

/// A handler that counts its runs and answers `status` with a body naming the run, a
/// replayable header, a cookie, and `size` extra bytes; it takes `delay`.
#[derive(Clone)]
struct Handler {
    runs: Arc<AtomicUsize>,
    status: StatusCode,
    size: usize,
    delay: Duration,
}

impl Handler {
    fn new() -> Self {
        Self {
            runs: Arc::new(AtomicUsize::new(0)),
            status: StatusCode::CREATED,
            size: 0,
            delay: Duration::ZERO,
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// The layer's service over this handler, its bodies collected.
    fn under(&self, layer: IdempotencyLayer) -> Svc {
        let handler = self.clone();
        let inner = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let h = handler.clone();
            async move {
                let n = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(
                    req.extensions().get::<HeldLock>().is_some(),
                    "the lock is in the extensions"
                );
                tokio::time::sleep(h.delay).await;
                let got = req.into_body().collect().await.unwrap().to_bytes();
                let mut body = format!("run {n} of {}", String::from_utf8_lossy(&got));
                body.push_str(&"x".repeat(h.size));
                let response = Response::builder()
                    .status(h.status)
                    .header("content-type", "text/plain")
                    .header("x-run", n.to_string())
                    .header("set-cookie", format!("session={n}"))
                    .body(body)
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        let service = layer.layer(inner).map_future(|f| async move {
            let response = f.await?;
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(Response::from_parts(parts, bytes))
        });
        BoxCloneSyncService::new(service)
    }
}

fn post(key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post("/jobs/nightly-report/run");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

async fn send(service: &Svc, request: Request<Full<Bytes>>) -> Response<Bytes> {
    service.clone().oneshot(request).await.unwrap()
}

/// Waits (up to a second) for the backend to hold `n` objects: a lock released as its body
/// ended is deleted by the lease driver in the background.
async fn until_objects(backend: &MemoryBackend, n: usize) {
    for _ in 0..100 {
        if backend.object_count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} objects, not {n}", backend.object_count());
}

fn layer(backend: &MemoryBackend) -> IdempotencyLayer {
    IdempotencyLayer::new(Client::new(backend.clone()))
}

#[tokio::test]
async fn a_duplicate_after_completion_gets_the_stored_response_byte_for_byte() {
    for size in [0, 64 * 1024] {
        let backend = MemoryBackend::new();
        let handler = Handler {
            size,
            ..Handler::new()
        };
        let service = handler.under(layer(&backend));
        let first = send(&service, post(Some("k-1"), "payload")).await;
        assert_eq!(first.status(), StatusCode::CREATED);
        assert!(first.headers().get("idempotent-replayed").is_none());
        for _ in 0..3 {
            let again = send(&service, post(Some("k-1"), "payload")).await;
            assert_eq!(again.status(), StatusCode::CREATED);
            assert_eq!(again.body(), first.body(), "body of {size} extra bytes");
            assert_eq!(again.headers()["idempotent-replayed"], "true");
            assert_eq!(again.headers()["x-run"], "1");
            assert_eq!(again.headers()["content-type"], "text/plain");
            assert!(
                again.headers().get("set-cookie").is_none(),
                "never replayed"
            );
        }
        assert_eq!(handler.runs(), 1);
        assert_eq!(
            backend.object_count(),
            1,
            "the record, and no lock beside it"
        );
    }
}

#[tokio::test]
async fn a_replay_costs_two_requests_and_no_mutation() {
    let backend = MemoryBackend::new();
    let handler = Handler::new();
    let service = handler.under(layer(&backend));
    send(&service, post(Some("k"), "")).await;
    let before = backend.request_count();
    send(&service, post(Some("k"), "")).await;
    assert_eq!(
        backend.request_count() - before,
        2,
        "a refused create, one read"
    );
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422_and_other_keys_run() {
    let backend = MemoryBackend::new();
    let handler = Handler::new();
    let service = handler.under(layer(&backend));
    send(&service, post(Some("k"), "a")).await;
    let other = send(&service, post(Some("k"), "b")).await;
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    let text = String::from_utf8_lossy(other.body()).to_string();
    assert!(!text.contains("run 1") && !text.contains("\"k\""), "{text}");
    assert_eq!(
        send(&service, post(Some("k2"), "b")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(handler.runs(), 2);
    // Without a fingerprint, the stored answer whatever the body.
    let loose = handler.under(layer(&backend).without_fingerprint());
    let replay = send(&loose, post(Some("k3"), "a")).await;
    let again = send(&loose, post(Some("k3"), "b")).await;
    assert_eq!(again.body(), replay.body());
}

#[tokio::test]
async fn a_missing_key_is_400_or_passes_through_when_optional() {
    let backend = MemoryBackend::new();
    let handler = Handler::new();
    let service = handler.under(layer(&backend));
    assert_eq!(
        send(&service, post(None, "")).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(handler.runs(), 0);
    let optional = IdempotencyLayer::with_key(
        Client::new(backend.clone()),
        dimutex::layer::FromHeader::new("idempotency-key").optional(),
    );
    let service = {
        let h = handler.clone();
        let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let n = h.runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Infallible>(Response::new(format!("run {n}"))) }
        });
        optional.layer(inner)
    };
    for _ in 0..2 {
        let r = service.clone().oneshot(post(None, "")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(handler.runs(), 2, "no key, no record");
    assert_eq!(backend.object_count(), 0);
}

#[tokio::test]
async fn a_5xx_is_not_stored_and_the_retry_runs_again() {
    let backend = MemoryBackend::new();
    let handler = Handler {
        status: StatusCode::SERVICE_UNAVAILABLE,
        ..Handler::new()
    };
    let service = handler.under(layer(&backend));
    for n in 1..=2 {
        let r = send(&service, post(Some("k"), "")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["x-run"], n.to_string().as_str());
        until_objects(&backend, 0).await;
    }
    assert_eq!(handler.runs(), 2);
    assert_eq!(backend.object_count(), 0, "released, not stored");
    // A predicate decides otherwise.
    let stored = handler.under(layer(&backend).store_if(|_| true));
    send(&stored, post(Some("k5"), "")).await;
    let again = send(&stored, post(Some("k5"), "")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn a_record_past_its_retention_runs_again() {
    let backend = MemoryBackend::new();
    let handler = Handler::new();
    let service = handler.under(layer(&backend).retention(Duration::from_secs(3600)));
    send(&service, post(Some("k"), "")).await;
    backend.set_clock_offset_ms(3_590_000);
    let inside = send(&service, post(Some("k"), "")).await;
    assert_eq!(inside.headers()["idempotent-replayed"], "true");
    backend.set_clock_offset_ms(3_602_000);
    let after = send(&service, post(Some("k"), "")).await;
    assert!(after.headers().get("idempotent-replayed").is_none());
    assert_eq!(after.headers()["x-run"], "2");
    assert_eq!(handler.runs(), 2);
}

#[tokio::test]
async fn bodies_over_the_caps_are_413_or_sent_unstored() {
    let backend = MemoryBackend::new();
    let handler = Handler {
        size: 2000,
        ..Handler::new()
    };
    let service = handler.under(
        layer(&backend)
            .max_request_body(100)
            .max_response_body(1000),
    );
    let big = "y".repeat(101);
    assert_eq!(
        send(&service, post(Some("k"), &big)).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(handler.runs(), 0);
    for n in 1..=2 {
        let r = send(&service, post(Some("k"), "small")).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(
            r.body().len(),
            format!("run {n} of small").len() + 2000,
            "sent whole"
        );
        until_objects(&backend, 0).await;
    }
    assert_eq!(handler.runs(), 2, "not stored: the retry ran again");
    assert_eq!(backend.object_count(), 0);
}

#[tokio::test]
async fn fifty_concurrent_duplicates_run_the_handler_once() {
    for wait in [false, true] {
        let backend = MemoryBackend::new();
        let handler = Handler {
            delay: Duration::from_millis(200),
            ..Handler::new()
        };
        let mut l = layer(&backend);
        if wait {
            l = l.wait_up_to(Duration::from_secs(10));
        }
        let service = handler.under(l);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let service = service.clone();
                tokio::spawn(async move { send(&service, post(Some("k"), "same")).await })
            })
            .collect();
        let mut statuses = Vec::new();
        let mut bodies = Vec::new();
        for t in tasks {
            let r = t.await.unwrap();
            statuses.push(r.status());
            if r.status() == StatusCode::CREATED {
                bodies.push(r.body().clone());
            }
        }
        assert_eq!(handler.runs(), 1, "wait: {wait}");
        if wait {
            assert_eq!(
                bodies.len(),
                50,
                "every duplicate got the replay: {statuses:?}"
            );
            assert!(bodies.iter().all(|b| b == &bodies[0]));
        } else {
            let conflicts = statuses
                .iter()
                .filter(|s| **s == StatusCode::CONFLICT)
                .count();
            assert_eq!((bodies.len(), conflicts), (1, 49), "{statuses:?}");
        }
    }
}

#[tokio::test]
async fn a_client_that_goes_away_leaves_no_record_and_the_retry_runs() {
    let backend = MemoryBackend::new();
    let handler = Handler {
        delay: Duration::from_millis(300),
        ..Handler::new()
    };
    let service = handler.under(layer(&backend));
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        send(&service, post(Some("k"), "")),
    )
    .await;
    assert!(gone.is_err());
    // The dropped guard is released in the background.
    for _ in 0..100 {
        if backend.object_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handler = Handler::new();
    let service = handler.under(layer(&backend));
    let r = send(&service, post(Some("k"), "")).await;
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(handler.runs(), 1);
}

/// A memory backend whose record writes fail.
#[derive(Debug, Clone)]
struct NoRecords(MemoryBackend);

type Written<'a> = BoxFuture<'a, Result<Reply<ObjectState>, BackendError>>;

impl Backend for NoRecords {
    fn create<'a>(&'a self, name: &'a str, md: &'a Metadata) -> Written<'a> {
        self.0.create(name, md)
    }
    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        self.0.inspect(name)
    }
    fn takeover<'a>(&'a self, name: &'a str, v: Version, md: &'a Metadata) -> Written<'a> {
        self.0.takeover(name, v, md)
    }
    fn refresh<'a>(&'a self, name: &'a str, v: Version, md: &'a Metadata) -> Written<'a> {
        self.0.refresh(name, v, md)
    }
    fn release<'a>(
        &'a self,
        name: &'a str,
        v: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        self.0.release(name, v)
    }
    // `record` is left to the trait's default, which refuses.
}

#[tokio::test]
async fn a_failed_record_write_still_answers_and_the_retry_runs_again() {
    let backend = MemoryBackend::new();
    let handler = Handler::new();
    let client = Client::new(NoRecords(backend.clone()));
    let service = handler.under(IdempotencyLayer::new(client));
    for n in 1..=2 {
        let r = send(&service, post(Some("k"), "")).await;
        assert_eq!(r.status(), StatusCode::CREATED, "the handler's response");
        assert_eq!(r.headers()["x-run"], n.to_string().as_str());
        for _ in 0..100 {
            if backend.object_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            backend.object_count(),
            0,
            "the lock released, nothing stored"
        );
    }
    assert_eq!(handler.runs(), 2);
}

#[tokio::test]
async fn a_handler_that_panics_leaves_no_record() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async move {
        panic!("the handler failed");
        #[allow(unreachable_code)]
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let service = IdempotencyLayer::new(client.clone()).layer(inner);
    let task = tokio::spawn(service.oneshot(post(Some("k"), "")));
    assert!(task.await.unwrap_err().is_panic());
    for _ in 0..100 {
        if backend.object_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(backend.object_count(), 0, "released");
    let handler = Handler::new();
    let r = send(
        &handler.under(IdempotencyLayer::new(client)),
        post(Some("k"), ""),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn an_unstored_response_holds_the_lock_until_its_body_has_been_sent() {
    let backend = MemoryBackend::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let inner = {
        let runs = runs.clone();
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut response = Response::new(Full::new(Bytes::from("unavailable")));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                Ok::<_, Infallible>(response)
            }
        })
    };
    let service = layer(&backend).layer(inner);
    let first = service.clone().oneshot(post(Some("k"), "")).await.unwrap();
    // The body not read yet: a duplicate finds the lock held.
    let duplicate = service.clone().oneshot(post(Some("k"), "")).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    drop(duplicate);
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "unavailable"
    );
    until_objects(&backend, 0).await;
    let retry = service.oneshot(post(Some("k"), "")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
