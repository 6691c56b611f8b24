//! Target 6: a request through `IdempotencyLayer`, the first with its key and a replay,
//! versus the reqwest floor of the same HTTP requests.
//!
//! - Ours: an `IdempotencyLayer` service over [`our_client`], called in process
//!   (`oneshot`) with a small JSON request body; its handler answers 201 with a 100-byte
//!   JSON body at once. Each request is timed from the call to its collected body. A first
//!   request (a fresh key) is the create (`ifGenerationMatch=0`), the handler, and the record
//!   write: a multipart upload conditional on the lock's generation and metageneration, with
//!   status, headers, fingerprint and base64 body in the metadata and no contents. A replay
//!   (a key completed before the round) is the create, refused with 412, and one GET of the
//!   object resource.
//! - The floor: the same requests sent directly with `reqwest` by [`Floor`]: a create, then
//!   the upload of a record of the same fields and sizes conditional on the create's
//!   generation and metageneration 1; or a create refused with 412, then a GET of the object.
//!
//! Rounds as in target 1 ([`cycle::interleaved`]): fresh pools each round, ours and the
//! floor alternating which goes first, one current-thread runtime.
//!
//! Records are deleted as they are made: after each timed first request (ours and the
//! floor's alike), its worker reads the record's generation and deletes it conditionally,
//! through a third pool, before its next request. fake-gcs-server's creates slow down with
//! every object in the bucket (about 2.3 µs each: 0.9 ms per create at 200 objects, 5 ms at
//! 2000), so records left until the end of a round made whichever arm ran second slower
//! (c = 16 medians of 30 ms next to 75 ms) and measured the bucket's growth. The replayed
//! records of a round are deleted at its end, each conditional on its generation.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use dimutex::idempotency::{IdempotencyLayer, IdempotentBody};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

use super::cycle::{self, Floor, LatencyPlan, OUR_PREFIX, Round, Runner, Timed, our_client};
use super::servers::GcsTarget;
use super::util::{Figure, Goal, Result};

const PATH: &str = "/jobs/report/run";
const REQUEST_BODY: &[u8] = br#"{"report":"daily-summary","day":"2026-01-01","notify":true}"#;
/// The handler's answer: 100 bytes.
const RESPONSE_BODY: &[u8] =
    br#"{"job":"job-7f3a9c21e4b05d68","report":"daily-summary","state":"queued","at":"2026-01-01T00:00:00Z"}"#;

/// Where ours' records are: [`our_client`]'s prefix, then the layer's.
const OURS_PREFIX: &str = "bench/idempotency/";

/// Where the handler puts the object name of its request's record (its lock's key under
/// [`OUR_PREFIX`]), so that the worker can delete the record once it is timed.
#[derive(Clone, Default)]
struct RecordName(Arc<Mutex<Option<String>>>);
/// Where the floor's records are.
const FLOOR_PREFIX: &str = "bench-floor/idem/";
/// The ttl of a record: the layer's default retention (24 h), in seconds.
const RECORD_TTL: &str = "86400";
/// Deletes at a time when a round's objects are cleaned up.
const DELETERS: usize = 8;

/// Which request of a key is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The first request with a fresh key: it runs the handler and stores its response.
    First,
    /// A duplicate of a key completed before: the stored response.
    Replay,
}

impl Kind {
    pub fn metric(self, label: &str, concurrency: usize) -> String {
        let kind = match self {
            Kind::First => "first",
            Kind::Replay => "replay",
        };
        format!("idempotency_{kind}_p50 {label} c={concurrency}")
    }
}

/// The handler under the layer: 201 and [`RESPONSE_BODY`] at once (after noting its
/// record's name, if asked to).
async fn handler(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let extensions = request.extensions();
    if let (Some(slot), Some(held)) = (
        extensions.get::<RecordName>(),
        extensions.get::<dimutex::HeldLock>(),
    ) {
        let name = format!("{OUR_PREFIX}{}", held.key());
        *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(name);
    }
    let mut response = Response::new(Full::new(Bytes::from_static(RESPONSE_BODY)));
    *response.status_mut() = StatusCode::CREATED;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// One request with the key `key` through `service`, timed from the call to its collected
/// body; an error unless it is the handler's answer, replayed or not as `replay` says. With
/// `slot`, the handler notes its record's name there.
async fn timed<S>(
    service: S,
    key: String,
    replay: bool,
    slot: Option<&RecordName>,
) -> Result<Duration>
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<IdempotentBody<Full<Bytes>>>,
            Error = Infallible,
        >,
{
    let mut request = Request::post(PATH)
        .header("idempotency-key", key.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(REQUEST_BODY)))?;
    if let Some(slot) = slot {
        request.extensions_mut().insert(slot.clone());
    }
    let t = Instant::now();
    let response = service.oneshot(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    let elapsed = t.elapsed();
    let replayed = parts.headers.contains_key("idempotent-replayed");
    if parts.status != StatusCode::CREATED || body != RESPONSE_BODY || replayed != replay {
        return Err(format!(
            "key {key}: HTTP {} (replayed: {replayed}, expected {replay}), body {:?}",
            parts.status,
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    Ok(elapsed)
}

/// The record fields of the floor's record write, as the layer stores the handler's answer:
/// status, headers (JSON), fingerprint (64 hex digits) and the base64 body.
fn record_fields() -> serde_json::Map<String, serde_json::Value> {
    let headers = serde_json::json!([["content-type", "application/json"]]).to_string();
    let mut fields = serde_json::Map::new();
    fields.insert("status".into(), "201".into());
    fields.insert("headers".into(), headers.into());
    fields.insert(
        "fingerprint".into(),
        format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        )
        .into(),
    );
    let body = base64::engine::general_purpose::STANDARD.encode(RESPONSE_BODY);
    fields.insert("body".into(), body.into());
    fields
}

/// The floor's first request: a create, then the record write over it.
async fn floor_first(
    floor: &Floor,
    name: &str,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let generation = floor.create(name).await?;
    floor
        .record(name, generation, 1, fields, RECORD_TTL, b"")
        .await
}

/// The object name of the floor's record number `n` of run `run`: as long as ours (a prefix
/// and 64 hex digits).
fn floor_name(run: u32, n: usize) -> String {
    format!("{FLOOR_PREFIX}{run:08x}{n:056x}")
}

/// Target 6 on one server at one concurrency for `kind`.
pub async fn latency(
    target: &GcsTarget,
    kind: Kind,
    concurrency: usize,
    plan: &LatencyPlan,
) -> Result<(Figure, String)> {
    let (target, plan) = (target.clone(), *plan);
    cycle::on_current_thread(move || async move {
        latency_here(&target, kind, concurrency, &plan).await
    })
    .await
}

async fn latency_here(
    target: &GcsTarget,
    kind: Kind,
    concurrency: usize,
    plan: &LatencyPlan,
) -> Result<(Figure, String)> {
    let run = rand::random::<u32>();
    let seq = Arc::new(AtomicUsize::new(0));
    let fields = Arc::new(record_fields());
    // Records deleted as they were made, and at the rounds' ends.
    let (deleted_each, deleted_at_end) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let samples = cycle::interleaved(concurrency, plan, |round| {
        let (seq, fields) = (seq.clone(), fields.clone());
        let (deleted_each, deleted_at_end) = (deleted_each.clone(), deleted_at_end.clone());
        async move {
            let client = our_client(target).await?;
            let service = IdempotencyLayer::new(client.clone()).layer(tower::service_fn(handler));
            let floor = Arc::new(Floor::new(target)?);
            // The pool that deletes each first request's record, for ours and the floor alike.
            let cleaner = Arc::new(Floor::new(target)?);
            let (ours, theirs): (Runner, Runner) = match kind {
                Kind::First => {
                    let (ours_seq, c, d) = (seq.clone(), cleaner.clone(), deleted_each.clone());
                    let ours = move |_w: usize| -> Timed {
                        let n = ours_seq.fetch_add(1, Ordering::Relaxed);
                        let (service, cleaner, deleted) = (service.clone(), c.clone(), d.clone());
                        Box::pin(async move {
                            let slot = RecordName::default();
                            let elapsed =
                                timed(service, format!("{run:08x}-{n}"), false, Some(&slot))
                                    .await?;
                            let name = slot.0.lock().unwrap_or_else(|e| e.into_inner()).take();
                            cleaner
                                .delete_current(&name.ok_or("the handler saw no HeldLock")?)
                                .await?;
                            deleted.fetch_add(1, Ordering::Relaxed);
                            Ok(elapsed)
                        })
                    };
                    let f = floor.clone();
                    let theirs = move |_w: usize| -> Timed {
                        let name = floor_name(run, seq.fetch_add(1, Ordering::Relaxed));
                        let (floor, fields) = (f.clone(), fields.clone());
                        let (cleaner, deleted) = (cleaner.clone(), deleted_each.clone());
                        Box::pin(async move {
                            let t = Instant::now();
                            floor_first(&floor, &name, &fields).await?;
                            let elapsed = t.elapsed();
                            cleaner.delete_current(&name).await?;
                            deleted.fetch_add(1, Ordering::Relaxed);
                            Ok(elapsed)
                        })
                    };
                    (Arc::new(ours), Arc::new(theirs))
                }
                Kind::Replay => {
                    // Worker w replays key w, completed here before the round.
                    let keys: Vec<String> = (0..concurrency)
                        .map(|w| format!("{run:08x}-r{round}-w{w}"))
                        .collect();
                    let names: Vec<String> = (0..concurrency)
                        .map(|_| floor_name(run, seq.fetch_add(1, Ordering::Relaxed)))
                        .collect();
                    for (key, name) in keys.iter().zip(&names) {
                        timed(service.clone(), key.clone(), false, None).await?;
                        floor_first(&floor, name, &fields).await?;
                    }
                    let ours = move |w: usize| -> Timed {
                        Box::pin(timed(service.clone(), keys[w].clone(), true, None))
                    };
                    let f = floor.clone();
                    let theirs = move |w: usize| -> Timed {
                        let (floor, name) = (f.clone(), names[w].clone());
                        Box::pin(async move {
                            let t = Instant::now();
                            floor.create_refused(&name).await?;
                            // What a replay needs of the resource: its metadata.
                            let resource = floor.get(&name).await?;
                            let resource: serde_json::Value = serde_json::from_slice(&resource)?;
                            if !resource["metadata"].is_object() {
                                return Err("floor replay: no metadata".into());
                            }
                            Ok(t.elapsed())
                        })
                    };
                    (Arc::new(ours), Arc::new(theirs))
                }
            };
            Ok(Round {
                ours,
                floor: theirs,
                finish: Box::pin(async move {
                    client.shutdown(Duration::from_secs(10)).await?;
                    let n = floor.delete_under(OURS_PREFIX, DELETERS).await?
                        + floor.delete_under(FLOOR_PREFIX, DELETERS).await?;
                    deleted_at_end.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                }),
            })
        }
    })
    .await?;
    let floor = Floor::new(target)?;
    let left = floor.list(OURS_PREFIX).await?.len() + floor.list(FLOOR_PREFIX).await?.len();
    let label = cycle::short_label(&target.label);
    let what = match kind {
        Kind::First => "first requests",
        Kind::Replay => "replays",
    };
    let head = format!("idempotency {what} {} c={concurrency}", target.label);
    let note = format!(
        "{}; records deleted as they were made (GET + conditional DELETE after the timed request, both arms): {}, at the rounds' ends: {}, left: {left}",
        samples.note(&head, what),
        deleted_each.load(Ordering::Relaxed),
        deleted_at_end.load(Ordering::Relaxed),
    );
    Ok((
        samples.figure(kind.metric(label, concurrency), Goal::RatioAtMost(1.10)),
        note,
    ))
}
