//! Lock keys from a JSON body field, for `LockLayer` and `IdempotencyLayer` alike.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dimutex::backend::MemoryBackend;
use dimutex::idempotency::IdempotencyLayer;
use dimutex::json_key::{BodyKey, JsonKeyLayer};
use dimutex::layer::{FromExtension, LockLayer};
use dimutex::{Client, HeldLock};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<Bytes>, Infallible>;

/// A handler that holds for 300 ms and answers the lock's key and the body it got.
fn handler() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ Sync {
    tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let key = req
            .extensions()
            .get::<HeldLock>()
            .map(|l| l.key().as_str().to_owned())
            .unwrap_or_else(|| "no lock".to_owned());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let text = format!("{key} {}", String::from_utf8_lossy(&body));
        Ok(Response::new(Full::new(Bytes::from(text))))
    })
}

async fn send(service: &Svc, body: &str) -> Response<Bytes> {
    let request = Request::post("/hook")
        .header("x-delivery-id", format!("d-{}", rand::random::<u32>()))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    service.clone().oneshot(request).await.unwrap()
}

macro_rules! boxed {
    ($svc:expr) => {
        BoxCloneSyncService::new($svc.map_future(|f| async move {
            let response = f.await?;
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(Response::from_parts(parts, bytes))
        }))
    };
}

fn locked_per_customer(backend: &MemoryBackend, optional: bool) -> Svc {
    let mut json = JsonKeyLayer::new("/data/object/customer");
    let mut by_customer = FromExtension::<BodyKey>::new();
    if optional {
        json = json.optional();
        by_customer = by_customer.optional();
    }
    let service = ServiceBuilder::new()
        .layer(json)
        .layer(LockLayer::new(Client::new(backend.clone()), by_customer))
        .service(handler());
    boxed!(service)
}

fn event(customer: &str) -> String {
    format!(r#"{{"type":"invoice.paid","data":{{"object":{{"customer":"{customer}"}}}}}}"#)
}

#[tokio::test]
async fn deliveries_for_one_customer_are_serialized_and_two_customers_run_at_once() {
    let backend = MemoryBackend::new();
    let service = locked_per_customer(&backend, false);
    let e1 = event("cus_1");
    let (a, b) = tokio::join!(send(&service, &e1), send(&service, &e1));
    let mut statuses = [a.status(), b.status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
    let ok = if a.status() == StatusCode::OK { a } else { b };
    assert!(
        ok.body().starts_with(b"cus_1 {"),
        "keyed by the customer, body intact: {:?}",
        ok.body()
    );
    assert!(ok.body().ends_with(event("cus_1").as_bytes()));

    let started = Instant::now();
    let (e2, e3) = (event("cus_2"), event("cus_3"));
    let (a, b) = tokio::join!(send(&service, &e2), send(&service, &e3));
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    assert!(
        started.elapsed() < Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_body_without_the_field_is_400_or_runs_unlocked_when_optional() {
    let backend = MemoryBackend::new();
    let strict = locked_per_customer(&backend, false);
    for body in [
        "not json",
        r#"{"data":{}}"#,
        r#"{"data":{"object":{"customer":[1]}}}"#,
    ] {
        let r = send(&strict, body).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let loose = locked_per_customer(&backend, true);
    let r = send(&loose, "not json").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.body()[..], b"no lock not json");
}

#[tokio::test]
async fn a_body_over_the_cap_is_413() {
    let backend = MemoryBackend::new();
    let service = ServiceBuilder::new()
        .layer(JsonKeyLayer::new("/id").max_body(64))
        .layer(LockLayer::new(
            Client::new(backend),
            FromExtension::<BodyKey>::new(),
        ))
        .service(handler());
    let service = boxed!(service);
    let r = send(&service, &format!(r#"{{"id":"{}"}}"#, "x".repeat(64))).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn the_idempotency_layer_takes_its_key_from_the_body_too() {
    let backend = MemoryBackend::new();
    let service = ServiceBuilder::new()
        .layer(JsonKeyLayer::new("/id"))
        .layer(IdempotencyLayer::with_key(
            Client::new(backend.clone()),
            FromExtension::<BodyKey>::new(),
        ))
        .service(handler());
    let service = boxed!(service);
    let first = send(&service, r#"{"id":"evt_1"}"#).await;
    let again = send(&service, r#"{"id":"evt_1"}"#).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.body(), first.body());
    let other = send(&service, r#"{"id":"evt_2"}"#).await;
    assert!(other.headers().get("idempotent-replayed").is_none());
}
