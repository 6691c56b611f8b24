//! Cross-implementation tests: this crate and the reference Python `dimutex` (PyPI
//! `dimutex==1.3.1`) sharing lock objects on the in-repo fake GCS server.
//!
//! The Python side is `tests/support/dimutex_peer.py`, one long-running process per test that
//! takes JSON commands on stdin and answers JSON lines on stdout. It needs the venv made by
//! `bash .ci/setup-python.sh` (see `support::python`).
//!
//! Key names contain no spaces: Python `dimutex` encodes object names with `quote_plus` (a
//! space becomes `+`, which GCS reads as a literal `+`), while we percent-encode a path
//! segment (`%20`), so the two sides would name different objects for a key with a space.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dimutex::backend::GcsBackend;
use dimutex::testing::FakeGcs;
use dimutex::{Client, Error};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long one answer of the Python peer may take (its own HTTP timeout is 10 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// The Python `dimutex` driver: one process, one aiohttp session, many commands.
struct Peer {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    next_id: u64,
}

impl Peer {
    async fn start(fake: &FakeGcs) -> Peer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/dimutex_peer.py");
        let mut child = Command::new(support::python::dimutex_python())
            .arg(script)
            .arg("--api-url")
            .arg(fake.endpoint())
            .arg("--bucket")
            .arg(FakeGcs::DEFAULT_BUCKET)
            // Python dimutex would force https onto it; we pass `api_url` instead.
            .env_remove("STORAGE_EMULATOR_HOST")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the Python dimutex peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut peer = Peer {
            _child: child,
            stdin,
            stdout,
            next_id: 0,
        };
        let ready = peer.read().await;
        assert_eq!(ready["ready"], true, "peer did not start: {ready}");
        assert_eq!(
            ready["dimutex"], "1.3.1",
            "unexpected dimutex version: {ready}"
        );
        peer
    }

    async fn read(&mut self) -> Value {
        let line = tokio::time::timeout(ANSWER_TIMEOUT, self.stdout.next_line())
            .await
            .expect("the Python peer did not answer in time")
            .expect("read from the Python peer")
            .expect("the Python peer exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
    }

    /// Sends one command and returns the answer. A `crash` answer fails the test.
    async fn call(&mut self, mut cmd: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = json!(id);
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        let answer = self.read().await;
        assert_eq!(answer["id"], id, "answer out of order: {answer}");
        assert_ne!(
            answer["error"],
            "crash",
            "Python dimutex crashed on {cmd}:\n{}",
            answer["detail"].as_str().unwrap_or_default()
        );
        answer
    }

    /// Python `acquire`: `Ok(())`, or `Err("AlreadyAcquiredError")`.
    async fn acquire(&mut self, name: &str, ttl_secs: f64) -> Result<(), String> {
        outcome(
            self.call(json!({"op": "acquire", "name": name, "ttl": ttl_secs}))
                .await,
        )
    }

    /// Python `acquire`, started at the wall time `at`.
    async fn acquire_at(
        &mut self,
        name: &str,
        ttl_secs: f64,
        at: SystemTime,
    ) -> Result<(), String> {
        let at = at.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        outcome(
            self.call(json!({"op": "acquire", "name": name, "ttl": ttl_secs, "at": at}))
                .await,
        )
    }

    async fn release(&mut self, name: &str) -> Result<(), String> {
        outcome(self.call(json!({"op": "release", "name": name})).await)
    }

    async fn acquired(&mut self, name: &str) -> bool {
        let a = self.call(json!({"op": "acquired", "name": name})).await;
        a["acquired"].as_bool().unwrap_or_else(|| panic!("{a}"))
    }

    async fn quit(mut self) {
        self.call(json!({"op": "quit"})).await;
    }
}

fn outcome(answer: Value) -> Result<(), String> {
    if answer["ok"] == true {
        Ok(())
    } else {
        Err(answer["error"].as_str().unwrap_or("?").to_owned())
    }
}

fn is_already_acquired(r: &Result<(), String>) -> bool {
    matches!(r, Err(e) if e == "AlreadyAcquiredError")
}

async fn setup(test: &str, ttl: Duration) -> (FakeGcs, Client, Peer, String) {
    let fake = FakeGcs::start().await.unwrap();
    let backend = GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap();
    let prefix = support::unique_prefix(test);
    let client = Client::builder(backend)
        .prefix(prefix.clone())
        .ttl(ttl)
        .build()
        .unwrap();
    let peer = Peer::start(&fake).await;
    (fake, client, peer, prefix)
}

#[tokio::test]
async fn python_sees_our_lock_as_held() {
    let (fake, client, mut py, prefix) = setup("interop-held", Duration::from_secs(30)).await;
    let key = "nightly-export";
    let name = format!("{prefix}{key}");

    let ours = client.try_acquire(key).await.expect("free lock");
    let r = py.acquire(&name, 30.0).await;
    assert!(
        is_already_acquired(&r),
        "python acquired our live lock: {r:?}"
    );
    assert!(py.acquired(&name).await, "python must see the object");
    assert!(
        ours.release().await.unwrap(),
        "our release deleted the lock"
    );

    py.acquire(&name, 30.0)
        .await
        .expect("python acquires the released lock");
    let md = fake
        .object_metadata(FakeGcs::DEFAULT_BUCKET, &name)
        .expect("python's lock object");
    eprintln!("python-written metadata: {md:?}");
    match client.try_acquire(key).await {
        Err(Error::Held { remaining }) => {
            eprintln!("we see python's lock as held, remaining {remaining:?}");
            let remaining = remaining.expect("a remaining time");
            assert!(
                remaining > Duration::from_secs(25) && remaining <= Duration::from_secs(33),
                "python's ttl 30 s + skew 2 s, got {remaining:?}"
            );
        }
        other => panic!("we must honour python's live lock, got {other:?}"),
    }
    py.release(&name).await.expect("python releases its lock");
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
    py.quit().await;
}

#[tokio::test]
async fn we_take_over_an_expired_python_lock() {
    let (fake, client, mut py, prefix) = setup("interop-takeover", Duration::from_secs(10)).await;
    let key = "expired-by-python";
    let name = format!("{prefix}{key}");

    // Python's expires = its clock + 1 s; it never releases (a crashed Python holder).
    let py_acquired_at = Instant::now();
    py.acquire(&name, 1.0).await.expect("python acquires");
    let expires = fake
        .object_metadata(FakeGcs::DEFAULT_BUCKET, &name)
        .unwrap()["expires"]
        .to_owned();

    let started = Instant::now();
    let ours = client
        .acquire(key, Instant::now() + Duration::from_secs(10))
        .await
        .expect("we take over the expired python lock");
    let waited = started.elapsed();
    let since_python = py_acquired_at.elapsed();
    eprintln!(
        "takeover of python lock (expires {expires}): waited {waited:.2?}, {since_python:.2?} after \
         python acquired (floor: 1 s ttl + 2 s skew, + up to 1 s Date resolution)"
    );
    assert!(
        since_python >= Duration::from_secs(2),
        "taken over before expires + skew: {since_python:?}"
    );
    assert!(
        since_python < Duration::from_secs(6),
        "takeover too slow: {since_python:?}"
    );
    let md = fake
        .object_metadata(FakeGcs::DEFAULT_BUCKET, &name)
        .unwrap();
    assert!(md.contains_key("owner"), "the object is ours now: {md:?}");

    let r = py.acquire(&name, 1.0).await;
    assert!(is_already_acquired(&r), "python took our fresh lock: {r:?}");
    assert!(ours.release().await.unwrap());
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
    py.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_rounds_exactly_one_holder() {
    const ROUNDS: usize = 30;
    let (fake, client, mut py, prefix) = setup("interop-contention", Duration::from_secs(30)).await;
    let (mut ours_won, mut python_won) = (0, 0);
    let started = Instant::now();
    for round in 0..ROUNDS {
        let key = format!("contended-{round}");
        let name = format!("{prefix}{key}");
        // Both sides start at the same wall time; ours is shifted by -3..=+3 ms across rounds
        // so that neither side always has the head start.
        let at = SystemTime::now() + Duration::from_millis(50);
        let shift = round as i64 % 7 - 3;
        let our_at = if shift >= 0 {
            at + Duration::from_millis(shift as u64)
        } else {
            at - Duration::from_millis(shift.unsigned_abs())
        };
        let ours = async {
            if let Ok(d) = our_at.duration_since(SystemTime::now()) {
                tokio::time::sleep(d).await;
            }
            client.try_acquire(key.as_str()).await
        };
        let (py_result, our_result) = tokio::join!(py.acquire_at(&name, 30.0, at), ours);
        match (py_result, our_result) {
            (Ok(()), Err(Error::Held { .. })) => {
                python_won += 1;
                py.release(&name).await.expect("python releases");
            }
            (r, Ok(guard)) if is_already_acquired(&r) => {
                ours_won += 1;
                assert!(guard.release().await.unwrap());
            }
            (p, o) => panic!("round {round}: not exactly one holder: python {p:?}, ours {o:?}"),
        }
        assert_eq!(
            fake.object_count(FakeGcs::DEFAULT_BUCKET),
            0,
            "round {round} left its lock behind"
        );
    }
    eprintln!(
        "contention: {ROUNDS} rounds in {:.2?}: ours won {ours_won}, python won {python_won}, \
         {} requests",
        started.elapsed(),
        fake.request_count()
    );
    assert_eq!(ours_won + python_won, ROUNDS);
    py.quit().await;
}

#[tokio::test]
async fn python_never_crashes_on_our_lock() {
    let fake = FakeGcs::start().await.unwrap();
    let backend = GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap();
    let prefix = support::unique_prefix("interop-refreshed");
    let client = Client::builder(backend)
        .prefix(prefix.clone())
        .ttl(Duration::from_secs(3))
        .refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut py = Peer::start(&fake).await;
    let key = "refreshed";
    let name = format!("{prefix}{key}");

    let guard = client.try_acquire(key).await.unwrap();
    let first = fake
        .object_metadata(FakeGcs::DEFAULT_BUCKET, &name)
        .unwrap()["expires"]
        .to_owned();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(guard.is_healthy(), "our lease must survive its refreshes");
    let md = fake
        .object_metadata(FakeGcs::DEFAULT_BUCKET, &name)
        .unwrap();
    eprintln!(
        "our refreshed metadata: {md:?} (expires at acquisition: {first}, after 2.5 s: {})",
        &md["expires"]
    );
    assert_ne!(md["expires"], first, "the refreshes rewrote expires");

    let r = py.acquire(&name, 3.0).await;
    assert!(
        is_already_acquired(&r),
        "python must parse our expires and see the lock held: {r:?}"
    );
    assert!(guard.release().await.unwrap());
    py.quit().await;
}

/// Python `dimutex` releases with an unconditional delete, so a Python holder that outlived its
/// `expires` (and was taken over) deletes our lock when it finally releases. We cannot prevent
/// that; our lease must notice it at its next refresh and report the lock lost.
#[tokio::test]
async fn a_stale_python_release_is_detected_as_lost() {
    let fake = FakeGcs::start().await.unwrap();
    let backend = GcsBackend::builder(FakeGcs::DEFAULT_BUCKET)
        .endpoint(fake.endpoint())
        .build()
        .await
        .unwrap();
    let prefix = support::unique_prefix("interop-stale-release");
    let client = Client::builder(backend)
        .prefix(prefix.clone())
        .ttl(Duration::from_secs(3))
        .refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut py = Peer::start(&fake).await;
    let key = "stale-python";
    let name = format!("{prefix}{key}");

    let guard = client.try_acquire(key).await.unwrap();
    // What a stale Python holder does in its `finally`: `release()`, no generation check.
    py.release(&name)
        .await
        .expect("python's unconditional delete removes our lock");
    let deleted = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("our lease notices the deletion within a refresh interval or two");
    eprintln!(
        "stale python release: our lease reported lost {:.2?} after the deletion",
        deleted.elapsed()
    );
    assert!(!guard.is_healthy());
    assert!(
        !guard.release().await.unwrap(),
        "the lock was no longer ours"
    );
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0);
    py.quit().await;
}

/// Issue 16, hole 7: a Python `dimutex` process refreshes (an unconditional PATCH) a lock it
/// does not own, ours. Its write keeps our generation and owner id, but its `expires` is not
/// one we sent: our next refresh meets a 412, reads the object, and must call the lease lost
/// instead of taking the foreign write for a landed refresh of ours (before the fix it
/// PATCHed again, and both believed they held the lock).
#[tokio::test]
async fn a_python_refresh_of_our_lock_makes_our_lease_lost() {
    let ttl = Duration::from_secs(6);
    let (_fake, client, mut py, prefix) = setup("interop-foreign-refresh", ttl).await;
    let name = format!("{prefix}k");
    let guard = client.try_acquire("k").await.expect("free lock");
    let r = py
        .call(json!({"op": "refresh", "name": name, "ttl": 6.0}))
        .await;
    assert_eq!(r["ok"], true, "python refreshed our lock: {r}");
    // Our next refresh comes within the refresh interval (ttl/3).
    tokio::time::timeout(ttl, guard.lost())
        .await
        .expect("our lease is lost at our next refresh");
    assert!(!guard.is_healthy());
    assert!(!guard.release().await.unwrap(), "not ours to delete");
    py.quit().await;
}
