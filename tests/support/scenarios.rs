//! Lock scenarios run unchanged against every backend: the in-memory backend, the GCS backend
//! on the in-repo fake server, on fake-gcs-server, or on real GCS.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dimutex::backend::{Backend, Metadata};
use dimutex::{Backoff, Client, ClientBuilder, Error, RetryPolicy};

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A server under test, seen through a backend.
pub struct Env {
    /// Makes a fresh backend (its own connection pool), like another process would have.
    pub make_backend: Arc<dyn Fn() -> BoxFut<Arc<dyn Backend>> + Send + Sync>,
    /// Names of the lock objects under `prefix` that exist now.
    pub objects: Arc<dyn Fn(String) -> BoxFut<Vec<String>> + Send + Sync>,
    /// How many requests the server has seen (None when it cannot tell).
    pub requests: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
    /// Moves the server clock (None when it cannot).
    pub set_server_clock_offset_ms: Option<Arc<dyn Fn(i64) + Send + Sync>>,
    /// A unique prefix for this test's objects.
    pub prefix: String,
}

impl Env {
    pub async fn backend(&self) -> Arc<dyn Backend> {
        (self.make_backend)().await
    }

    /// A client builder with this test's prefix and fast polling.
    pub async fn client(&self) -> ClientBuilder {
        Client::builder(self.backend().await)
            .prefix(self.prefix.clone())
            .poll(Backoff::new(Duration::from_millis(5), Duration::from_millis(100), 2.0).unwrap())
    }

    pub async fn objects(&self) -> Vec<String> {
        (self.objects)(self.prefix.clone()).await
    }

    pub fn requests(&self) -> u64 {
        (self
            .requests
            .as_ref()
            .expect("this server has a request log"))()
    }
}

/// Records critical sections and counts overlaps.
#[derive(Default)]
pub struct Exclusion {
    inside: AtomicUsize,
    overlaps: AtomicUsize,
    entered: AtomicUsize,
}

impl Exclusion {
    pub async fn critical_section(&self, hold: Duration) {
        if self.inside.fetch_add(1, Ordering::SeqCst) != 0 {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        self.entered.fetch_add(1, Ordering::SeqCst);
        if hold.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(hold).await;
        }
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn overlaps(&self) -> usize {
        self.overlaps.load(Ordering::SeqCst)
    }

    pub fn entered(&self) -> usize {
        self.entered.load(Ordering::SeqCst)
    }
}

/// The fewest acquisitions that make an exclusion run mean something; a run goes on past its
/// rounds until it has them (or until [`EXCLUSION_DEADLINE`]), so that a slow server or one
/// that throttles (fewer successes per attempt) is run longer, not failed.
pub const ENOUGH_ACQUISITIONS: usize = 50;

/// How long an exclusion run may go on for [`ENOUGH_ACQUISITIONS`]: a GCS-like throttle of
/// one mutation per second per object allows one hand-over per ~2 s on one key.
pub const EXCLUSION_DEADLINE: Duration = Duration::from_secs(180);

impl ExclusionReport {
    /// Prints the figures and checks them: no overlap, every release found the lock ours,
    /// nothing left, and enough contention for the run to mean something.
    pub fn assert_clean(&self, label: &str) {
        eprintln!(
            "{label}: {} attempts, {} acquisitions, {} held answers, {} overlaps, {} releases not ours, {} leftovers, {:.1?}",
            self.attempts,
            self.acquisitions,
            self.held_answers,
            self.overlaps,
            self.releases_not_ours,
            self.leftovers,
            self.elapsed,
        );
        assert_eq!(self.overlaps, 0, "{label}: overlapping critical sections");
        assert_eq!(
            self.releases_not_ours, 0,
            "{label}: a release found the lock not ours"
        );
        assert_eq!(self.leftovers, 0, "{label}: lock objects left behind");
        assert!(
            self.acquisitions >= ENOUGH_ACQUISITIONS,
            "{label}: too few acquisitions: {} in {} attempts within {:?}",
            self.acquisitions,
            self.attempts,
            EXCLUSION_DEADLINE
        );
        assert!(
            self.held_answers > 0,
            "{label}: no contention: the run proves nothing"
        );
    }
}

pub struct ExclusionReport {
    pub attempts: usize,
    pub acquisitions: usize,
    pub held_answers: usize,
    pub overlaps: usize,
    /// Releases that found the lock no longer ours.
    pub releases_not_ours: usize,
    pub leftovers: usize,
    pub elapsed: Duration,
}

/// T1/T2: `clients` clients, each making at least `rounds` attempts (`try_acquire`) on keys
/// drawn round-robin from `keys`, and more until the run has [`ENOUGH_ACQUISITIONS`]; every
/// success runs a critical section and releases.
pub async fn mutual_exclusion(
    env: &Env,
    clients: usize,
    rounds: usize,
    keys: usize,
) -> ExclusionReport {
    let started = Instant::now();
    let sections: Arc<Vec<Exclusion>> = Arc::new((0..keys).map(|_| Exclusion::default()).collect());
    let attempts = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(AtomicUsize::new(0));
    let not_ours = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = env.client().await.build().unwrap();
        let (sections, attempts) = (sections.clone(), attempts.clone());
        let (held, not_ours) = (held.clone(), not_ours.clone());
        tasks.push(tokio::spawn(async move {
            let enough =
                || sections.iter().map(Exclusion::entered).sum::<usize>() >= ENOUGH_ACQUISITIONS;
            let mut r = 0;
            while r < rounds || (!enough() && started.elapsed() < EXCLUSION_DEADLINE) {
                let k = (c * 7 + r) % sections.len();
                r += 1;
                attempts.fetch_add(1, Ordering::Relaxed);
                match client.try_acquire(format!("key-{k}")).await {
                    Ok(guard) => {
                        sections[k].critical_section(Duration::ZERO).await;
                        if !guard.release().await.expect("release") {
                            not_ours.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(Error::Held { .. }) => {
                        held.fetch_add(1, Ordering::Relaxed);
                        // An in-process backend answers without ever returning Pending: a
                        // loop of refused attempts would otherwise keep the holder's task from
                        // running (past its ttl, as a paused process would).
                        tokio::task::yield_now().await;
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            client.shutdown(Duration::from_secs(10)).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    ExclusionReport {
        attempts: attempts.load(Ordering::Relaxed),
        acquisitions: sections.iter().map(Exclusion::entered).sum(),
        held_answers: held.load(Ordering::Relaxed),
        overlaps: sections.iter().map(Exclusion::overlaps).sum(),
        releases_not_ours: not_ours.load(Ordering::Relaxed),
        leftovers: env.objects().await.len(),
        elapsed: started.elapsed(),
    }
}

/// What the external-target test runs against any server (`STORAGE_EMULATOR_HOST` +
/// `DIMUTEX_TEST_BUCKET`): exclusion, refresh, drop and shutdown.
pub async fn external_suite(env: &Env, label: &str) {
    let r = mutual_exclusion(env, 8, 10, 1).await;
    r.assert_clean(&format!("T1 {label}, 8 clients x at least 10 rounds"));
    refresh_keeps_the_lease(env).await;
    records_round_trip(env).await;
    drop_and_shutdown_release(env).await;
}

/// Waiting acquisitions on one key: every waiter gets its turn, one at a time.
pub async fn waiters_take_turns(env: &Env, waiters: usize) {
    let section = Arc::new(Exclusion::default());
    let mut tasks = Vec::new();
    for _ in 0..waiters {
        let client = env.client().await.build().unwrap();
        let section = section.clone();
        tasks.push(tokio::spawn(async move {
            let guard = client
                .acquire("queue", Instant::now() + Duration::from_secs(30))
                .await
                .expect("acquire within 30 s");
            section.critical_section(Duration::from_millis(20)).await;
            assert!(guard.release().await.unwrap());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(section.entered(), waiters);
    assert_eq!(section.overlaps(), 0);
    assert!(env.objects().await.is_empty());
}

/// T10: the round-trip budget.
pub async fn round_trip_budget(env: &Env) {
    let a = env.client().await.build().unwrap();
    let b = env.client().await.build().unwrap();

    let before = env.requests();
    let guard = a.try_acquire("budget").await.unwrap();
    assert_eq!(
        env.requests() - before,
        1,
        "uncontended acquire = 1 request (create)"
    );

    let before = env.requests();
    let err = b.try_acquire("budget").await.unwrap_err();
    assert!(err.is_held(), "{err}");
    assert!(err.retry_after().is_some());
    assert_eq!(
        env.requests() - before,
        2,
        "contended try = 2 requests (create, inspect)"
    );

    let before = env.requests();
    assert!(guard.release().await.unwrap());
    assert_eq!(env.requests() - before, 1, "release = 1 request (delete)");

    // Refresh = 1 request. The first refresh comes 0.5–2 s after the acquisition, the second
    // 2 s later: a 2.25 s window holds exactly one.
    let c = env
        .client()
        .await
        .ttl(Duration::from_secs(6))
        .refresh_interval(Duration::from_secs(2))
        .build()
        .unwrap();
    let guard = c.try_acquire("budget-refresh").await.unwrap();
    let before = env.requests();
    tokio::time::sleep(Duration::from_millis(2250)).await;
    assert_eq!(env.requests() - before, 1, "one refresh = 1 request");
    assert!(guard.is_healthy());
    assert!(guard.release().await.unwrap());

    // Expired takeover <= 3 requests.
    if let Some(shift) = &env.set_server_clock_offset_ms {
        let stale = a.try_acquire("budget-expired").await.unwrap();
        let stale_token = stale.token();
        shift(120_000); // two minutes later, by the server's clock
        let before = env.requests();
        let fresh = b.try_acquire("budget-expired").await.unwrap();
        let cost = env.requests() - before;
        assert!(cost <= 3, "takeover cost {cost} requests");
        assert_eq!(cost, 3, "create (412), inspect, takeover");
        assert_ne!(fresh.token(), stale_token);
        shift(0);
        assert!(fresh.release().await.unwrap());
        assert!(
            !stale.release().await.unwrap(),
            "the stale holder no longer holds it"
        );
    }
    a.shutdown(Duration::from_secs(5)).await.unwrap();
    b.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(env.objects().await.is_empty());
}

/// A refreshed lease outlives its ttl; another client sees it held throughout.
pub async fn refresh_keeps_the_lease(env: &Env) {
    let holder = env
        .client()
        .await
        .ttl(Duration::from_secs(2))
        .refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let other = env.client().await.build().unwrap();
    let guard = holder.try_acquire("long").await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(guard.is_healthy());
        assert!(other.try_acquire("long").await.unwrap_err().is_held());
    }
    assert!(guard.release().await.unwrap());
    assert!(env.objects().await.is_empty());
}

/// Someone else overwrites our lock (as an operator breaking it would): the next refresh is
/// refused, the lost signal fires, and release reports that the lock was not ours.
pub async fn foreign_takeover_is_signalled(env: &Env) {
    let holder = env
        .client()
        .await
        .ttl(Duration::from_secs(3))
        .refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let guard = holder.try_acquire("stolen").await.unwrap();
    let lost = guard.lost();
    let raw = env.backend().await;
    let name = format!("{}stolen", env.prefix);
    let state = raw.inspect(&name).await.unwrap().into_value().unwrap();
    let md = Metadata::from([
        ("owner".into(), "intruder#0".into()),
        ("ttl".into(), "60".into()),
    ]);
    let stolen = raw
        .takeover(&name, state.version(), &md)
        .await
        .unwrap()
        .into_value();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("lost fires within 3 s");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "noticed at the next refresh"
    );
    assert!(!guard.is_healthy());
    assert!(
        !guard.release().await.unwrap(),
        "release reports the lock was not ours"
    );
    // The intruder's lock is untouched.
    let now = raw.inspect(&name).await.unwrap().into_value().unwrap();
    assert_eq!(now.version().generation(), stolen.version().generation());
    raw.release(&name, now.version()).await.unwrap();
}

/// Dropping a guard releases the lock without any call; shutdown drains.
pub async fn drop_and_shutdown_release(env: &Env) {
    let client = env.client().await.build().unwrap();
    let guard = client.try_acquire("dropped").await.unwrap();
    drop(guard);
    let started = Instant::now();
    while !env.objects().await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "drop did not release within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _a = client.try_acquire("s1").await.unwrap();
    let _b = client.try_acquire("s2").await.unwrap();
    assert_eq!(client.active_leases(), 2);
    client.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(env.objects().await.is_empty());
    assert!(matches!(
        client.try_acquire("s3").await,
        Err(Error::ShutDown)
    ));
}

/// Bad keys are refused before any request.
pub async fn bad_keys_send_nothing(env: &Env) {
    let client = env.client().await.build().unwrap();
    let before = env.requests.as_ref().map(|f| f());
    for key in ["", "a\nb", ".."] {
        assert!(
            matches!(client.try_acquire(key).await, Err(Error::InvalidKey(_))),
            "{key:?}"
        );
    }
    let long = "k".repeat(1024 - env.prefix.len() + 1);
    assert!(matches!(
        client.try_acquire(long.as_str()).await,
        Err(Error::InvalidKey(_))
    ));
    if let Some(before) = before {
        assert_eq!(env.requests(), before);
    }
}

/// A holder that dies (its runtime dropped: no release, no refresh, as with SIGKILL), judged
/// by contenders whose wall clocks are off by `offsets_s`: none takes over before the
/// server-judged expiry, all within ttl + 1 s rule slack + 1 s `Date` resolution + poll cap
/// (+ 1 s for a loaded machine).
pub async fn takeover_after_crash_ignores_client_clocks(env: &Env, offsets_s: &[i64]) {
    let ttl = Duration::from_secs(2);
    let mut runs = Vec::new();
    for (i, offset) in offsets_s.iter().copied().enumerate() {
        let key = format!("crash-{i}");
        let skewed = move || shift(SystemTime::now(), offset);
        // The holder, in a runtime of its own that we then drop.
        let make = env.make_backend.clone();
        let prefix = env.prefix.clone();
        let key2 = key.clone();
        let acquired_at = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let at = rt.block_on(async move {
                let client = Client::builder(make().await)
                    .prefix(prefix)
                    .ttl(ttl)
                    .wall_clock(skewed)
                    .build()
                    .unwrap();
                let sent = Instant::now();
                let guard = client.try_acquire(key2).await.unwrap();
                std::mem::forget(guard);
                sent
            });
            drop(rt);
            at
        })
        .join()
        .unwrap();
        let contender = env
            .client()
            .await
            .ttl(ttl)
            .wall_clock(skewed)
            .poll(Backoff::new(Duration::from_millis(20), Duration::from_millis(250), 2.0).unwrap())
            .build()
            .unwrap();
        runs.push(tokio::spawn(async move {
            let guard = contender
                .acquire(key, Instant::now() + Duration::from_secs(20))
                .await
                .unwrap();
            let waited = acquired_at.elapsed();
            assert!(guard.release().await.unwrap());
            (offset, waited)
        }));
    }
    for run in runs {
        let (offset, waited) = run.await.unwrap();
        assert!(
            waited >= ttl,
            "offset {offset}s: taken over after {waited:?}, before the ttl"
        );
        assert!(
            waited
                <= ttl
                    + Duration::from_secs(1)
                    + Duration::from_millis(250)
                    + Duration::from_secs(1),
            "offset {offset}s: taken over only after {waited:?}"
        );
        eprintln!(
            "clock offset {offset:+} s: taken over {waited:.2?} after the holder's last write"
        );
    }
    assert!(env.objects().await.is_empty());
}

fn shift(t: SystemTime, secs: i64) -> SystemTime {
    if secs >= 0 {
        t + Duration::from_secs(secs as u64)
    } else {
        t - Duration::from_secs(secs.unsigned_abs())
    }
}

/// A fast-failing retry policy, for tests that want errors quickly.
pub fn quick_retry() -> RetryPolicy {
    RetryPolicy::new(
        Backoff::new(Duration::from_millis(10), Duration::from_millis(50), 2.0).unwrap(),
        Duration::from_millis(500),
    )
}

/// The local fast path: a key held by this client is answered "held" with no request, and a
/// waiter of this client gets the lock as soon as the release completes, without polling.
pub async fn held_here_is_known_locally(env: &Env) {
    let client = env.client().await.build().unwrap();
    let guard = client.try_acquire("local").await.unwrap();
    let before = env.requests();
    for _ in 0..100 {
        let err = client.try_acquire("local").await.unwrap_err();
        assert!(err.is_held());
        assert!(err.retry_after().unwrap() > Duration::from_secs(20));
    }
    assert_eq!(env.requests(), before, "a key held here costs no request");

    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let g = client
                    .acquire("local", Instant::now() + Duration::from_secs(10))
                    .await
                    .unwrap();
                let got = Instant::now();
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert!(g.release().await.unwrap());
                got
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        env.requests(),
        before,
        "local waiters do not poll the backend"
    );
    let released = Instant::now();
    assert!(guard.release().await.unwrap());
    let mut handovers = Vec::new();
    for w in waiters {
        handovers.push(w.await.unwrap());
    }
    handovers.sort();
    let first = handovers[0].duration_since(released);
    eprintln!("local hand-over: first waiter had the lock {first:?} after release() was called");
    assert!(
        first < Duration::from_millis(500),
        "hand-over took {first:?}"
    );
    // Each hand-over: the holder's delete and the next waiter's create; nothing else.
    assert_eq!(
        env.requests() - before,
        2 * 5 - 1,
        "requests for 1 release + 4 (acquire, release)"
    );
    assert!(env.objects().await.is_empty());
}

/// Operators: `status` shows the holder without its nonce; `force_release` with a stale token
/// deletes nothing, with the right token breaks the lock, and the holder learns it is lost.
pub async fn status_and_force_release(env: &Env) {
    let holder = env
        .client()
        .await
        .identity("worker-7")
        .ttl(Duration::from_secs(3))
        .refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let operator = env.client().await.build().unwrap();
    assert!(operator.status("ops").await.unwrap().is_none());
    let guard = holder.try_acquire("ops").await.unwrap();
    let status = operator.status("ops").await.unwrap().expect("held");
    assert_eq!(status.owner(), Some("worker-7"));
    assert_eq!(status.token(), guard.token());
    assert!(status.is_live());
    // ttl 3 s + 1 s rule slack, + up to 1 s of `Date` resolution.
    let remaining = status.remaining();
    assert!(
        remaining <= Duration::from_secs(5) && remaining >= Duration::from_secs(2),
        "{remaining:?}"
    );
    assert!(!status.written_by_python());
    if let Some(since) = status.since() {
        assert!(since <= status.server_time() + Duration::from_secs(1));
    }

    let other = holder.try_acquire("elsewhere").await.unwrap();
    assert!(
        !operator
            .force_release("ops", Some(other.token()))
            .await
            .unwrap(),
        "wrong token"
    );
    assert!(guard.is_healthy());
    let lost = guard.lost();
    assert!(
        operator
            .force_release("ops", Some(guard.token()))
            .await
            .unwrap()
    );
    tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("the holder learns");
    assert!(!guard.release().await.unwrap());
    assert!(
        !operator.force_release("ops", None).await.unwrap(),
        "nothing left to break"
    );
    assert!(other.release().await.unwrap());
    assert!(env.objects().await.is_empty());
}

/// Completed records on this server: the record write (one overwrite conditional on the
/// lock's version) and its contents read back, through the backend; then the idempotency
/// layer replaying a small and a large response byte for byte, the handler run once each.
pub async fn records_round_trip(env: &Env) {
    use bytes::Bytes;
    use dimutex::backend::{BackendError, Version};
    use dimutex::idempotency::IdempotencyLayer;
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt};

    let backend = env.backend().await;
    let name = format!("{}records/direct", env.prefix);
    let lock = backend
        .create(&name, &Metadata::new())
        .await
        .unwrap()
        .into_value();
    // Contents with our default multipart boundary in them, and every byte value.
    let mut data = b"--dimutex-7a1c3f0e9b2d4c86\r\n".to_vec();
    data.extend((0..=255u8).cycle().take(70_000));
    let md = Metadata::from([("status".to_owned(), "201".to_owned())]);
    // (A stale metageneration: see `record_with_a_stale_metageneration_*`.)
    let stale = Version::new(
        lock.version().generation() + 1,
        lock.version().metageneration(),
    );
    let refused = backend.record(&name, stale, &md, &data).await;
    assert!(
        matches!(refused, Err(BackendError::PreconditionFailed)),
        "{refused:?}"
    );
    let record = backend
        .record(&name, lock.version(), &md, &data)
        .await
        .unwrap()
        .into_value();
    assert_ne!(record.version().generation(), lock.version().generation());
    assert_eq!(record.metadata()["status"], "201");
    let read = backend
        .contents(&name, record.version().generation())
        .await
        .unwrap();
    assert!(
        read.value()[..] == data[..],
        "contents read back as written"
    );
    // (The contents of a replaced generation: see `a_replaced_generation_is_read`.)
    backend.release(&name, record.version()).await.unwrap();

    let client = env.client().await.build().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |req: http::Request<Full<Bytes>>| {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                let size: usize = req.uri().query().unwrap_or("0").parse().unwrap();
                let body: Vec<u8> = (0..size).map(|i| (i * 7 + n) as u8).collect();
                let response = http::Response::builder()
                    .status(201)
                    .header("x-run", n.to_string())
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let service = IdempotencyLayer::new(client.clone()).layer(handler);
    for (i, size) in [10usize, 200_000].into_iter().enumerate() {
        let post = || {
            http::Request::post(format!("/jobs/run?{size}"))
                .header("idempotency-key", format!("key-{size}"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        };
        let first = service.clone().oneshot(post()).await.unwrap();
        let first_body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(first_body.len(), size);
        let again = service.clone().oneshot(post()).await.unwrap();
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["x-run"], i.to_string().as_str());
        let again_body = again.into_body().collect().await.unwrap().to_bytes();
        assert!(
            again_body == first_body,
            "a replay of {size} bytes, byte for byte"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each handler ran once");
    client.shutdown(Duration::from_secs(10)).await.unwrap();
    // Records outlive their client: removed here, so that the server is left as found.
    for name in env.objects().await {
        if let Some(state) = backend.inspect(&name).await.unwrap().into_value() {
            backend.release(&name, state.version()).await.unwrap();
        }
    }
}

/// A record write on the right generation but a stale metageneration (a metadata write by
/// someone else since): whether the server accepted it. Documented GCS refuses it (412).
pub async fn record_with_a_stale_metageneration_is_accepted(env: &Env) -> bool {
    use dimutex::backend::Version;
    let backend = env.backend().await;
    let name = format!("{}records/stale", env.prefix);
    let lock = backend
        .create(&name, &Metadata::new())
        .await
        .unwrap()
        .into_value();
    let v = lock.version();
    let stale = Version::new(v.generation(), v.metageneration() + 1);
    let written = backend.record(&name, stale, &Metadata::new(), b"x").await;
    let current = backend.inspect(&name).await.unwrap().into_value().unwrap();
    backend.release(&name, current.version()).await.unwrap();
    written.is_ok()
}

/// A read of the contents of a generation that was replaced since: whether the server
/// answered with the current contents. Documented GCS refuses it (`ifGenerationMatch`, 412).
pub async fn a_replaced_generation_is_read(env: &Env) -> bool {
    use dimutex::backend::BackendError;
    let backend = env.backend().await;
    let name = format!("{}records/replaced", env.prefix);
    let lock = backend
        .create(&name, &Metadata::new())
        .await
        .unwrap()
        .into_value();
    let record = backend
        .record(&name, lock.version(), &Metadata::new(), b"record")
        .await
        .unwrap()
        .into_value();
    let old = backend.contents(&name, lock.version().generation()).await;
    backend.release(&name, record.version()).await.unwrap();
    match old {
        Ok(_) => true,
        Err(BackendError::PreconditionFailed) => false,
        Err(e) => panic!("unexpected answer: {e}"),
    }
}
