//! What GCS sends and expects on the wire: object resources, error replies, headers,
//! percent-encoded names and precondition queries.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::backend::{BackendError, Metadata, ObjectState, Version};

pub(super) struct Response {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Response {
    pub(super) fn error(&self, name: &str) -> BackendError {
        if self.status == StatusCode::PRECONDITION_FAILED {
            // The answer of every contended write: nothing in its body is needed.
            return BackendError::PreconditionFailed;
        }
        let message = error_message(&self.body).unwrap_or_else(|| {
            self.status
                .canonical_reason()
                .unwrap_or("unexpected status")
                .to_owned()
        });
        // Server messages name the object ("The object b/dimutex/KEY exceeded the rate
        // limit..."); errors end up in logs, raw keys must not.
        let message = redact(&message, name);
        let status = self.status.as_u16();
        match status {
            // GCS says which: "No such object: b/o" or "The specified bucket does not exist."
            404 if message.contains("bucket does not exist") => BackendError::BucketNotFound,
            404 => BackendError::NotFound,
            408 | 429 | 500..=599 => BackendError::Transient {
                status: Some(status),
                retry_after: retry_after(&self.headers),
                message: format!("HTTP {status}: {message}"),
            },
            _ => {
                tracing::debug!(target: "dimutex", object = name, status, "request refused");
                BackendError::Fatal {
                    status: Some(status),
                    message: format!("HTTP {status}: {message}"),
                }
            }
        }
    }
}

/// `message` without the object name, raw or percent-encoded.
fn redact(message: &str, name: &str) -> String {
    if name.is_empty() {
        return message.to_owned();
    }
    message
        .replace(name, "<lock object>")
        .replace(&encode_segment(name), "<lock object>")
}

pub(super) fn transport_error(e: reqwest::Error) -> BackendError {
    // The URL names the object: keep it out of messages that end up in logs.
    let e = e.without_url();
    // Timeouts, refused or reset connections and truncated bodies are all worth retrying;
    // the request may or may not have reached the server.
    if e.is_builder() {
        return BackendError::Fatal {
            status: None,
            message: format!("invalid request: {e}"),
        };
    }
    BackendError::Transient {
        status: None,
        retry_after: None,
        message: format!("transport: {e}"),
    }
}

fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        message: String,
    }
    serde_json::from_slice::<Envelope>(body)
        .ok()
        .map(|e| e.error.message)
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    at.duration_since(SystemTime::now()).ok()
}

pub(super) fn server_time(headers: &HeaderMap) -> Option<SystemTime> {
    let value = headers.get(http::header::DATE)?.to_str().ok()?;
    httpdate::parse_http_date(value).ok()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectResource {
    #[serde(deserialize_with = "int64")]
    generation: i64,
    #[serde(default, deserialize_with = "opt_int64")]
    metageneration: Option<i64>,
    updated: Option<String>,
    time_created: Option<String>,
    #[serde(default)]
    metadata: Option<Metadata>,
}

/// GCS sends int64 fields as JSON strings; some emulators send numbers.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Int64;
    impl serde::de::Visitor<'_> for Int64 {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an int64 as a string or a number")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<i64, E> {
            s.parse().map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<i64, E> {
            Ok(n)
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<i64, E> {
            i64::try_from(n).map_err(E::custom)
        }
    }
    d.deserialize_any(Int64)
}

fn opt_int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    int64(d).map(Some)
}

/// Parses an object resource. GCS always sends `metageneration`; when a server leaves it out,
/// `missing_metageneration` is what the request implies (1 for a new object, one more than the
/// precondition for a PATCH), or `None` to refuse the reply.
pub(super) fn parse_object(
    body: &[u8],
    missing_metageneration: Option<i64>,
) -> Result<ObjectState, BackendError> {
    let resource: ObjectResource =
        serde_json::from_slice(body).map_err(|e| BackendError::Fatal {
            status: None,
            message: format!("malformed object resource: {e}"),
        })?;
    // Never a default: an `updated` read as any time (the epoch) would make a live lock
    // look expired, and be taken over.
    let updated = resource
        .updated
        .as_deref()
        .ok_or_else(|| BackendError::Fatal {
            status: None,
            message: "object resource without `updated`".into(),
        })?;
    let updated = parse_rfc3339(updated).ok_or_else(|| BackendError::Fatal {
        status: None,
        message: format!("object resource with an unreadable `updated`: {updated:?}"),
    })?;
    let metageneration = resource
        .metageneration
        .or(missing_metageneration)
        .ok_or_else(|| BackendError::Fatal {
            status: None,
            message: "object resource without metageneration".into(),
        })?;
    let state = ObjectState::new(
        Version::new(resource.generation, metageneration),
        updated,
        resource.metadata.unwrap_or_default(),
    );
    Ok(
        match resource.time_created.as_deref().and_then(parse_rfc3339) {
            Some(created) => state.with_created(created),
            None => state,
        },
    )
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.into())
}

/// Percent-encodes an object name as one path segment (everything but unreserved characters).
fn encode_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len() * 3);
    push_segment(&mut out, name);
    out
}

/// Appends `name` percent-encoded as one path segment.
pub(super) fn push_segment(out: &mut String, name: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.reserve(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

/// The write preconditions as a query string: the `expected` version (generation and
/// metageneration), or no object at all (`None`: generation 0).
pub(super) fn preconditions(expected: Option<Version>) -> String {
    match expected {
        Some(v) => format!(
            "ifGenerationMatch={}&ifMetagenerationMatch={}",
            v.generation(),
            v.metageneration()
        ),
        None => "ifGenerationMatch=0".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_encoded_segment() {
        assert_eq!(encode_segment("dimutex/a b+c"), "dimutex%2Fa%20b%2Bc");
        assert_eq!(encode_segment("ü"), "%C3%BC");
        assert_eq!(encode_segment("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(
            preconditions(Some(Version::new(7, 2))),
            "ifGenerationMatch=7&ifMetagenerationMatch=2"
        );
        assert_eq!(preconditions(None), "ifGenerationMatch=0");
    }

    #[test]
    fn object_resources_parse_strings_and_numbers() {
        let s = parse_object(br#"{"generation":"1700000000000001","metageneration":"2","updated":"2026-11-26T06:22:41.123Z","metadata":{"ttl":"30"}}"#, None).unwrap();
        assert_eq!(s.version(), Version::new(1700000000000001, 2));
        assert_eq!(s.metadata()["ttl"], "30");
        assert_eq!(
            s.updated(),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_674_161_123)
        );
        let n = parse_object(
            br#"{"generation":5,"metageneration":1,"updated":"2026-11-26T06:22:41Z"}"#,
            None,
        )
        .unwrap();
        assert_eq!(n.version(), Version::new(5, 1));
        assert!(parse_object(b"{}", None).is_err());
        for bad in [
            &br#"{"generation":"5x","metageneration":"1","updated":"2026-11-26T06:22:41Z"}"#[..],
            br#"{"generation":true,"metageneration":"1","updated":"2026-11-26T06:22:41Z"}"#,
            br#"{"generation":18446744073709551615,"updated":"2026-11-26T06:22:41Z"}"#,
        ] {
            assert!(parse_object(bad, Some(1)).is_err());
        }
        let no_metageneration = br#"{"generation":5,"updated":"2026-11-26T06:22:41Z"}"#;
        assert!(parse_object(no_metageneration, None).is_err());
        let patched = parse_object(
            br#"{"generation":5,"updated":"2026-11-26T06:28:40.9593Z"}"#,
            Some(3),
        )
        .unwrap();
        assert_eq!(patched.version(), Version::new(5, 3));
    }

    /// Hole 6 (issue 16): a missing or unreadable `updated` was read as the Unix epoch, which
    /// makes a live lock look expired to whoever inspects it.
    #[test]
    fn an_object_without_a_readable_updated_is_an_error_never_a_time() {
        for body in [
            &br#"{"generation":"5","metageneration":"1","metadata":{"ttl":"30"}}"#[..],
            br#"{"generation":"5","metageneration":"1","updated":"yesterday"}"#,
            br#"{"generation":"5","metageneration":"1","updated":""}"#,
        ] {
            match parse_object(body, None) {
                Err(e @ BackendError::Fatal { .. }) => {
                    assert!(e.to_string().contains("`updated`"), "{e}")
                }
                other => panic!("{other:?} for {}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn error_messages_do_not_name_the_object() {
        let r = Response {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers: HeaderMap::new(),
            body: Bytes::from_static(
                br#"{"error":{"code":429,"message":"The object b/dimutex/tenant 7 exceeded the rate limit"}}"#,
            ),
        };
        let e = r.error("dimutex/tenant 7");
        assert!(e.is_rate_limited());
        let text = e.to_string();
        assert!(!text.contains("tenant 7"), "{text}");
        assert!(text.contains("<lock object>"), "{text}");
    }

    #[test]
    fn retry_after_reads_seconds() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }
}
