//! The fake misbehaving on purpose: injected faults (before or after the commit, dropped
//! connections, delays), random faults, the mutation throttle, a skewed clock.

use std::time::{Duration, Instant, SystemTime};

use http::Method;
use reqwest::StatusCode;
use serde_json::json;

use super::{Api, FakeGcs, generation};
use crate::testing::{Fault, FaultRule};

#[tokio::test]
async fn fail_before_does_not_commit() {
    let api = Api::new().await;
    api.fake
        .inject(FaultRule::new(Fault::FailBefore(503)).with_method(Method::POST));
    let get = api.get("k").await;
    assert_eq!(get.status, StatusCode::NOT_FOUND, "GET is not matched");
    let failed = api.create("k", "&ifGenerationMatch=0", json!({})).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.reason(), "backendError");
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
    assert_eq!(api.fake.faults_injected(), 1);

    api.fake.inject(Fault::FailBefore(429));
    let limited = api.create("k", "&ifGenerationMatch=0", json!({})).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.reason(), "rateLimitExceeded");
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);

    let retried = api.create("k", "&ifGenerationMatch=0", json!({})).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(api.fake.faults_injected(), 2);
}

#[tokio::test]
async fn commit_then_503_commits() {
    let api = Api::new().await;
    api.fake.inject(Fault::CommitThen(503));
    let answer = api
        .create("k", "&ifGenerationMatch=0", json!({"o": "1"}))
        .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.reason(), "backendError");
    assert_eq!(api.fake.object_names(FakeGcs::DEFAULT_BUCKET), ["k"]);
    // The retry of the ambiguous create meets the committed object.
    let retry = api
        .create("k", "&ifGenerationMatch=0", json!({"o": "1"}))
        .await;
    assert_eq!(retry.status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn commit_then_drop_commits_and_the_client_sees_an_error() {
    let api = Api::new().await;
    // Warm the pool so the dropped request rides a reused keep-alive connection.
    assert_eq!(api.get("k").await.status, StatusCode::NOT_FOUND);
    api.fake
        .inject(FaultRule::new(Fault::CommitThenDrop).with_object("k"));
    let error = api
        .send(api.create_request("k", "&ifGenerationMatch=0", json!({})))
        .await
        .expect_err("a dropped connection is an error");
    assert!(!error.is_status(), "{error:?}");
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 1);
    let log = api.fake.requests();
    let dropped = log.last().unwrap();
    assert_eq!(dropped.status(), None);
    assert_eq!(dropped.fault(), Some(&Fault::CommitThenDrop));
    assert_eq!(dropped.object(), Some("k"));
    // The same client recovers on a new connection.
    assert_eq!(api.get("k").await.status, StatusCode::OK);
    assert_eq!(api.fake.request_count(), 3);
}

#[tokio::test]
async fn commit_then_drop_on_a_fresh_connection() {
    let api = Api::new().await;
    api.fake.inject(Fault::CommitThenDrop);
    let result = api.send(api.http.delete(api.object_url("k", ""))).await;
    assert!(result.is_err());
    assert_eq!(api.fake.requests()[0].status(), None);
}

#[tokio::test]
async fn delays() {
    let api = Api::new().await;
    api.fake
        .inject(FaultRule::new(Fault::Delay(Duration::from_millis(300))).with_method(Method::GET));
    let start = Instant::now();
    assert_eq!(api.get("k").await.status, StatusCode::NOT_FOUND);
    assert!(start.elapsed() >= Duration::from_millis(300));

    // Delay before handling: a client that gives up leaves nothing behind.
    api.fake.inject(Fault::Delay(Duration::from_millis(500)));
    let timed_out = api
        .send(
            api.create_request("a", "&ifGenerationMatch=0", json!({}))
                .timeout(Duration::from_millis(100)),
        )
        .await;
    assert!(timed_out.unwrap_err().is_timeout());
    // The server still handles it once the delay passes (GCS may, too).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(api.fake.object_names(FakeGcs::DEFAULT_BUCKET), ["a"]);

    // Commit, then a slow answer: the write is in before the client times out.
    api.fake
        .inject(Fault::CommitThenDelay(Duration::from_millis(500)));
    let timed_out = api
        .send(
            api.create_request("b", "&ifGenerationMatch=0", json!({}))
                .timeout(Duration::from_millis(200)),
        )
        .await;
    assert!(timed_out.unwrap_err().is_timeout());
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 2);
    assert_eq!(api.fake.faults_injected(), 3);
}

#[tokio::test]
async fn throttle_answers_429() {
    let api = Api::new().await;
    api.fake.set_throttle(true);
    let g = generation(&api.create("k", "", json!({})).await);
    let limited = api.delete("k", &format!("?ifGenerationMatch={g}")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.reason(), "rateLimitExceeded");
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 1);
    assert_eq!(
        api.create("other", "", json!({})).await.status,
        StatusCode::OK
    );
    api.fake.set_throttle(false);
    let ok = api.delete("k", &format!("?ifGenerationMatch={g}")).await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn random_faults_hit_mutations_only_by_default() {
    let api = Api::new().await;
    api.fake
        .set_fault_rate(1.0, vec![Fault::FailBefore(503)], 7);
    for i in 0..5 {
        let answer = api.create(&format!("k{i}"), "", json!({})).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(api.get("k0").await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.fake.faults_injected(), 5);
    api.fake.set_read_faults(true);
    assert_eq!(api.get("k0").await.status, StatusCode::SERVICE_UNAVAILABLE);
    api.fake.clear_faults();
    assert_eq!(api.create("k0", "", json!({})).await.status, StatusCode::OK);
    assert_eq!(api.fake.faults_injected(), 6);

    // A partial rate with a fixed seed is reproducible.
    let outcome = |seed| async move {
        let api = Api::new().await;
        api.fake
            .set_fault_rate(0.5, vec![Fault::CommitThen(503)], seed);
        let mut statuses = Vec::new();
        for i in 0..20 {
            statuses.push(api.create(&format!("k{i}"), "", json!({})).await.status);
        }
        assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 20);
        statuses
    };
    let a = outcome(11).await;
    assert_eq!(a, outcome(11).await);
    assert!(a.contains(&StatusCode::OK) && a.contains(&StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn clock_offset_moves_date_and_timestamps() {
    let api = Api::new().await;
    api.fake.set_clock_offset_ms(-3_600_000);
    let created = api.create("k", "", json!({})).await;
    let date = httpdate::parse_http_date(created.headers["date"].to_str().unwrap()).unwrap();
    let behind = SystemTime::now().duration_since(date).unwrap();
    assert!(behind > Duration::from_secs(3590) && behind < Duration::from_secs(3610));
    let updated = created.json()["updated"].as_str().unwrap().to_owned();
    let updated =
        time::OffsetDateTime::parse(&updated, &time::format_description::well_known::Rfc3339)
            .unwrap();
    let behind = time::OffsetDateTime::now_utc() - updated;
    assert!(behind > time::Duration::seconds(3590) && behind < time::Duration::seconds(3610));
}
