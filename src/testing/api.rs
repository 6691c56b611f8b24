//! The GCS JSON API itself: routing a path to a resource, turning a request into an [`Op`]
//! on the object store, running it, and GCS-shaped answers (JSON resources, error bodies,
//! media). Nothing here knows about connections or faults.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Map, Value, json};

use super::multipart;
use super::wire::{self, Query};
use crate::backend::Metadata;
use crate::backend::store::{MetadataPatch, Preconditions, Store, StoreError};

/// The body of every answer.
pub(super) type Body = Full<Bytes>;

/// An error answer with a GCS error body.
#[derive(Debug)]
pub(super) struct ApiError {
    status: u16,
    message: String,
    close: bool,
}

impl ApiError {
    pub(super) fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            close: false,
        }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// Also closes the connection (the request body may be unread).
    pub(super) fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub(super) fn response(&self) -> Response<Body> {
        let mut response = error_response(self.status, &self.message);
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// What a request path resolved to.
pub(super) enum Resource {
    Bucket,
    Objects,
    Upload,
    Object(String),
}

/// A validated request, ready to run against the store.
pub(super) struct Prepared {
    pub(super) bucket: String,
    pub(super) store: Arc<Store>,
    pub(super) op: Op,
}

/// One operation on a bucket's store.
pub(super) enum Op {
    Bucket,
    List {
        prefix: String,
    },
    Get {
        object: String,
        media: bool,
        pre: Preconditions,
    },
    Insert {
        object: String,
        metadata: Metadata,
        cache_control: Option<String>,
        content_type: Option<String>,
        data: Vec<u8>,
        pre: Preconditions,
    },
    Patch {
        object: String,
        patch: MetadataPatch,
        pre: Preconditions,
    },
    Delete {
        object: String,
        pre: Preconditions,
    },
}

/// Parses a path into its bucket and resource. Object names must be one path segment.
pub(super) fn route(path: &str) -> Result<(String, Resource), ApiError> {
    let not_found = || ApiError::new(404, format!("Not Found: {path}"));
    let (upload, rest) = if let Some(rest) = path.strip_prefix("/upload/storage/v1/b/") {
        (true, rest)
    } else if let Some(rest) = path.strip_prefix("/storage/v1/b/") {
        (false, rest)
    } else {
        return Err(not_found());
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let resource = match (upload, segments.as_slice()) {
        (false, [_]) => Resource::Bucket,
        (false, [_, "o"]) => Resource::Objects,
        (true, [_, "o"]) => Resource::Upload,
        (false, [_, "o", object]) => {
            let object = wire::decode_path_segment(object).map_err(ApiError::invalid)?;
            validate_object_name(&object)?;
            Resource::Object(object)
        }
        _ => return Err(not_found()),
    };
    let bucket = wire::decode_path_segment(segments[0]).map_err(ApiError::invalid)?;
    if bucket.is_empty() {
        return Err(not_found());
    }
    Ok((bucket, resource))
}

/// GCS object-name rules: 1 to 1024 bytes of UTF-8, no CR or LF.
fn validate_object_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid("Object name is required."));
    }
    if name.len() > 1024 {
        return Err(ApiError::invalid("Object name is longer than 1024 bytes."));
    }
    if name.contains(['\r', '\n']) {
        return Err(ApiError::invalid(
            "Object name contains a carriage return or line feed.",
        ));
    }
    Ok(())
}

/// Refuses (405) a method the resource does not serve.
pub(super) fn check_method(
    method: &Method,
    resource: &Resource,
    path: &str,
) -> Result<(), ApiError> {
    let allowed = match resource {
        Resource::Bucket | Resource::Objects => method == Method::GET,
        Resource::Upload => method == Method::POST,
        Resource::Object(_) => matches!(*method, Method::GET | Method::PATCH | Method::DELETE),
    };
    if !allowed {
        return Err(ApiError::new(
            405,
            format!("Method {method} is not allowed on {path}"),
        ));
    }
    Ok(())
}

/// The operation a request (already routed to `resource`, its method checked) asks for.
pub(super) fn operation(
    resource: Resource,
    method: &Method,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Op, ApiError> {
    Ok(match resource {
        Resource::Bucket => Op::Bucket,
        Resource::Objects => Op::List {
            prefix: query.get("prefix").unwrap_or_default().to_owned(),
        },
        Resource::Upload => upload(query, headers, body)?,
        Resource::Object(object) => match *method {
            Method::PATCH => Op::Patch {
                patch: metadata_patch(body)?,
                pre: query.preconditions().map_err(ApiError::invalid)?,
                object,
            },
            Method::DELETE => Op::Delete {
                pre: query.preconditions().map_err(ApiError::invalid)?,
                object,
            },
            _ => Op::Get {
                media: query.get("alt") == Some("media"),
                pre: query.preconditions().map_err(ApiError::invalid)?,
                object,
            },
        },
    })
}

/// An upload (`uploadType=multipart` or `uploadType=media`) as an insert.
fn upload(query: &Query, headers: &HeaderMap, body: &[u8]) -> Result<Op, ApiError> {
    let pre = query.preconditions().map_err(ApiError::invalid)?;
    let query_name = query.get("name").map(str::to_owned);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (object, metadata, cache_control, content_type, data) = match query.get("uploadType") {
        Some("multipart") => {
            let content_type = content_type
                .ok_or_else(|| ApiError::invalid("A multipart upload needs a Content-Type."))?;
            let boundary = multipart::boundary(&content_type).map_err(ApiError::invalid)?;
            let parts = multipart::parse(body, &boundary).map_err(ApiError::invalid)?;
            let [meta, media] = parts.as_slice() else {
                return Err(ApiError::invalid(format!(
                    "A multipart upload has exactly two parts (metadata, media), not {}.",
                    parts.len()
                )));
            };
            let resource: Value = serde_json::from_slice(meta.body())
                .map_err(|e| ApiError::invalid(format!("Invalid object metadata JSON: {e}")))?;
            let resource = resource
                .as_object()
                .ok_or_else(|| ApiError::invalid("Object metadata must be a JSON object."))?;
            let name = query_name.or(string_field(resource, "name")?);
            let metadata = insert_metadata(resource.get("metadata"))?;
            let cache_control = string_field(resource, "cacheControl")?;
            let content_type = string_field(resource, "contentType")?
                .or_else(|| media.header("content-type").map(str::to_owned));
            (
                name,
                metadata,
                cache_control,
                content_type,
                media.body().to_vec(),
            )
        }
        Some("media") => (
            query_name,
            Metadata::new(),
            None,
            content_type,
            body.to_vec(),
        ),
        Some("resumable") => {
            return Err(ApiError::invalid(
                "The fake GCS server does not support resumable uploads.",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(format!("Invalid upload type {other:?}.")));
        }
        None => {
            return Err(ApiError::invalid(
                "Upload requests must include an uploadType URL parameter and a URL-encoded \
                 object name.",
            ));
        }
    };
    let object = object.ok_or_else(|| ApiError::invalid("Required: the object name."))?;
    validate_object_name(&object)?;
    Ok(Op::Insert {
        object,
        metadata,
        cache_control,
        content_type,
        data,
        pre,
    })
}

/// A string field of a JSON resource: absent or `null` is `None`.
fn string_field(resource: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match resource.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::invalid(format!(
            "Invalid value for {key}: {other} is not a string."
        ))),
    }
}

/// A metadata value: strings as they are, numbers and booleans in their JSON spelling.
fn metadata_value(key: &str, value: &Value) -> Result<Option<String>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Bool(b) => Ok(Some(b.to_string())),
        _ => Err(ApiError::invalid(format!(
            "Invalid value for metadata.{key}: it must be a string."
        ))),
    }
}

/// A `metadata` value, which must be a JSON object.
fn metadata_map(value: &Value) -> Result<&Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| ApiError::invalid("Invalid value for metadata: it must be a JSON object."))
}

/// The `metadata` of an uploaded resource; `null` entries are left out.
fn insert_metadata(value: Option<&Value>) -> Result<Metadata, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Metadata::new());
    };
    let mut entries = Vec::new();
    for (key, value) in metadata_map(value)? {
        if let Some(value) = metadata_value(key, value)? {
            entries.push((key.clone(), value));
        }
    }
    let size: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::invalid(format!(
            "Custom metadata is {size} bytes; at most {MAX_METADATA_BYTES} are allowed."
        )));
    }
    Ok(entries.into_iter().collect())
}

/// GCS's documented limit on an object's custom metadata (keys and values), checked on
/// uploads.
const MAX_METADATA_BYTES: usize = 8 * 1024;

/// The `metadata` change of a PATCH body; `null` values remove keys. Other fields are ignored.
fn metadata_patch(body: &[u8]) -> Result<MetadataPatch, ApiError> {
    let resource: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Invalid JSON in the request body: {e}")))?;
    let resource = resource
        .as_object()
        .ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    match resource.get("metadata") {
        None => Ok(MetadataPatch::new()),
        Some(Value::Null) => Err(ApiError::invalid(
            "The fake GCS server does not support \"metadata\": null; remove keys one by one.",
        )),
        Some(value) => metadata_map(value)?
            .iter()
            .map(|(key, value)| {
                let value = metadata_value(key, value)?;
                Ok((key.clone(), value))
            })
            .collect(),
    }
}

/// Runs a validated request against its store.
pub(super) fn execute(prepared: Prepared) -> Response<Body> {
    let Prepared { bucket, store, op } = prepared;
    match op {
        Op::Bucket => json_response(
            StatusCode::OK,
            &json!({
                "kind": "storage#bucket",
                "id": bucket,
                "name": bucket,
                "location": "US",
                "storageClass": "STANDARD",
            }),
        ),
        Op::List { prefix } => {
            let items: Vec<Value> = store
                .list(&prefix)
                .iter()
                .map(|o| wire::object_resource(&bucket, o))
                .collect();
            let mut list = Map::new();
            list.insert("kind".into(), "storage#objects".into());
            if !items.is_empty() {
                list.insert("items".into(), Value::Array(items));
            }
            json_response(StatusCode::OK, &Value::Object(list))
        }
        Op::Get { object, media, pre } => match store.get_checked(&object, pre) {
            Ok(o) if media => media_response(
                o.data.to_vec(),
                o.content_type.as_deref().map(str::to_owned),
                o.generation,
                o.metageneration,
            ),
            Ok(o) => json_response(StatusCode::OK, &wire::object_resource(&bucket, &o)),
            Err(e) => store_error(e, &bucket, &object),
        },
        Op::Insert {
            object,
            metadata,
            cache_control,
            content_type,
            data,
            pre,
        } => match store.insert(
            &object,
            metadata,
            cache_control.map(Cow::Owned),
            content_type.map(Cow::Owned),
            Cow::Owned(data),
            pre,
        ) {
            Ok(o) => json_response(StatusCode::OK, &wire::object_resource(&bucket, &o)),
            Err(e) => store_error(e, &bucket, &object),
        },
        Op::Patch { object, patch, pre } => match store.patch(&object, patch, pre) {
            Ok(o) => json_response(StatusCode::OK, &wire::object_resource(&bucket, &o)),
            Err(e) => store_error(e, &bucket, &object),
        },
        Op::Delete { object, pre } => match store.delete(&object, pre) {
            Ok(()) => {
                let mut response = Response::new(Body::default());
                *response.status_mut() = StatusCode::NO_CONTENT;
                response
            }
            Err(e) => store_error(e, &bucket, &object),
        },
    }
}

/// The answer to a store refusal, as GCS words it.
fn store_error(error: StoreError, bucket: &str, object: &str) -> Response<Body> {
    match error {
        StoreError::NotFound => error_response(404, &format!("No such object: {bucket}/{object}")),
        StoreError::PreconditionFailed => error_response(
            412,
            "At least one of the pre-conditions you specified did not hold.",
        ),
        StoreError::NotModified => {
            let mut response = Response::new(Body::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        }
        StoreError::RateLimited => error_response(
            429,
            &format!(
                "The object {bucket}/{object} exceeded the rate limit for object mutation \
                 operations (create, update, and delete). Please reduce your request rate. \
                 See https://cloud.google.com/storage/docs/gcs429."
            ),
        ),
    }
}

/// A JSON answer.
fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Body::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}

/// A GCS error answer: `status` (500 if it is not a status) with a GCS error body.
pub(super) fn error_response(status: u16, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &wire::error_body(status.as_u16(), message))
}

/// An `alt=media` answer: the object's data, with its generations in `x-goog-*` headers.
fn media_response(
    data: Vec<u8>,
    content_type: Option<String>,
    generation: i64,
    metageneration: i64,
) -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from(data)));
    let headers = response.headers_mut();
    let content_type = content_type
        .and_then(|ct| HeaderValue::from_str(&ct).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert("x-goog-generation", HeaderValue::from(generation));
    headers.insert("x-goog-metageneration", HeaderValue::from(metageneration));
    response
}
