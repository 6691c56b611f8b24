//! The object API over HTTP: create, get, patch, delete, list, object names and routes,
//! media and multipart uploads, malformed and oversized bodies.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use serde_json::json;

use super::{Api, BOUNDARY, FakeGcs, generation, multipart_body};

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
