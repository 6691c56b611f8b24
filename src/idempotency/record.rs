//! A stored response: what a completed record holds, and how it is written into the lock
//! object's metadata and contents.
//!
//! | metadata | value |
//! |---|---|
//! | `status` | the status code |
//! | `fingerprint` | the request's fingerprint (hex SHA-256), `-` when fingerprints are off |
//! | `body-bytes` | the body's length |
//! | `headers` | a small response's replayable headers, a JSON array of `[name, value]` pairs |
//! | `body` | a small response's body in base64 (absent when empty): one read returns it all |
//! | `headers-bytes` | a larger response's: the length of its headers JSON, which the object's contents begin with, followed by the body |
//!
//! GCS allows 8 KiB of custom metadata per object (and documents 4 KiB per value for some of
//! its APIs): a response is inline only when its headers JSON and its base64 body each fit in
//! [`VALUE_LIMIT`].

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
const HEADERS_BYTES: &str = "headers-bytes";

/// The longest inline value: two of them and the other fields stay under GCS's 8 KiB.
const VALUE_LIMIT: usize = 3 * 1024;

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
            (BODY_BYTES.to_owned(), self.body.len().to_string()),
        ]);
        let body = BASE64.encode(&self.body);
        if headers.len() <= VALUE_LIMIT && body.len() <= VALUE_LIMIT {
            if !body.is_empty() {
                md.insert(BODY.to_owned(), body);
            }
            md.insert(HEADERS.to_owned(), headers);
            return (md, Bytes::new());
        }
        md.insert(HEADERS_BYTES.to_owned(), headers.len().to_string());
        let mut data = Vec::with_capacity(headers.len() + self.body.len());
        data.extend_from_slice(headers.as_bytes());
        data.extend_from_slice(&self.body);
        (md, data.into())
    }
}

/// A record read back: its fingerprint, and its response (or where to find it).
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) fingerprint: String,
    status: StatusCode,
    body_len: usize,
    pub(crate) layout: Layout,
}

/// Where a record's response is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Inline {
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// In the object's contents: this many bytes of headers JSON, then the body.
    Contents { headers_len: usize },
}

/// Reads a record's metadata; `None` when it is not one this crate wrote.
pub(crate) fn decode(md: &Metadata) -> Option<Decoded> {
    let status = StatusCode::from_u16(md.get(STATUS)?.parse().ok()?).ok()?;
    let body_len = md.get(BODY_BYTES)?.parse().ok()?;
    let layout = match (md.get(HEADERS), md.get(HEADERS_BYTES)) {
        (Some(headers), None) => {
            let body: Bytes = match md.get(BODY) {
                Some(b64) => BASE64.decode(b64).ok()?.into(),
                None => Bytes::new(),
            };
            if body.len() != body_len {
                return None;
            }
            Layout::Inline {
                headers: serde_json::from_str(headers).ok()?,
                body,
            }
        }
        (None, Some(len)) => Layout::Contents {
            headers_len: len.parse().ok()?,
        },
        _ => return None,
    };
    Some(Decoded {
        fingerprint: md.get(FINGERPRINT)?.clone(),
        status,
        body_len,
        layout,
    })
}

impl Decoded {
    /// The replay: the stored status, headers and body, and `Idempotent-Replayed: true`;
    /// `contents` are the object's, for a response stored there. `None` when the contents are
    /// not this record's.
    pub(crate) fn replay(self, contents: Option<Bytes>) -> Option<http::Response<Bytes>> {
        let (headers, body) = match self.layout {
            Layout::Inline { headers, body } => (headers, body),
            Layout::Contents { headers_len } => {
                let contents = contents?;
                if contents.len() != headers_len.checked_add(self.body_len)? {
                    return None;
                }
                let headers = serde_json::from_slice(&contents[..headers_len]).ok()?;
                (headers, contents.slice(headers_len..))
            }
        };
        let mut response = http::Response::new(body);
        *response.status_mut() = self.status;
        let map = response.headers_mut();
        for (name, value) in &headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                map.append(name, value);
            }
        }
        map.insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
        Some(response)
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

    fn metadata_bytes(md: &Metadata) -> usize {
        md.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    #[test]
    fn a_small_response_is_stored_in_the_metadata_and_replayed_as_it_was() {
        let stored = Stored::new(StatusCode::CREATED, &response_headers(), Bytes::from("{}"));
        let (md, data) = stored.encode("f00d");
        assert!(data.is_empty());
        let decoded = decode(&md).unwrap();
        assert_eq!(decoded.fingerprint, "f00d");
        let replay = decoded.replay(None).unwrap();
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(replay.body(), "{}");
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
    fn an_empty_body_needs_no_body_field() {
        let (md, _) =
            Stored::new(StatusCode::NO_CONTENT, &HeaderMap::new(), Bytes::new()).encode("-");
        assert!(!md.contains_key(BODY));
        let replay = decode(&md).unwrap().replay(None).unwrap();
        assert!(replay.body().is_empty());
    }

    #[test]
    fn large_bodies_and_large_headers_go_to_the_contents() {
        let mut big_header = HeaderMap::new();
        big_header.insert(
            "link",
            HeaderValue::from_str(&"<a>; rel=x, ".repeat(700)).unwrap(),
        );
        for (headers, body) in [
            (HeaderMap::new(), Bytes::from(vec![0xa5; VALUE_LIMIT])),
            (big_header, Bytes::from("small")),
        ] {
            let (md, data) = Stored::new(StatusCode::OK, &headers, body.clone()).encode("-");
            assert!(!data.is_empty());
            assert!(!md.contains_key(BODY) && !md.contains_key(HEADERS));
            assert!(
                metadata_bytes(&md) < 1024,
                "metadata of {} bytes",
                metadata_bytes(&md)
            );
            let decoded = decode(&md).unwrap();
            assert!(matches!(decoded.layout, Layout::Contents { .. }));
            let replay = decode(&md).unwrap().replay(Some(data.clone())).unwrap();
            assert_eq!(replay.body(), &body);
            for (name, value) in &headers {
                assert_eq!(replay.headers()[name], value);
            }
            assert!(decode(&md).unwrap().replay(None).is_none());
            assert!(
                decoded.replay(Some(data.slice(1..))).is_none(),
                "other contents"
            );
        }
    }

    #[test]
    fn inline_metadata_stays_under_the_gcs_limits() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-big",
            HeaderValue::from_str(&"h".repeat(VALUE_LIMIT - 20)).unwrap(),
        );
        let body = Bytes::from(vec![7; VALUE_LIMIT / 4 * 3]);
        let (md, data) = Stored::new(StatusCode::OK, &h, body).encode(&"f".repeat(64));
        assert!(data.is_empty(), "inline");
        assert!(md.values().all(|v| v.len() <= VALUE_LIMIT));
        // With the lock's own fields (owner at most 256 + 33 bytes, ttl, expires, record).
        assert!(
            metadata_bytes(&md) + 400 < 8 * 1024,
            "{}",
            metadata_bytes(&md)
        );
    }

    #[test]
    fn metadata_that_is_not_a_record_is_not_decoded() {
        assert!(decode(&Metadata::new()).is_none());
        let (mut md, _) =
            Stored::new(StatusCode::OK, &HeaderMap::new(), Bytes::from("x")).encode("-");
        md.insert(HEADERS_BYTES.to_owned(), "3".to_owned());
        assert!(
            decode(&md).is_none(),
            "headers both inline and in the contents"
        );
        let (mut md, _) =
            Stored::new(StatusCode::OK, &HeaderMap::new(), Bytes::from("x")).encode("-");
        md.insert(BODY_BYTES.to_owned(), "2".to_owned());
        assert!(decode(&md).is_none(), "a body of another length");
    }
}
