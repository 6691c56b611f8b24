//! A stored response: what a completed record holds, and how it is written into the lock
//! object's metadata and contents.
//!
//! | metadata | value |
//! |---|---|
//! | `status` | the status code |
//! | `headers` | the replayable headers, a JSON array of `[name, value]` pairs |
//! | `fingerprint` | the request's fingerprint (hex SHA-256), `-` when fingerprints are off |
//! | `body` | the body in base64, for a small response: one read returns it all |
//! | `body-bytes` | the body's length, when the body is the object's contents instead |

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

use crate::backend::Metadata;

const STATUS: &str = "status";
const HEADERS: &str = "headers";
const FINGERPRINT: &str = "fingerprint";
const BODY: &str = "body";
const BODY_BYTES: &str = "body-bytes";

/// GCS allows 8 KiB of custom metadata per object: a response whose headers and base64 body
/// fit in this many bytes is stored in the metadata, the rest in the object's contents.
const INLINE_LIMIT: usize = 6 * 1024;

/// Headers never replayed: per-connection (hop-by-hop), per-response (`Date`), or
/// belonging to the first client alone (`Set-Cookie`).
const NOT_REPLAYED: [HeaderName; 11] = [
    header::SET_COOKIE,
    header::DATE,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
    header::CONTENT_LENGTH,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// A response as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) status: StatusCode,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Bytes,
}

/// Where a stored response's body is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Body {
    Inline(Bytes),
    /// In the object's contents, this many bytes.
    Contents(usize),
}

impl Stored {
    /// The replayable part of a response: its status, the headers that are safe to send
    /// again (with a UTF-8 value), and its body.
    pub(crate) fn new(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Self {
        let headers = headers
            .iter()
            .filter(|(name, _)| !NOT_REPLAYED.contains(name))
            .filter_map(|(name, value)| {
                let value = std::str::from_utf8(value.as_bytes()).ok()?;
                Some((name.as_str().to_owned(), value.to_owned()))
            })
            .collect();
        Self {
            status,
            headers,
            body,
        }
    }

    /// The record's metadata fields and contents.
    pub(crate) fn encode(&self, fingerprint: &str) -> (Metadata, Bytes) {
        let headers = serde_json::to_string(&self.headers).unwrap_or_else(|_| "[]".to_owned());
        let mut md = Metadata::from([
            (STATUS.to_owned(), self.status.as_u16().to_string()),
            (FINGERPRINT.to_owned(), fingerprint.to_owned()),
        ]);
        let inline_len = headers.len() + self.body.len().div_ceil(3) * 4;
        let data = if inline_len <= INLINE_LIMIT {
            md.insert(BODY.to_owned(), BASE64.encode(&self.body));
            Bytes::new()
        } else {
            md.insert(BODY_BYTES.to_owned(), self.body.len().to_string());
            self.body.clone()
        };
        md.insert(HEADERS.to_owned(), headers);
        (md, data)
    }
}

/// A record read back: its fingerprint, and the response without its body (or with it, when
/// inline).
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) fingerprint: String,
    pub(crate) status: StatusCode,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Body,
}

/// Reads a record's metadata; `None` when it is not one this crate wrote.
pub(crate) fn decode(md: &Metadata) -> Option<Decoded> {
    let status = StatusCode::from_u16(md.get(STATUS)?.parse().ok()?).ok()?;
    let headers = serde_json::from_str(md.get(HEADERS)?).ok()?;
    let body = match (md.get(BODY), md.get(BODY_BYTES)) {
        (Some(inline), None) => Body::Inline(BASE64.decode(inline).ok()?.into()),
        (None, Some(len)) => Body::Contents(len.parse().ok()?),
        _ => return None,
    };
    Some(Decoded {
        fingerprint: md.get(FINGERPRINT)?.clone(),
        status,
        headers,
        body,
    })
}

impl Decoded {
    /// The replay: the stored status, headers and `body`, and `Idempotent-Replayed: true`.
    pub(crate) fn replay(self, body: Bytes) -> http::Response<Bytes> {
        let mut response = http::Response::new(body);
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
        headers.insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.append("x-job", HeaderValue::from_static("a"));
        h.append("x-job", HeaderValue::from_static("b"));
        h.insert(
            header::SET_COOKIE,
            HeaderValue::from_static("session=secret"),
        );
        h.insert(
            header::DATE,
            HeaderValue::from_static("Thu, 03 Dec 2026 10:00:00 GMT"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("x-binary", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        h
    }

    #[test]
    fn a_small_response_is_stored_in_the_metadata_and_replayed_as_it_was() {
        let stored = Stored::new(StatusCode::CREATED, &response_headers(), Bytes::from("{}"));
        let (md, data) = stored.encode("f00d");
        assert!(data.is_empty());
        let decoded = decode(&md).unwrap();
        assert_eq!(decoded.fingerprint, "f00d");
        assert_eq!(decoded.body, Body::Inline(Bytes::from("{}")));
        let replay = decoded.replay(Bytes::from("{}"));
        assert_eq!(replay.status(), StatusCode::CREATED);
        let h = replay.headers();
        assert_eq!(h["content-type"], "application/json");
        let jobs: Vec<_> = h.get_all("x-job").iter().collect();
        assert_eq!(jobs, ["a", "b"]);
        assert_eq!(h["idempotent-replayed"], "true");
        for gone in ["set-cookie", "date", "connection", "x-binary"] {
            assert!(!h.contains_key(gone), "{gone} must not be replayed");
        }
    }

    #[test]
    fn a_large_body_goes_to_the_contents() {
        let body = Bytes::from(vec![0xa5; INLINE_LIMIT]);
        let (md, data) = Stored::new(StatusCode::OK, &HeaderMap::new(), body.clone()).encode("-");
        assert_eq!(data, body);
        assert!(!md.contains_key(BODY));
        let decoded = decode(&md).unwrap();
        assert_eq!(decoded.body, Body::Contents(INLINE_LIMIT));
        let total: usize = md.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total < 8 * 1024, "metadata of {total} bytes");
    }

    #[test]
    fn metadata_that_is_not_a_record_is_not_decoded() {
        assert!(decode(&Metadata::new()).is_none());
        let (mut md, _) = Stored::new(StatusCode::OK, &HeaderMap::new(), Bytes::new()).encode("-");
        md.insert(BODY_BYTES.to_owned(), "3".to_owned());
        assert!(
            decode(&md).is_none(),
            "a body both inline and in the contents"
        );
    }
}
