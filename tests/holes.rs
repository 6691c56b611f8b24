//! The holes of issue 16, each reproduced against the in-repo fake GCS with the client's
//! **default** settings; every test here failed on the code before the fix.

use std::time::{Duration, Instant};

use dimutex::backend::{
    Backend, BackendError, BoxFuture, GcsBackend, Metadata, ObjectState, Reply, Version,
};
use dimutex::testing::{FakeGcs, Fault, FaultRule};
use dimutex::{Client, Error};
use http::Method;

async fn backend(fake: &FakeGcs) -> GcsBackend {
    GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap()
}

fn objects(fake: &FakeGcs) -> usize {
    fake.object_count(FakeGcs::DEFAULT_BUCKET)
}

/// Hole 1: shutdown used to send the delete of a live lease and mark it lost only when the
/// delete's reply came; with that reply late, another client held the lock while our guard
/// still said healthy. Now the lease is lost before the delete is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_marks_a_live_lease_lost_before_its_delete_is_sent() {
    let fake = FakeGcs::start().await.unwrap();
    let a = Client::new(backend(&fake).await);
    let b = Client::new(backend(&fake).await);
    let guard = a.try_acquire("k").await.unwrap();
    assert!(guard.is_healthy());
    fake.inject(
        FaultRule::new(Fault::CommitThenDelay(Duration::from_secs(3))).with_method(Method::DELETE),
    );
    let shutdown = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown(Duration::from_secs(30)).await }
    });
    // The delete lands at once; its reply is 3 s late.
    let until = Instant::now() + Duration::from_secs(5);
    while objects(&fake) > 0 {
        assert!(Instant::now() < until, "the delete never landed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other = b
        .try_acquire("k")
        .await
        .expect("free once the delete landed");
    assert!(
        !guard.is_healthy(),
        "our guard must not believe in a lock another client holds"
    );
    tokio::time::timeout(Duration::from_millis(1), guard.lost())
        .await
        .expect("the lost signal fired before the delete was sent");
    shutdown.await.unwrap().unwrap();
    assert!(other.is_healthy());
    assert!(other.release().await.unwrap());
}

/// Hole 3: an acquisition whose future is dropped while its create is in flight used to
/// leave the landed lock behind for the whole ttl (30 s by default). Now the client deletes
/// it in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_acquisition_does_not_leak_its_landed_create() {
    let fake = FakeGcs::start().await.unwrap();
    let a = Client::new(backend(&fake).await);
    let b = Client::new(backend(&fake).await);
    fake.inject(
        FaultRule::new(Fault::CommitThenDelay(Duration::from_secs(2))).with_method(Method::POST),
    );
    let dropped = tokio::time::timeout(Duration::from_millis(200), a.try_acquire("k")).await;
    assert!(dropped.is_err(), "cut off while the create was in flight");
    let started = Instant::now();
    let guard = loop {
        match b.try_acquire("k").await {
            Ok(guard) => break guard,
            Err(e) if e.is_held() => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the abandoned lock is still held after {:?}",
                    started.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    eprintln!(
        "abandoned lock freed {:?} after the drop",
        started.elapsed()
    );
    assert!(guard.release().await.unwrap());
    a.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(objects(&fake), 0);
}

/// A create delayed on its way to the server (not only its reply): it times out, the
/// acquisition then finds the lock held by another and gives up. The read that showed the
/// other's lock used to count as "ours never landed", so nothing was cleaned up; once the
/// other released, our late create landed and blocked the key for the whole ttl. Now the
/// abandoned create is looked for again after a pause, and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_delayed_in_transit_is_cleaned_up_when_it_lands_after_a_refusal() {
    let fake = FakeGcs::start().await.unwrap();
    let a = Client::new(backend(&fake).await);
    let b = Client::new(backend(&fake).await);
    let held = a.try_acquire("k").await.unwrap();
    // B's create reaches the store 7 s after it was sent, 2 s after B's 5 s timeout.
    fake.inject(FaultRule::new(Fault::Delay(Duration::from_secs(7))).with_method(Method::POST));
    // With the defaults the timeout spends the retry budget: unavailable (held, with a
    // longer budget); either way, B does not have the lock.
    let refused = b.try_acquire("k").await;
    assert!(
        matches!(refused, Err(Error::Held { .. } | Error::Unavailable { .. })),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(held.release().await.unwrap());
    let until = Instant::now() + Duration::from_secs(20);
    let mut landed = false;
    loop {
        let names = fake.object_names(FakeGcs::DEFAULT_BUCKET);
        landed |= !names.is_empty();
        if landed && names.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "B's late create (landed: {landed}) was never cleaned up: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.shutdown(Duration::from_secs(10)).await.unwrap();
    a.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Hole 8: a local waiter woken by shutdown's releases used to go on and create its lock
/// after `shutdown` had returned `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lock_is_created_after_shutdown_returns() {
    let fake = FakeGcs::start().await.unwrap();
    let client = Client::new(backend(&fake).await);
    let guard = client.try_acquire("k").await.unwrap();
    let waiter = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .acquire("k", Instant::now() + Duration::from_secs(20))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(objects(&fake), 0, "shutdown released the held lock");
    let waited = waiter.await.unwrap();
    assert!(matches!(waited, Err(Error::ShutDown)), "{waited:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(objects(&fake), 0, "nothing created after shutdown returned");
    drop(guard);
    assert!(client.try_acquire("k").await.is_err());
}

/// A backend whose replies carry no `Date`.
#[derive(Debug)]
struct NoDate(GcsBackend);

fn undated<T: Send + 'static>(
    f: BoxFuture<'_, Result<Reply<T>, BackendError>>,
) -> BoxFuture<'_, Result<Reply<T>, BackendError>> {
    Box::pin(async move { f.await.map(|r| Reply::new(r.into_value(), None)) })
}

impl Backend for NoDate {
    fn create<'a>(
        &'a self,
        name: &'a str,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        undated(self.0.create(name, metadata))
    }

    fn inspect<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Reply<Option<ObjectState>>, BackendError>> {
        undated(self.0.inspect(name))
    }

    fn takeover<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        undated(self.0.takeover(name, expected, metadata))
    }

    fn refresh<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
        metadata: &'a Metadata,
    ) -> BoxFuture<'a, Result<Reply<ObjectState>, BackendError>> {
        undated(self.0.refresh(name, expected, metadata))
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        expected: Version,
    ) -> BoxFuture<'a, Result<Reply<()>, BackendError>> {
        undated(self.0.release(name, expected))
    }
}

/// Hole 6: a reply without a `Date` used to be judged on the client's clock; with the
/// server's clock a minute behind, every live lock looked expired and was taken over. Now a
/// missing `Date` never shortens a lease: the lock stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_without_a_date_never_makes_a_live_lock_expired() {
    let fake = FakeGcs::start().await.unwrap();
    fake.set_clock_offset_ms(-60_000);
    let holder = Client::new(backend(&fake).await);
    let contender = Client::new(NoDate(backend(&fake).await));
    let guard = holder.try_acquire("k").await.unwrap();
    let refused = contender.try_acquire("k").await;
    assert!(
        matches!(&refused, Err(e) if e.is_held()),
        "a live lock taken over: {:?}",
        refused.map(|g| g.token())
    );
    let waited = contender
        .acquire("k", Instant::now() + Duration::from_secs(2))
        .await;
    assert!(
        matches!(&waited, Err(e) if e.is_held()),
        "{:?}",
        waited.map(|g| g.token())
    );
    assert!(guard.is_healthy());
    assert!(guard.release().await.unwrap());
}
