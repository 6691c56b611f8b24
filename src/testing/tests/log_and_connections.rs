//! The request log (what it records, its bound) and connections: keep-alive, the body limit,
//! stopping the server.

use std::time::Duration;

use http::Method;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Api, FakeGcs};

#[tokio::test]
async fn request_log_counts_and_clears() {
    let api = Api::new().await;
    api.create("a/b", "&ifGenerationMatch=0", json!({})).await;
    api.get("a/b").await;
    api.get("missing").await;
    api.delete("a/b", "?ifGenerationMatch=1").await;
    assert_eq!(api.fake.request_count(), 4);
    let log = api.fake.requests();
    let summary: Vec<_> = log
        .iter()
        .map(|r| {
            (
                r.method().clone(),
                r.object().map(str::to_owned),
                r.status(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (Method::POST, Some("a/b".into()), Some(200)),
            (Method::GET, Some("a/b".into()), Some(200)),
            (Method::GET, Some("missing".into()), Some(404)),
            (Method::DELETE, Some("a/b".into()), Some(412)),
        ]
    );
    assert_eq!(
        log[0].query_param("ifGenerationMatch").as_deref(),
        Some("0")
    );
    assert_eq!(
        log[0].query_param("uploadType").as_deref(),
        Some("multipart")
    );
    assert_eq!(log.iter().filter(|r| r.is_mutation()).count(), 2);
    api.fake.clear_log();
    assert_eq!(api.fake.request_count(), 0);
    assert!(api.fake.requests().is_empty());
}

#[tokio::test]
async fn log_capacity_bounds_the_log_but_not_the_count() {
    let fake = FakeGcs::builder().log_capacity(2).start().await.unwrap();
    let http = Client::new();
    for name in ["a", "b", "c"] {
        let url = format!("{}/storage/v1/b/test-bucket/o/{name}", fake.endpoint());
        http.get(url).send().await.unwrap();
    }
    assert_eq!(fake.request_count(), 3);
    let objects: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| r.object().map(str::to_owned))
        .collect();
    assert_eq!(objects, [Some("b".to_owned()), Some("c".to_owned())]);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let fake = FakeGcs::start().await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let mut buf = vec![0; 4096];
    for _ in 0..3 {
        tcp.write_all(b"GET /storage/v1/b/test-bucket/o HTTP/1.1\r\nHost: f\r\n\r\n")
            .await
            .unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains("\r\ndate: "), "{reply}");
    }
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test]
async fn dropping_the_fake_stops_the_server() {
    let fake = FakeGcs::start().await.unwrap();
    let http = Client::new();
    let url = format!("{}/storage/v1/b/test-bucket/o", fake.endpoint());
    assert!(http.get(&url).send().await.is_ok());
    drop(fake);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(http.get(&url).send().await.is_err());
}

#[tokio::test]
async fn body_limit_is_configurable_and_keeps_the_connection() {
    let fake = FakeGcs::builder().max_body_bytes(10).start().await.unwrap();
    let http = Client::new();
    let url = format!(
        "{}/upload/storage/v1/b/test-bucket/o?uploadType=media&name=k",
        fake.endpoint()
    );
    let answer = http.post(&url).body(vec![b'x'; 100]).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], 413);
    let answer = http.post(&url).body(vec![b'x'; 10]).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 1);
}
