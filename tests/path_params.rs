//! `FromPathParam` under `Router::nest` (issue 16, hole 4): the key is the parameter the
//! handler's `Path` sees, however deeply the router is nested.

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::routing::post;
use dimutex::backend::MemoryBackend;
use dimutex::layer::{FromPathParam, LockLayer};
use dimutex::{Client, HeldLock};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn key_of(Extension(held): Extension<HeldLock>) -> String {
    held.key().as_str().to_owned()
}

fn jobs(client: &Client, route: &str, param: &'static str) -> Router {
    Router::new()
        .route(route, post(key_of))
        .route_layer(LockLayer::new(client.clone(), FromPathParam::new(param)))
}

async fn call(app: Router, path: &str) -> (StatusCode, String) {
    let request = Request::post(path).body(Body::empty()).unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn flat() {
    let client = Client::new(MemoryBackend::new());
    let app = jobs(&client, "/jobs/{id}/run", "id");
    assert_eq!(
        call(app, "/jobs/abc/run").await,
        (StatusCode::OK, "abc".into())
    );
}

#[tokio::test]
async fn nested_once() {
    let client = Client::new(MemoryBackend::new());
    let app = Router::new().nest("/api", jobs(&client, "/jobs/{id}/run", "id"));
    assert_eq!(
        call(app, "/api/jobs/abc/run").await,
        (StatusCode::OK, "abc".into())
    );
}

#[tokio::test]
async fn nested_twice() {
    let client = Client::new(MemoryBackend::new());
    let inner = Router::new().nest("/api", jobs(&client, "/jobs/{id}/run", "id"));
    let app = Router::new().nest("/v1", inner);
    assert_eq!(
        call(app, "/v1/api/jobs/x%20y/run").await,
        (StatusCode::OK, "x y".into())
    );
}

#[tokio::test]
async fn nested_under_a_parameter_of_the_outer_router() {
    let client = Client::new(MemoryBackend::new());
    let app = Router::new().nest("/tenants/{tenant}", jobs(&client, "/jobs/{id}", "id"));
    assert_eq!(
        call(app.clone(), "/tenants/t1/jobs/j9").await,
        (StatusCode::OK, "j9".into())
    );
    let by_tenant = Router::new().nest("/tenants/{tenant}", jobs(&client, "/jobs/{id}", "tenant"));
    assert_eq!(
        call(by_tenant, "/tenants/t1/jobs/j9").await,
        (StatusCode::OK, "t1".into())
    );
}

#[tokio::test]
async fn wildcard_under_nest() {
    let client = Client::new(MemoryBackend::new());
    let app = Router::new().nest("/files", jobs(&client, "/lock/{*path}", "path"));
    assert_eq!(
        call(app, "/files/lock/a/b/c.txt").await,
        (StatusCode::OK, "a/b/c.txt".into())
    );
}

#[tokio::test]
async fn a_missing_parameter_is_a_400_before_any_request() {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let app = Router::new().nest("/api", jobs(&client, "/jobs/{id}/run", "nope"));
    let (status, body) = call(app, "/api/jobs/abc/run").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(backend.request_count(), 0);
}
