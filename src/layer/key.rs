//! Deriving lock keys from requests.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use http::HeaderName;
use http::request::Parts;

use crate::key::{KeyError, LockKey};

/// Derives the lock key of a request: `Ok(Some(key))` locks `key`, `Ok(None)` means the
/// request needs no lock, `Err` rejects it with 400.
///
/// Closures over `&http::request::Parts` implement it:
///
/// ```
/// use dimutex::{LockKey, layer::{KeyExtractor, KeyRejection}};
/// let by_tenant = |parts: &http::request::Parts| -> Result<Option<LockKey>, KeyRejection> {
///     match parts.uri.path().strip_prefix("/tenants/") {
///         Some(rest) => Ok(Some(LockKey::new(rest.split('/').next().unwrap_or(""))?)),
///         None => Ok(None),
///     }
/// };
/// let (parts, ()) = http::Request::get("/tenants/acme/export").body(()).unwrap().into_parts();
/// assert_eq!(by_tenant.extract(&parts).unwrap().unwrap().as_str(), "acme");
/// ```
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// The key of this request, `None` for no lock, or why the request is refused.
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&Parts) -> Result<Option<LockKey>, KeyRejection> + Clone + Send + Sync + 'static,
{
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        self(parts)
    }
}

/// Why no key could be derived from a request (answered with 400).
///
/// ```
/// use dimutex::{KeyError, layer::KeyRejection};
/// let r: KeyRejection = KeyError::Empty.into();
/// assert_eq!(r.to_string(), "invalid lock key: lock key is empty");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRejection {
    /// The request names a key, but not a valid one.
    #[error("invalid lock key: {0}")]
    Invalid(#[from] KeyError),
    /// The request lacks what the key is made from (a header, an extension, a parameter).
    #[error("missing {0}")]
    Missing(Cow<'static, str>),
}

/// The key is the value of a request header (say, a webhook delivery id). A missing header is
/// a 400 unless the extractor is [`optional`](Self::optional).
///
/// ```
/// use dimutex::layer::{FromHeader, KeyExtractor};
/// let by_delivery = FromHeader::new("x-github-delivery");
/// let (parts, ()) = http::Request::post("/hook").header("x-github-delivery", "72d3162e").body(()).unwrap().into_parts();
/// assert_eq!(by_delivery.extract(&parts).unwrap().unwrap().as_str(), "72d3162e");
/// ```
#[derive(Debug, Clone)]
pub struct FromHeader {
    name: HeaderName,
    optional: bool,
}

impl FromHeader {
    /// Keys from header `name`.
    ///
    /// # Panics
    /// When `name` is not a valid header name (a programming error, like `HeaderName::from_static`).
    ///
    /// ```
    /// let by_tenant = dimutex::layer::FromHeader::new("x-tenant-id");
    /// ```
    pub fn new(name: impl TryInto<HeaderName, Error: fmt::Debug>) -> Self {
        Self {
            name: name.try_into().expect("a valid header name"),
            optional: false,
        }
    }

    /// Requests without the header pass through unlocked instead of getting a 400.
    ///
    /// ```
    /// use dimutex::layer::{FromHeader, KeyExtractor};
    /// let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
    /// assert!(FromHeader::new("x-job").optional().extract(&parts).unwrap().is_none());
    /// ```
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

impl KeyExtractor for FromHeader {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        match parts.headers.get(&self.name) {
            Some(value) => Ok(Some(LockKey::from_bytes(value.as_bytes())?)),
            None if self.optional => Ok(None),
            None => Err(KeyRejection::Missing(
                format!("header `{}`", self.name).into(),
            )),
        }
    }
}

/// The key is a value that an earlier layer put in the request extensions (an authenticated
/// tenant id, say), as any `T: AsRef<str>`. A missing extension is a 400 unless
/// [`optional`](Self::optional).
///
/// ```
/// use dimutex::layer::{FromExtension, KeyExtractor};
/// #[derive(Clone)]
/// struct TenantId(String);
/// impl AsRef<str> for TenantId {
///     fn as_ref(&self) -> &str { &self.0 }
/// }
/// let mut request = http::Request::get("/export").body(()).unwrap();
/// request.extensions_mut().insert(TenantId("acme".into()));
/// let (parts, ()) = request.into_parts();
/// let key = FromExtension::<TenantId>::new().extract(&parts).unwrap().unwrap();
/// assert_eq!(key.as_str(), "acme");
/// ```
pub struct FromExtension<T> {
    optional: bool,
    _type: PhantomData<fn() -> T>,
}

impl<T> FromExtension<T> {
    /// Keys from the extension of type `T`.
    ///
    /// ```
    /// let by_key = dimutex::layer::FromExtension::<dimutex::LockKey>::new();
    /// ```
    pub fn new() -> Self {
        Self {
            optional: false,
            _type: PhantomData,
        }
    }

    /// Requests without the extension pass through unlocked instead of getting a 400.
    ///
    /// ```
    /// let by_key = dimutex::layer::FromExtension::<dimutex::LockKey>::new().optional();
    /// ```
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

impl<T> Default for FromExtension<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for FromExtension<T> {
    fn clone(&self) -> Self {
        Self {
            optional: self.optional,
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for FromExtension<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FromExtension")
            .field("type", &std::any::type_name::<T>())
            .field("optional", &self.optional)
            .finish()
    }
}

impl<T: AsRef<str> + Send + Sync + 'static> KeyExtractor for FromExtension<T> {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        match parts.extensions.get::<T>() {
            Some(value) => Ok(Some(LockKey::new(value.as_ref())?)),
            None if self.optional => Ok(None),
            None => Err(KeyRejection::Missing(
                format!("request extension `{}`", std::any::type_name::<T>()).into(),
            )),
        }
    }
}

/// The key is an axum path parameter (feature `axum`). Add the layer with
/// `Router::route_layer` so that it runs after routing: it reads axum's
/// [`MatchedPath`](axum::extract::MatchedPath) (`/jobs/{job_id}/run`; under `Router::nest`, with
/// the outer routers' prefixes) and takes the parameter's value, percent-decoded, from the
/// request's [`OriginalUri`](axum::extract::OriginalUri), the whole path the template matched
/// (a nested router's request URI has its prefix stripped).
///
/// ```
/// use dimutex::layer::{FromPathParam, KeyExtractor};
/// let by_job = FromPathParam::new("job_id");
/// ```
#[cfg(feature = "axum")]
#[derive(Debug, Clone)]
pub struct FromPathParam {
    name: Cow<'static, str>,
}

#[cfg(feature = "axum")]
impl FromPathParam {
    /// Keys from the path parameter `name` (without braces).
    ///
    /// ```
    /// let by_tenant = dimutex::layer::FromPathParam::new("tenant");
    /// ```
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Self { name: name.into() }
    }
}

#[cfg(feature = "axum")]
impl KeyExtractor for FromPathParam {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        let missing = || KeyRejection::Missing(format!("path parameter `{}`", self.name).into());
        let matched = parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .ok_or_else(missing)?;
        let path = match parts.extensions.get::<axum::extract::OriginalUri>() {
            Some(original) => original.path(),
            None => parts.uri.path(),
        };
        let raw = path_param(matched.as_str(), path, &self.name).ok_or_else(missing)?;
        let key = match percent_decode(raw).ok_or(KeyRejection::Invalid(KeyError::InvalidUtf8))? {
            // Nothing decoded: `raw` is the key, and a `str` already.
            std::borrow::Cow::Borrowed(_) => LockKey::new(raw)?,
            std::borrow::Cow::Owned(bytes) => LockKey::from_bytes(&bytes)?,
        };
        Ok(Some(key))
    }
}

/// The raw value of `{name}` (or `{*name}`) in `path`, matched segment by segment against the
/// route `template`. Byte by byte: this runs on every request.
#[cfg(feature = "axum")]
fn path_param<'p>(template: &str, path: &'p str, name: &str) -> Option<&'p str> {
    // The parameter's segment in the template, and whether it takes the rest of the path.
    let mut segments = template.strip_prefix('/')?;
    let mut index = 0;
    let wildcard = loop {
        let (segment, tail) = split_segment(segments);
        if let Some(param) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            match param.strip_prefix('*') {
                Some(param) if param == name => break true,
                None if param == name => break false,
                _ => {}
            }
        }
        segments = tail?;
        index += 1;
    };
    let mut rest = path.strip_prefix('/')?;
    for _ in 0..index {
        rest = split_segment(rest).1.unwrap_or("");
    }
    Some(if wildcard {
        rest
    } else {
        split_segment(rest).0
    })
}

/// The first segment of `s` and what follows its `/` (`None`: it was the last).
#[cfg(feature = "axum")]
fn split_segment(s: &str) -> (&str, Option<&str>) {
    match s.bytes().position(|b| b == b'/') {
        Some(at) => (&s[..at], Some(&s[at + 1..])),
        None => (s, None),
    }
}

#[cfg(feature = "axum")]
fn percent_decode(s: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
    let bytes = s.as_bytes();
    if !bytes.contains(&b'%') {
        return Some(bytes.into());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out.into())
}

#[cfg(all(test, feature = "axum"))]
mod tests {
    use super::*;

    #[test]
    fn path_params_are_found_by_segment() {
        assert_eq!(
            path_param("/jobs/{job_id}/run", "/jobs/abc/run", "job_id"),
            Some("abc")
        );
        assert_eq!(path_param("/t/{a}/{b}", "/t/x/y", "b"), Some("y"));
        assert_eq!(
            path_param("/files/{*rest}", "/files/a/b/c", "rest"),
            Some("a/b/c")
        );
        assert_eq!(path_param("/jobs/{job_id}", "/jobs/abc", "other"), None);
        assert_eq!(
            path_param("/jobs/{job_id}/run", "/jobs//run", "job_id"),
            Some("")
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(*percent_decode("a%20b%2Fc").unwrap(), *b"a b/c");
        assert!(matches!(
            percent_decode("plain"),
            Some(std::borrow::Cow::Borrowed(b"plain"))
        ));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
    }
}
