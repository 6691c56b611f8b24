//! The reliability suite (issue 5, `testing.md` T3, T5/T6, T7, T8 and the backend outage):
//! clients run against the in-repo fake GCS with injected faults, a TCP proxy that makes the
//! server go away, paused holders and skewed clocks; every operation goes into a [`History`]
//! and an independent [`Checker`] judges it and prints a summary table.
//!
//! Bounded for CI (the whole binary well under 4 minutes on 2 cores in a debug build);
//! `DIMUTEX_SOAK=1` runs the load phases longer (T3 60 s per fault rate, T8 60 s).
//! T4/T5 with real processes (SIGKILL, SIGSTOP) are in `tests/cli.rs`.

#[path = "support/fenced.rs"]
mod fenced;
#[path = "support/history.rs"]
mod history;
#[path = "support/proxy.rs"]
mod proxy;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dimutex::backend::GcsBackend;
use dimutex::layer::{FromHeader, LockLayer};
use dimutex::testing::{FakeGcs, Fault};
use dimutex::{Backoff, Client, ClientBuilder, HeldLock, LockGuard, RetryPolicy};
use fenced::Resource;
use history::{Checker, Event, History, Kind, Outcome, Recording, Report};
use http::{Request, Response, StatusCode};
use proxy::Proxy;
use tower::{ServiceBuilder, ServiceExt, service_fn};

// ---------------------------------------------------------------------------------------------
// Helpers.

/// `DIMUTEX_SOAK=1`: longer load phases.
fn soak() -> bool {
    std::env::var("DIMUTEX_SOAK").is_ok_and(|v| v.trim() == "1")
}

fn run_time(ci: Duration, soak_time: Duration) -> Duration {
    if soak() { soak_time } else { ci }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn gcs(endpoint: &str) -> GcsBackend {
    GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(endpoint)
        .build()
        .await
        .expect("a GCS backend on the fake")
}

/// A client of its own (own connection pool, as another process would have) whose requests
/// are recorded as `id`'s.
async fn client(history: &Arc<History>, endpoint: &str, prefix: &str, id: &str) -> ClientBuilder {
    let backend = Recording::new(gcs(endpoint).await, history.clone(), id, prefix);
    Client::builder(backend)
        .prefix(prefix)
        .identity(id)
        .poll(Backoff::new(ms(20), ms(250), 2.0).unwrap())
}

fn quick_retry(max_elapsed: Duration) -> RetryPolicy {
    RetryPolicy::new(Backoff::new(ms(10), ms(100), 2.0).unwrap(), max_elapsed)
}

/// Acquires (waiting up to `wait`, or failing fast) and records the outcome.
async fn acquire(
    h: &History,
    client: &Client,
    id: &str,
    key: &str,
    wait: Option<Duration>,
) -> Option<LockGuard> {
    let start = h.now();
    let result = match wait {
        Some(wait) => client.acquire(key, Instant::now() + wait).await,
        None => client.try_acquire(key).await,
    };
    match result {
        Ok(guard) => {
            let token = guard.token().get();
            h.complete(start, Kind::Acquire, key, id, Some(token), Outcome::Ok, "");
            Some(guard)
        }
        Err(e) if e.is_held() => {
            h.complete(start, Kind::Acquire, key, id, None, Outcome::Failed, "held");
            None
        }
        Err(e) => {
            h.complete(
                start,
                Kind::Acquire,
                key,
                id,
                None,
                Outcome::Unknown,
                e.to_string(),
            );
            None
        }
    }
}

fn objects(fake: &FakeGcs, prefix: &str) -> Vec<String> {
    fake.object_names(FakeGcs::DEFAULT_BUCKET)
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Waits (bounded) until no lock object under `prefix` is left.
async fn wait_for_no_objects(fake: &FakeGcs, prefix: &str, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    loop {
        let left = objects(fake, prefix);
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        tokio::time::sleep(ms(50)).await;
    }
}

/// After quiescence + ttl: takes every key once with a fault-free client and releases it. An
/// expired lock object (an ambiguous create nobody adopted, a release that failed) is taken over
/// and deleted; a live one (still refreshed by somebody) makes the sweep fail and stays as a
/// leftover. Returns how many expired objects the sweep removed.
async fn sweep(h: &Arc<History>, fake: &FakeGcs, prefix: &str, keys: &[&str]) -> usize {
    let expired = objects(fake, prefix).len();
    let sweeper = client(h, &fake.endpoint(), prefix, "sweeper")
        .await
        .build()
        .unwrap();
    for key in keys {
        if let Some(guard) = acquire(h, &sweeper, "sweeper", key, None).await {
            let _ = h.release(guard, "sweeper").await;
        }
    }
    sweeper.shutdown(Duration::from_secs(5)).await.unwrap();
    expired
}

// ---------------------------------------------------------------------------------------------
// The checker can fail.

/// A synthetic history with two holders of one key inside at once, a superseded token accepted
/// by an unfenced store, an ambiguous create nobody resolved, a spurious lost signal and a
/// leftover object: the checker reports each.
#[test]
fn checker_reports_a_synthetic_overlap_and_the_rest() {
    let h = History::new();
    let store = Resource::unfenced(h.clone());
    let ttl = Duration::from_secs(10);
    let at = |ms| Duration::from_millis(ms);
    let ev = |start, end, kind, client: &str, token, outcome| Event {
        start,
        end,
        kind,
        key: "k".into(),
        client: client.into(),
        token,
        outcome,
        expected: None,
        updated: None,
        server_date: None,
        detail: String::new(),
        owner: String::new(),
    };
    // a holds token 1 over [10, 50]; b acquires token 2 at 30 and enters: overlap.
    h.push(ev(at(0), at(10), Kind::Acquire, "a", Some(1), Outcome::Ok));
    h.push(ev(at(10), at(10), Kind::Enter, "a", Some(1), Outcome::Ok));
    h.push(ev(at(20), at(30), Kind::Acquire, "b", Some(2), Outcome::Ok));
    h.push(ev(at(30), at(30), Kind::Enter, "b", Some(2), Outcome::Ok));
    h.push(ev(at(40), at(40), Kind::Exit, "b", Some(2), Outcome::Ok));
    h.push(ev(at(50), at(50), Kind::Exit, "a", Some(1), Outcome::Ok));
    // a's delete removed its object, yet its release said "not ours": an underclaim (one of
    // one release: above the 2 % allowed).
    h.push(ev(at(55), at(56), Kind::Delete, "a", Some(1), Outcome::Ok));
    h.push(ev(
        at(54),
        at(57),
        Kind::Release,
        "a",
        Some(1),
        Outcome::Failed,
    ));
    // a's write with token 1 lands after token 2 was granted, and after b's increment.
    std::thread::sleep(ms(60));
    let read = store.read("k");
    assert!(store.write("k", "b", 2, read));
    assert!(store.write("k", "a", 1, read), "unfenced: last writer wins");
    // c's create had an unknown outcome and nothing followed it.
    h.push(ev(
        h.now(),
        h.now(),
        Kind::Create,
        "c",
        None,
        Outcome::Unknown,
    ));
    // a's lease reported lost 20 ms after it was acquired, with a 10 s ttl and nobody else
    // writing: spurious.
    h.push(ev(at(30), at(30), Kind::Lost, "a", Some(1), Outcome::Ok));

    let report = Checker::new(&h, ttl)
        .store(&store)
        .leftovers(vec!["prefix/k".into()])
        .check();
    report.print("synthetic bad history");
    assert_eq!(report.overlaps.len(), 1, "{report:?}");
    assert_eq!(report.overlaps[0].key, "k");
    assert_eq!(report.lost_updates, 1);
    assert_eq!(report.superseded_accepted.len(), 1);
    assert_eq!(report.superseded_accepted[0].newer, 2);
    assert_eq!(report.unresolved.len(), 1);
    assert_eq!(report.spurious_lost.len(), 1);
    assert_eq!(report.leftovers.len(), 1);
    assert_eq!(report.release_underclaims.len(), 1);
    assert_eq!(
        report.violations().len(),
        7,
        "overlap, superseded token, lost update, leftover, unresolved ambiguity, misreported \
         release, spurious lost signal: {:#?}",
        report.violations()
    );

    // The same history made sequential, the write fenced, the ambiguity resolved by a later
    // acquisition, the lost signal after the deadline: clean.
    let h = History::new();
    let store = Resource::fenced(h.clone());
    h.push(ev(at(0), at(10), Kind::Acquire, "a", Some(1), Outcome::Ok));
    h.push(ev(at(10), at(10), Kind::Enter, "a", Some(1), Outcome::Ok));
    h.push(ev(at(20), at(20), Kind::Exit, "a", Some(1), Outcome::Ok));
    h.push(ev(
        at(25),
        at(26),
        Kind::Create,
        "c",
        None,
        Outcome::Unknown,
    ));
    h.push(ev(at(30), at(40), Kind::Acquire, "b", Some(2), Outcome::Ok));
    h.push(ev(at(40), at(40), Kind::Enter, "b", Some(2), Outcome::Ok));
    h.push(ev(at(50), at(50), Kind::Exit, "b", Some(2), Outcome::Ok));
    h.push(ev(
        at(9_500),
        at(9_500),
        Kind::Lost,
        "a",
        Some(1),
        Outcome::Ok,
    ));
    assert!(store.write("k", "b", 2, 0));
    assert!(
        !store.write("k", "a", 1, 0),
        "fenced: the old token is refused"
    );
    let report = Checker::new(&h, ttl).check();
    report.print("synthetic good history");
    report.assert_clean("synthetic good history");
    assert_eq!(report.resolved.get("superseded"), Some(&1));
}

// ---------------------------------------------------------------------------------------------
// T3: faults.

const T3_TTL: Duration = Duration::from_secs(3);
const T3_TIMEOUT: Duration = Duration::from_secs(1);
const T3_KEYS: [&str; 3] = ["k0", "k1", "k2"];
const T3_LONG_KEYS: [&str; 2] = ["long0", "long1"];
const T3_CLIENTS: usize = 6;
const T3_LONG_HOLD: Duration = Duration::from_millis(3_500);

/// Every fault kind of testing.md's T3; the commit-then-delay outlasts the request timeout.
fn t3_faults() -> Vec<Fault> {
    vec![
        Fault::FailBefore(503),
        Fault::FailBefore(429),
        Fault::CommitThen(503),
        Fault::CommitThenDrop,
        Fault::CommitThenDelay(T3_TIMEOUT + ms(300)),
        Fault::Delay(ms(150)),
    ]
}

struct T3Figures {
    report: Report,
    events: Vec<Event>,
    long_holds: usize,
    swept_expired: usize,
    elapsed: Duration,
}

/// One cycle: acquire, the critical section (hold, then increment the fenced counter unless the
/// lease was lost meanwhile), release. Whether it held the lock.
async fn t3_cycle(
    h: &History,
    store: &Resource,
    client: &Client,
    id: &str,
    key: &str,
    wait: Option<Duration>,
    hold: Duration,
) -> bool {
    let Some(guard) = acquire(h, client, id, key, wait).await else {
        return false;
    };
    let token = guard.token().get();
    h.point(Kind::Enter, key, id, Some(token));
    let lost = tokio::select! {
        _ = guard.lost() => true,
        _ = tokio::time::sleep(hold) => false,
    };
    if lost {
        h.point(Kind::Lost, key, id, Some(token));
    } else if guard.is_healthy() {
        store.increment(key, id, token, ms(5)).await;
    }
    h.point(Kind::Exit, key, id, Some(token));
    let _ = h.release(guard, id).await;
    true
}

/// T3: `T3_CLIENTS` clients × bounded rounds on three keys, short critical sections that
/// increment a fenced counter; two more clients each hold a key of their own for 3.5 s at a time
/// (across three refreshes) while the short clients now and then try it. Faults on every
/// request (reads included) at `rate`.
async fn t3(rate: f64, seed: u64) -> T3Figures {
    let started = Instant::now();
    let fake = FakeGcs::start().await.unwrap();
    let h = History::new();
    let store = Arc::new(Resource::fenced(h.clone()));
    let prefix = "t3/";
    fake.set_fault_rate(rate, t3_faults(), seed);
    fake.set_read_faults(true);
    let end = Instant::now() + run_time(Duration::from_secs(12), Duration::from_secs(60));
    let build = |id: String| {
        let (h, endpoint) = (h.clone(), fake.endpoint());
        async move {
            client(&h, &endpoint, prefix, &id)
                .await
                .ttl(T3_TTL)
                .refresh_interval(Duration::from_secs(1))
                .request_timeout(T3_TIMEOUT)
                .poll(Backoff::new(ms(10), ms(100), 2.0).unwrap())
                .build()
                .unwrap()
        }
    };
    let mut tasks = Vec::new();
    for c in 0..T3_CLIENTS {
        let id = format!("c{c}");
        let client = build(id.clone()).await;
        let (h, store) = (h.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..5_000usize {
                if Instant::now() >= end {
                    break;
                }
                if i % 8 == 7 {
                    // A fail-fast try on a key a long holder keeps refreshing.
                    let key = T3_LONG_KEYS[(c + i) % T3_LONG_KEYS.len()];
                    t3_cycle(&h, &store, &client, &id, key, None, ms(15)).await;
                    continue;
                }
                let key = T3_KEYS[(c + i + i / 3) % T3_KEYS.len()];
                let wait = Some(Duration::from_secs(2));
                t3_cycle(&h, &store, &client, &id, key, wait, ms(15)).await;
            }
            client.shutdown(Duration::from_secs(10)).await.unwrap();
            0
        }));
    }
    for (n, key) in T3_LONG_KEYS.into_iter().enumerate() {
        let id = format!("long{n}");
        let client = build(id.clone()).await;
        let (h, store) = (h.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            let mut long_holds = 0;
            for _ in 0..100 {
                if Instant::now() + T3_LONG_HOLD >= end {
                    break;
                }
                let wait = Some(Duration::from_secs(2));
                if t3_cycle(&h, &store, &client, &id, key, wait, T3_LONG_HOLD).await {
                    long_holds += 1;
                }
                tokio::time::sleep(ms(50)).await;
            }
            client.shutdown(Duration::from_secs(10)).await.unwrap();
            long_holds
        }));
    }
    let mut long_holds = 0;
    for t in tasks {
        long_holds += t.await.unwrap();
    }
    // Quiescence, then the ttl (+ 1 s of rule slack + 1 s of `Date` resolution): whatever an
    // unresolved write left behind has expired by the server's clock.
    fake.clear_faults();
    tokio::time::sleep(T3_TTL + ms(2_500)).await;
    let all_keys: Vec<&str> = T3_KEYS.iter().chain(&T3_LONG_KEYS).copied().collect();
    let swept_expired = sweep(&h, &fake, prefix, &all_keys).await;
    let report = Checker::new(&h, T3_TTL)
        .store(&store)
        .leftovers(objects(&fake, prefix))
        .faults(fake.faults_injected())
        .server_requests(fake.request_count())
        .check();
    T3Figures {
        report,
        events: h.events(),
        long_holds,
        swept_expired,
        elapsed: started.elapsed(),
    }
}

fn t3_assert(rate: f64, f: &T3Figures) {
    let label = format!(
        "T3 faults {:.0} % ({} + 2 clients, 3 + 2 keys, ttl {T3_TTL:?})",
        rate * 100.0,
        T3_CLIENTS
    );
    let r = &f.report;
    r.print(&label);
    let calls = |o| {
        f.events
            .iter()
            .filter(|e| e.kind == Kind::Acquire && e.outcome == o)
            .count()
    };
    eprintln!(
        "  {label}: {} long holds; acquire calls {} ok, {} held after waiting up to 2 s, {} unavailable; {} expired objects swept after the ttl; {:.1?}",
        f.long_holds,
        calls(Outcome::Ok),
        calls(Outcome::Failed),
        calls(Outcome::Unknown),
        f.swept_expired,
        f.elapsed
    );
    for e in r
        .release_misreports
        .iter()
        .chain(&r.release_underclaims)
        .take(3)
    {
        eprintln!(
            "  release() misreported: {} {} token {:?} at {:.3?} returned {}; the key's requests meanwhile:",
            e.client, e.key, e.token, e.start, e.detail
        );
        for b in f
            .events
            .iter()
            .filter(|b| {
                b.kind.is_backend() && b.key == e.key && b.start >= e.start && b.start <= e.end
            })
            .take(8)
        {
            eprintln!(
                "    {:>9.3?}..{:>9.3?} {:<7} {:?} {:?} token {:?}: {}",
                b.start, b.end, b.client, b.kind, b.outcome, b.token, b.detail
            );
        }
    }
    // Safety first: a history violation is reported even in a run that also falls short of a
    // liveness floor below.
    r.assert_clean(&label);
    // At 20 % some of the faults are 429s: the clients then wait out GCS's mutation window
    // (1-2 s) before creates and deletes, as they must on a throttled object, so fewer cycles
    // fit in the run. These are liveness floors, not targets: over 14 runs on a 2-core VM the
    // 20 % run made 23-47 acquisitions and 3-6 long holds (a long holder fits two or three
    // 3.5 s holds in the run; a 429 before its create or delete costs it a second or two).
    let (enough, enough_long) = if rate >= 0.2 { (20, 2) } else { (100, 4) };
    assert!(r.acquisitions >= enough, "{label}: too few acquisitions");
    assert!(r.faults_injected > 0, "{label}: no fault was injected");
    assert!(
        f.long_holds >= enough_long,
        "{label}: too few locks held across refreshes"
    );
    assert!(
        r.refreshes >= 2 * f.long_holds,
        "{label}: long holds were not refreshed"
    );
    if rate >= 0.05 {
        assert!(
            r.ambiguous > 0,
            "{label}: no ambiguous write: the run proves little"
        );
    }
    if rate == 0.05 {
        assert!(
            r.owner_release_pct() >= 99.0,
            "{label}: the owner released only {:.1} % of {} cycles",
            r.owner_release_pct(),
            r.acquisitions
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_faults_1_percent() {
    t3_assert(0.01, &t3(0.01, 101).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_faults_5_percent() {
    t3_assert(0.05, &t3(0.05, 105).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_faults_20_percent() {
    t3_assert(0.20, &t3(0.20, 120).await);
}

/// A refresh that lands but whose answer is lost (503 after commit, dropped connection, answer
/// later than the request timeout) must not make the holder believe its lease is lost: the
/// library re-reads the object, finds its own write, and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landed_refreshes_with_lost_answers_are_not_lost_leases() {
    let fake = FakeGcs::start().await.unwrap();
    let h = History::new();
    let prefix = "landed/";
    let ttl = Duration::from_secs(3);
    let holder = client(&h, &fake.endpoint(), prefix, "holder")
        .await
        .ttl(ttl)
        .refresh_interval(Duration::from_secs(1))
        .request_timeout(ms(500))
        .build()
        .unwrap();
    let other = client(&h, &fake.endpoint(), prefix, "other")
        .await
        .build()
        .unwrap();
    let guard = acquire(&h, &holder, "holder", "k", None).await.unwrap();
    let token = guard.token().get();
    h.point(Kind::Enter, "k", "holder", Some(token));
    // One fault per refresh: each refresh lands, and its answer is lost.
    let faults = [
        Fault::CommitThen(503),
        Fault::CommitThenDrop,
        Fault::CommitThenDelay(ms(700)),
        Fault::CommitThen(503),
    ];
    let held = tokio::select! {
        _ = guard.lost() => false,
        _ = async {
            for fault in faults {
                fake.inject(dimutex::testing::FaultRule::new(fault).with_method(http::Method::PATCH));
                for _ in 0..40 {
                    if fake.pending_faults() == 0 {
                        break;
                    }
                    tokio::time::sleep(ms(50)).await;
                }
                tokio::time::sleep(ms(300)).await;
                assert!(acquire(&h, &other, "other", "k", None).await.is_none());
            }
        } => true,
    };
    if !held {
        h.point(Kind::Lost, "k", "holder", Some(token));
    }
    h.point(Kind::Exit, "k", "holder", Some(token));
    let _ = h.release(guard, "holder").await;
    let report = Checker::new(&h, ttl)
        .leftovers(objects(&fake, prefix))
        .faults(fake.faults_injected())
        .check();
    report.print("landed refreshes with lost answers (ttl 3 s, four refreshes)");
    assert_eq!(fake.pending_faults(), 0, "every refresh fault was used");
    assert!(report.ambiguous >= 4);
    assert!(
        held,
        "the lease was reported lost although every refresh landed"
    );
    report.assert_clean("landed refreshes");
}

/// The minimal reproduction of a release that T3 finds misreported: the owner's delete takes
/// effect but its answer is lost (503 after commit); before the retry, another client creates
/// the lock anew; the retry meets the new object (412) and `release()` answers "not ours",
/// although the owner's own delete removed its lock while its lease was healthy.
#[tokio::test]
async fn release_whose_delete_landed_before_a_new_holder_reports_ours() {
    let fake = FakeGcs::start().await.unwrap();
    let h = History::new();
    let prefix = "misreport/";
    let a = client(&h, &fake.endpoint(), prefix, "a")
        .await
        .build()
        .unwrap();
    let b = client(&h, &fake.endpoint(), prefix, "b")
        .await
        .build()
        .unwrap();
    let guard = acquire(&h, &a, "a", "k", None).await.unwrap();
    fake.inject(
        dimutex::testing::FaultRule::new(Fault::CommitThen(503)).with_method(http::Method::DELETE),
    );
    let releasing = tokio::spawn({
        let h = h.clone();
        async move { h.release(guard, "a").await }
    });
    // The delete landed at once; the retry waits for the backoff (at least 100 ms).
    let mut next = None;
    for _ in 0..50 {
        next = acquire(&h, &b, "b", "k", None).await;
        if next.is_some() {
            break;
        }
        tokio::time::sleep(ms(5)).await;
    }
    let next = next.expect("b takes the lock once a's delete has landed");
    let reported = releasing.await.unwrap();
    let _ = h.release(next, "b").await;
    let report = Checker::new(&h, Duration::from_secs(30))
        .leftovers(objects(&fake, prefix))
        .check();
    report.print("release misreport reproduction");
    assert_eq!(
        report.owner_releases, 2,
        "both deletes removed their owner's object"
    );
    assert!(
        reported.unwrap(),
        "a's delete removed a's lock while its lease was healthy, yet release() said it was not ours"
    );
    report.assert_clean("release misreport reproduction");
}

// ---------------------------------------------------------------------------------------------
// T5/T6: a paused holder against a fenced store and against its unfenced twin.

const T5_TTL: Duration = Duration::from_secs(2);

struct Paused {
    key: String,
    holder: String,
    stale_writes: usize,
    stale_accepted: usize,
    lost_before_write: bool,
    takeover_after_pause: Duration,
}

/// A holder reads the counter, then is "stopped" for `pause`: its process does nothing (the
/// task sleeps) and none of its requests get out (the proxy in front of its backend
/// blackholes). A contender waits for the lock, gets it, increments. The holder wakes and, as a
/// holder that does not look at its lease would, writes what it computed before the pause and
/// then twice more.
async fn paused_holder(
    h: &Arc<History>,
    fake: &FakeGcs,
    store: &Resource,
    key: &str,
    pause: Duration,
) -> Paused {
    let prefix = "t5/";
    let proxy = Proxy::start(fake.addr()).await.unwrap();
    let holder_id = format!("holder-{key}");
    let holder = client(h, &proxy.endpoint(), prefix, &holder_id)
        .await
        .ttl(T5_TTL)
        .refresh_interval(Duration::from_secs(1))
        .request_timeout(ms(500))
        .retry(quick_retry(ms(500)))
        .build()
        .unwrap();
    let contender_id = format!("contender-{key}");
    let contender = client(h, &fake.endpoint(), prefix, &contender_id)
        .await
        .ttl(T5_TTL)
        .build()
        .unwrap();
    let guard = acquire(h, &holder, &holder_id, key, None)
        .await
        .expect("the holder acquires");
    let token = guard.token().get();
    h.point(Kind::Enter, key, &holder_id, Some(token));
    let read = store.read(key);
    // Let one refresh land, so the pause starts from a refreshed lease.
    tokio::time::sleep(ms(1_100)).await;

    proxy.blackhole();
    let paused_at = Instant::now();
    let contender_run = {
        let (h, key, id) = (h.clone(), key.to_owned(), contender_id.clone());
        async move {
            let guard = acquire(&h, &contender, &id, &key, Some(Duration::from_secs(15)))
                .await
                .expect("the contender gets the lock once the paused lease expires");
            let got = paused_at.elapsed();
            let t = guard.token().get();
            h.point(Kind::Enter, &key, &id, Some(t));
            (guard, got, t)
        }
    };
    let ((guard_b, got, token_b), ()) = tokio::join!(contender_run, tokio::time::sleep(pause));
    assert!(token_b > token, "tokens increase: {token} then {token_b}");
    assert!(store.increment(key, &contender_id, token_b, ms(0)).await);
    h.point(Kind::Exit, key, &contender_id, Some(token_b));
    assert!(h.release(guard_b, &contender_id).await.unwrap());
    proxy.resume();

    // On resume: the lost signal has fired before the holder writes anything.
    let lost_before_write =
        !guard.is_healthy() && tokio::time::timeout(ms(1), guard.lost()).await.is_ok();
    if lost_before_write {
        h.point(Kind::Lost, key, &holder_id, Some(token));
    }
    let mut stale_accepted = 0;
    let mut value = read;
    for _ in 0..3 {
        stale_accepted += usize::from(store.write(key, &holder_id, token, value));
        value = store.read(key);
    }
    h.point(Kind::Exit, key, &holder_id, Some(token));
    let still_ours = h.release(guard, &holder_id).await.unwrap();
    assert!(
        !still_ours,
        "the paused holder's release must find the lock not its own"
    );
    holder.shutdown(Duration::from_secs(5)).await.unwrap();
    Paused {
        key: key.to_owned(),
        holder: holder_id,
        stale_writes: 3,
        stale_accepted,
        lost_before_write,
        takeover_after_pause: got,
    }
}

/// The control: a pause of ttl/4 keeps the lock; nobody else gets it meanwhile.
async fn briefly_paused_holder(h: &Arc<History>, fake: &FakeGcs, store: &Resource, key: &str) {
    let prefix = "t5/";
    let proxy = Proxy::start(fake.addr()).await.unwrap();
    let id = "holder-control";
    let holder = client(h, &proxy.endpoint(), prefix, id)
        .await
        .ttl(T5_TTL)
        .refresh_interval(Duration::from_secs(1))
        .request_timeout(ms(500))
        .build()
        .unwrap();
    let other = client(h, &fake.endpoint(), prefix, "contender-control")
        .await
        .ttl(T5_TTL)
        .build()
        .unwrap();
    let guard = acquire(h, &holder, id, key, None).await.unwrap();
    let token = guard.token().get();
    h.point(Kind::Enter, key, id, Some(token));
    let read = store.read(key);
    proxy.blackhole();
    let tries = async {
        for _ in 0..4 {
            assert!(
                acquire(h, &other, "contender-control", key, None)
                    .await
                    .is_none(),
                "taken during a short pause"
            );
            tokio::time::sleep(ms(100)).await;
        }
    };
    tokio::join!(tries, tokio::time::sleep(T5_TTL / 4));
    proxy.resume();
    assert!(guard.is_healthy(), "a pause of ttl/4 keeps the lease");
    assert!(
        store.write(key, id, token, read),
        "and its write is accepted"
    );
    h.point(Kind::Exit, key, id, Some(token));
    assert!(h.release(guard, id).await.unwrap());
    holder.shutdown(Duration::from_secs(5)).await.unwrap();
    other.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_t6_paused_holder_fenced_store_rejects_unfenced_twin_loses_an_update() {
    let fake = FakeGcs::start().await.unwrap();
    let h = History::new();
    let fenced = Resource::fenced(h.clone());
    let unfenced = Resource::unfenced(h.clone());
    let pause = 2 * T5_TTL;
    let (f, u, ()) = tokio::join!(
        paused_holder(&h, &fake, &fenced, "fenced", pause),
        paused_holder(&h, &fake, &unfenced, "unfenced", pause),
        briefly_paused_holder(&h, &fake, &fenced, "control"),
    );
    let report = Checker::new(&h, T5_TTL)
        .store(&fenced)
        .store(&unfenced)
        .leftovers(wait_for_no_objects(&fake, "t5/", Duration::from_secs(2)).await)
        .faults(fake.faults_injected())
        .server_requests(fake.request_count())
        .check();
    report.print("T5/T6 paused holder (pause 2×ttl, ttl 2 s) + control (pause ttl/4)");
    for p in [&f, &u] {
        eprintln!(
            "  {}: taken over {:.2?} into the pause; lost signalled before writing: {}; stale writes accepted {}/{}",
            p.key, p.takeover_after_pause, p.lost_before_write, p.stale_accepted, p.stale_writes
        );
        assert!(
            p.lost_before_write,
            "{}: the holder's lost signal had not fired on resume",
            p.key
        );
    }
    // T5: the fenced store rejects 100 % of the stale holder's writes.
    assert_eq!(
        f.stale_accepted, 0,
        "the fenced store accepted a stale write"
    );
    let fenced_rejected = fenced
        .writes()
        .iter()
        .filter(|w| w.client == f.holder && !w.accepted)
        .count();
    assert_eq!(fenced_rejected, f.stale_writes, "100 % rejected");
    assert!(
        !report
            .superseded_accepted
            .iter()
            .any(|s| s.store == "fenced"),
        "the checker found a superseded token in the fenced store"
    );
    // T6, the negative control: against the unfenced twin the checker must catch the lost
    // update. If it does not, the checker proves nothing and the suite fails.
    assert_eq!(
        u.stale_accepted, u.stale_writes,
        "unfenced: last writer wins"
    );
    assert!(
        report.lost_updates >= 1,
        "negative control never fired: the checker missed the unfenced lost update"
    );
    assert!(
        report
            .superseded_accepted
            .iter()
            .any(|s| s.store == "unfenced" && s.client == u.holder),
        "negative control never fired: no superseded token reported for the unfenced twin"
    );
    assert_eq!(
        unfenced.read("unfenced"),
        1 + 2,
        "four increments, one of them lost"
    );
    // A paused process keeps believing it is inside: the checker sees both overlaps, and none
    // on the control key.
    let overlapping: Vec<&str> = report.overlaps.iter().map(|o| o.key.as_str()).collect();
    assert!(overlapping.contains(&"fenced") && overlapping.contains(&"unfenced"));
    assert!(!overlapping.contains(&"control"), "the control overlapped");
    assert!(report.leftovers.is_empty(), "{:?}", report.leftovers);
    assert!(report.unresolved.is_empty(), "{:?}", report.unresolved);
    assert!(
        report.spurious_lost.is_empty(),
        "{:?}",
        report.spurious_lost
    );
}

// ---------------------------------------------------------------------------------------------
// T7: client clocks.

const T7_TTL: Duration = Duration::from_secs(2);

fn shifted(secs: i64) -> impl Fn() -> SystemTime + Send + Sync + 'static {
    move || {
        let now = SystemTime::now();
        if secs >= 0 {
            now + Duration::from_secs(secs.unsigned_abs())
        } else {
            now - Duration::from_secs(secs.unsigned_abs())
        }
    }
}

/// A holder with a skewed wall clock holds (refreshing) for 2.5 s while two contenders with
/// skewed clocks (the same offset and its opposite) try every 100 ms; then the holder dies
/// (its runtime dropped: no release, no refresh). Returns the crash time.
async fn t7_one(h: Arc<History>, endpoint: String, store: Arc<Resource>, offset: i64) -> Duration {
    let prefix = "t7/".to_owned();
    let key = format!("off{offset:+}");
    let holder_id = format!("holder{offset:+}");
    let crashed = {
        let (h, endpoint, store, key, prefix) = (
            h.clone(),
            endpoint.clone(),
            store.clone(),
            key.clone(),
            prefix.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let holder = client(&h, &endpoint, &prefix, &holder_id)
                    .await
                    .ttl(T7_TTL)
                    .refresh_interval(Duration::from_secs(1))
                    .wall_clock(shifted(offset))
                    .build()
                    .unwrap();
                let guard = acquire(&h, &holder, &holder_id, &key, None)
                    .await
                    .expect("the holder acquires");
                let token = guard.token().get();
                h.point(Kind::Enter, &key, &holder_id, Some(token));
                assert!(store.increment(&key, &holder_id, token, ms(5)).await);
                tokio::time::sleep(ms(2_500)).await;
                assert!(
                    guard.is_healthy(),
                    "offset {offset}: the holder lost its lease"
                );
                std::mem::forget(guard);
                h.point(Kind::Exit, &key, &holder_id, Some(token));
            });
            drop(rt); // the crash
            h.now()
        })
    };
    let mut contenders = Vec::new();
    for (n, skew) in [offset, -offset].into_iter().enumerate() {
        let id = format!("contender{offset:+}/{n}");
        let c = client(&h, &endpoint, &prefix, &id)
            .await
            .ttl(T7_TTL)
            .wall_clock(shifted(skew))
            .build()
            .unwrap();
        let (h, store, key) = (h.clone(), store.clone(), key.clone());
        contenders.push(tokio::spawn(async move {
            tokio::time::sleep(ms(300)).await;
            for _ in 0..150 {
                if let Some(guard) = acquire(&h, &c, &id, &key, None).await {
                    let token = guard.token().get();
                    h.point(Kind::Enter, &key, &id, Some(token));
                    assert!(store.increment(&key, &id, token, ms(5)).await);
                    h.point(Kind::Exit, &key, &id, Some(token));
                    assert!(h.release(guard, &id).await.unwrap());
                    return;
                }
                tokio::time::sleep(ms(100)).await;
            }
            panic!("{id}: never got the lock");
        }));
    }
    let crashed = crashed.await.unwrap();
    for c in contenders {
        c.await.unwrap();
    }
    crashed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_client_clock_offsets_never_cause_an_early_takeover() {
    let fake = FakeGcs::start().await.unwrap();
    let h = History::new();
    let store = Arc::new(Resource::fenced(h.clone()));
    let offsets = [-300i64, -30, 30, 300];
    let runs: Vec<_> = offsets
        .iter()
        .map(|&o| tokio::spawn(t7_one(h.clone(), fake.endpoint(), store.clone(), o)))
        .collect();
    let mut crashes = Vec::new();
    for r in runs {
        crashes.push(r.await.unwrap());
    }
    let report = Checker::new(&h, T7_TTL)
        .store(&store)
        .leftovers(objects(&fake, "t7/"))
        .server_requests(fake.request_count())
        .check();
    report.print("T7 client wall clocks −300/−30/+30/+300 s (ttl 2 s)");
    report.assert_clean("T7");
    let events = h.events();
    for (offset, crashed) in offsets.iter().zip(crashes) {
        let key = format!("off{offset:+}");
        let holder = format!("holder{offset:+}");
        // The server-judged expiry: the holder's last acknowledged write (`updated`, server
        // clock) + ttl. The takeover's `Date` (server clock) must not precede it.
        let last_write = events
            .iter()
            .filter(|e| e.key == key && e.client == holder && e.outcome == Outcome::Ok)
            .filter_map(|e| e.updated)
            .max()
            .expect("the holder wrote");
        let takeover = events
            .iter()
            .filter(|e| e.key == key && e.client != holder && e.outcome == Outcome::Ok)
            .find(|e| matches!(e.kind, Kind::Takeover | Kind::Create))
            .expect("a contender took over");
        assert_eq!(
            takeover.kind,
            Kind::Takeover,
            "offset {offset}: expired lock is taken over"
        );
        let date = takeover.server_date.expect("a Date header");
        let margin = date
            .duration_since(last_write + T7_TTL)
            .unwrap_or_else(|e| {
                panic!(
                    "offset {offset}: taken over {:?} before the server-judged expiry",
                    e.duration()
                )
            });
        let acquired = events
            .iter()
            .find(|e| {
                e.key == key
                    && e.kind == Kind::Acquire
                    && e.outcome == Outcome::Ok
                    && e.client != holder
            })
            .unwrap();
        let after_crash = acquired.end.saturating_sub(crashed);
        let tries = events
            .iter()
            .filter(|e| e.key == key && e.kind == Kind::Acquire && e.outcome == Outcome::Failed)
            .count();
        eprintln!(
            "  offset {offset:+} s: {tries} refused tries while held; taken over {margin:.2?} after the server-judged expiry (Date resolution 1 s + rule slack 1 s), {after_crash:.2?} after the crash"
        );
        assert!(tries >= 10, "offset {offset}: contenders barely tried");
        assert!(
            after_crash <= T7_TTL + Duration::from_secs(3),
            "offset {offset}: taken over only {after_crash:?} after the crash"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// T8: the throttle.

/// The library's default poll backoff (50 ms to 1 s, ×3), unless `T8_POLL_MAX_MS` says
/// otherwise (for exploring).
fn t8_poll() -> Backoff {
    let max = std::env::var("T8_POLL_MAX_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    Backoff::new(ms(50), ms(max), 3.0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t8_sixteen_contenders_under_the_throttle_poll_with_get() {
    let fake = FakeGcs::builder().throttle(true).start().await.unwrap();
    let h = History::new();
    let store = Arc::new(Resource::fenced(h.clone()));
    let prefix = "t8/";
    let key = "hot";
    // Issue 5: 60 s of run time, in CI too (the soak switch makes it 5 minutes).
    let run = run_time(Duration::from_secs(60), Duration::from_secs(300));
    let started = Instant::now();
    let end = started + run;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let id = format!("c{c}");
        let client = client(&h, &fake.endpoint(), prefix, &id)
            .await
            .ttl(Duration::from_secs(10))
            .poll(t8_poll())
            .build()
            .unwrap();
        let (h, store) = (h.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            let mut held = 0;
            for _ in 0..1_000 {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                // Each contender waits for the rest of the run: a new acquisition starts with a
                // create (the protocol's uncontended fast path), so short waits in a loop would
                // measure re-acquisitions, not polling.
                let wait = end - now;
                let Some(guard) = acquire(&h, &client, &id, key, Some(wait)).await else {
                    continue;
                };
                held += 1;
                let token = guard.token().get();
                h.point(Kind::Enter, key, &id, Some(token));
                store.increment(key, &id, token, ms(50)).await;
                h.point(Kind::Exit, key, &id, Some(token));
                let _ = h.release(guard, &id).await;
            }
            client.shutdown(Duration::from_secs(10)).await.unwrap();
            held
        }));
    }
    let mut holders = 0;
    for t in tasks {
        if t.await.unwrap() > 0 {
            holders += 1;
        }
    }
    let elapsed = started.elapsed();
    let name = format!("{prefix}{key}");
    let log = fake.requests();
    let on_object: Vec<_> = log.iter().filter(|r| r.object() == Some(&name)).collect();
    let mutations = on_object.iter().filter(|r| r.is_mutation()).count();
    let reads = on_object.len() - mutations;
    let throttled = on_object.iter().filter(|r| r.status() == Some(429)).count();
    let mut breakdown = std::collections::BTreeMap::new();
    for r in on_object.iter().filter(|r| r.is_mutation()) {
        *breakdown
            .entry(format!("{} {}", r.method(), r.status().unwrap_or(0)))
            .or_insert(0usize) += 1;
    }
    eprintln!("  mutation requests by method and status: {breakdown:?}");
    let report = Checker::new(&h, Duration::from_secs(10))
        .store(&store)
        .leftovers(wait_for_no_objects(&fake, prefix, Duration::from_secs(3)).await)
        .server_requests(fake.request_count())
        .check();
    let label = format!("T8 throttle on, 16 contenders, one key, {run:?}");
    report.print(&label);
    let per_sec = mutations as f64 / elapsed.as_secs_f64();
    eprintln!(
        "  {label}: {mutations} mutation requests ({per_sec:.2}/s), {reads} reads, {throttled} answered 429, {holders}/16 contenders held it, {:.1?}",
        elapsed
    );
    report.assert_clean(&label);
    assert!(report.acquisitions >= 3, "too few hand-overs");
    assert!(
        per_sec <= 2.0,
        "contenders sent {per_sec:.2} mutation requests per second on the object"
    );
    assert!(
        reads as f64 >= 3.0 * mutations as f64,
        "waiters poll with reads: {reads} reads vs {mutations} mutations"
    );
    assert!(reads > mutations, "contenders poll with GET");
}

// ---------------------------------------------------------------------------------------------
// The backend goes away while a lock is held and requests arrive.

#[derive(Debug, Clone)]
struct Answer {
    key: &'static str,
    sent: Duration,
    done: Duration,
    status: StatusCode,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_outage_holder_loses_layer_answers_503_then_recovers() {
    const TTL: Duration = Duration::from_secs(2);
    let fake = FakeGcs::start().await.unwrap();
    let proxy = Proxy::start(fake.addr()).await.unwrap();
    let h = History::new();
    let store = Arc::new(Resource::fenced(h.clone()));
    let prefix = "outage/";
    let holder = client(&h, &proxy.endpoint(), prefix, "holder")
        .await
        .ttl(TTL)
        .refresh_interval(Duration::from_secs(1))
        .request_timeout(ms(500))
        .retry(quick_retry(ms(500)))
        .build()
        .unwrap();
    let layer_client = client(&h, &proxy.endpoint(), prefix, "layer")
        .await
        .ttl(TTL)
        .refresh_interval(Duration::from_secs(1))
        .request_timeout(ms(500))
        .retry(quick_retry(ms(300)))
        .build()
        .unwrap();
    let service = {
        let (h, store) = (h.clone(), store.clone());
        ServiceBuilder::new()
            .layer(
                LockLayer::new(layer_client.clone(), FromHeader::new("x-key"))
                    .release_on_response(),
            )
            .service(service_fn(move |req: Request<String>| {
                let (h, store) = (h.clone(), store.clone());
                async move {
                    let Some(held) = req.extensions().get::<HeldLock>().cloned() else {
                        return Ok::<_, Infallible>(
                            Response::builder()
                                .status(500)
                                .body("ran without the lock".to_owned())
                                .unwrap(),
                        );
                    };
                    let key = held.key().as_str().to_owned();
                    let token = held.token().get();
                    h.complete(
                        h.now(),
                        Kind::Acquire,
                        &key,
                        "layer",
                        Some(token),
                        Outcome::Ok,
                        "seen by the handler",
                    );
                    h.point(Kind::Enter, &key, "layer", Some(token));
                    store.increment(&key, "layer", token, ms(5)).await;
                    h.point(Kind::Exit, &key, "layer", Some(token));
                    Ok(Response::new(String::new()))
                }
            }))
    };

    let guard = acquire(&h, &holder, "holder", "job", None).await.unwrap();
    let token = guard.token().get();
    h.point(Kind::Enter, "job", "holder", Some(token));
    let lost = guard.lost();

    // Requests arrive every 100 ms on the held key and on a free one, for the whole run.
    let pause_after = ms(1_000);
    let outage = 2 * TTL;
    let recovery = TTL + Duration::from_secs(3);
    let total = pause_after + outage + recovery;
    let requests = {
        let (h, service) = (h.clone(), service.clone());
        tokio::spawn(async move {
            let mut calls = Vec::new();
            let started = Instant::now();
            while started.elapsed() < total {
                for key in ["job", "other"] {
                    let (h, service) = (h.clone(), service.clone());
                    calls.push(tokio::spawn(async move {
                        let request = Request::post("/work")
                            .header("x-key", key)
                            .body(String::new())
                            .unwrap();
                        let sent = h.now();
                        let response =
                            tokio::time::timeout(Duration::from_secs(5), service.oneshot(request))
                                .await
                                .expect("the layer answers within 5 s")
                                .unwrap();
                        Answer {
                            key,
                            sent,
                            done: h.now(),
                            status: response.status(),
                        }
                    }));
                }
                tokio::time::sleep(ms(100)).await;
            }
            let mut answers = Vec::new();
            for c in calls {
                answers.push(c.await.unwrap());
            }
            answers
        })
    };

    tokio::time::sleep(pause_after).await;
    proxy.pause();
    let paused = h.now();
    let lost_at = tokio::time::timeout(outage, lost).await.map(|()| h.now());
    h.point(Kind::Lost, "job", "holder", Some(token));
    h.point(Kind::Exit, "job", "holder", Some(token));
    let lost_at = lost_at.expect("the holder reports its lease lost during the outage");
    tokio::time::sleep_until(tokio::time::Instant::from_std(h.instant(paused + outage))).await;
    proxy.resume();
    let resumed = h.now();
    let holder_release = h.release(guard, "holder").await;
    let answers = requests.await.unwrap();
    holder.shutdown(Duration::from_secs(5)).await.unwrap();
    layer_client.shutdown(Duration::from_secs(5)).await.unwrap();

    let report = Checker::new(&h, TTL)
        .store(&store)
        .leftovers(wait_for_no_objects(&fake, prefix, Duration::from_secs(3)).await)
        .server_requests(fake.request_count())
        .check();
    report.print("backend outage (2×ttl, ttl 2 s) with a LockLayer under requests");
    let slack = ms(100);
    let during: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent >= paused + slack && a.done + slack <= resumed)
        .collect();
    let before: Vec<&Answer> = answers.iter().filter(|a| a.done < paused).collect();
    let last_second: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent + Duration::from_secs(1) >= resumed + recovery)
        .collect();
    let count = |list: &[&Answer], s: u16| list.iter().filter(|a| a.status.as_u16() == s).count();
    eprintln!(
        "  outage: holder lost {:.2?} after the pause (ttl {TTL:?}); release after resume: {holder_release:?}",
        lost_at - paused
    );
    eprintln!(
        "  answers: before {} (409: {}, 200: {}), during {} (503: {}), last second {} (200: {}), total {}",
        before.len(),
        count(&before, 409),
        count(&before, 200),
        during.len(),
        count(&during, 503),
        last_second.len(),
        count(&last_second, 200),
        answers.len()
    );
    assert!(lost_at - paused <= TTL + ms(500), "lost noticed late");
    assert!(
        answers
            .iter()
            .all(|a| a.status != StatusCode::INTERNAL_SERVER_ERROR),
        "a handler ran without the lock"
    );
    // Before: the held key is 409, never 200; the free one 200 (or 409 while its previous
    // request's release is still on its way), never 503.
    let ok_before = |a: &&Answer| match a.key {
        "job" => a.status == StatusCode::CONFLICT,
        _ => matches!(a.status, StatusCode::OK | StatusCode::CONFLICT),
    };
    assert!(
        before.iter().all(ok_before) && count(&before, 200) > 0,
        "before the outage: job held (409), other free (200): {before:?}"
    );
    assert!(
        during.len() >= 40,
        "too few requests during the outage: {}",
        during.len()
    );
    assert!(
        during
            .iter()
            .all(|a| a.status == StatusCode::SERVICE_UNAVAILABLE),
        "during the outage every answer is 503: {:?}",
        during
            .iter()
            .filter(|a| a.status != StatusCode::SERVICE_UNAVAILABLE)
            .collect::<Vec<_>>()
    );
    // Recovered: in the last second both keys are served (a 409 can only be the previous
    // request's release still on its way), no 503.
    for key in ["job", "other"] {
        let of_key: Vec<&Answer> = last_second
            .iter()
            .copied()
            .filter(|a| a.key == key)
            .collect();
        assert!(
            count(&of_key, 200) > 0
                && of_key
                    .iter()
                    .all(|a| matches!(a.status, StatusCode::OK | StatusCode::CONFLICT)),
            "recovered: {key} served in the last second: {of_key:?}"
        );
    }
    report.assert_clean("backend outage");
}
