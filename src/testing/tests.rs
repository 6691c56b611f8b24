//! End-to-end tests of the fake over HTTP with `reqwest`.

use std::time::{Duration, Instant, SystemTime};

use http::Method;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{FakeGcs, Fault, FaultRule};

const BOUNDARY: &str = "==dimutex-test==";

struct Api {
    fake: FakeGcs,
    http: Client,
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn reason(&self) -> Value {
        self.json()["error"]["errors"][0]["reason"].clone()
    }
}

fn encode(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn multipart_body(resource: &Value, media: &[u8], media_type: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n\
             --{BOUNDARY}\r\nContent-Type: {media_type}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(media);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

impl Api {
    async fn new() -> Self {
        Self {
            fake: FakeGcs::start().await.unwrap(),
            http: Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.fake.endpoint())
    }

    fn object_url(&self, name: &str, query: &str) -> String {
        self.url(&format!(
            "/storage/v1/b/{}/o/{}{query}",
            FakeGcs::DEFAULT_BUCKET,
            encode(name)
        ))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
        let response = request.send().await?;
        Ok(Answer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.bytes().await?.to_vec(),
        })
    }

    fn create_request(&self, name: &str, query: &str, metadata: Value) -> reqwest::RequestBuilder {
        let resource = json!({ "name": name, "metadata": metadata, "cacheControl": "no-store" });
        self.http
            .post(self.url(&format!(
                "/upload/storage/v1/b/{}/o?uploadType=multipart{query}",
                FakeGcs::DEFAULT_BUCKET
            )))
            .header(
                "content-type",
                format!("multipart/related; boundary=\"{BOUNDARY}\""),
            )
            .body(multipart_body(&resource, b"lock", "plain/text"))
    }

    async fn create(&self, name: &str, query: &str, metadata: Value) -> Answer {
        self.send(self.create_request(name, query, metadata))
            .await
            .unwrap()
    }

    async fn get(&self, name: &str) -> Answer {
        self.send(self.http.get(self.object_url(name, "")))
            .await
            .unwrap()
    }

    async fn patch(&self, name: &str, query: &str, body: Value) -> Answer {
        self.send(
            self.http
                .patch(self.object_url(name, query))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
        .unwrap()
    }

    async fn delete(&self, name: &str, query: &str) -> Answer {
        self.send(self.http.delete(self.object_url(name, query)))
            .await
            .unwrap()
    }
}

fn generation(answer: &Answer) -> String {
    answer.json()["generation"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn multipart_create_then_conflict() {
    let api = Api::new().await;
    let first = api
        .create("locks/a", "&ifGenerationMatch=0", json!({"owner": "me"}))
        .await;
    assert_eq!(first.status, StatusCode::OK);
    let resource = first.json();
    assert_eq!(resource["kind"], "storage#object");
    assert_eq!(resource["name"], "locks/a");
    assert_eq!(resource["metageneration"], "1");
    assert_eq!(resource["metadata"]["owner"], "me");

    let second = api
        .create("locks/a", "&ifGenerationMatch=0", json!({"owner": "you"}))
        .await;
    assert_eq!(second.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(second.reason(), "conditionNotMet");
    assert_eq!(second.json()["error"]["code"], 412);
    assert!(second.headers.contains_key("date"));
    assert_eq!(
        api.fake.object_metadata("test-bucket", "locks/a").unwrap()["owner"],
        "me"
    );
}

#[tokio::test]
async fn get_returns_gcs_resource_with_string_int64s() {
    let api = Api::new().await;
    let created = api.create("k", "", json!({"a": "1"})).await;
    let got = api.get("k").await;
    assert_eq!(got.status, StatusCode::OK);
    let r = got.json();
    assert_eq!(r, created.json());
    assert_eq!(r["bucket"], FakeGcs::DEFAULT_BUCKET);
    assert!(r["generation"].as_str().unwrap().parse::<i64>().unwrap() > 0);
    assert_eq!(r["metageneration"], "1");
    assert_eq!(r["size"], "4");
    assert_eq!(r["cacheControl"], "no-store");
    assert_eq!(r["contentType"], "plain/text");
    for field in ["updated", "timeCreated"] {
        let ts = r[field].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-26T06:22:41.123Z".len(), "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    }
    let date = got.headers["date"].to_str().unwrap();
    let date = httpdate::parse_http_date(date).unwrap();
    let skew = SystemTime::now()
        .duration_since(date)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(5));

    let media = api
        .send(api.http.get(api.object_url("k", "?alt=media")))
        .await
        .unwrap();
    assert_eq!(media.body, b"lock");
    assert_eq!(media.headers["content-type"], "plain/text");

    let missing = api.get("nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.reason(), "notFound");
}

#[tokio::test]
async fn patch_merges_and_bumps_metageneration() {
    let api = Api::new().await;
    let created = api.create("k", "", json!({"a": "1", "b": "2"})).await;
    let g = generation(&created);
    let patched = api
        .patch(
            "k",
            &format!("?ifGenerationMatch={g}&ifMetagenerationMatch=1"),
            json!({"metadata": {"a": null, "c": "3"}}),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK);
    let r = patched.json();
    assert_eq!(r["metageneration"], "2");
    assert_eq!(r["generation"], g.as_str());
    assert_eq!(r["metadata"], json!({"b": "2", "c": "3"}));

    let stale = api
        .patch("k", "?ifMetagenerationMatch=1", json!({"metadata": {}}))
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);

    let bad = api
        .patch("k", "?ifMetagenerationMatch=one", json!({"metadata": {}}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.reason(), "invalid");
}

#[tokio::test]
async fn delete_with_stale_metageneration_is_refused() {
    let api = Api::new().await;
    let g = generation(&api.create("k", "", json!({})).await);
    api.patch("k", "", json!({"metadata": {"x": "y"}})).await;
    let stale = api
        .delete(
            "k",
            &format!("?ifGenerationMatch={g}&ifMetagenerationMatch=1"),
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 1);

    let ok = api
        .delete(
            "k",
            &format!("?ifGenerationMatch={g}&ifMetagenerationMatch=2"),
        )
        .await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
    assert!(ok.body.is_empty());
    assert!(ok.headers.contains_key("date"));
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
    assert_eq!(api.delete("k", "").await.status, StatusCode::NOT_FOUND);
}

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
async fn unknown_bucket_and_route_and_method() {
    let api = Api::new().await;
    let answer = api
        .send(api.http.get(api.url("/storage/v1/b/nope/o/k")))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.reason(), "notFound");
    assert_eq!(answer.json()["error"]["code"], 404);
    let upload = api
        .send(
            api.http
                .post(api.url("/upload/storage/v1/b/nope/o?uploadType=media&name=k"))
                .body("x"),
        )
        .await
        .unwrap();
    assert_eq!(upload.status, StatusCode::NOT_FOUND);

    let route = api.send(api.http.get(api.url("/elsewhere"))).await.unwrap();
    assert_eq!(route.status, StatusCode::NOT_FOUND);
    assert_eq!(route.reason(), "notFound");
    let method = api
        .send(api.http.put(api.object_url("k", "")))
        .await
        .unwrap();
    assert_eq!(method.status, StatusCode::METHOD_NOT_ALLOWED);

    api.fake.create_bucket("nope");
    let now = api
        .send(api.http.get(api.url("/storage/v1/b/nope/o")))
        .await
        .unwrap();
    assert_eq!(now.status, StatusCode::OK);
    assert_eq!(now.json(), json!({"kind": "storage#objects"}));
    let bucket = api
        .send(api.http.get(api.url("/storage/v1/b/nope")))
        .await
        .unwrap();
    assert_eq!(bucket.json()["name"], "nope");
}

#[tokio::test]
async fn names_are_one_percent_encoded_segment() {
    let api = Api::new().await;
    api.create("dir/sub dir/a+b", "", json!({})).await;
    assert_eq!(
        api.fake.object_names(FakeGcs::DEFAULT_BUCKET),
        ["dir/sub dir/a+b"]
    );
    let by_encoded = api
        .send(
            api.http
                .get(api.url("/storage/v1/b/test-bucket/o/dir%2Fsub%20dir%2Fa%2Bb")),
        )
        .await
        .unwrap();
    assert_eq!(by_encoded.status, StatusCode::OK);
    assert_eq!(by_encoded.json()["name"], "dir/sub dir/a+b");
    // A literal '+' in a path is a '+', not a space (Python's quote_plus leaves it... as '+').
    let by_plus = api
        .send(
            api.http
                .get(api.url("/storage/v1/b/test-bucket/o/dir%2Fsub%20dir%2Fa+b")),
        )
        .await
        .unwrap();
    assert_eq!(by_plus.status, StatusCode::OK);
    // Unencoded slashes are not an object path.
    let unencoded = api
        .send(
            api.http
                .get(api.url("/storage/v1/b/test-bucket/o/dir/sub%20dir/a+b")),
        )
        .await
        .unwrap();
    assert_eq!(unencoded.status, StatusCode::NOT_FOUND);
    let bad = api
        .send(api.http.get(api.url("/storage/v1/b/test-bucket/o/a%zz")))
        .await
        .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn list_by_prefix() {
    let api = Api::new().await;
    for name in ["locks/b", "locks/a", "other"] {
        api.create(name, "", json!({})).await;
    }
    let list = api
        .send(
            api.http
                .get(api.url("/storage/v1/b/test-bucket/o?prefix=locks%2F")),
        )
        .await
        .unwrap()
        .json();
    assert_eq!(list["kind"], "storage#objects");
    let names: Vec<_> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["locks/a", "locks/b"]);
    let none = api
        .send(
            api.http
                .get(api.url("/storage/v1/b/test-bucket/o?prefix=zz")),
        )
        .await
        .unwrap()
        .json();
    assert!(none.get("items").is_none());
}

#[tokio::test]
async fn media_upload_and_name_precedence() {
    let api = Api::new().await;
    let media = api
        .send(
            api.http
                .post(api.url(
                    "/upload/storage/v1/b/test-bucket/o?uploadType=media&name=m%2F1&ifGenerationMatch=0",
                ))
                .header("content-type", "text/plain")
                .body("hello"),
        )
        .await
        .unwrap();
    assert_eq!(media.status, StatusCode::OK);
    assert_eq!(media.json()["name"], "m/1");
    assert_eq!(media.json()["contentType"], "text/plain");
    assert_eq!(media.json()["size"], "5");

    // The `name` parameter wins over the metadata part's name.
    let resource = json!({"name": "from-body", "contentType": "application/x-lock"});
    let multipart = api
        .send(
            api.http
                .post(
                    api.url(
                        "/upload/storage/v1/b/test-bucket/o?uploadType=multipart&name=from-query",
                    ),
                )
                .header(
                    "content-type",
                    format!("multipart/related; boundary={BOUNDARY}"),
                )
                .body(multipart_body(&resource, b"x", "plain/text")),
        )
        .await
        .unwrap();
    assert_eq!(multipart.status, StatusCode::OK);
    assert_eq!(multipart.json()["name"], "from-query");
    assert_eq!(multipart.json()["contentType"], "application/x-lock");
    assert!(multipart.json().get("metadata").is_none());
}

#[tokio::test]
async fn malformed_uploads_are_400_and_oversized_413() {
    let api = Api::new().await;
    let upload = |query: &str| api.url(&format!("/upload/storage/v1/b/test-bucket/o{query}"));
    let cases = [
        api.http.post(upload("?name=k")).body("x"),
        api.http
            .post(upload("?uploadType=resumable&name=k"))
            .body("x"),
        api.http.post(upload("?uploadType=media")).body("x"),
        api.http
            .post(upload("?uploadType=media&name=k&ifGenerationMatch=x"))
            .body("x"),
        api.http
            .post(upload("?uploadType=multipart"))
            .header("content-type", "multipart/related; boundary=b")
            .body("not multipart"),
        api.http
            .post(upload("?uploadType=multipart"))
            .header("content-type", "multipart/related; boundary=b")
            .body("--b\r\n\r\n{\"name\":\"k\"}\r\n--b--"),
        api.http
            .post(upload("?uploadType=multipart"))
            .header("content-type", "multipart/related; boundary=b")
            .body("--b\r\n\r\nnot json\r\n--b\r\n\r\nx\r\n--b--"),
        api.http
            .post(upload("?uploadType=multipart"))
            .header("content-type", "application/json")
            .body("{}"),
    ];
    for (i, request) in cases.into_iter().enumerate() {
        let answer = api.send(request).await.unwrap();
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "case {i}");
        assert_eq!(answer.reason(), "invalid", "case {i}");
    }
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);

    let big = vec![b'x'; FakeGcs::DEFAULT_MAX_BODY_BYTES + 1];
    let answer = api
        .send(
            api.http
                .post(upload("?uploadType=media&name=big"))
                .body(big),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api.fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
    // The client carries on.
    assert_eq!(api.get("k").await.status, StatusCode::NOT_FOUND);
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

#[tokio::test]
async fn python_style_multipart_is_accepted() {
    // As the Python client writes it: quoted boundary, `plain/text` media part, CRLF.
    let api = Api::new().await;
    let body = "--===============123==\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n\
                {\"name\": \"py/lock\", \"metadata\": {\"expires\": \"5\"}}\r\n\
                --===============123==\r\ncontent-type: plain/text\r\n\r\nlock\r\n\
                --===============123==--";
    let answer = api
        .send(
            api.http
                .post(api.url(
                    "/upload/storage/v1/b/test-bucket/o?uploadType=multipart&ifGenerationMatch=0",
                ))
                .header(
                    "content-type",
                    "multipart/related; boundary=\"===============123==\"",
                )
                .body(body),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    assert_eq!(answer.json()["metadata"]["expires"], "5");
    assert_eq!(answer.json()["contentType"], "plain/text");
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
