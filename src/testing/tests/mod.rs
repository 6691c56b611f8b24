//! End-to-end tests of the fake over HTTP with `reqwest`, and the harness they share: `Api`, a
//! fake with a client, and `Answer`, what it answered.

mod faults;
mod log_and_connections;
mod objects;

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

use super::FakeGcs;

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
