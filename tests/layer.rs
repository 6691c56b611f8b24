//! The tower layer: T9 (409, disconnects, panics, refresh, streaming, bad keys), T8 (429 →
//! 503) and T10 (round trips) of testing.md.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use dimutex::backend::{Backend, GcsBackend, MemoryBackend};
use dimutex::layer::{FromHeader, FromPathParam, LockLayer, Rejection};
use dimutex::testing::{FakeGcs, Fault};
use dimutex::{Client, HeldLock};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{ServiceBuilder, ServiceExt, service_fn};

type Req = Request<String>;

fn request(key: Option<&[u8]>) -> Req {
    let mut builder = Request::post("/work");
    if let Some(key) = key {
        builder = builder.header("x-key", http::HeaderValue::from_bytes(key).unwrap());
    }
    builder.body(String::new()).unwrap()
}

async fn ok_handler(req: Req) -> Result<Response<String>, Infallible> {
    let held = req.extensions().get::<HeldLock>().cloned();
    Ok(Response::new(match held {
        Some(h) => format!("locked {}", h.token()),
        None => "unlocked".into(),
    }))
}

async fn body_json<B: Body<Data = Bytes>>(body: B) -> serde_json::Value
where
    B::Error: std::fmt::Debug,
{
    let bytes = body.collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

async fn wait_until_empty(backend: &MemoryBackend, within: Duration) -> Duration {
    let started = Instant::now();
    while backend.object_count() != 0 {
        assert!(
            started.elapsed() < within,
            "lock still held after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn held_elsewhere_is_409_problem_json_with_retry_after() {
    let backend = MemoryBackend::new();
    let elsewhere = Client::new(backend.clone());
    let _held = elsewhere.try_acquire("job-1").await.unwrap();
    let client = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")))
        .service_fn(ok_handler);
    let before = backend.request_count();
    let response = service.oneshot(request(Some(b"job-1"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(
        backend.request_count() - before,
        2,
        "contended try = create + inspect"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=32).contains(&retry), "Retry-After {retry}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["status"], 409);
    for secret in ["dimutex/", "job-1", elsewhere.identity()] {
        assert!(
            !text.contains(secret),
            "the 409 body leaks {secret:?}: {text}"
        );
    }
}

#[tokio::test]
async fn t10_uncontended_request_costs_two_and_held_here_costs_zero() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client.clone(), FromHeader::new("x-key")).release_on_response())
        .service_fn(ok_handler);
    let before = backend.request_count();
    let response = service
        .clone()
        .oneshot(request(Some(b"job-2")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    wait_until_empty(&backend, Duration::from_secs(1)).await;
    assert_eq!(backend.request_count() - before, 2, "create + delete");

    let _held_here = client.try_acquire("job-2").await.unwrap();
    let before = backend.request_count();
    for _ in 0..50 {
        let response = service
            .clone()
            .oneshot(request(Some(b"job-2")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!(
        backend.request_count(),
        before,
        "a key held in this process costs no request"
    );
}

#[tokio::test]
async fn a_create_refused_by_the_throttle_waits_out_the_window_once() {
    use dimutex::backend::Metadata;
    let backend = MemoryBackend::new();
    backend.set_throttle(true);
    // Another process held the lock and deleted it a moment ago: the name was just mutated,
    // and this client has not met the throttle itself.
    let name = "dimutex/job-throttled";
    let created = backend
        .create(
            name,
            &Metadata::from([("owner".into(), "elsewhere".into())]),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    backend
        .release(name, created.value().version())
        .await
        .unwrap();
    let client = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client.clone(), FromHeader::new("x-key")))
        .service_fn(ok_handler);
    let before = backend.request_count();
    let started = Instant::now();
    let response = service
        .oneshot(request(Some(b"job-throttled")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the create is sent again after the window: {:?}",
        started.elapsed()
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"locked "), "{body:?}");
    wait_until_empty(&backend, Duration::from_secs(3)).await;
    assert_eq!(
        backend.request_count() - before,
        3,
        "the create refused in place (429), the one after the window, and one delete: the \
         lease is timed from the create that landed, so the delete waits out the window \
         after it and is not refused"
    );
}

#[tokio::test]
async fn a_shut_down_client_answers_503_without_a_request() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    client.shutdown(Duration::from_secs(1)).await.unwrap();
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")))
        .service_fn(ok_handler);
    let response = service.oneshot(request(Some(b"job-shut"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(backend.request_count(), 0);
}

/// Log lines written while `f` runs on this thread, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_layer_logs_each_acquisition_by_key_id_never_by_key_or_owner() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let backend = MemoryBackend::new();
    let elsewhere = Client::new(backend.clone());
    let client = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client.clone(), FromHeader::new("x-key")))
        .service_fn(ok_handler);
    // Taken in place; then held by another client (the rest of the acquisition, in a future).
    let response = service
        .clone()
        .oneshot(request(Some(b"secret-job-key")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    wait_until_empty(&backend, Duration::from_secs(1)).await;
    let held = elsewhere.try_acquire("secret-job-key").await.unwrap();
    let response = service
        .oneshot(request(Some(b"secret-job-key")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("lock for request"))
        .collect();
    assert_eq!(lines.len(), 2, "one line per acquisition: {text}");
    assert!(lines[0].contains("outcome=\"acquired\""), "{}", lines[0]);
    assert!(lines[1].contains("outcome=\"held\""), "{}", lines[1]);
    for line in &lines {
        assert!(line.contains("key_id="), "{line}");
        assert!(line.contains("elapsed_us="), "{line}");
    }
    let object = backend
        .inspect("dimutex/secret-job-key")
        .await
        .unwrap()
        .into_value()
        .expect("held elsewhere");
    let owner = object.metadata().get("owner").unwrap();
    let nonce = owner.rsplit('#').next().unwrap();
    assert_eq!(nonce.len(), 32, "{owner}");
    for secret in ["secret-job-key", nonce] {
        assert!(!text.contains(secret), "the log names {secret:?}: {text}");
    }
    drop(held);
}

#[tokio::test]
async fn bad_keys_get_400_before_any_request() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")))
        .service_fn(ok_handler);
    let long = vec![b'k'; 1025];
    let cases: Vec<(&str, Option<&[u8]>)> = vec![
        ("empty", Some(b"")),
        ("over 1024 bytes", Some(&long)),
        ("control character (tab)", Some(b"a\tb")),
        ("invalid UTF-8", Some(b"\xff\xfe")),
        ("dot segment", Some(b"..")),
        ("missing header", None),
    ];
    for (what, key) in cases {
        let response = service.clone().oneshot(request(key)).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(
            body_json(response.into_body()).await["status"],
            400,
            "{what}"
        );
    }
    // Prefix + key over 1024 bytes is refused by the client, also before any request.
    let fits_alone = vec![b'k'; 1020];
    let response = service
        .clone()
        .oneshot(request(Some(&fits_alone)))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::BAD_REQUEST,
        "prefix + key over 1024 bytes"
    );
    assert_eq!(backend.request_count(), 0);
}

#[tokio::test]
async fn no_key_means_no_lock() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key").optional()))
        .service_fn(ok_handler);
    let response = service.oneshot(request(None)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "unlocked"
    );
    assert_eq!(backend.request_count(), 0);
}

/// A body whose chunks arrive on a channel.
struct ChunkBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

#[tokio::test]
async fn a_streamed_body_keeps_the_lock_until_its_last_chunk() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let other = Client::new(backend.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")))
        .service_fn(move |_req: Req| {
            let rx = rx.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(Response::new(ChunkBody(rx))) }
        });
    let response = service.oneshot(request(Some(b"stream"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    assert!(body.holds_lock());
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    assert!(
        other.try_acquire("stream").await.unwrap_err().is_held(),
        "held while streaming"
    );
    tx.send(Bytes::from_static(b"last")).await.unwrap();
    drop(tx);
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "last"
    );
    assert!(body.holds_lock(), "the stream has not said it ended yet");
    assert!(body.frame().await.is_none());
    assert!(!body.holds_lock());
    let took = wait_until_empty(&backend, Duration::from_secs(1)).await;
    eprintln!("streamed body: released {took:?} after the end of the stream");
}

#[tokio::test]
async fn release_on_response_releases_before_the_body() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")).release_on_response())
        .service_fn(ok_handler);
    let response = service.oneshot(request(Some(b"early"))).await.unwrap();
    assert!(!response.body().holds_lock());
    wait_until_empty(&backend, Duration::from_secs(1)).await;
    assert!(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .starts_with(b"locked")
    );
}

#[tokio::test]
async fn waiting_requests_queue_instead_of_409() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (i, o) = (inside.clone(), overlaps.clone());
    let service = ServiceBuilder::new()
        .layer(
            LockLayer::new(client, FromHeader::new("x-key"))
                .wait_up_to(Duration::from_secs(5))
                .release_on_response(),
        )
        .service_fn(move |req: Req| {
            let (i, o) = (i.clone(), o.clone());
            async move {
                if i.fetch_add(1, Ordering::SeqCst) != 0 {
                    o.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
                i.fetch_sub(1, Ordering::SeqCst);
                ok_handler(req).await
            }
        });
    let calls: Vec<_> = (0..8)
        .map(|_| tokio::spawn(service.clone().oneshot(request(Some(b"queue")))))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    wait_until_empty(&backend, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_custom_rejection_hook_is_used() {
    let backend = MemoryBackend::new();
    let _held = Client::new(backend.clone())
        .try_acquire("hooked")
        .await
        .unwrap();
    let hook = |r: &Rejection| {
        let mut response = Response::new(Bytes::from_static(b"busy, come back later"));
        *response.status_mut() = r.status();
        response
    };
    let service = ServiceBuilder::new()
        .layer(
            LockLayer::new(Client::new(backend.clone()), FromHeader::new("x-key"))
                .on_rejection(hook),
        )
        .service_fn(ok_handler);
    let response = service.oneshot(request(Some(b"hooked"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "busy, come back later"
    );
}

/// A handler that holds its lock for 3×TTL keeps it through refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_lock_through_refreshes() {
    let backend = MemoryBackend::new();
    let client = Client::builder(backend.clone())
        .ttl(Duration::from_secs(2))
        .build()
        .unwrap();
    let other = Client::new(backend.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")))
        .service_fn(|req: Req| async move {
            let held = req.extensions().get::<HeldLock>().cloned().unwrap();
            tokio::time::sleep(Duration::from_secs(6)).await;
            Ok::<_, Infallible>(Response::new(format!("healthy={}", held.is_healthy())))
        });
    let call = tokio::spawn(service.oneshot(request(Some(b"long"))));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(other.try_acquire("long").await.unwrap_err().is_held());
    }
    let response = call.await.unwrap().unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "healthy=true"
    );
    wait_until_empty(&backend, Duration::from_secs(1)).await;
}

/// Serves `router` on 127.0.0.1:0.
async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

fn app(client: Client, entered: Arc<tokio::sync::Notify>) -> Router {
    Router::new()
        .route(
            "/hang/{id}",
            post(move || {
                let entered = entered.clone();
                async move {
                    entered.notify_one();
                    std::future::pending::<()>().await;
                }
            }),
        )
        .route(
            "/panic/{id}",
            post(|| async {
                if std::hint::black_box(true) {
                    panic!("handler panicked on purpose");
                }
                "unreachable"
            }),
        )
        .route_layer(LockLayer::new(client, FromPathParam::new("id")))
        .route("/healthz", get(|| async { "ok" }))
}

/// T9: a client that disconnects mid-handler releases the lock within 1 s, 50 times of 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_releases_within_a_second() {
    let backend = MemoryBackend::new();
    let entered = Arc::new(tokio::sync::Notify::new());
    let addr = serve(app(Client::new(backend.clone()), entered.clone())).await;
    let mut worst = Duration::ZERO;
    for round in 0..50 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("POST /hang/job-{round} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), entered.notified())
            .await
            .expect("handler entered");
        assert_eq!(backend.object_count(), 1);
        drop(stream);
        worst = worst.max(wait_until_empty(&backend, Duration::from_secs(1)).await);
    }
    eprintln!("client disconnect: 50/50 released, slowest {worst:?}");
}

/// T9: a panicking handler releases the lock, 50 times of 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_releases() {
    // Keep the 50 deliberate panics out of the test output; others still print.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let deliberate = info
            .payload()
            .downcast_ref::<&str>()
            .is_some_and(|m| m.contains("on purpose"));
        if !deliberate {
            default_hook(info);
        }
    }));
    let backend = MemoryBackend::new();
    let addr = serve(app(
        Client::new(backend.clone()),
        Arc::new(tokio::sync::Notify::new()),
    ))
    .await;
    let mut worst = Duration::ZERO;
    for round in 0..50 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("POST /panic/job-{round} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        worst = worst.max(wait_until_empty(&backend, Duration::from_secs(1)).await);
    }
    eprintln!("handler panic: 50/50 released, slowest {worst:?}");
}

async fn gcs_client(fake: &FakeGcs, retry_ms: u64) -> Client {
    let backend = GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap();
    Client::builder(backend)
        .retry(dimutex::RetryPolicy::new(
            dimutex::Backoff::new(Duration::from_millis(20), Duration::from_millis(100), 2.0)
                .unwrap(),
            Duration::from_millis(retry_ms),
        ))
        .build()
        .unwrap()
}

/// T8: with the throttle on, a backend 429 becomes 503 + Retry-After: never 409, never 200
/// without the lock.
#[tokio::test]
async fn t8_throttled_backend_is_503_not_409() {
    let fake = FakeGcs::start().await.unwrap();
    fake.set_throttle(true);
    let client = gcs_client(&fake, 300).await;
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")).release_on_response())
        .service_fn(move |req: Req| {
            r.fetch_add(1, Ordering::SeqCst);
            assert!(
                req.extensions().get::<HeldLock>().is_some(),
                "ran without the lock"
            );
            ok_handler(req)
        });
    // Mutate the lock object's name just now, so the next create is within the 1 s window.
    let raw = GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap();
    let name = "dimutex/throttled";
    let state = raw
        .create(name, &Default::default())
        .await
        .unwrap()
        .into_value();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    raw.release(name, state.version()).await.unwrap();
    let response = service
        .clone()
        .oneshot(request(Some(b"throttled")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler did not run");
    assert!(
        fake.requests().iter().any(|r| r.status() == Some(429)),
        "the throttle fired"
    );
    // A second later the same request gets the lock.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = service.oneshot(request(Some(b"throttled"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

/// T8, hammered: 8 callers on one key for 4 s with the throttle on. Every answer is 200 with
/// the lock held by nobody else, 409, or 503 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8_hammering_one_key_under_the_throttle() {
    let fake = Arc::new(FakeGcs::start().await.unwrap());
    fake.set_throttle(true);
    let client = gcs_client(&fake, 300).await;
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (i, o) = (inside.clone(), overlaps.clone());
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")).release_on_response())
        .service_fn(move |req: Req| {
            let (i, o) = (i.clone(), o.clone());
            async move {
                assert!(req.extensions().get::<HeldLock>().is_some());
                if i.fetch_add(1, Ordering::SeqCst) != 0 {
                    o.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                i.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        });
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let until = Instant::now() + Duration::from_secs(4);
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let service = service.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                while Instant::now() < until {
                    let response = service
                        .clone()
                        .oneshot(request(Some(b"hot")))
                        .await
                        .unwrap();
                    let slot = match response.status() {
                        StatusCode::OK => 0,
                        StatusCode::CONFLICT => 1,
                        StatusCode::SERVICE_UNAVAILABLE => {
                            assert!(response.headers().contains_key("retry-after"));
                            2
                        }
                        other => panic!("unexpected status {other}"),
                    };
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    let [ok, held, unavailable] = [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed));
    let throttled = fake
        .requests()
        .iter()
        .filter(|r| r.status() == Some(429))
        .count();
    eprintln!(
        "T8 hammer: {ok} x 200, {held} x 409, {unavailable} x 503; backend 429s: {throttled}"
    );
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    assert!(ok >= 2, "the lock changed hands at least twice in 4 s");
    assert!(
        throttled > 0 && unavailable > 0,
        "the throttle fired and surfaced as 503"
    );
}

/// A backend that is down: 503 by default (fail closed), the handler without the lock with
/// `fail_open(true)`.
#[tokio::test]
async fn down_backend_fails_closed_unless_told_otherwise() {
    let fake = FakeGcs::start().await.unwrap();
    fake.set_fault_rate(1.0, vec![Fault::FailBefore(503)], 1);
    let client = gcs_client(&fake, 200).await;
    let closed = ServiceBuilder::new()
        .layer(LockLayer::new(client.clone(), FromHeader::new("x-key")))
        .service_fn(ok_handler);
    let response = closed.oneshot(request(Some(b"down"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let open = ServiceBuilder::new()
        .layer(LockLayer::new(client, FromHeader::new("x-key")).fail_open(true))
        .service_fn(ok_handler);
    let response = open.oneshot(request(Some(b"down"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "unlocked"
    );
}

/// The service keeps working behind tower's readiness contract (`poll_ready` then `call`).
#[tokio::test]
async fn poll_ready_is_delegated() {
    let backend = MemoryBackend::new();
    let inner = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(service_fn(ok_handler));
    let layer = LockLayer::new(Client::new(backend.clone()), FromHeader::new("x-key"))
        .release_on_response();
    let mut service = tower::Layer::layer(&layer, inner);
    let client = Client::new(backend.clone());
    let _held = client.try_acquire("held").await.unwrap();
    // Requests the layer answers itself (a bad key: 400; a key held elsewhere: 409) between
    // served ones: the permit the limit reserved is neither lost nor held forever, so every
    // `ready` comes back (a leaked permit would hang it here).
    let keys: [&[u8]; 5] = [b"k0", b"bad\xffkey", b"k1", b"held", b"k2"];
    for key in keys {
        let status = tokio::time::timeout(Duration::from_secs(5), async {
            let ready = service.ready().await.unwrap();
            let response = tower::Service::call(ready, request(Some(key)))
                .await
                .unwrap();
            response.status()
        })
        .await
        .expect("ready and answered");
        let expected = match key {
            b"bad\xffkey" => StatusCode::BAD_REQUEST,
            b"held" => StatusCode::CONFLICT,
            _ => StatusCode::OK,
        };
        assert_eq!(status, expected, "{}", String::from_utf8_lossy(key));
    }
}

/// `wait_up_to(Duration::MAX)` ("wait as long as it takes") does not panic on a request.
#[tokio::test(flavor = "current_thread")]
async fn an_unbounded_wait_does_not_panic() {
    use tower::ServiceExt;
    let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    let app = axum::Router::new()
        .route("/jobs/{id}", axum::routing::post(|| async { "ran" }))
        .route_layer(
            dimutex::layer::LockLayer::new(
                client.clone(),
                dimutex::layer::FromPathParam::new("id"),
            )
            .wait_up_to(std::time::Duration::MAX),
        );
    let request = http::Request::post("/jobs/a")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
}
