//! The lock scenarios and the ambiguous-outcome cases on the GCS backend, against the in-repo
//! fake GCS server over HTTP.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dimutex::Client;
use dimutex::backend::{Backend, GcsBackend};
use dimutex::testing::{FakeGcs, Fault, FaultRule};
use http::Method;
use support::scenarios::{self, Env};

async fn gcs(fake: &FakeGcs) -> GcsBackend {
    GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap()
}

fn env(fake: &Arc<FakeGcs>, test: &str) -> Env {
    let f = fake.clone();
    let objects = fake.clone();
    let requests = fake.clone();
    let clock = fake.clone();
    Env {
        make_backend: Arc::new(move || {
            let f = f.clone();
            Box::pin(async move { Arc::new(gcs(&f).await) as Arc<dyn Backend> })
        }),
        objects: Arc::new(move |prefix| {
            let names: Vec<String> = objects
                .object_names(FakeGcs::DEFAULT_BUCKET)
                .into_iter()
                .filter(|n| n.starts_with(&prefix))
                .collect();
            Box::pin(async move { names })
        }),
        requests: Some(Arc::new(move || requests.request_count())),
        set_server_clock_offset_ms: Some(Arc::new(move |ms| clock.set_clock_offset_ms(ms))),
        prefix: support::unique_prefix(test),
    }
}

async fn fake() -> Arc<FakeGcs> {
    Arc::new(FakeGcs::start().await.unwrap())
}

/// The external-target suite on a server several times slower than the fake (every request
/// delayed 2 ms): a fixed floor of acquisitions tuned to the fast fake failed there ("too
/// few acquisitions: 24" in 80 attempts); the run now goes on until it has enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_external_suite_passes_on_a_slower_server() {
    let fake = fake().await;
    fake.set_read_faults(true);
    fake.set_fault_rate(1.0, vec![Fault::Delay(Duration::from_millis(2))], 16);
    scenarios::external_suite(&env(&fake, "slow"), "in-repo fake, 2 ms per request").await;
    assert!(fake.faults_injected() > 100, "the requests were not slowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_mutual_exclusion_one_key() {
    let fake = fake().await;
    let started = Instant::now();
    let r = scenarios::mutual_exclusion(&env(&fake, "t1"), 32, 200, 1).await;
    r.assert_clean("T1 in-repo fake GCS, 32 clients x 200 rounds");
    eprintln!(
        "T1 in-repo fake GCS: {} requests in {:.1?}",
        fake.request_count(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_many_keys() {
    let fake = fake().await;
    let r = scenarios::mutual_exclusion(&env(&fake, "t2"), 64, 157, 100).await;
    r.assert_clean("T2 in-repo fake GCS, 64 clients x 157 rounds on 100 keys");
    assert_eq!(r.acquisitions + r.held_answers, 64 * 157);
}

#[tokio::test]
async fn waiters_take_turns() {
    let fake = fake().await;
    scenarios::waiters_take_turns(&env(&fake, "turns"), 8).await;
}

#[tokio::test]
async fn t10_round_trip_budget() {
    let fake = fake().await;
    scenarios::round_trip_budget(&env(&fake, "t10")).await;
}

#[tokio::test]
async fn refresh_keeps_the_lease() {
    let fake = fake().await;
    scenarios::refresh_keeps_the_lease(&env(&fake, "refresh")).await;
}

#[tokio::test]
async fn foreign_takeover_is_signalled() {
    let fake = fake().await;
    scenarios::foreign_takeover_is_signalled(&env(&fake, "stolen")).await;
}

#[tokio::test]
async fn drop_and_shutdown_release() {
    let fake = fake().await;
    scenarios::drop_and_shutdown_release(&env(&fake, "drop")).await;
}

#[tokio::test]
async fn bad_keys_send_nothing() {
    let fake = fake().await;
    scenarios::bad_keys_send_nothing(&env(&fake, "badkeys")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_client_clocks_change_nothing() {
    let fake = fake().await;
    scenarios::takeover_after_crash_ignores_client_clocks(&env(&fake, "t7"), &[-300, -30, 30, 300])
        .await;
}

#[tokio::test]
async fn ambiguous_create_is_adopted_by_its_owner() {
    let fake = fake().await;
    let client = Client::builder(gcs(&fake).await)
        .retry(scenarios::quick_retry())
        .build()
        .unwrap();
    fake.inject(FaultRule::new(Fault::CommitThenDrop).with_method(Method::POST));
    fake.clear_log();
    let guard = client
        .try_acquire("ambiguous")
        .await
        .expect("our landed create is ours, not a conflict");
    let log: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| (r.method().clone(), r.status()))
        .collect();
    assert_eq!(fake.faults_injected(), 1);
    assert_eq!(
        log.iter()
            .map(|(m, s)| format!("{m} {}", s.map_or("dropped".to_owned(), |s| s.to_string())))
            .collect::<Vec<_>>(),
        ["POST dropped", "POST 412", "GET 200"],
        "create landed (reply dropped), retry 412, inspect finds our owner"
    );
    assert!(guard.is_healthy());
    assert!(guard.release().await.unwrap());
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
}

#[tokio::test]
async fn ambiguous_create_answered_503_is_adopted() {
    let fake = fake().await;
    let client = Client::builder(gcs(&fake).await)
        .retry(scenarios::quick_retry())
        .build()
        .unwrap();
    fake.inject(FaultRule::new(Fault::CommitThen(503)).with_method(Method::POST));
    let guard = client.try_acquire("ambiguous-503").await.expect("adopted");
    assert!(guard.release().await.unwrap());
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
}

#[tokio::test]
async fn ambiguous_refresh_does_not_lose_the_lease() {
    let fake = fake().await;
    let client = Client::builder(gcs(&fake).await)
        .ttl(Duration::from_secs(3))
        .refresh_interval(Duration::from_secs(1))
        .retry(scenarios::quick_retry())
        .build()
        .unwrap();
    let guard = client.try_acquire("ambiguous-refresh").await.unwrap();
    fake.inject(FaultRule::new(Fault::CommitThenDrop).with_method(Method::PATCH));
    fake.inject(FaultRule::new(Fault::CommitThen(503)).with_method(Method::PATCH));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(fake.faults_injected(), 2, "both refresh faults fired");
    assert!(
        guard.is_healthy(),
        "a refresh that landed is not a lost lease"
    );
    assert!(guard.release().await.unwrap());
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
}

/// A lease whose last refresh may have landed (its first attempt committed, the reply was a
/// 503; the retry was refused with a 403, so the client never learned the new
/// metageneration): the version the client holds is stale, and the server's object is still
/// its lease.
async fn lease_with_a_refresh_of_unknown_outcome(
    fake: &FakeGcs,
    key: &str,
) -> (Client, dimutex::LockGuard) {
    let client = Client::builder(gcs(fake).await)
        .ttl(Duration::from_secs(3))
        .refresh_interval(Duration::from_secs(1))
        .retry(scenarios::quick_retry())
        .build()
        .unwrap();
    let guard = client.try_acquire(key).await.unwrap();
    fake.inject(FaultRule::new(Fault::CommitThen(503)).with_method(Method::PATCH));
    fake.inject(FaultRule::new(Fault::FailBefore(403)).with_method(Method::PATCH));
    let started = Instant::now();
    while fake.faults_injected() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the refresh faults did not fire"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The refresh's end reaches the driver.
    tokio::time::sleep(Duration::from_millis(50)).await;
    (client, guard)
}

#[tokio::test]
async fn a_release_after_a_refresh_of_unknown_outcome_deletes_the_lock() {
    let fake = fake().await;
    let (_client, guard) =
        lease_with_a_refresh_of_unknown_outcome(&fake, "unknown-then-release").await;
    assert!(
        guard.release().await.unwrap(),
        "the object is still our lease (our generation, our owner): the release deletes it"
    );
    assert_eq!(
        fake.object_count(FakeGcs::DEFAULT_BUCKET),
        0,
        "no lock object is left to expire"
    );
}

#[tokio::test]
async fn a_refresh_after_one_of_unknown_outcome_keeps_the_lease() {
    let fake = fake().await;
    let (_client, guard) =
        lease_with_a_refresh_of_unknown_outcome(&fake, "unknown-then-refresh").await;
    // The next refresh (a second after the failed one) meets the new metageneration.
    let lost = guard.lost();
    tokio::select! {
        _ = lost => panic!("a lease whose own refresh landed is not lost"),
        _ = tokio::time::sleep(Duration::from_millis(2500)) => {}
    }
    assert!(guard.is_healthy());
    assert!(guard.release().await.unwrap());
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
}

#[tokio::test]
async fn ambiguous_release_still_releases() {
    let fake = fake().await;
    let client = Client::builder(gcs(&fake).await)
        .retry(scenarios::quick_retry())
        .build()
        .unwrap();
    let guard = client.try_acquire("ambiguous-release").await.unwrap();
    fake.inject(FaultRule::new(Fault::CommitThenDrop).with_method(Method::DELETE));
    assert!(
        guard.release().await.unwrap(),
        "our delete landed; the retry's 404 is ours"
    );
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
}

#[tokio::test]
async fn failures_before_commit_are_retried() {
    let fake = fake().await;
    // The default retry policy (5 s): a 429 is retried no sooner than a second later.
    let client = Client::new(gcs(&fake).await);
    fake.inject(FaultRule::new(Fault::FailBefore(503)).with_method(Method::POST));
    fake.inject(FaultRule::new(Fault::FailBefore(429)).with_method(Method::POST));
    let started = Instant::now();
    let guard = client.try_acquire("retried").await.unwrap();
    assert_eq!(fake.faults_injected(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "a 429 waits out the mutation window"
    );
    assert!(guard.release().await.unwrap());
}

#[tokio::test]
async fn a_slow_reply_past_the_timeout_is_resolved() {
    let fake = fake().await;
    let client = Client::builder(gcs(&fake).await)
        .request_timeout(Duration::from_millis(200))
        .retry(scenarios::quick_retry())
        .build()
        .unwrap();
    fake.inject(
        FaultRule::new(Fault::CommitThenDelay(Duration::from_millis(600)))
            .with_method(Method::POST),
    );
    let guard = client
        .try_acquire("slow")
        .await
        .expect("the landed create is adopted");
    assert!(guard.release().await.unwrap());
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
}

#[tokio::test]
async fn a_down_backend_is_unavailable_not_held() {
    let fake = fake().await;
    let client = Client::builder(gcs(&fake).await)
        .retry(scenarios::quick_retry())
        .build()
        .unwrap();
    fake.set_fault_rate(1.0, vec![Fault::FailBefore(503)], 7);
    let err = client.try_acquire("down").await.unwrap_err();
    assert!(matches!(err, dimutex::Error::Unavailable { .. }), "{err:?}");
    assert!(err.retry_after().is_some());
    fake.clear_faults();
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
}

#[tokio::test]
async fn a_missing_bucket_is_a_clear_error() {
    let fake = fake().await;
    let backend = GcsBackend::builder("no-such-bucket")
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap();
    let err = Client::new(backend).try_acquire("k").await.unwrap_err();
    assert!(
        matches!(
            err,
            dimutex::Error::Backend(dimutex::backend::BackendError::BucketNotFound)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn throttled_release_is_retried_until_it_lands() {
    let fake = fake().await;
    fake.set_throttle(true);
    let client = Client::builder(gcs(&fake).await).build().unwrap();
    let guard = client.try_acquire("throttled").await.unwrap();
    // The delete comes within a second of the create: 429, retried with backoff.
    assert!(guard.release().await.unwrap());
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
    assert!(
        fake.requests().iter().any(|r| r.status() == Some(429)),
        "the throttle fired"
    );
}

#[tokio::test]
async fn emulator_host_variable_is_honoured() {
    // Only this test in this binary touches the variable.
    let fake = fake().await;
    let host = fake.endpoint().trim_start_matches("http://").to_owned();
    // SAFETY-free: std::env::set_var is unsafe in edition 2024 only for threaded readers.
    unsafe { std::env::set_var("STORAGE_EMULATOR_HOST", &host) };
    let backend = GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .build()
        .await
        .unwrap();
    unsafe { std::env::remove_var("STORAGE_EMULATOR_HOST") };
    assert_eq!(backend.endpoint(), fake.endpoint());
    assert!(!format!("{backend:?}").contains("Bearer"));
    let guard = Client::new(backend).try_acquire("via-env").await.unwrap();
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 1);
    assert!(guard.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_here_is_known_locally() {
    let backend = fake().await;
    scenarios::held_here_is_known_locally(&env(&backend, "local")).await;
}

/// A waiter in another process polls with reads and never repeats the create.
#[tokio::test]
async fn waiters_poll_with_reads_not_creates() {
    let fake = fake().await;
    let holder = Client::new(gcs(&fake).await);
    let waiter = Client::new(gcs(&fake).await);
    let guard = holder.try_acquire("polled").await.unwrap();
    fake.clear_log();
    let wait = tokio::spawn(async move {
        waiter
            .acquire("polled", Instant::now() + Duration::from_secs(10))
            .await
            .map(|g| (g, waiter))
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(guard.release().await.unwrap());
    let (g, _waiter) = wait.await.unwrap().unwrap();
    let log = fake.requests();
    let count = |m: Method| log.iter().filter(|r| *r.method() == m).count();
    eprintln!(
        "waiting 1.5 s: {} POST, {} GET, {} DELETE",
        count(Method::POST),
        count(Method::GET),
        count(Method::DELETE)
    );
    assert_eq!(
        count(Method::POST),
        2,
        "one create while held, one after the release"
    );
    assert!(count(Method::GET) >= 2, "the waiter polled with reads");
    assert!(
        count(Method::GET) <= 20,
        "poll backoff grows (50 ms .. 1 s)"
    );
    assert!(g.release().await.unwrap());
}

#[tokio::test]
async fn status_and_force_release() {
    let backend = fake().await;
    scenarios::status_and_force_release(&env(&backend, "ops")).await;
}

#[tokio::test]
async fn records_round_trip() {
    let fake = fake().await;
    scenarios::records_round_trip(&env(&fake, "records")).await;
}

#[tokio::test]
async fn records_follow_documented_preconditions() {
    let fake = fake().await;
    let env = env(&fake, "records-stale");
    assert!(!scenarios::record_with_a_stale_metageneration_is_accepted(&env).await);
    assert!(!scenarios::a_replaced_generation_is_read(&env).await);
}

/// Documented GCS: at most 8 KiB of custom metadata per object. The fake refuses more, so
/// that a record too large for GCS fails here too.
#[tokio::test]
async fn metadata_over_8_kib_is_refused() {
    let fake = fake().await;
    let backend = gcs(&fake).await;
    let md = dimutex::backend::Metadata::from([("big".to_owned(), "x".repeat(8 * 1024))]);
    let refused = backend.create("too-big", &md).await;
    assert!(
        matches!(
            refused,
            Err(dimutex::backend::BackendError::Fatal {
                status: Some(400),
                ..
            })
        ),
        "{refused:?}"
    );
    let md = dimutex::backend::Metadata::from([("big".to_owned(), "x".repeat(8 * 1024 - 3))]);
    backend.create("just-fits", &md).await.unwrap();
}
