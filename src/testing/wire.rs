//! Encodings of the GCS JSON API: percent-decoding, query strings, timestamps, the object
//! resource and the error body.

use std::time::SystemTime;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::backend::store::{Preconditions, StoredObject};

/// Decodes a percent-encoded path segment. `+` stays a literal `+`, as GCS treats it in paths.
pub(crate) fn decode_path_segment(segment: &str) -> Result<String, String> {
    percent_decode(segment, false)
}

/// Decodes a query-string key or value (`application/x-www-form-urlencoded`: `+` is a space).
pub(crate) fn decode_query_component(component: &str) -> Result<String, String> {
    percent_decode(component, true)
}

fn percent_decode(input: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("invalid percent-encoding in {input:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{input:?} does not decode to UTF-8"))
}

/// A parsed query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            pairs.push((decode_query_component(key)?, decode_query_component(value)?));
        }
        Ok(Self { pairs })
    }

    /// The first value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn int(&self, key: &str) -> Result<Option<i64>, String> {
        self.get(key)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("Invalid value for {key}: {v:?} is not an integer."))
            })
            .transpose()
    }

    /// The four write preconditions.
    pub(crate) fn preconditions(&self) -> Result<Preconditions, String> {
        Ok(Preconditions {
            if_generation_match: self.int("ifGenerationMatch")?,
            if_generation_not_match: self.int("ifGenerationNotMatch")?,
            if_metageneration_match: self.int("ifMetagenerationMatch")?,
            if_metageneration_not_match: self.int("ifMetagenerationNotMatch")?,
        })
    }
}

/// RFC 3339 in UTC with millisecond precision, as GCS writes `updated`:
/// `2026-11-26T06:22:41.123Z`.
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from(t)
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

/// The GCS object resource (`storage#object`); int64 fields are strings, as GCS sends them.
pub(crate) fn object_resource(bucket: &str, o: &StoredObject) -> Value {
    let mut m = Map::new();
    m.insert("kind".into(), "storage#object".into());
    m.insert(
        "id".into(),
        format!("{bucket}/{}/{}", o.name, o.generation).into(),
    );
    m.insert("name".into(), o.name.to_string().into());
    m.insert("bucket".into(), bucket.into());
    m.insert("generation".into(), o.generation.to_string().into());
    m.insert("metageneration".into(), o.metageneration.to_string().into());
    if let Some(ct) = &o.content_type {
        m.insert("contentType".into(), ct.to_string().into());
    }
    m.insert("storageClass".into(), "STANDARD".into());
    m.insert("size".into(), o.data.len().to_string().into());
    m.insert("timeCreated".into(), rfc3339_millis(o.created).into());
    m.insert("updated".into(), rfc3339_millis(o.updated).into());
    if let Some(cc) = &o.cache_control {
        m.insert("cacheControl".into(), cc.to_string().into());
    }
    if !o.metadata.is_empty() {
        let md: Map<String, Value> = o
            .metadata
            .iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
            .collect();
        m.insert("metadata".into(), Value::Object(md));
    }
    Value::Object(m)
}

/// The GCS `reason` for an error status.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        400 => "invalid",
        401 => "required",
        403 => "forbidden",
        404 => "notFound",
        405 => "methodNotAllowed",
        408 => "requestTimeout",
        409 => "conflict",
        412 => "conditionNotMet",
        413 => "uploadTooLarge",
        429 => "rateLimitExceeded",
        500..=599 => "backendError",
        _ => "invalid",
    }
}

/// The GCS error body: `{"error":{"code":..,"message":..,"errors":[{"reason":..,..}]}}`.
pub(crate) fn error_body(status: u16, message: &str) -> Value {
    json!({
        "error": {
            "code": status,
            "message": message,
            "errors": [{
                "domain": "global",
                "reason": reason(status),
                "message": message,
            }],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn path_segments_keep_plus_and_decode_slashes() {
        assert_eq!(decode_path_segment("a%2Fb+c%20d").unwrap(), "a/b+c d");
        assert_eq!(decode_path_segment("%C3%A9").unwrap(), "é");
        assert!(decode_path_segment("a%2").is_err());
        assert!(decode_path_segment("a%zz").is_err());
        assert!(decode_path_segment("%FF").is_err());
    }

    #[test]
    fn query_decodes_plus_as_space_and_parses_preconditions() {
        let q =
            Query::parse("name=a+b%2Fc&ifGenerationMatch=0&flag&ifMetagenerationMatch=3").unwrap();
        assert_eq!(q.get("name"), Some("a b/c"));
        assert_eq!(q.get("flag"), Some(""));
        let pre = q.preconditions().unwrap();
        assert_eq!(pre.if_generation_match, Some(0));
        assert_eq!(pre.if_metageneration_match, Some(3));
        assert_eq!(pre.if_generation_not_match, None);
        let bad = Query::parse("ifMetagenerationNotMatch=x").unwrap();
        assert!(bad.preconditions().is_err());
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_961_123_456);
        assert_eq!(rfc3339_millis(t), "2026-11-18T11:22:41.123Z");
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn error_body_has_gcs_shape() {
        let body = error_body(412, "nope");
        assert_eq!(body["error"]["code"], 412);
        assert_eq!(body["error"]["errors"][0]["reason"], "conditionNotMet");
        assert_eq!(reason(503), "backendError");
        assert_eq!(reason(429), "rateLimitExceeded");
        assert_eq!(reason(404), "notFound");
        assert_eq!(reason(400), "invalid");
    }
}
