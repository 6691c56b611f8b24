//! The HTTP examples, end to end: each is spawned as a real process (the binary that `cargo
//! test` builds next to this test, in `target/<profile>/examples/`), on a free port
//! (`ADDR=127.0.0.1:0`), and driven over HTTP. `jobs` runs on the in-memory backend and on
//! fake-gcs-server; `webhooks` and `tenants` on the in-memory backend.

#[path = "support/emulator.rs"]
mod emulator;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use emulator::FakeGcsServer;
use reqwest::{Response, StatusCode};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Every environment variable the examples read; cleared so the caller's settings don't leak in.
const EXAMPLE_ENV: [&str; 5] = [
    "ADDR",
    "DIMUTEX_BUCKET",
    "DIMUTEX_TTL",
    "STORAGE_EMULATOR_HOST",
    "RUST_LOG",
];

/// `target/<profile>/examples/<name>`: this test runs from `target/<profile>/deps/`.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    const HINT: &str = "build the examples first: `cargo build --all-features --examples` \
                        (plain `cargo test --all-features` builds them; `--test examples` alone does not)";
    let built = match std::fs::metadata(&path).and_then(|m| m.modified()) {
        Ok(built) => built,
        Err(_) => panic!("example binary {} not found; {HINT}", path.display()),
    };
    // `cargo test --test examples` does not rebuild the examples: refuse a stale binary.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        root.join("examples").join(format!("{name}.rs")),
        root.join("examples").join("support"),
        root.join("src"),
    ];
    if let Some(newer) = sources.iter().find_map(|p| newer_than(p, built)) {
        panic!(
            "example binary {} is older than {}; {HINT}",
            path.display(),
            newer.display()
        );
    }
    path
}

/// A file under `path` modified after `time`.
fn newer_than(path: &Path, time: SystemTime) -> Option<PathBuf> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        std::fs::read_dir(path)
            .ok()?
            .flatten()
            .find_map(|entry| newer_than(&entry.path(), time))
    } else {
        (meta.modified().ok()? > time).then(|| path.to_owned())
    }
}

/// A running example; killed when dropped.
struct Example {
    name: &'static str,
    child: Child,
    /// What the example printed up to and including its `listening on` line.
    banner: Vec<String>,
    base: String,
    http: reqwest::Client,
}

impl Example {
    async fn start(name: &'static str, env: &[(&str, &str)]) -> Example {
        let mut command = Command::new(example_binary(name));
        for var in EXAMPLE_ENV {
            command.env_remove(var);
        }
        command
            .env("ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start example `{name}`: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (banner, base, lines) = match tokio::time::timeout(STARTUP_TIMEOUT, read_banner(stdout))
            .await
        {
            Ok(Ok(found)) => found,
            Ok(Err(printed)) => panic!(
                "example `{name}` exited before printing `listening on` and a `curl` line (status {:?}); it printed:\n{}",
                child.try_wait().ok().flatten(),
                printed.join("\n")
            ),
            Err(_) => {
                panic!(
                    "example `{name}` printed no `listening on` and `curl` lines within {STARTUP_TIMEOUT:?}"
                )
            }
        };
        // Keep draining stdout so the example never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = lines;
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{name}] {line}");
            }
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client");
        Example {
            name,
            child,
            banner,
            base,
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn banner_mentions(&self, text: &str) -> bool {
        self.banner.iter().any(|line| line.contains(text))
    }

    async fn get(&self, path: &str) -> Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on `{}`: {e}", self.name))
    }

    async fn post(&self, path: &str) -> Response {
        self.http
            .post(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} on `{}`: {e}", self.name))
    }

    /// `POST path` as a future that does not borrow `self` (to run several at once).
    fn post_owned(&self, path: String) -> impl Future<Output = Response> + 'static {
        let request = self.http.post(self.url(&path));
        async move {
            request
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST {path}: {e}"))
        }
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit.
    #[cfg(unix)]
    async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = self.child.id().expect("the example is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run `kill`");
        assert!(status.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("`{}` did not exit within {timeout:?}", self.name))
            .expect("wait for the example")
    }
}

type Lines = tokio::io::Lines<BufReader<ChildStdout>>;

/// Reads stdout up to the `listening on http://...` line and the first `curl` line after it:
/// (lines so far, base URL, the rest). `Err(lines)` when stdout ends first.
async fn read_banner(stdout: ChildStdout) -> Result<(Vec<String>, String, Lines), Vec<String>> {
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Vec::new();
    let mut base = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if base.is_none() {
            base = line
                .split_once("listening on ")
                .map(|(_, url)| url.trim().trim_end_matches('/').to_owned());
        }
        let curl = base.is_some() && line.contains("curl ");
        banner.push(line);
        if curl {
            return Ok((banner, base.unwrap_or_default(), lines));
        }
    }
    Err(banner)
}

async fn json(response: Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("a response body");
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {response:?}"))
        .to_str()
        .expect("an ASCII header")
}

/// Checks the layer's 409: problem+json, `Retry-After` ≥ 1, and a body that names neither
/// the lock object (nor even the key) nor its owner.
async fn assert_conflict(response: Response, key: &str, owner_hints: &[String]) {
    assert_eq!(response.status(), StatusCode::CONFLICT, "{response:?}");
    assert_eq!(
        header(&response, "content-type"),
        "application/problem+json"
    );
    let retry_after: u64 = header(&response, "retry-after")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    let body = response.text().await.expect("a body");
    assert!(!body.contains(key), "the 409 names the key: {body}");
    assert!(
        !body.contains("dimutex/"),
        "the 409 names the object: {body}"
    );
    for hint in owner_hints {
        assert!(
            !body.contains(hint.as_str()),
            "the 409 names the owner: {body}"
        );
    }
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem+json");
    assert_eq!(problem["status"], 409);
}

/// Things the default owner id (`hostname:pid#nonce`) of `example` contains.
fn owner_hints(example: &Example) -> Vec<String> {
    let mut hints = vec![format!(":{}", example.child.id().unwrap_or(0))];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if host.len() >= 4 {
            hints.push(host.to_owned());
        }
    }
    hints
}

/// Repeats `POST path` while it answers 409 (the release of the previous holder is handed to a
/// background task once the response has been sent, so it may land a moment after the
/// client has its answer). Returns the final response and how many 409s came first.
async fn post_until_free(example: &Example, path: &str, within: Duration) -> (Response, usize) {
    let deadline = Instant::now() + within;
    let mut conflicts = 0;
    loop {
        let response = example.post(path).await;
        if response.status() != StatusCode::CONFLICT || Instant::now() >= deadline {
            return (response, conflicts);
        }
        conflicts += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `jobs` checks, on whatever backend `example` uses. `objects` lists the bucket's objects
/// (for the emulator run) to show that the lock really is an object there.
async fn check_jobs(example: &Example, objects: Option<&(dyn Fn() -> ListObjects + Sync)>) {
    let started = Instant::now();
    let health = example.get("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);

    let job = format!("report-{}", std::process::id());
    let first = {
        let http = example.http.clone();
        let url = example.url(&format!("/jobs/{job}/run?hold_ms=1500"));
        tokio::spawn(async move { http.post(url).send().await })
    };
    // Give the first request time to take the lock (it holds it for 1.5 s).
    tokio::time::sleep(Duration::from_millis(400)).await;

    if let Some(objects) = objects {
        let names = objects().await;
        assert!(
            names.iter().any(|n| n == &format!("dimutex/{job}")),
            "no lock object for the running job in the bucket: {names:?}"
        );
    }

    let second = example.post(&format!("/jobs/{job}/run")).await;
    assert_conflict(second, &job, &owner_hints(example)).await;

    let other = example.post("/jobs/other-job/run").await;
    assert_eq!(other.status(), StatusCode::OK);
    let other = json(other).await;
    assert_eq!(other["job_id"], "other-job");

    let first = first.await.unwrap().expect("the first request");
    assert_eq!(first.status(), StatusCode::OK);
    let first = json(first).await;
    assert_eq!(first["job_id"], job.as_str());
    assert_eq!(first["held_ms"], 1500);
    let first_token = first["token"].as_i64().expect("an integer token");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the job did not hold for 1.5 s"
    );

    let (again, conflicts) =
        post_until_free(example, &format!("/jobs/{job}/run"), Duration::from_secs(3)).await;
    assert_eq!(again.status(), StatusCode::OK, "the lock was not released");
    let again = json(again).await;
    assert_ne!(
        again["token"].as_i64(),
        Some(first_token),
        "a new acquisition has a new fencing token"
    );
    eprintln!(
        "[{}] lock free again after {conflicts} early 409(s)",
        example.name
    );

    let bad_hold = example.post("/jobs/bad-hold/run?hold_ms=abc").await;
    assert_eq!(bad_hold.status(), StatusCode::BAD_REQUEST);

    let bad_key = example.post("/jobs/bad%0Aid/run").await;
    assert_eq!(bad_key.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&bad_key, "content-type"), "application/problem+json");

    // Routes the layer is not on take no lock: an unknown path is a plain 404.
    let unknown = example.post(&format!("/jobs/{job}/unknown")).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    if let Some(objects) = objects {
        // Every release is done within a moment of the last response.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let names = objects().await;
            if names.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "objects left: {names:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "[{}] jobs checks took {:?}",
        example.name,
        started.elapsed()
    );
}

/// The `jobs` demo with `Idempotency-Key` (the README's curl lines): run, run again (the
/// stored response, the job not run again), the key with another body (422), and a request
/// without the key runs every time.
async fn check_jobs_idempotency(example: &Example) {
    let job = format!("idem-{}", std::process::id());
    let run = |key: &str, body: &'static str| {
        example
            .http
            .post(example.url(&format!("/jobs/{job}/run?hold_ms=50")))
            .header("idempotency-key", key.to_owned())
            .body(body)
            .send()
    };
    let first = run("k-1", "").await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = json(first).await;
    let again = run("k-1", "").await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(header(&again, "idempotent-replayed"), "true");
    assert_eq!(
        json(again).await,
        first,
        "the same token: the job did not run again"
    );
    let other = run("k-1", r#"{"other":1}"#).await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(header(&other, "content-type"), "application/problem+json");
    let plain = json(example.post(&format!("/jobs/{job}/run")).await).await;
    assert_ne!(
        plain["token"], first["token"],
        "without a key, the job runs"
    );
}

type ListObjects = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send>>;

/// The object names in the emulator's bucket.
fn lister(server: &FakeGcsServer) -> impl Fn() -> ListObjects + Sync + use<> {
    let url = format!("{}/storage/v1/b/{}/o", server.endpoint(), server.bucket());
    move || {
        let url = url.clone();
        Box::pin(async move {
            let body = reqwest::get(url)
                .await
                .and_then(Response::error_for_status)
                .expect("list the bucket")
                .bytes()
                .await
                .expect("the listing");
            let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            body["items"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
    }
}

#[tokio::test]
async fn jobs_on_the_memory_backend() {
    let example = Example::start("jobs", &[]).await;
    assert!(example.banner_mentions("in-memory"), "{:?}", example.banner);
    assert!(example.banner_mentions("curl "), "{:?}", example.banner);
    check_jobs(&example, None).await;
    check_jobs_idempotency(&example).await;
}

#[tokio::test]
async fn jobs_on_fake_gcs_server() {
    let server = FakeGcsServer::start().await;
    let host = server
        .endpoint()
        .strip_prefix("http://")
        .expect("an http endpoint")
        .to_owned();
    let example = Example::start(
        "jobs",
        &[
            ("DIMUTEX_BUCKET", server.bucket()),
            ("STORAGE_EMULATOR_HOST", &host),
        ],
    )
    .await;
    assert!(
        example.banner_mentions("emulator") && example.banner_mentions(server.bucket()),
        "{:?}",
        example.banner
    );
    let list = lister(&server);
    check_jobs(&example, Some(&list)).await;
    check_jobs_idempotency(&example).await;
}

#[tokio::test]
async fn jobs_rejects_a_bad_ttl() {
    for ttl in ["abc", "1"] {
        let output = Command::new(example_binary("jobs"))
            .env_clear()
            .env("DIMUTEX_TTL", ttl)
            .env("ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .output();
        let output = tokio::time::timeout(STARTUP_TIMEOUT, output)
            .await
            .expect("the example exits at once")
            .expect("run the example");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "DIMUTEX_TTL={ttl} was accepted");
        assert!(stderr.contains("DIMUTEX_TTL"), "{stderr}");
        assert!(
            !String::from_utf8_lossy(&output.stdout).contains("listening on"),
            "DIMUTEX_TTL={ttl}: it listened anyway"
        );
    }
    let ok = Example::start("jobs", &[("DIMUTEX_TTL", "5")]).await;
    assert!(ok.banner_mentions("lease ttl: 5s"), "{:?}", ok.banner);
}

#[cfg(unix)]
#[tokio::test]
async fn jobs_shuts_down_gracefully_on_sigterm() {
    let mut example = Example::start("jobs", &[]).await;
    let running = {
        let http = example.http.clone();
        let url = example.url("/jobs/long/run?hold_ms=800");
        tokio::spawn(async move { http.post(url).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = example.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
    let running = running.await.unwrap().expect("the in-flight request");
    assert_eq!(
        running.status(),
        StatusCode::OK,
        "the in-flight job was cut off"
    );
}

#[tokio::test]
async fn webhooks_one_delivery_at_a_time() {
    let example = Example::start("webhooks", &[]).await;
    assert!(example.banner_mentions("curl "), "{:?}", example.banner);
    assert_eq!(example.get("/healthz").await.status(), StatusCode::OK);

    let deliver = |id: Option<&str>, hold_ms: u64| {
        let mut request = example
            .http
            .post(example.url(&format!("/webhooks?hold_ms={hold_ms}")))
            .body(r#"{"event":"push"}"#);
        if let Some(id) = id {
            request = request.header("x-delivery-id", id);
        }
        async move { request.send().await.expect("a delivery") }
    };

    // The same delivery twice at once: one runs, the other is told to come back.
    let (a, b) = tokio::join!(deliver(Some("d-1"), 1000), deliver(Some("d-1"), 1000));
    let mut statuses = [a.status(), b.status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
    let (ok, conflict) = if a.status() == StatusCode::OK {
        (a, b)
    } else {
        (b, a)
    };
    assert_conflict(conflict, "d-1", &owner_hints(&example)).await;
    let ok = json(ok).await;
    assert_eq!(ok["delivery_id"], "d-1");
    assert_eq!(ok["bytes"], 16);
    assert!(ok["token"].is_i64(), "{ok}");

    // A redelivery after the first attempt answered: its stored response, not run again.
    let replay = deliver(Some("d-1"), 1000).await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(header(&replay, "idempotent-replayed"), "true");
    assert_eq!(json(replay).await, ok, "the first attempt's response");

    // Different deliveries run side by side.
    let started = Instant::now();
    let (a, b) = tokio::join!(deliver(Some("d-2"), 600), deliver(Some("d-3"), 600));
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    assert!(
        started.elapsed() < Duration::from_millis(1150),
        "deliveries with different ids ran one after the other ({:?})",
        started.elapsed()
    );

    // Two deliveries for one customer at once are serialized; two customers run side by side.
    let for_customer = |id: &'static str, customer: &str| {
        let body = format!(r#"{{"data":{{"object":{{"customer":"{customer}"}}}}}}"#);
        let request = example
            .http
            .post(example.url("/webhooks?hold_ms=600"))
            .header("x-delivery-id", id)
            .body(body);
        async move { request.send().await.expect("a delivery") }
    };
    let (a, b) = tokio::join!(for_customer("c-1", "cus_1"), for_customer("c-2", "cus_1"));
    let mut statuses = [a.status(), b.status()];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::CONFLICT],
        "one customer"
    );
    let started = Instant::now();
    let (a, b) = tokio::join!(for_customer("c-3", "cus_2"), for_customer("c-4", "cus_3"));
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    assert!(
        started.elapsed() < Duration::from_millis(1150),
        "two customers"
    );

    // No delivery id, no lock: 400.
    let missing = deliver(None, 0).await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&missing, "content-type"), "application/problem+json");
}

#[tokio::test]
async fn tenants_one_export_per_tenant() {
    let example = Example::start("tenants", &[]).await;
    assert!(example.banner_mentions("curl "), "{:?}", example.banner);
    assert_eq!(example.get("/healthz").await.status(), StatusCode::OK);

    let export = |tenant: &str, hold_ms: u64| {
        example.post_owned(format!("/tenants/{tenant}/export?hold_ms={hold_ms}"))
    };

    // The same tenant twice at once: one export runs, the other gets 409.
    let (a, b) = tokio::join!(export("acme", 1000), export("acme", 1000));
    let mut statuses = [a.status(), b.status()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
    let (ok, conflict) = if a.status() == StatusCode::OK {
        (a, b)
    } else {
        (b, a)
    };
    assert_conflict(conflict, "acme", &owner_hints(&example)).await;
    let ok = json(ok).await;
    assert_eq!(ok["tenant"], "acme");
    assert_eq!(ok["held_ms"], 1000);

    // The handler released before answering: the tenant is free at once.
    let again = export("acme", 0).await;
    assert_eq!(again.status(), StatusCode::OK);

    // Different tenants export side by side.
    let started = Instant::now();
    let (a, b) = tokio::join!(export("globex", 600), export("initech", 600));
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    assert!(
        started.elapsed() < Duration::from_millis(1150),
        "exports of different tenants ran one after the other ({:?})",
        started.elapsed()
    );

    // A bad hold_ms is refused before any lock is taken.
    let bad = example.post("/tenants/acme/export?hold_ms=abc").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}
