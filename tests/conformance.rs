//! T0 conformance: the same raw JSON-API cases against every GCS server the tests use.
//!
//! Each case is written once, over a [`Server`], and speaks the GCS JSON API directly with
//! `reqwest` (not the crate's `GcsBackend`): this checks the *servers*. The expected result of
//! every case is documented GCS behaviour. The in-repo fake must show no deviation at all.
//! fake-gcs-server 1.54.0 has known deviations, listed BY NAME in [`FAKE_GCS_SERVER_DEVIATIONS`];
//! where one applies, the case asserts that the deviant behaviour really happens, so a fixed
//! version is noticed ("fake-gcs-server no longer deviates: <name>; update the table").
//!
//! Servers: the in-repo `FakeGcs`, a private fake-gcs-server (installed by
//! `.ci/setup-python.sh`; a missing binary is a failure, not a skip), and an external target
//! when `STORAGE_EMULATOR_HOST` and `DIMUTEX_TEST_BUCKET` are set (real GCS or any emulator; no
//! credentials are sent). Objects live under a unique prefix per run and are deleted at the end.
//!
//! Run: `cargo test --all-features --test conformance -- --nocapture`.
#![cfg(all(feature = "testing", feature = "gcs"))]

mod support;

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dimutex::testing::FakeGcs;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, DATE};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use support::emulator::{self, FakeGcsServer};

// ---------------------------------------------------------------------------------------------
// Servers and their known deviations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    InRepoFake,
    FakeGcsServer,
    External,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::InRepoFake => "in-repo fake",
            Kind::FakeGcsServer => "fake-gcs-server",
            Kind::External => "external",
        }
    }
}

#[derive(Clone, Debug)]
struct Server {
    endpoint: String,
    bucket: String,
    kind: Kind,
}

/// A known, named departure of a server from documented GCS behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Deviation {
    UploadIgnoresMetagenerationMatch,
    GetIgnoresPreconditions,
    PatchIgnoresPreconditions,
    PatchKeepsMetageneration,
    PatchKeepsUpdated,
    PatchReplyLacksMetageneration,
    PatchNullKeptAsEmpty,
    DeleteIgnoresPreconditions,
    DeleteAnswers200WithBody,
}

impl Deviation {
    const ALL: [Deviation; 9] = [
        Deviation::UploadIgnoresMetagenerationMatch,
        Deviation::GetIgnoresPreconditions,
        Deviation::PatchIgnoresPreconditions,
        Deviation::PatchKeepsMetageneration,
        Deviation::PatchKeepsUpdated,
        Deviation::PatchReplyLacksMetageneration,
        Deviation::PatchNullKeptAsEmpty,
        Deviation::DeleteIgnoresPreconditions,
        Deviation::DeleteAnswers200WithBody,
    ];

    /// What the deviant server does, against what GCS documents.
    fn describe(self) -> &'static str {
        match self {
            Deviation::UploadIgnoresMetagenerationMatch => {
                "uploads ignore ifMetagenerationMatch (stale one overwrites; on an absent name \
                 it creates); GCS: 412"
            }
            Deviation::GetIgnoresPreconditions => {
                "GET ignores ifGenerationMatch/ifMetagenerationMatch (200); GCS: 412"
            }
            Deviation::PatchIgnoresPreconditions => {
                "PATCH ignores ifGenerationMatch (incl. 0) and ifMetagenerationMatch and applies \
                 the change; GCS: 412"
            }
            Deviation::PatchKeepsMetageneration => "PATCH leaves metageneration as it was; GCS: +1",
            Deviation::PatchKeepsUpdated => "PATCH leaves `updated` as it was; GCS: advances it",
            Deviation::PatchReplyLacksMetageneration => {
                "the PATCH reply has no `metageneration`; GCS: the full object resource"
            }
            Deviation::PatchNullKeptAsEmpty => {
                "a metadata key PATCHed to null is kept with value \"\"; GCS: removes it"
            }
            Deviation::DeleteIgnoresPreconditions => {
                "DELETE ignores ifGenerationMatch (incl. 0) and ifMetagenerationMatch and \
                 deletes; GCS: 412"
            }
            Deviation::DeleteAnswers200WithBody => {
                "DELETE answers 200 with a body; GCS: 204 No Content"
            }
        }
    }
}

impl fmt::Display for Deviation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The measured deviations of fake-gcs-server 1.54.0 (see /tmp/ci-notes.md and
/// `../shared/design/testing.md`; `GetIgnoresPreconditions` measured by this suite).
const FAKE_GCS_SERVER_DEVIATIONS: &[Deviation] = &[
    Deviation::UploadIgnoresMetagenerationMatch,
    Deviation::GetIgnoresPreconditions,
    Deviation::PatchIgnoresPreconditions,
    Deviation::PatchKeepsMetageneration,
    Deviation::PatchKeepsUpdated,
    Deviation::PatchReplyLacksMetageneration,
    Deviation::PatchNullKeptAsEmpty,
    Deviation::DeleteIgnoresPreconditions,
    Deviation::DeleteAnswers200WithBody,
];

/// Whether `kind` is known to deviate from GCS in the way `d` names. The in-repo fake and an
/// external target (real GCS, or an emulator that claims to be faithful) have none.
fn deviation(kind: Kind, d: Deviation) -> bool {
    match kind {
        Kind::FakeGcsServer => FAKE_GCS_SERVER_DEVIATIONS.contains(&d),
        Kind::InRepoFake | Kind::External => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Raw JSON API client
// ---------------------------------------------------------------------------------------------

type Res = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// One HTTP answer.
#[derive(Clone, Debug)]
struct Reply {
    /// `METHOD path?query`, with the run's prefix shortened to `{P}`.
    what: String,
    status: u16,
    date: String,
    body: Vec<u8>,
    /// The body as JSON (`Null` when it is not JSON).
    json: Value,
}

impl Reply {
    fn summary(&self) -> String {
        let body = String::from_utf8_lossy(&self.body);
        let body = body.trim();
        let mut short: String = body.chars().take(200).collect();
        if short.len() < body.len() {
            short.push('…');
        }
        format!("{} → {} {short}", self.what, self.status)
    }

    fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn expect(&self, status: u16) -> Res {
        ensure!(
            self.status == status,
            "{}: expected {status}",
            self.summary()
        );
        Ok(())
    }

    fn expect_2xx(&self) -> Res {
        ensure!(self.success(), "{}: expected 2xx", self.summary());
        Ok(())
    }

    fn meta(&self, key: &str) -> Option<&str> {
        self.json.get("metadata")?.get(key)?.as_str()
    }
}

/// The object fields the cases look at, parsed strictly: int64 fields must be JSON strings.
#[derive(Clone, Debug)]
struct Obj {
    name: String,
    generation: i64,
    metageneration: i64,
    updated: OffsetDateTime,
    metadata: Map<String, Value>,
    cache_control: Option<String>,
}

impl Obj {
    fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key)?.as_str()
    }
}

fn int64_string(reply: &Reply, field: &str) -> Result<i64, String> {
    match reply.json.get(field) {
        Some(Value::String(s)) => s
            .parse::<i64>()
            .map_err(|_| format!("{}: {field} {s:?} is not an int64", reply.summary())),
        Some(other) => Err(format!(
            "{}: {field} is {other}, not a JSON string (GCS sends int64 as strings)",
            reply.summary()
        )),
        None => Err(format!("{}: no {field}", reply.summary())),
    }
}

fn parse_obj(reply: &Reply) -> Result<Obj, String> {
    let name = reply
        .json
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{}: no name", reply.summary()))?
        .to_owned();
    let generation = int64_string(reply, "generation")?;
    let metageneration = int64_string(reply, "metageneration")?;
    let updated = reply
        .json
        .get("updated")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{}: no updated", reply.summary()))?;
    let updated = OffsetDateTime::parse(updated, &Rfc3339).map_err(|e| {
        format!(
            "{}: updated {updated:?} is not RFC 3339: {e}",
            reply.summary()
        )
    })?;
    let metadata = match reply.json.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return Err(format!("{}: metadata is {other}", reply.summary())),
    };
    let cache_control = reply
        .json
        .get("cacheControl")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Obj {
        name,
        generation,
        metageneration,
        updated,
        metadata,
        cache_control,
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so an object name (with its
/// `/` and spaces) is ONE path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn gen_meta(generation: i64, metageneration: i64) -> String {
    format!("ifGenerationMatch={generation}&ifMetagenerationMatch={metageneration}")
}

const BOUNDARY: &str = "dimutex-conformance-3f9a1c";

/// Everything one run against one server needs.
struct Ctx {
    server: Server,
    http: reqwest::Client,
    prefix: String,
    /// Deviations seen to apply, by the case running now (drained after each case).
    confirmed: Mutex<Vec<Deviation>>,
}

impl Ctx {
    fn new(server: Server) -> Ctx {
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5));
        if server.kind != Kind::External {
            http = http.no_proxy();
        }
        let tag = match server.kind {
            Kind::InRepoFake => "in-repo-fake",
            Kind::FakeGcsServer => "fake-gcs-server",
            Kind::External => "external",
        };
        Ctx {
            prefix: support::unique_prefix(&format!("conformance-{tag}")),
            http: http.build().expect("a reqwest client"),
            server,
            confirmed: Mutex::new(Vec::new()),
        }
    }

    fn kind(&self) -> Kind {
        self.server.kind
    }

    /// An object name under this run's prefix (so it contains `/`).
    fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn object_url(&self, name: &str, query: &str) -> String {
        let mut url = format!(
            "{}/storage/v1/b/{}/o/{}",
            self.server.endpoint,
            encode(&self.server.bucket),
            encode(name)
        );
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        url
    }

    async fn send(
        &self,
        method: Method,
        url: String,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Reply, String> {
        let what = format!(
            "{method} {}",
            url.trim_start_matches(&self.server.endpoint)
                .replace(&encode(&self.prefix), "{P}")
        );
        // GCS allows about one mutation per second per object name; a 429 did not take
        // effect, so it is retried (the in-repo fake's throttle is off here).
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self.http.request(method.clone(), &url);
            if let Some((content_type, bytes)) = &body {
                request = request
                    .header(CONTENT_TYPE, *content_type)
                    .body(bytes.clone());
            }
            let response = request.send().await.map_err(|e| format!("{what}: {e}"))?;
            let status = response.status().as_u16();
            let date = response
                .headers()
                .get(DATE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let bytes = response
                .bytes()
                .await
                .map_err(|e| format!("{what}: reading the body: {e}"))?
                .to_vec();
            if status == 429 && attempt < 8 {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                continue;
            }
            let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let mut reply = Reply {
                what,
                status,
                date: String::new(),
                body: bytes,
                json,
            };
            // The `Date` header is part of every case: it is the server clock the lock
            // protocol judges expiry by.
            let Some(date) = date else {
                return Err(format!(
                    "{}: no Date header (GCS sends one on every reply)",
                    reply.summary()
                ));
            };
            reply.date = date;
            return Ok(reply);
        }
    }

    /// A multipart upload: the JSON metadata part (`name`, `cacheControl: no-store`,
    /// `metadata`), then a small media part.
    async fn upload(&self, name: &str, metadata: Value, query: &str) -> Result<Reply, String> {
        let resource = json!({
            "name": name,
            "cacheControl": "no-store",
            "contentType": "text/plain",
            "metadata": metadata,
        });
        let mut body = Vec::new();
        let _ = write!(
            Bytes(&mut body),
            "--{BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n\
             --{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nlock\r\n--{BOUNDARY}--\r\n"
        );
        let mut url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=multipart",
            self.server.endpoint,
            encode(&self.server.bucket)
        );
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        let content_type = format!("multipart/related; boundary={BOUNDARY}");
        self.send(Method::POST, url, Some((&content_type, body)))
            .await
    }

    async fn get(&self, name: &str, query: &str) -> Result<Reply, String> {
        self.send(Method::GET, self.object_url(name, query), None)
            .await
    }

    async fn patch(&self, name: &str, metadata: Value, query: &str) -> Result<Reply, String> {
        let body = serde_json::to_vec(&json!({ "metadata": metadata })).expect("JSON");
        self.send(
            Method::PATCH,
            self.object_url(name, query),
            Some(("application/json", body)),
        )
        .await
    }

    async fn delete(&self, name: &str, query: &str) -> Result<Reply, String> {
        self.send(Method::DELETE, self.object_url(name, query), None)
            .await
    }

    /// Creates `name` with `ifGenerationMatch=0`; it must be 200.
    async fn create(&self, name: &str, metadata: Value) -> Result<Obj, String> {
        let reply = self.upload(name, metadata, "ifGenerationMatch=0").await?;
        reply.expect(200)?;
        parse_obj(&reply)
    }

    /// The object as GET shows it; it must exist.
    async fn current(&self, name: &str) -> Result<Obj, String> {
        let reply = self.get(name, "").await?;
        reply.expect(200)?;
        parse_obj(&reply)
    }

    /// Whether `name` exists (GET 200) or not (GET 404).
    async fn exists(&self, name: &str) -> Result<bool, String> {
        let reply = self.get(name, "").await?;
        match reply.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(format!("{}: expected 200 or 404", reply.summary())),
        }
    }

    /// Creates `name` (`v` = "1"), then overwrites it (`v` = "2"). Returns the current object
    /// and the first, now stale, generation.
    async fn with_stale_generation(&self, name: &str) -> Result<(Obj, i64), String> {
        let first = self.create(name, json!({"v": "1"})).await?;
        let reply = self.upload(name, json!({"v": "2"}), "").await?;
        reply.expect(200)?;
        let now = parse_obj(&reply)?;
        ensure!(
            now.generation != first.generation,
            "{}: an overwrite kept generation {}",
            reply.summary(),
            first.generation
        );
        Ok((now, first.generation))
    }

    /// Creates `name` (`v` = "1") and PATCHes it without preconditions (on GCS: metageneration
    /// 1 → 2, so 1 is stale). Returns the current object and a metageneration that does not
    /// match it: current − 1 when the PATCH bumped it, else current + 1 (so the precondition
    /// checks below do not depend on the `PatchKeepsMetageneration` deviation).
    async fn with_stale_metageneration(&self, name: &str) -> Result<(Obj, i64), String> {
        self.create(name, json!({"v": "1"})).await?;
        self.patch(name, json!({"bump": "1"}), "")
            .await?
            .expect(200)?;
        let now = self.current(name).await?;
        let stale = if now.metageneration > 1 {
            now.metageneration - 1
        } else {
            now.metageneration + 1
        };
        Ok((now, stale))
    }

    /// Judges one observation. `documented`: documented GCS behaviour was seen; `deviant`: the
    /// behaviour of deviation `d` was seen. Where the server is known to deviate, the deviant
    /// behaviour is required (and recorded as confirmed); elsewhere the documented one.
    fn judge(
        &self,
        d: Deviation,
        documented: bool,
        deviant: bool,
        expected: &str,
        observed: impl FnOnce() -> String,
    ) -> Res {
        let label = self.kind().label();
        if deviation(self.kind(), d) {
            if deviant {
                self.confirmed.lock().unwrap().push(d);
                return Ok(());
            }
            if documented {
                return Err(format!(
                    "{label} no longer deviates: {d}; update the table ({})",
                    observed()
                ));
            }
            return Err(format!(
                "{}: neither documented GCS ({expected}) nor the known deviation {d} ({})",
                observed(),
                d.describe()
            ));
        }
        if documented {
            return Ok(());
        }
        let hint = if deviant {
            format!(" — this is deviation {d}: {}", d.describe())
        } else {
            String::new()
        };
        Err(format!("{}: documented GCS: {expected}{hint}", observed()))
    }

    /// Lists the objects under this run's prefix.
    async fn list(&self) -> Result<Vec<String>, String> {
        let url = format!(
            "{}/storage/v1/b/{}/o?prefix={}",
            self.server.endpoint,
            encode(&self.server.bucket),
            encode(&self.prefix)
        );
        let reply = self.send(Method::GET, url, None).await?;
        reply.expect(200)?;
        let items = match reply.json.get("items") {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(format!("{}: items is {other}", reply.summary())),
        };
        items
            .iter()
            .map(|item| {
                item.get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{}: an item without a name", reply.summary()))
            })
            .collect()
    }

    /// Deletes every object under this run's prefix, then checks that none is left.
    async fn cleanup(&self) -> Result<usize, String> {
        let names = self.list().await?;
        for name in &names {
            let reply = self.delete(name, "").await?;
            ensure!(
                reply.success() || reply.status == 404,
                "cleanup: {}",
                reply.summary()
            );
        }
        let left = self.list().await?;
        ensure!(left.is_empty(), "cleanup left {left:?}");
        Ok(names.len())
    }
}

/// `fmt::Write` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        const CASES: &[&str] = &[$(stringify!($case)),*];

        async fn run_case(c: &Ctx, case: &str) -> Res {
            match case {
                $(stringify!($case) => $case(c).await,)*
                other => Err(format!("no case named {other}")),
            }
        }
    };
}

cases![
    insert_if_generation_match_0_creates,
    insert_if_generation_match_0_on_existing_is_412,
    insert_if_generation_match_0_after_delete,
    insert_without_precondition_creates_then_overwrites,
    insert_matching_generation_and_metageneration_overwrites,
    insert_stale_generation_is_412,
    insert_stale_metageneration_is_412,
    insert_if_generation_match_nonzero_on_absent_is_412,
    insert_if_metageneration_match_on_absent_is_412,
    overwrite_gives_new_generation_and_metageneration_1,
    get_returns_the_object_resource,
    get_absent_is_404,
    get_matching_preconditions,
    get_stale_generation_is_412,
    get_stale_metageneration_is_412,
    int64_fields_are_json_strings,
    patch_without_precondition_merges,
    patch_if_generation_match_0_on_existing_is_412,
    patch_matching_generation_and_metageneration,
    patch_stale_generation_is_412,
    patch_stale_metageneration_is_412,
    patch_absent_is_404,
    patch_increments_metageneration,
    patch_advances_updated,
    patch_reply_has_metageneration,
    patch_null_removes_key,
    delete_without_precondition,
    delete_answers_204_no_content,
    delete_if_generation_match_0_on_existing_is_412,
    delete_matching_generation_and_metageneration,
    delete_stale_generation_is_412,
    delete_stale_metageneration_is_412,
    delete_absent_is_404,
    date_header_on_every_reply,
    encoded_name_is_one_path_segment,
];

/// Insert with `ifGenerationMatch=0` on an absent name: 200, metageneration 1, metadata and
/// `cacheControl: no-store` kept, and GET agrees.
async fn insert_if_generation_match_0_creates(c: &Ctx) -> Res {
    let name = c.name("insert-gen0");
    let created = c
        .create(&name, json!({"owner": "conformance#1", "ttl": "30"}))
        .await?;
    ensure!(created.name == name, "created name {:?}", created.name);
    ensure!(
        created.metageneration == 1,
        "a new object has metageneration {}, not 1",
        created.metageneration
    );
    ensure!(
        created.meta("owner") == Some("conformance#1") && created.meta("ttl") == Some("30"),
        "upload reply metadata {:?}",
        created.metadata
    );
    ensure!(
        created.cache_control.as_deref() == Some("no-store"),
        "upload reply cacheControl {:?}",
        created.cache_control
    );
    let got = c.current(&name).await?;
    ensure!(
        got.generation == created.generation && got.metageneration == 1,
        "GET shows g{} m{}, the upload said g{} m1",
        got.generation,
        got.metageneration,
        created.generation
    );
    ensure!(
        got.meta("owner") == Some("conformance#1") && got.meta("ttl") == Some("30"),
        "GET metadata {:?}",
        got.metadata
    );
    ensure!(
        got.cache_control.as_deref() == Some("no-store"),
        "GET cacheControl {:?}",
        got.cache_control
    );
    Ok(())
}

/// Insert with `ifGenerationMatch=0` on an existing name: 412, the object untouched.
async fn insert_if_generation_match_0_on_existing_is_412(c: &Ctx) -> Res {
    let name = c.name("insert-gen0-existing");
    let first = c.create(&name, json!({"v": "1"})).await?;
    let reply = c
        .upload(&name, json!({"v": "x"}), "ifGenerationMatch=0")
        .await?;
    reply.expect(412)?;
    let now = c.current(&name).await?;
    ensure!(
        now.generation == first.generation && now.meta("v") == Some("1"),
        "after a 412 the object changed: {now:?}"
    );
    Ok(())
}

/// Create, delete, create again with `ifGenerationMatch=0`: 200 and a new generation.
async fn insert_if_generation_match_0_after_delete(c: &Ctx) -> Res {
    let name = c.name("insert-gen0-recreate");
    let first = c.create(&name, json!({"v": "1"})).await?;
    c.delete(&name, "").await?.expect_2xx()?;
    let second = c.create(&name, json!({"v": "2"})).await?;
    ensure!(
        second.generation != first.generation && second.metageneration == 1,
        "recreated: g{} m{} (first g{})",
        second.generation,
        second.metageneration,
        first.generation
    );
    Ok(())
}

/// Insert without precondition: creates (metageneration 1), then overwrites (new generation,
/// metageneration 1, metadata replaced — not merged).
async fn insert_without_precondition_creates_then_overwrites(c: &Ctx) -> Res {
    let name = c.name("insert-noprecondition");
    let reply = c.upload(&name, json!({"v": "1", "old": "yes"}), "").await?;
    reply.expect(200)?;
    let first = parse_obj(&reply)?;
    ensure!(
        first.metageneration == 1,
        "new object metageneration {}",
        first.metageneration
    );
    let reply = c.upload(&name, json!({"v": "2"}), "").await?;
    reply.expect(200)?;
    let second = parse_obj(&reply)?;
    ensure!(
        second.generation != first.generation && second.metageneration == 1,
        "overwrite: g{} m{} (was g{})",
        second.generation,
        second.metageneration,
        first.generation
    );
    let now = c.current(&name).await?;
    ensure!(
        now.meta("v") == Some("2") && now.meta("old").is_none(),
        "an overwrite replaces the metadata: {:?}",
        now.metadata
    );
    Ok(())
}

/// Takeover: insert with the current generation and metageneration overwrites atomically.
async fn insert_matching_generation_and_metageneration_overwrites(c: &Ctx) -> Res {
    let name = c.name("insert-matching");
    let first = c.create(&name, json!({"v": "1"})).await?;
    let reply = c
        .upload(
            &name,
            json!({"v": "2"}),
            &gen_meta(first.generation, first.metageneration),
        )
        .await?;
    reply.expect(200)?;
    let second = parse_obj(&reply)?;
    ensure!(
        second.generation != first.generation
            && second.metageneration == 1
            && second.meta("v") == Some("2"),
        "takeover gave {second:?}"
    );
    Ok(())
}

/// Insert with a stale generation (current metageneration): 412, untouched.
async fn insert_stale_generation_is_412(c: &Ctx) -> Res {
    let name = c.name("insert-stale-gen");
    let (now, stale) = c.with_stale_generation(&name).await?;
    let reply = c
        .upload(
            &name,
            json!({"v": "x"}),
            &gen_meta(stale, now.metageneration),
        )
        .await?;
    reply.expect(412)?;
    let after = c.current(&name).await?;
    ensure!(
        after.generation == now.generation && after.meta("v") == Some("2"),
        "after a 412 the object changed: {after:?}"
    );
    Ok(())
}

/// Insert with the current generation but a stale metageneration: 412, untouched.
async fn insert_stale_metageneration_is_412(c: &Ctx) -> Res {
    let name = c.name("insert-stale-meta");
    let (now, stale) = c.with_stale_metageneration(&name).await?;
    let reply = c
        .upload(&name, json!({"v": "x"}), &gen_meta(now.generation, stale))
        .await?;
    let after = c.current(&name).await?;
    let untouched = after.generation == now.generation && after.meta("v") == Some("1");
    let overwritten = after.generation != now.generation && after.meta("v") == Some("x");
    c.judge(
        Deviation::UploadIgnoresMetagenerationMatch,
        reply.status == 412 && untouched,
        reply.status == 200 && overwritten,
        "412 and the object untouched",
        || {
            format!(
                "{}; then g{} v={:?}",
                reply.summary(),
                after.generation,
                after.meta("v")
            )
        },
    )
}

/// Insert with `ifGenerationMatch=N≠0` on an absent name: 412 (not 404), nothing created.
async fn insert_if_generation_match_nonzero_on_absent_is_412(c: &Ctx) -> Res {
    let name = c.name("insert-gen5-absent");
    let reply = c
        .upload(&name, json!({"v": "x"}), "ifGenerationMatch=5")
        .await?;
    reply.expect(412)?;
    ensure!(!c.exists(&name).await?, "a 412 upload created the object");
    Ok(())
}

/// Insert with only `ifMetagenerationMatch` on an absent name: 412, nothing created.
async fn insert_if_metageneration_match_on_absent_is_412(c: &Ctx) -> Res {
    let name = c.name("insert-meta1-absent");
    let reply = c
        .upload(&name, json!({"v": "x"}), "ifMetagenerationMatch=1")
        .await?;
    let exists = c.exists(&name).await?;
    c.judge(
        Deviation::UploadIgnoresMetagenerationMatch,
        reply.status == 412 && !exists,
        reply.status == 200 && exists,
        "412 and no object",
        || format!("{}; exists afterwards: {exists}", reply.summary()),
    )
}

/// An overwrite of a PATCHed object (metageneration 2) makes a new generation with
/// metageneration 1 again.
async fn overwrite_gives_new_generation_and_metageneration_1(c: &Ctx) -> Res {
    let name = c.name("overwrite-resets");
    let first = c.create(&name, json!({"v": "1"})).await?;
    c.patch(&name, json!({"v": "1b"}), "").await?.expect(200)?;
    let patched = c.current(&name).await?;
    c.judge(
        Deviation::PatchKeepsMetageneration,
        patched.metageneration == 2,
        patched.metageneration == 1,
        "metageneration 2 after one PATCH",
        || format!("after one PATCH: m{}", patched.metageneration),
    )?;
    let reply = c
        .upload(
            &name,
            json!({"v": "2"}),
            &gen_meta(patched.generation, patched.metageneration),
        )
        .await?;
    reply.expect(200)?;
    let second = parse_obj(&reply)?;
    ensure!(
        second.generation != first.generation && second.metageneration == 1,
        "overwrite: g{} m{} (was g{} m{})",
        second.generation,
        second.metageneration,
        patched.generation,
        patched.metageneration
    );
    let now = c.current(&name).await?;
    ensure!(
        now.generation == second.generation && now.metageneration == 1,
        "GET after overwrite: g{} m{}",
        now.generation,
        now.metageneration
    );
    Ok(())
}

/// GET: the object resource with name, bucket, generation, metageneration, `updated`,
/// metadata, `cacheControl`.
async fn get_returns_the_object_resource(c: &Ctx) -> Res {
    let name = c.name("get");
    let created = c.create(&name, json!({"owner": "o", "ttl": "9"})).await?;
    let reply = c.get(&name, "").await?;
    reply.expect(200)?;
    let got = parse_obj(&reply)?;
    ensure!(
        reply.json.get("bucket").and_then(Value::as_str) == Some(c.server.bucket.as_str()),
        "{}: bucket",
        reply.summary()
    );
    ensure!(
        got.name == name
            && got.generation == created.generation
            && got.metageneration == created.metageneration
            && got.updated == created.updated,
        "GET {got:?} vs upload {created:?}"
    );
    ensure!(
        got.meta("owner") == Some("o") && got.meta("ttl") == Some("9"),
        "metadata {:?}",
        got.metadata
    );
    Ok(())
}

/// GET of an absent object: 404.
async fn get_absent_is_404(c: &Ctx) -> Res {
    c.get(&c.name("get-absent"), "").await?.expect(404)
}

/// GET with the current generation and metageneration: 200.
async fn get_matching_preconditions(c: &Ctx) -> Res {
    let name = c.name("get-matching");
    let o = c.create(&name, json!({"v": "1"})).await?;
    c.get(&name, &gen_meta(o.generation, o.metageneration))
        .await?
        .expect(200)
}

/// GET with a stale generation: 412.
async fn get_stale_generation_is_412(c: &Ctx) -> Res {
    let name = c.name("get-stale-gen");
    let (now, stale) = c.with_stale_generation(&name).await?;
    let reply = c.get(&name, &gen_meta(stale, now.metageneration)).await?;
    c.judge(
        Deviation::GetIgnoresPreconditions,
        reply.status == 412,
        reply.status == 200,
        "412",
        || reply.summary(),
    )
}

/// GET with the current generation and a stale metageneration: 412.
async fn get_stale_metageneration_is_412(c: &Ctx) -> Res {
    let name = c.name("get-stale-meta");
    let (now, stale) = c.with_stale_metageneration(&name).await?;
    let reply = c.get(&name, &gen_meta(now.generation, stale)).await?;
    c.judge(
        Deviation::GetIgnoresPreconditions,
        reply.status == 412,
        reply.status == 200,
        "412",
        || reply.summary(),
    )
}

/// `generation`, `metageneration` (and `size`) are JSON strings in upload, GET, list and PATCH
/// replies.
async fn int64_fields_are_json_strings(c: &Ctx) -> Res {
    let name = c.name("int64-strings");
    let upload = c.upload(&name, json!({"v": "1"}), "").await?;
    upload.expect(200)?;
    let get = c.get(&name, "").await?;
    get.expect(200)?;
    for reply in [&upload, &get] {
        for field in ["generation", "metageneration", "size"] {
            int64_string(reply, field)?;
        }
    }
    let list_url = format!(
        "{}/storage/v1/b/{}/o?prefix={}",
        c.server.endpoint,
        encode(&c.server.bucket),
        encode(&name)
    );
    let list = c.send(Method::GET, list_url, None).await?;
    list.expect(200)?;
    let item = list
        .json
        .get("items")
        .and_then(|items| items.get(0))
        .cloned()
        .ok_or_else(|| format!("{}: no items", list.summary()))?;
    let item = Reply {
        json: item,
        ..list.clone()
    };
    int64_string(&item, "generation")?;
    int64_string(&item, "metageneration")?;
    let patch = c.patch(&name, json!({"v": "2"}), "").await?;
    patch.expect(200)?;
    int64_string(&patch, "generation")?;
    if patch.json.get("metageneration").is_some() {
        int64_string(&patch, "metageneration")?;
    }
    Ok(())
}

/// PATCH without precondition: 200, metadata merged key by key, same generation.
async fn patch_without_precondition_merges(c: &Ctx) -> Res {
    let name = c.name("patch-noprecondition");
    let o = c
        .create(&name, json!({"keep": "k", "change": "old"}))
        .await?;
    let reply = c
        .patch(&name, json!({"change": "new", "add": "a"}), "")
        .await?;
    reply.expect(200)?;
    ensure!(
        reply.meta("keep") == Some("k")
            && reply.meta("change") == Some("new")
            && reply.meta("add") == Some("a"),
        "{}: the reply's metadata is not the merge",
        reply.summary()
    );
    ensure!(
        int64_string(&reply, "generation")? == o.generation,
        "{}: PATCH changed the generation",
        reply.summary()
    );
    let now = c.current(&name).await?;
    ensure!(
        now.generation == o.generation
            && now.meta("keep") == Some("k")
            && now.meta("change") == Some("new")
            && now.meta("add") == Some("a"),
        "after PATCH: {now:?}"
    );
    Ok(())
}

/// Shared judgement of a refused PATCH: documented 412 and no change, or (deviation) 200 and
/// the change applied.
fn judge_refused_patch(c: &Ctx, reply: &Reply, before: &Obj, after: &Obj) -> Res {
    let untouched = after.meta("p").is_none() && after.metageneration == before.metageneration;
    let applied = after.meta("p") == Some("x");
    c.judge(
        Deviation::PatchIgnoresPreconditions,
        reply.status == 412 && untouched,
        reply.status == 200 && applied,
        "412 and the object untouched",
        || {
            format!(
                "{}; then m{} p={:?}",
                reply.summary(),
                after.metageneration,
                after.meta("p")
            )
        },
    )
}

/// PATCH with `ifGenerationMatch=0` on an existing object: 412.
async fn patch_if_generation_match_0_on_existing_is_412(c: &Ctx) -> Res {
    let name = c.name("patch-gen0");
    let before = c.create(&name, json!({"v": "1"})).await?;
    let reply = c
        .patch(&name, json!({"p": "x"}), "ifGenerationMatch=0")
        .await?;
    let after = c.current(&name).await?;
    judge_refused_patch(c, &reply, &before, &after)
}

/// PATCH with the current generation and metageneration: 200, applied.
async fn patch_matching_generation_and_metageneration(c: &Ctx) -> Res {
    let name = c.name("patch-matching");
    let o = c.create(&name, json!({"v": "1"})).await?;
    let reply = c
        .patch(
            &name,
            json!({"p": "x"}),
            &gen_meta(o.generation, o.metageneration),
        )
        .await?;
    reply.expect(200)?;
    let now = c.current(&name).await?;
    ensure!(
        now.generation == o.generation && now.meta("p") == Some("x"),
        "after a matching PATCH: {now:?}"
    );
    Ok(())
}

/// PATCH with a stale generation: 412.
async fn patch_stale_generation_is_412(c: &Ctx) -> Res {
    let name = c.name("patch-stale-gen");
    let (before, stale) = c.with_stale_generation(&name).await?;
    let reply = c
        .patch(
            &name,
            json!({"p": "x"}),
            &gen_meta(stale, before.metageneration),
        )
        .await?;
    let after = c.current(&name).await?;
    judge_refused_patch(c, &reply, &before, &after)
}

/// PATCH with the current generation and a stale metageneration: 412.
async fn patch_stale_metageneration_is_412(c: &Ctx) -> Res {
    let name = c.name("patch-stale-meta");
    let (before, stale) = c.with_stale_metageneration(&name).await?;
    let reply = c
        .patch(
            &name,
            json!({"p": "x"}),
            &gen_meta(before.generation, stale),
        )
        .await?;
    let after = c.current(&name).await?;
    judge_refused_patch(c, &reply, &before, &after)
}

/// PATCH of an absent object: 404 — with no precondition, and with the generation and
/// metageneration of a deleted object (a refresh of a lock someone released).
async fn patch_absent_is_404(c: &Ctx) -> Res {
    let name = c.name("patch-absent");
    c.patch(&name, json!({"p": "x"}), "").await?.expect(404)?;
    let o = c.create(&name, json!({"v": "1"})).await?;
    c.delete(&name, "").await?.expect_2xx()?;
    c.patch(
        &name,
        json!({"p": "x"}),
        &gen_meta(o.generation, o.metageneration),
    )
    .await?
    .expect(404)?;
    ensure!(!c.exists(&name).await?, "a 404 PATCH created the object");
    Ok(())
}

/// Each PATCH increments metageneration: 1 → 2 → 3 (seen by GET).
async fn patch_increments_metageneration(c: &Ctx) -> Res {
    let name = c.name("patch-metageneration");
    c.create(&name, json!({"v": "1"})).await?;
    let mut seen = Vec::new();
    for v in ["2", "3"] {
        c.patch(&name, json!({"v": v}), "").await?.expect(200)?;
        seen.push(c.current(&name).await?.metageneration);
    }
    c.judge(
        Deviation::PatchKeepsMetageneration,
        seen == [2, 3],
        seen == [1, 1],
        "metagenerations 2, 3 after two PATCHes",
        || format!("metagenerations after two PATCHes: {seen:?}"),
    )
}

/// A PATCH advances `updated` (GCS sets it at every metadata change).
async fn patch_advances_updated(c: &Ctx) -> Res {
    let name = c.name("patch-updated");
    let created = c.create(&name, json!({"v": "1"})).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.patch(&name, json!({"v": "2"}), "").await?.expect(200)?;
    let now = c.current(&name).await?;
    c.judge(
        Deviation::PatchKeepsUpdated,
        now.updated > created.updated,
        now.updated == created.updated,
        "`updated` later than at create",
        || {
            format!(
                "updated at create {}, after PATCH {}",
                created.updated, now.updated
            )
        },
    )
}

/// The PATCH reply is the whole object resource, including its new metageneration.
async fn patch_reply_has_metageneration(c: &Ctx) -> Res {
    let name = c.name("patch-reply");
    c.create(&name, json!({"v": "1"})).await?;
    let reply = c.patch(&name, json!({"v": "2"}), "").await?;
    reply.expect(200)?;
    let now = c.current(&name).await?;
    let in_reply = reply.json.get("metageneration").cloned();
    let documented = match &in_reply {
        Some(Value::String(s)) => s.parse::<i64>().ok() == Some(now.metageneration),
        _ => false,
    };
    c.judge(
        Deviation::PatchReplyLacksMetageneration,
        documented,
        in_reply.is_none(),
        "a string metageneration equal to GET's",
        || {
            format!(
                "{}; GET says metageneration {}",
                reply.summary(),
                now.metageneration
            )
        },
    )
}

/// PATCH `{"metadata":{"k":null}}` removes key `k` and keeps the others.
async fn patch_null_removes_key(c: &Ctx) -> Res {
    let name = c.name("patch-null");
    c.create(&name, json!({"gone": "1", "kept": "2"})).await?;
    c.patch(&name, json!({"gone": null}), "")
        .await?
        .expect(200)?;
    let now = c.current(&name).await?;
    ensure!(
        now.meta("kept") == Some("2"),
        "the other key was lost: {:?}",
        now.metadata
    );
    c.judge(
        Deviation::PatchNullKeptAsEmpty,
        !now.metadata.contains_key("gone"),
        now.meta("gone") == Some(""),
        "the key removed",
        || format!("metadata after PATCH to null: {:?}", now.metadata),
    )
}

/// DELETE without precondition: some 2xx, then GET 404.
async fn delete_without_precondition(c: &Ctx) -> Res {
    let name = c.name("delete-noprecondition");
    c.create(&name, json!({"v": "1"})).await?;
    c.delete(&name, "").await?.expect_2xx()?;
    ensure!(!c.exists(&name).await?, "the object is still there");
    Ok(())
}

/// DELETE answers 204 with an empty body (clients must still accept any 2xx).
async fn delete_answers_204_no_content(c: &Ctx) -> Res {
    let name = c.name("delete-204");
    c.create(&name, json!({"v": "1"})).await?;
    let reply = c.delete(&name, "").await?;
    c.judge(
        Deviation::DeleteAnswers200WithBody,
        reply.status == 204 && reply.body.is_empty(),
        reply.status == 200 && !reply.body.is_empty(),
        "204 with an empty body",
        || reply.summary(),
    )
}

/// Shared judgement of a refused DELETE: documented 412 and the object still there, or
/// (deviation) 2xx and the object gone.
async fn judge_refused_delete(c: &Ctx, reply: &Reply, name: &str) -> Res {
    let exists = c.exists(name).await?;
    c.judge(
        Deviation::DeleteIgnoresPreconditions,
        reply.status == 412 && exists,
        reply.success() && !exists,
        "412 and the object still there",
        || format!("{}; exists afterwards: {exists}", reply.summary()),
    )
}

/// DELETE with `ifGenerationMatch=0` on an existing object: 412.
async fn delete_if_generation_match_0_on_existing_is_412(c: &Ctx) -> Res {
    let name = c.name("delete-gen0");
    c.create(&name, json!({"v": "1"})).await?;
    let reply = c.delete(&name, "ifGenerationMatch=0").await?;
    judge_refused_delete(c, &reply, &name).await
}

/// DELETE with the current generation and metageneration: 2xx, gone.
async fn delete_matching_generation_and_metageneration(c: &Ctx) -> Res {
    let name = c.name("delete-matching");
    let o = c.create(&name, json!({"v": "1"})).await?;
    c.delete(&name, &gen_meta(o.generation, o.metageneration))
        .await?
        .expect_2xx()?;
    ensure!(!c.exists(&name).await?, "the object is still there");
    Ok(())
}

/// DELETE with a stale generation: 412.
async fn delete_stale_generation_is_412(c: &Ctx) -> Res {
    let name = c.name("delete-stale-gen");
    let (now, stale) = c.with_stale_generation(&name).await?;
    let reply = c
        .delete(&name, &gen_meta(stale, now.metageneration))
        .await?;
    judge_refused_delete(c, &reply, &name).await
}

/// DELETE with the current generation and a stale metageneration: 412.
async fn delete_stale_metageneration_is_412(c: &Ctx) -> Res {
    let name = c.name("delete-stale-meta");
    let (now, stale) = c.with_stale_metageneration(&name).await?;
    let reply = c.delete(&name, &gen_meta(now.generation, stale)).await?;
    judge_refused_delete(c, &reply, &name).await
}

/// DELETE of an absent object: 404 — with no precondition, and with the generation and
/// metageneration of an already deleted object (a release that was already done).
async fn delete_absent_is_404(c: &Ctx) -> Res {
    let name = c.name("delete-absent");
    c.delete(&name, "").await?.expect(404)?;
    let o = c.create(&name, json!({"v": "1"})).await?;
    let query = gen_meta(o.generation, o.metageneration);
    c.delete(&name, &query).await?.expect_2xx()?;
    c.delete(&name, &query).await?.expect(404)
}

/// Every reply — 200, 2xx, 404, 412, on upload, GET, PATCH, DELETE — has a `Date` header in
/// HTTP-date form close to this machine's clock.
async fn date_header_on_every_reply(c: &Ctx) -> Res {
    let name = c.name("date-header");
    let mut replies = vec![
        c.upload(&name, json!({"v": "1"}), "ifGenerationMatch=0")
            .await?,
    ];
    replies.push(
        c.upload(&name, json!({"v": "1"}), "ifGenerationMatch=0")
            .await?,
    );
    replies.push(c.get(&name, "").await?);
    replies.push(c.patch(&name, json!({"v": "2"}), "").await?);
    replies.push(c.delete(&name, "").await?);
    replies.push(c.get(&name, "").await?);
    replies.push(c.patch(&name, json!({"v": "3"}), "").await?);
    replies.push(c.delete(&name, "").await?);
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    ensure!(
        statuses[0] == 200
            && statuses[1] == 412
            && statuses[2] == 200
            && statuses[3] == 200
            && (200..300).contains(&statuses[4])
            && statuses[5..] == [404, 404, 404],
        "unexpected statuses {statuses:?}"
    );
    for reply in &replies {
        let date = httpdate::parse_http_date(&reply.date)
            .map_err(|e| format!("{}: Date {:?}: {e}", reply.summary(), reply.date))?;
        let skew = match date.duration_since(SystemTime::now()) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration(),
        };
        ensure!(
            skew < Duration::from_secs(3600),
            "{}: Date {:?} is {skew:?} off this machine's clock",
            reply.summary(),
            reply.date
        );
    }
    Ok(())
}

/// A name with `/` and a space, percent-encoded as ONE path segment, works for GET, PATCH and
/// DELETE; its "parent directory" is no object.
async fn encoded_name_is_one_path_segment(c: &Ctx) -> Res {
    let parent = c.name("encoded dir");
    let name = format!("{parent}/a b/c");
    let o = c.create(&name, json!({"v": "1"})).await?;
    ensure!(o.name == name, "created as {:?}, not {name:?}", o.name);
    let got = c.current(&name).await?;
    ensure!(got.name == name, "GET names it {:?}", got.name);
    ensure!(
        !c.exists(&parent).await?,
        "the parent {parent:?} exists as an object"
    );
    let listed = c.list().await?;
    ensure!(listed.contains(&name), "list {listed:?} lacks {name:?}");
    c.patch(
        &name,
        json!({"p": "x"}),
        &gen_meta(o.generation, got.metageneration),
    )
    .await?
    .expect(200)?;
    ensure!(
        c.current(&name).await?.meta("p") == Some("x"),
        "the PATCH went elsewhere"
    );
    c.delete(&name, "").await?.expect_2xx()?;
    ensure!(!c.exists(&name).await?, "the DELETE went elsewhere");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------------------------

const CASE_TIMEOUT: Duration = Duration::from_secs(60);

struct Row {
    case: String,
    result: Res,
    confirmed: Vec<Deviation>,
}

/// Runs every case against `server`, prints the table, and fails if any case failed.
async fn conformance(server: Server) {
    let ctx = Arc::new(Ctx::new(server.clone()));
    let mut rows = Vec::new();
    for &case in CASES {
        let c = ctx.clone();
        let task = tokio::spawn(async move {
            match tokio::time::timeout(CASE_TIMEOUT, run_case(&c, case)).await {
                Ok(result) => result,
                Err(_) => Err(format!("timed out after {CASE_TIMEOUT:?}")),
            }
        });
        let result = match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(format!("panicked: {}", panic_message(e))),
            Err(e) => Err(format!("task failed: {e}")),
        };
        let confirmed = std::mem::take(&mut *ctx.confirmed.lock().unwrap());
        rows.push(Row {
            case: case.to_owned(),
            result,
            confirmed,
        });
    }

    // Every listed deviation must have been seen by some case, or the table is stale.
    let known: BTreeSet<Deviation> = Deviation::ALL
        .into_iter()
        .filter(|d| deviation(server.kind, *d))
        .collect();
    if !known.is_empty() {
        let seen: BTreeSet<Deviation> = rows.iter().flat_map(|r| r.confirmed.clone()).collect();
        let unseen: Vec<_> = known.difference(&seen).collect();
        rows.push(Row {
            case: "(every listed deviation observed)".into(),
            result: if unseen.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "listed for {} but never observed: {unseen:?}",
                    server.kind.label()
                ))
            },
            confirmed: Vec::new(),
        });
    }

    let cleanup = ctx.cleanup().await;
    rows.push(Row {
        case: "(cleanup: no objects left under the prefix)".into(),
        result: cleanup.as_ref().map(|_| ()).map_err(Clone::clone),
        confirmed: Vec::new(),
    });

    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    let mut table = format!(
        "\nT0 conformance — {} ({}, bucket {}, prefix {})\n",
        server.kind.label(),
        server.endpoint,
        server.bucket,
        ctx.prefix
    );
    let width = rows.iter().map(|r| r.case.len()).max().unwrap_or(0);
    for row in &rows {
        let result = match &row.result {
            Ok(()) if row.confirmed.is_empty() => "ok".to_owned(),
            Ok(()) => {
                let mut names: Vec<String> = row.confirmed.iter().map(|d| d.to_string()).collect();
                names.dedup();
                format!("ok (known deviation: {})", names.join(", "))
            }
            Err(e) => format!("FAIL: {e}"),
        };
        let _ = writeln!(table, "  {:<width$}  {result}", row.case);
    }
    let _ = writeln!(
        table,
        "  {} cases + {} suite checks: {} passed, {failed} failed; objects cleaned up: {}",
        CASES.len(),
        rows.len() - CASES.len(),
        rows.len() - failed,
        cleanup.map_or_else(|_| "?".to_owned(), |n| n.to_string())
    );
    println!("{table}");
    assert_eq!(
        failed,
        0,
        "{failed} conformance check(s) failed on {}; see the table above",
        server.kind.label()
    );
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_in_repo_fake() {
    let fake = FakeGcs::start().await.expect("start the in-repo fake");
    conformance(Server {
        endpoint: fake.endpoint(),
        bucket: FakeGcs::DEFAULT_BUCKET.to_owned(),
        kind: Kind::InRepoFake,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_fake_gcs_server() {
    let server = FakeGcsServer::start().await;
    conformance(Server {
        endpoint: server.endpoint().to_owned(),
        bucket: server.bucket().to_owned(),
        kind: Kind::FakeGcsServer,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_external() {
    let Some((endpoint, bucket)) = emulator::external_target() else {
        println!(
            "conformance_external: SKIPPED — no external target configured; set \
             STORAGE_EMULATOR_HOST (host:port or URL) and DIMUTEX_TEST_BUCKET to run the \
             conformance cases against real GCS or another emulator"
        );
        return;
    };
    conformance(Server {
        endpoint,
        bucket,
        kind: Kind::External,
    })
    .await;
}

/// Prints the known deviations of fake-gcs-server, by name; the other servers have none.
#[test]
fn fake_gcs_server_deviation_list() {
    let mut out = String::from("\nKnown deviations of fake-gcs-server 1.54.0 from GCS:\n");
    for d in Deviation::ALL {
        if deviation(Kind::FakeGcsServer, d) {
            let _ = writeln!(out, "  {:<34} {}", d.to_string(), d.describe());
        }
    }
    println!("{out}");
    for d in FAKE_GCS_SERVER_DEVIATIONS {
        assert!(
            Deviation::ALL.contains(d),
            "{d} missing from Deviation::ALL"
        );
    }
    for kind in [Kind::InRepoFake, Kind::External] {
        for d in Deviation::ALL {
            assert!(
                !deviation(kind, d),
                "{} must have no deviations, but lists {d}",
                kind.label()
            );
        }
    }
}
