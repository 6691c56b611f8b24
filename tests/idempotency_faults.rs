//! The idempotency layer under injected faults on the in-repo fake GCS: requests on many keys
//! from several clients (as replicas would be), every request failing now and then before or
//! after it takes effect, or losing its reply. A checker over what the handlers did and what
//! the callers got:
//! - no handler of a key starts after a replay of that key was answered (the record existed:
//!   nothing runs again while it does), and no two handlers of a key overlap;
//! - every replay of a key is the same response, and it is one a handler of that key produced.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dimutex::Client;
use dimutex::backend::GcsBackend;
use dimutex::idempotency::IdempotencyLayer;
use dimutex::testing::{FakeGcs, Fault};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rand::{Rng, SeedableRng};
use tower::{Layer, ServiceExt};

/// What the handlers did and the callers saw, each with when.
#[derive(Debug, Default)]
struct Log {
    /// Per key: (start, end, body) of each handler run.
    runs: BTreeMap<String, Vec<(Instant, Instant, Bytes)>>,
    /// Per key: (answered at, body) of each replay.
    replays: BTreeMap<String, Vec<(Instant, Bytes)>>,
    statuses: BTreeMap<u16, usize>,
}

type Shared = Arc<Mutex<Log>>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The app: a handler that takes a few milliseconds and answers 201 with a body naming its run.
fn service(
    client: Client,
    log: Shared,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = http::Response<dimutex::idempotency::IdempotentBody<Full<Bytes>>>,
    Error = Infallible,
    Future: Send,
> + Clone {
    let handler = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        async move {
            let key = req.headers()["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned();
            let start = Instant::now();
            let pause = rand::rng().random_range(0..15);
            tokio::time::sleep(ms(pause)).await;
            let body = Bytes::from(format!("{key} run {:?} {}", start, rand::random::<u64>()));
            log.lock().unwrap().runs.entry(key).or_default().push((
                start,
                Instant::now(),
                body.clone(),
            ));
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(201)
                    .body(Full::new(body))
                    .unwrap(),
            )
        }
    });
    IdempotencyLayer::new(client).layer(handler)
}

async fn client(fake: &FakeGcs, defaults: bool) -> Client {
    let backend = GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap();
    let builder = Client::builder(backend).prefix("idem/");
    if defaults {
        return builder.build().unwrap();
    }
    builder
        .ttl(Duration::from_secs(3))
        .refresh_interval(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

/// `requests` requests on `keys` keys from `clients` clients with 4 workers each, faults at
/// `rate` on every request; then the checks.
async fn run(rate: f64, seed: u64, requests: usize, keys: usize, clients: usize, defaults: bool) {
    let fake = FakeGcs::start().await.unwrap();
    let slow = if defaults { ms(5_300) } else { ms(1_300) };
    let faults = vec![
        Fault::FailBefore(503),
        Fault::FailBefore(429),
        Fault::CommitThen(503),
        Fault::CommitThenDrop,
        Fault::CommitThenDelay(slow),
        Fault::Delay(ms(100)),
    ];
    fake.set_fault_rate(rate, faults, seed);
    fake.set_read_faults(true);
    let log = Shared::default();
    let workers = clients * 4;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let c = client(&fake, defaults).await;
        let svc = service(c.clone(), log.clone());
        let log = log.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + w as u64);
        tasks.push(tokio::spawn(async move {
            for _ in 0..requests / workers {
                let key = format!("key-{}", rng.random_range(0..keys));
                let request = Request::post("/jobs/run")
                    .header("idempotency-key", &key)
                    .body(Full::new(Bytes::from(key.clone())))
                    .unwrap();
                let response = svc.clone().oneshot(request).await.unwrap();
                let status = response.status();
                let replayed = response.headers().contains_key("idempotent-replayed");
                let body = response.into_body().collect().await.unwrap().to_bytes();
                {
                    let mut log = log.lock().unwrap();
                    *log.statuses.entry(status.as_u16()).or_default() += 1;
                    if replayed {
                        log.replays
                            .entry(key)
                            .or_default()
                            .push((Instant::now(), body));
                    }
                }
                if status == StatusCode::CONFLICT || status.is_server_error() {
                    tokio::time::sleep(ms(rng.random_range(5..30))).await;
                }
            }
            c.shutdown(Duration::from_secs(30)).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap();
    check(&log, keys);
    let answered: usize = log.statuses.values().sum();
    eprintln!(
        "rate {rate}, defaults {defaults}: {answered} requests, statuses {:?}, {} runs, {} replays, {} faults injected",
        log.statuses,
        log.runs.values().map(Vec::len).sum::<usize>(),
        log.replays.values().map(Vec::len).sum::<usize>(),
        fake.faults_injected(),
    );
    assert_eq!(answered, requests / workers * workers);
    assert!(fake.faults_injected() > 0, "faults were injected");
}

fn check(log: &Log, keys: usize) {
    assert!(
        log.replays.len() >= keys * 3 / 4,
        "too few keys were replayed to test anything: {}",
        log.replays.len()
    );
    for (key, replays) in &log.replays {
        let runs = log.runs.get(key).map(Vec::as_slice).unwrap_or_default();
        let first_replay = replays.iter().map(|(at, _)| *at).min().unwrap();
        for (start, _, _) in runs {
            assert!(
                *start < first_replay,
                "{key}: a handler started after a replay was answered: the record existed"
            );
        }
        let stored = &replays[0].1;
        assert!(
            replays.iter().all(|(_, body)| body == stored),
            "{key}: replays differ"
        );
        assert!(
            runs.iter().any(|(_, _, body)| body == stored),
            "{key}: the replay is no handler's response"
        );
    }
    for (key, runs) in &log.runs {
        let mut runs: Vec<_> = runs.iter().map(|(s, e, _)| (*s, *e)).collect();
        runs.sort();
        for pair in runs.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{key}: two handlers overlapped");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_faults_2000_requests_20_keys() {
    run(0.05, 17, 2000, 20, 4, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_faults_with_the_default_settings() {
    run(0.05, 23, 400, 20, 2, true).await;
}
