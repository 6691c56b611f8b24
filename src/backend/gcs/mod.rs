//! The Google Cloud Storage backend, on the JSON API.

use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Backend, BackendError, BoxFuture, Metadata, ObjectState, Reply, Version};

mod wire;

use wire::{Response, parse_object, preconditions, push_segment, server_time, transport_error};

/// The production endpoint of the GCS JSON API.
pub const GCS_ENDPOINT: &str = "https://storage.googleapis.com";
/// The OAuth scope the backend asks for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// The multipart boundary of uploads, unless their contents contain it.
const BOUNDARY: &str = "dimutex-7a1c3f0e9b2d4c86";

/// The contents of a lock object.
const LOCK_DATA: &[u8] = b"lock";

/// Lock objects on Google Cloud Storage, through the JSON API.
///
/// Credentials are Application Default Credentials (scope `devstorage.read_write`; the
/// account needs `storage.objects.create`, `get`, `update` and `delete` on the bucket). With
/// `STORAGE_EMULATOR_HOST` set (`host:port` means `http://host:port`; a value with `://` is a
/// base URL), requests go to that emulator without credentials, as Google's own clients do.
/// An endpoint set with [`GcsBackendBuilder::endpoint`] wins over the variable.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dimutex::{Client, backend::GcsBackend};
/// let backend = GcsBackend::builder("my-locks-bucket").build().await?;
/// let client = Client::new(backend);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GcsBackend {
    http: reqwest::Client,
    endpoint: Arc<str>,
    bucket: Arc<str>,
    /// The bucket's object collection (`…/storage/v1/b/BUCKET/o/`), parsed once.
    objects: reqwest::Url,
    /// The bucket's upload URL (`…/upload/storage/v1/b/BUCKET/o`), parsed once.
    uploads: reqwest::Url,
    auth: Option<Arc<dyn gcp_auth::TokenProvider>>,
}

impl fmt::Debug for GcsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcsBackend")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field(
                "auth",
                &if self.auth.is_some() {
                    "application default credentials"
                } else {
                    "none"
                },
            )
            .finish()
    }
}

/// How the backend authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// ADC for the production endpoint, none for an emulator.
    Auto,
    /// Always Application Default Credentials.
    Adc,
    /// Never send credentials.
    Anonymous,
}

/// Configures a [`GcsBackend`].
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = dimutex::backend::GcsBackend::builder("locks")
///     .endpoint("http://127.0.0.1:4443")
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use]
pub struct GcsBackendBuilder {
    bucket: String,
    endpoint: Option<String>,
    auth: Auth,
    http: Option<reqwest::Client>,
}

/// Why a [`GcsBackend`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GcsConfigError {
    /// The bucket name is not a valid GCS bucket name.
    #[error("invalid bucket name {0:?}")]
    InvalidBucket(String),
    /// The endpoint is not a usable base URL.
    #[error("invalid endpoint {0:?}: expected http(s)://host[:port][/path] or host:port")]
    InvalidEndpoint(String),
    /// No Application Default Credentials were found.
    #[error("no Google credentials found: {0}")]
    Credentials(#[source] gcp_auth::Error),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Http(#[source] reqwest::Error),
}

impl GcsBackend {
    /// A builder for a backend on `bucket`.
    ///
    /// ```
    /// let builder = dimutex::backend::GcsBackend::builder("my-bucket");
    /// ```
    pub fn builder(bucket: impl Into<String>) -> GcsBackendBuilder {
        GcsBackendBuilder {
            bucket: bucket.into(),
            endpoint: None,
            auth: Auth::Auto,
            http: None,
        }
    }

    /// The base URL requests go to.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let b = dimutex::backend::GcsBackend::builder("b").endpoint("localhost:4443").build().await?;
    /// assert_eq!(b.endpoint(), "http://localhost:4443");
    /// # Ok(()) }
    /// ```
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let b = dimutex::backend::GcsBackend::builder("b").endpoint("localhost:4443").build().await?;
    /// assert_eq!(b.bucket(), "b");
    /// # Ok(()) }
    /// ```
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The object's URL. Every request URL is a copy of one parsed at build time with its
    /// path and query set: handed a string, reqwest parses all of it, host included, for
    /// each request (a tenth of a lock cycle's CPU on a loopback emulator).
    fn object_url(&self, name: &str) -> reqwest::Url {
        let mut path = self.objects.path().to_owned();
        push_segment(&mut path, name);
        let mut url = self.objects.clone();
        url.set_path(&path);
        url
    }

    /// The object's URL with the write preconditions of `expected` as its query.
    fn object_url_if(&self, name: &str, expected: Version) -> reqwest::Url {
        let mut url = self.object_url(name);
        url.set_query(Some(&preconditions(Some(expected))));
        url
    }

    /// Sends the request `build` makes, with a token when the backend has credentials, and
    /// reads the whole reply. The request is built only when it is sent, and the builder is
    /// never kept across an await: a boxed backend future stays under a kilobyte.
    async fn send(
        &self,
        build: impl FnOnce() -> reqwest::RequestBuilder,
    ) -> Result<Response, BackendError> {
        let token = self.token().await?;
        let (status, headers, body) = {
            let request = match &token {
                Some(token) => build().bearer_auth(token.as_str()),
                None => build(),
            };
            let mut response = request.send().await.map_err(transport_error)?;
            let headers = std::mem::take(response.headers_mut());
            (response.status(), headers, response.bytes())
        };
        let body = body.await.map_err(transport_error)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// An access token, when the backend sends credentials.
    async fn token(&self) -> Result<Option<Arc<gcp_auth::Token>>, BackendError> {
        let Some(provider) = &self.auth else {
            return Ok(None);
        };
        let token = provider
            .token(&[SCOPE])
            .await
            .map_err(|e| BackendError::Transient {
                status: None,
                retry_after: None,
                message: format!("could not get an access token: {e}"),
            })?;
        Ok(Some(token))
    }

    async fn write(
        &self,
        name: &str,
        build: impl FnOnce() -> reqwest::RequestBuilder,
        missing_metageneration: i64,
    ) -> Result<Reply<ObjectState>, BackendError> {
        let r = self.send(build).await?;
        if r.status.is_success() {
            let state = parse_object(&r.body, Some(missing_metageneration))?;
            return Ok(Reply::new(state, server_time(&r.headers)));
        }
        Err(r.error(name))
    }

    /// The upload of an object with `metadata` and the contents `data`, on the write
    /// preconditions of `expected`.
    fn upload(
        &self,
        name: &str,
        metadata: &Metadata,
        expected: Option<Version>,
        data: &[u8],
    ) -> reqwest::RequestBuilder {
        let mut url = self.uploads.clone();
        let query = format!("uploadType=multipart&{}", preconditions(expected));
        url.set_query(Some(&query));
        // The multipart body, the JSON resource serialized straight into it. Writing to a
        // `Vec` fails only if `Metadata`'s serialization does, which it does not.
        let resource = UploadResource {
            name,
            cache_control: "no-store",
            content_type: "text/plain",
            metadata,
        };
        let boundary = boundary_outside(data);
        let mut body = Vec::with_capacity(384 + data.len());
        let _ = write!(
            body,
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
        );
        let _ = serde_json::to_writer(&mut body, &resource);
        let _ = write!(body, "\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\n");
        body.extend_from_slice(data);
        let _ = write!(body, "\r\n--{boundary}--\r\n");
        self.http
            .post(url)
            .header(
                http::header::CONTENT_TYPE,
                format!("multipart/related; boundary={boundary}"),
            )
            .body(body)
    }
}

/// The JSON part of a multipart upload.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct UploadResource<'a> {
    name: &'a str,
    cache_control: &'static str,
    content_type: &'static str,
    metadata: &'a Metadata,
}

impl GcsBackendBuilder {
    /// Sends requests to `endpoint` instead of production GCS (or `STORAGE_EMULATOR_HOST`).
    /// `host:port` means `http://host:port`. Endpoints other than production GCS get no
    /// credentials unless [`with_credentials`](Self::with_credentials) is called.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Sends Application Default Credentials even to a non-production endpoint.
    pub fn with_credentials(mut self) -> Self {
        self.auth = Auth::Adc;
        self
    }

    /// Never sends credentials (for emulators and public test buckets).
    pub fn anonymous(mut self) -> Self {
        self.auth = Auth::Anonymous;
        self
    }

    /// Uses this `reqwest` client (to share a connection pool or set proxies). The lock
    /// client applies its own per-request timeout.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Builds the backend; looks up credentials when they will be used.
    pub async fn build(self) -> Result<GcsBackend, GcsConfigError> {
        if !valid_bucket(&self.bucket) {
            return Err(GcsConfigError::InvalidBucket(self.bucket));
        }
        let emulator = std::env::var("STORAGE_EMULATOR_HOST")
            .ok()
            .filter(|v| !v.trim().is_empty());
        let endpoint = match self.endpoint.or(emulator) {
            Some(e) => normalize_endpoint(&e).ok_or(GcsConfigError::InvalidEndpoint(e))?,
            None => GCS_ENDPOINT.to_owned(),
        };
        let use_auth = match self.auth {
            Auth::Auto => endpoint == GCS_ENDPOINT,
            Auth::Adc => true,
            Auth::Anonymous => false,
        };
        let auth = if use_auth {
            Some(
                gcp_auth::provider()
                    .await
                    .map_err(GcsConfigError::Credentials)?,
            )
        } else {
            None
        };
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(50))
                .build()
                .map_err(GcsConfigError::Http)?,
        };
        // The endpoint parsed as a base, and the bucket name is URL-safe: these parse.
        let parse = |path: String| {
            reqwest::Url::parse(&format!("{endpoint}{path}"))
                .map_err(|_| GcsConfigError::InvalidEndpoint(endpoint.clone()))
        };
        let objects = parse(format!("/storage/v1/b/{}/o/", self.bucket))?;
        let uploads = parse(format!("/upload/storage/v1/b/{}/o", self.bucket))?;
        Ok(GcsBackend {
            http,
            endpoint: endpoint.into(),
            bucket: self.bucket.into(),
            objects,
            uploads,
            auth,
        })
    }
}

impl Backend for GcsBackend {
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(async move {
            self.write(name, || self.upload(name, metadata, None, LOCK_DATA), 1)
                .await
                .map_err(|e| match e {
                    // On an upload, 404 means the bucket is missing.
                    BackendError::NotFound => BackendError::BucketNotFound,
                    e => e,
                })
        })
    }

    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        Box::pin(async move {
            let r = self.send(|| self.http.get(self.object_url(name))).await?;
            if r.status.is_success() {
                let state = parse_object(&r.body, None)?;
                return Ok(Reply::new(Some(state), server_time(&r.headers)));
            }
            match r.error(name) {
                BackendError::NotFound => Ok(Reply::new(None, server_time(&r.headers))),
                e => Err(e),
            }
        })
    }

    fn takeover<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(async move {
            self.write(
                name,
                || self.upload(name, metadata, Some(expected), LOCK_DATA),
                1,
            )
            .await
        })
    }

    fn refresh<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(async move {
            #[derive(serde::Serialize)]
            struct Patch<'a> {
                metadata: &'a Metadata,
            }
            // Serializing to a `Vec` fails only if `Metadata`'s serialization does: never.
            let body = serde_json::to_vec(&Patch { metadata }).unwrap_or_default();
            let request = || {
                self.http
                    .patch(self.object_url_if(name, expected))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body)
            };
            // fake-gcs-server 1.54 leaves metageneration out of PATCH replies; a PATCH
            // increments it by one (documented GCS behaviour).
            self.write(name, request, expected.metageneration() + 1)
                .await
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        Box::pin(async move {
            let request = || self.http.delete(self.object_url_if(name, expected));
            let r = self.send(request).await?;
            if r.status.is_success() {
                return Ok(Reply::new((), server_time(&r.headers)));
            }
            Err(r.error(name))
        })
    }

    fn record<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
        data: &'a [u8],
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        Box::pin(async move {
            let request = || self.upload(name, metadata, Some(expected), data);
            self.write(name, request, 1).await
        })
    }

    fn contents<'a>(
        &'a self,
        name: &'a str,
        generation: i64,
    ) -> BoxFuture<'a, Result<Reply<Bytes>, BackendError>> {
        Box::pin(async move {
            let request = || {
                let mut url = self.object_url(name);
                url.set_query(Some(&format!("alt=media&ifGenerationMatch={generation}")));
                self.http.get(url)
            };
            let r = self.send(request).await?;
            if r.status.is_success() {
                return Ok(Reply::new(r.body, server_time(&r.headers)));
            }
            Err(r.error(name))
        })
    }
}

/// The multipart boundary of an upload of `data`: [`BOUNDARY`], or a random one when `data`
/// contains it.
fn boundary_outside(data: &[u8]) -> std::borrow::Cow<'static, str> {
    let contains = |b: &str| data.windows(b.len()).any(|w| w == b.as_bytes());
    if !contains(BOUNDARY) {
        return BOUNDARY.into();
    }
    loop {
        let boundary = format!("dimutex-{:032x}", crate::random::bits());
        if !contains(&boundary) {
            return boundary.into();
        }
    }
}

fn normalize_endpoint(e: &str) -> Option<String> {
    let e = e.trim();
    let url = if e.contains("://") {
        e.to_owned()
    } else {
        format!("http://{e}")
    };
    let url = url.trim_end_matches('/').to_owned();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    // A base for request URLs: a host, maybe a port and a path, and nothing after it.
    let parsed = reqwest::Url::parse(&url).ok()?;
    let plain = parsed.has_host()
        && parsed.query().is_none()
        && parsed.fragment().is_none()
        && parsed.username().is_empty()
        && parsed.password().is_none();
    plain.then_some(url)
}

/// GCS bucket names: 3-222 characters of lowercase letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit.
fn valid_bucket(b: &str) -> bool {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=222).contains(&b.len())
        && b.chars().all(ok_char)
        && ends(b.chars().next())
        && ends(b.chars().last())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            normalize_endpoint("localhost:4443").as_deref(),
            Some("http://localhost:4443")
        );
        assert_eq!(
            normalize_endpoint("https://x.test/").as_deref(),
            Some("https://x.test")
        );
        assert_eq!(normalize_endpoint("http://"), None);
        assert_eq!(normalize_endpoint("ftp://x"), None);
        for bad in [
            "http://:4443",
            "localhost:abc",
            "http://h:1/p?x=1",
            "http://h:1/p#f",
            "http://user:pw@h:1",
        ] {
            assert_eq!(normalize_endpoint(bad), None, "{bad}");
        }
    }

    async fn backend(endpoint: &str) -> GcsBackend {
        GcsBackend::builder("b-1")
            .endpoint(endpoint)
            .anonymous()
            .build()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn request_urls_keep_the_endpoint_path_and_encode_the_name_as_one_segment() {
        let b = backend("http://127.0.0.1:1/pre/fix/").await;
        let name = "dimutex/a b+c%/?#\\ü..";
        let encoded = "dimutex%2Fa%20b%2Bc%25%2F%3F%23%5C%C3%BC..";
        assert_eq!(
            b.object_url(name).as_str(),
            format!("http://127.0.0.1:1/pre/fix/storage/v1/b/b-1/o/{encoded}")
        );
        assert_eq!(
            b.object_url_if(name, Version::new(7, 2)).as_str(),
            format!(
                "http://127.0.0.1:1/pre/fix/storage/v1/b/b-1/o/{encoded}\
                 ?ifGenerationMatch=7&ifMetagenerationMatch=2"
            )
        );
        let upload = b
            .upload(name, &Metadata::new(), None, LOCK_DATA)
            .build()
            .unwrap();
        assert_eq!(
            upload.url().as_str(),
            "http://127.0.0.1:1/pre/fix/upload/storage/v1/b/b-1/o\
             ?uploadType=multipart&ifGenerationMatch=0"
        );
        let b = backend("https://storage.test").await;
        let upload = b.upload(name, &Metadata::new(), Some(Version::new(5, 3)), LOCK_DATA);
        assert_eq!(
            upload.build().unwrap().url().as_str(),
            "https://storage.test/upload/storage/v1/b/b-1/o\
             ?uploadType=multipart&ifGenerationMatch=5&ifMetagenerationMatch=3"
        );
    }

    #[tokio::test]
    async fn an_endpoint_that_is_no_base_url_is_refused_as_given() {
        let e = GcsBackend::builder("b-1")
            .endpoint("http://h:1/p?x=1")
            .anonymous()
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(&e, GcsConfigError::InvalidEndpoint(given) if given == "http://h:1/p?x=1"),
            "{e}"
        );
    }

    #[test]
    fn bucket_names_are_checked() {
        assert!(valid_bucket("my-bucket_1.test"));
        assert!(!valid_bucket("My-Bucket"));
        assert!(!valid_bucket("ab"));
        assert!(!valid_bucket("-abc"));
        assert!(!valid_bucket("a/b"));
    }
}
