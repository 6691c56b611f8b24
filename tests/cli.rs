//! The `dimutex` command, spawned as a real process against the in-repo fake GCS server (and
//! fake-gcs-server for mutual exclusion): exit codes, mutual exclusion across processes,
//! takeover of a killed (T4) or stopped (T5) holder, a lost lease's command killed before
//! anyone may take over (hole 5), signal forwarding, an interrupted or slow acquisition that
//! leaves no lock behind, `status` and `release --force`, and `run --once-per` (the command
//! once per period across processes; a failure records nothing).

#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use dimutex::Client;
use dimutex::backend::GcsBackend;
use dimutex::testing::{FakeGcs, Fault, FaultRule};
use proxy::Proxy;
use support::emulator::FakeGcsServer;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_dimutex");
const COUNTER_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/counter.sh");
/// The bound on any one `dimutex` process in these tests.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(90);
const TTL: Duration = Duration::from_secs(3);

/// Serializes the tests that load the machine (8 processes at a time) and those that measure
/// take-over times, so the measurements are not disturbed.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A server the binary is pointed at, and a scratch directory.
struct Env {
    /// `host:port`, for `STORAGE_EMULATOR_HOST`.
    host: String,
    bucket: String,
    dir: PathBuf,
}

impl Env {
    fn new(endpoint: &str, bucket: &str, test: &str) -> Env {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "dimutex-cli-{test}-{}-{nanos:x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Env {
            host: endpoint
                .strip_prefix("http://")
                .expect("an http:// endpoint")
                .to_owned(),
            bucket: bucket.to_owned(),
            dir,
        }
    }

    fn fake(fake: &FakeGcs, test: &str) -> Env {
        Env::new(&fake.endpoint(), FakeGcs::DEFAULT_BUCKET, test)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `dimutex SUB --bucket B ARGS...`, with `STORAGE_EMULATOR_HOST` set.
    fn cmd(&self, sub: &str, args: &[&str]) -> Command {
        self.cmd_in(&self.bucket, sub, args)
    }

    /// `dimutex SUB --bucket BUCKET ARGS...`.
    fn cmd_in(&self, bucket: &str, sub: &str, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg(sub).arg("--bucket").arg(bucket).args(args);
        self.prepare(&mut c);
        c
    }

    /// `dimutex ARGS...` with no bucket argument.
    fn raw(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args);
        self.prepare(&mut c);
        c
    }

    fn prepare(&self, c: &mut Command) {
        c.env("STORAGE_EMULATOR_HOST", &self.host)
            .env_remove("DIMUTEX_BUCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
    }

    /// A library client on the same server, to look at lock objects from the test.
    async fn client(&self) -> Client {
        let backend = GcsBackend::builder(self.bucket.as_str())
            .endpoint(format!("http://{}", self.host))
            .build()
            .await
            .unwrap();
        Client::new(backend)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command to completion within [`PROCESS_TIMEOUT`].
async fn output(mut c: Command) -> Output {
    let child = c.spawn().expect("spawn dimutex");
    finish(child).await
}

async fn finish(child: Child) -> Output {
    tokio::time::timeout(PROCESS_TIMEOUT, child.wait_with_output())
        .await
        .expect("the process finished in time")
        .expect("wait for the process")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit code, showing the output otherwise.
#[track_caller]
fn assert_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

async fn wait_for_file(path: &Path, within: Duration) -> SystemTime {
    let deadline = Instant::now() + within;
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return SystemTime::now();
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {within:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) touches no memory; the pid is a process this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

fn is_alive(pid: u32) -> bool {
    // SAFETY: as above; signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Kills leftover grandchildren (the commands of killed holders) when a test ends.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if is_alive(pid) {
                // SAFETY: as above.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mutual exclusion across processes.

/// 8 workers × 10 rounds of the non-atomic counter script, each round under `dimutex run
/// --wait 60` (or bare, for the negative control). Returns the final count, the log lines
/// (key and token per locked run) and the elapsed time.
async fn counter_run(env: &Env, locked: bool) -> (u64, Vec<String>, Duration) {
    const WORKERS: usize = 8;
    const ROUNDS: usize = 10;
    let counter = env.path("counter");
    let log = env.path("log");
    std::fs::write(&counter, "0\n").unwrap();
    let _ = std::fs::remove_file(&log);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let counter = counter.to_str().unwrap().to_owned();
        let log = log.to_str().unwrap().to_owned();
        let mut commands = Vec::new();
        for _ in 0..ROUNDS {
            let c = if locked {
                env.cmd(
                    "run",
                    &[
                        "--wait", "60", "counter", "--", "sh", COUNTER_SH, &counter, &log,
                    ],
                )
            } else {
                let mut c = Command::new("sh");
                c.args([COUNTER_SH, &counter])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                c
            };
            commands.push(c);
        }
        workers.spawn(async move {
            for c in commands {
                let out = output(c).await;
                assert_code(&out, 0, "a counter round");
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.expect("a worker");
    }
    let elapsed = started.elapsed();
    let count = read_trimmed(&counter).parse().unwrap_or(0);
    let lines = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    (count, lines, elapsed)
}

fn check_log(lines: &[String]) {
    assert_eq!(lines.len(), 80, "one log line per locked run");
    let mut tokens = std::collections::HashSet::new();
    for line in lines {
        let (key, token) = line.split_once(' ').expect("KEY TOKEN");
        assert_eq!(key, "counter", "DIMUTEX_KEY");
        let token: i64 = token.parse().expect("DIMUTEX_TOKEN is a number");
        assert!(tokens.insert(token), "token {token} handed out twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_across_processes_fake_gcs() {
    let _heavy = HEAVY.lock().await;
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "mutex-fake");
    let (count, lines, elapsed) = counter_run(&env, true).await;
    eprintln!(
        "CLI mutual exclusion (in-repo fake): 8 processes x 10 rounds -> count {count} in {elapsed:.1?}"
    );
    assert_eq!(count, 80, "no update may be lost under the lock");
    check_log(&lines);
    assert_eq!(
        fake.object_count(FakeGcs::DEFAULT_BUCKET),
        0,
        "all released"
    );
}

/// fake-gcs-server honours `ifGenerationMatch` on uploads, which is all mutual exclusion
/// needs here (its PATCH does not move `updated`, so a refresh does not extend a lease there,
/// but each critical section lasts ~20 ms against a 30 s ttl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_across_processes_fake_gcs_server() {
    let _heavy = HEAVY.lock().await;
    let server = FakeGcsServer::start().await;
    let env = Env::new(server.endpoint(), server.bucket(), "mutex-fgcs");
    let (count, lines, elapsed) = counter_run(&env, true).await;
    eprintln!(
        "CLI mutual exclusion (fake-gcs-server): 8 processes x 10 rounds -> count {count} in {elapsed:.1?}"
    );
    assert_eq!(count, 80, "no update may be lost under the lock");
    check_log(&lines);
}

/// The negative control: the same workload without the lock loses updates, so the check
/// above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lock_updates_are_lost() {
    let _heavy = HEAVY.lock().await;
    let env = Env::new("http://127.0.0.1:9", "unused", "nolock");
    let (count, _, elapsed) = counter_run(&env, false).await;
    eprintln!(
        "CLI negative control (no lock): 8 processes x 10 rounds -> count {count} in {elapsed:.1?}"
    );
    assert!(
        count < 80,
        "without the lock, updates must get lost (count {count})"
    );
}

// ---------------------------------------------------------------------------------------------
// Take-over: T4 (SIGKILL) and T5 (SIGSTOP).

/// T4: a holder killed with SIGKILL is taken over no earlier than the ttl after its last
/// refresh, and no later than ttl + 2 s (our expiry rule `updated + ttl + 1 s < Date`, with
/// `Date` in whole seconds) + the 1 s poll cap + 1 s slack for process start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_killed_holder_is_taken_over_after_the_ttl() {
    let _heavy = HEAVY.lock().await;
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "t4");
    let ttl = TTL.as_secs().to_string();
    let pid_file = env.path("holder-child");
    let script = format!("echo $$ > '{}'; exec sleep 60", pid_file.display());
    let mut holder = env
        .cmd("run", &["--ttl", &ttl, "t4", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&pid_file, Duration::from_secs(10)).await;
    let _reap = Reap(vec![read_trimmed(&pid_file).parse().unwrap()]);

    let taken = env.path("taken");
    let contender = env
        .cmd(
            "run",
            &[
                "--ttl",
                &ttl,
                "--wait",
                "30",
                "t4",
                "--",
                "touch",
                taken.to_str().unwrap(),
            ],
        )
        .spawn()
        .unwrap();
    // Let the holder refresh a few times (every ttl/3 = 1 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    signal(holder.id().unwrap(), libc::SIGKILL);
    let killed_at = SystemTime::now();
    let _ = holder.wait().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = env.client().await;
    let status = client
        .status("t4")
        .await
        .unwrap()
        .expect("the dead holder's lock is still there");
    // Our own locks expire at `updated + ttl + 1 s`: recover the last write.
    let last_write = status.expires() - TTL - Duration::from_secs(1);

    let taken_at = wait_for_file_or_empty(&taken, Duration::from_secs(30)).await;
    let out = finish(contender).await;
    assert_code(&out, 0, "the contender");
    let after_write = taken_at.duration_since(last_write).unwrap_or_default();
    let after_kill = taken_at.duration_since(killed_at).unwrap_or_default();
    eprintln!(
        "T4 (SIGKILL, ttl {TTL:?}): taken over {after_write:.2?} after the holder's last refresh, \
         {after_kill:.2?} after the kill"
    );
    assert!(
        after_write >= TTL,
        "taken over {after_write:?} after the last refresh: before the ttl"
    );
    let bound = TTL + Duration::from_secs(2) + Duration::from_secs(1) + Duration::from_secs(1);
    assert!(
        after_write <= bound,
        "taken over {after_write:?} after the last refresh; at most {bound:?} allowed"
    );
}

/// Like [`wait_for_file`], for files that may stay empty (`touch`).
async fn wait_for_file_or_empty(path: &Path, within: Duration) -> SystemTime {
    let deadline = Instant::now() + within;
    loop {
        if path.exists() {
            return SystemTime::now();
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {within:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// T5: a holder stopped (SIGSTOP, the dimutex process only) for at least 2×ttl is taken over;
/// after SIGCONT it notices the lost lease, terminates its command and exits 74.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_stopped_holder_loses_the_lock_and_stops_its_command() {
    let _heavy = HEAVY.lock().await;
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "t5");
    let ttl = TTL.as_secs().to_string();
    let pid_file = env.path("holder-child");
    let script = format!("echo $$ > '{}'; exec sleep 60", pid_file.display());
    let holder = env
        .cmd("run", &["--ttl", &ttl, "t5", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&pid_file, Duration::from_secs(10)).await;
    let child_pid: u32 = read_trimmed(&pid_file).parse().unwrap();
    let _reap = Reap(vec![child_pid]);
    let holder_pid = holder.id().unwrap();

    let taken = env.path("taken");
    let script = format!("touch '{}'; sleep 4", taken.display());
    let contender = env
        .cmd(
            "run",
            &[
                "--ttl", &ttl, "--wait", "30", "t5", "--", "sh", "-c", &script,
            ],
        )
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(holder_pid, libc::SIGSTOP);
    let stopped_at = Instant::now();
    let stopped_wall = SystemTime::now();
    let taken_at = wait_for_file_or_empty(&taken, Duration::from_secs(15)).await;
    let takeover = taken_at.duration_since(stopped_wall).unwrap_or_default();
    // Stay stopped for 2×ttl (at least until the takeover).
    tokio::time::sleep_until((stopped_at + 2 * TTL).into()).await;
    assert!(
        is_alive(child_pid),
        "the command runs on while dimutex is stopped"
    );
    signal(holder_pid, libc::SIGCONT);
    let continued_at = Instant::now();
    let out = finish(holder).await;
    let exit_after = continued_at.elapsed();
    eprintln!(
        "T5 (SIGSTOP for {:.1?}, ttl {TTL:?}): taken over {takeover:.2?} after the stop; the \
         stopped dimutex exited {:?} {exit_after:.2?} after SIGCONT",
        stopped_at.elapsed() - exit_after,
        out.status.code()
    );
    assert_code(&out, 74, "the stopped holder");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("lost the lease on lock \"t5\""), "{stderr}");
    assert!(stderr.contains("taken over by another owner"), "{stderr}");
    assert!(!is_alive(child_pid), "the holder's command was terminated");
    assert!(
        exit_after < Duration::from_secs(5),
        "noticed the lost lease {exit_after:?} after SIGCONT"
    );
    let out = finish(contender).await;
    assert_code(&out, 0, "the contender");
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0, "released");
}

// ---------------------------------------------------------------------------------------------
// Exit codes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_lock_exits_75_and_signals_reach_the_command() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "held");
    let ready = env.path("ready");
    let script = format!("echo up > '{}'; exec sleep 60", ready.display());
    let holder = env
        .cmd("run", &["--ttl", "3", "busy", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&ready, Duration::from_secs(10)).await;

    // Fail fast.
    let marker = env.path("ran");
    let marker = marker.to_str().unwrap();
    let started = Instant::now();
    let out = output(env.cmd("run", &["busy", "--", "touch", marker])).await;
    assert_code(&out, 75, "run on a held lock");
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .starts_with("dimutex: lock \"busy\" is held by another owner (lease ends in at most "),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // With --wait, after the wait.
    let started = Instant::now();
    let out = output(env.cmd("run", &["--wait", "1.5", "busy", "--", "touch", marker])).await;
    assert_code(&out, 75, "run --wait 1.5 on a held lock");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(text(&out.stderr).contains("is held by another owner"));

    // Interrupted while waiting: 128 + SIGINT, and the command never runs.
    let seen = fake.requests().len();
    let waiter = env
        .cmd("run", &["--wait", "30", "busy", "--", "touch", marker])
        .spawn()
        .unwrap();
    // Its signal handlers are in place once it sends its create (the holder only PATCHes).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake.requests()[seen..]
        .iter()
        .any(|r| r.method() == http::Method::POST)
    {
        assert!(
            Instant::now() < deadline,
            "the waiter never tried to acquire"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(waiter.id().unwrap(), libc::SIGINT);
    let out = finish(waiter).await;
    assert_code(&out, 130, "a waiter interrupted");
    assert!(!Path::new(marker).exists(), "the command never ran");

    // SIGTERM to the holder reaches `sleep`, which dies of it: 128 + 15.
    signal(holder.id().unwrap(), libc::SIGTERM);
    let out = finish(holder).await;
    assert_code(&out, 143, "the holder after SIGTERM");
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_exit_64() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "usage");
    let long_key = "k".repeat(1020); // + "dimutex/" > 1024 bytes
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "empty key",
            vec!["run", "--bucket", "test-bucket", "", "--", "true"],
        ),
        (
            "key with a newline",
            vec!["run", "--bucket", "test-bucket", "a\nb", "--", "true"],
        ),
        (
            "prefix + key too long",
            vec!["run", "--bucket", "test-bucket", &long_key, "--", "true"],
        ),
        (
            "ttl 1",
            vec![
                "run",
                "--bucket",
                "test-bucket",
                "--ttl",
                "1",
                "k",
                "--",
                "true",
            ],
        ),
        (
            "ttl not a number",
            vec![
                "run",
                "--bucket",
                "test-bucket",
                "--ttl",
                "x",
                "k",
                "--",
                "true",
            ],
        ),
        (
            "negative wait",
            vec![
                "run",
                "--bucket",
                "test-bucket",
                "--wait",
                "-1",
                "k",
                "--",
                "true",
            ],
        ),
        (
            "prefix with a newline",
            vec![
                "run",
                "--bucket",
                "test-bucket",
                "--prefix",
                "a\nb/",
                "k",
                "--",
                "true",
            ],
        ),
        ("no bucket", vec!["run", "k", "--", "true"]),
        (
            "invalid bucket name",
            vec!["run", "--bucket", "Not A Bucket", "k", "--", "true"],
        ),
        ("no command", vec!["run", "--bucket", "test-bucket", "k"]),
        (
            "unknown option",
            vec![
                "run",
                "--bucket",
                "test-bucket",
                "--frobnicate",
                "k",
                "--",
                "true",
            ],
        ),
        ("no subcommand", vec![]),
        (
            "status: empty key",
            vec!["status", "--bucket", "test-bucket", ""],
        ),
        (
            "release without --force",
            vec!["release", "--bucket", "test-bucket", "k"],
        ),
        (
            "release: token not a number",
            vec![
                "release",
                "--force",
                "--bucket",
                "test-bucket",
                "k",
                "--token",
                "x",
            ],
        ),
    ];
    for (what, args) in cases {
        let out = output(env.raw(&args)).await;
        assert_code(&out, 64, what);
        assert!(!out.stderr.is_empty(), "{what}: a message on stderr");
    }
    assert_eq!(fake.request_count(), 0, "bad arguments send no request");

    let out = output(env.raw(&["--help"])).await;
    assert_code(&out, 0, "--help");
    let help = text(&out.stdout);
    for needle in [
        "75",
        "74",
        "69",
        "64",
        "128+N",
        "DIMUTEX_BUCKET",
        "STORAGE_EMULATOR_HOST",
        "DIMUTEX_TOKEN",
        "DIMUTEX_KEY",
        "RUST_LOG",
    ] {
        assert!(help.contains(needle), "--help mentions {needle}:\n{help}");
    }
    let out = output(env.raw(&["run", "--help"])).await;
    assert_code(&out, 0, "run --help");
    let help = text(&out.stdout);
    for needle in [
        "--wait",
        "--ttl",
        "--grace",
        "[default: 10]",
        "SIGTERM",
        "forwarded",
    ] {
        assert!(
            help.contains(needle),
            "run --help mentions {needle}:\n{help}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_backend_exits_69() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "unavailable");
    let marker = env.path("ran");
    let marker = marker.to_str().unwrap();

    // A bucket that does not exist: refused at once.
    let out = output(env.cmd_in("no-such-bucket", "run", &["k", "--", "touch", marker])).await;
    assert_code(&out, 69, "missing bucket");
    assert!(
        text(&out.stderr).contains("bucket not found"),
        "{}",
        text(&out.stderr)
    );
    assert!(!Path::new(marker).exists(), "the command never ran");
    // status and release read first: a missing bucket is 69 there too, never "free".
    let out = output(env.cmd_in("no-such-bucket", "status", &["k"])).await;
    assert_code(&out, 69, "status on a missing bucket");
    let out = output(env.cmd_in("no-such-bucket", "release", &["--force", "k"])).await;
    assert_code(&out, 69, "release on a missing bucket");

    // Nothing listening: retried until the retry policy (5 s) gives up.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = Env::new(
        &format!("http://127.0.0.1:{closed}"),
        "test-bucket",
        "closed",
    );
    let started = Instant::now();
    let (run, status, release) = tokio::join!(
        output(dead.cmd("run", &["k", "--", "touch", marker])),
        output(dead.cmd("status", &["k"])),
        output(dead.cmd("release", &["--force", "k"])),
    );
    eprintln!(
        "CLI: unreachable backend reported after {:.1?}",
        started.elapsed()
    );
    assert_code(&run, 69, "run, backend unreachable");
    assert_code(&status, 69, "status, backend unreachable");
    assert_code(&release, 69, "release, backend unreachable");
    assert!(
        text(&run.stderr).contains("unavailable"),
        "{}",
        text(&run.stderr)
    );
    assert!(!Path::new(marker).exists(), "the command never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_own_status_is_the_exit_status() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "status-code");
    let out = output(env.cmd(
        "run",
        &[
            "job/1",
            "--",
            "sh",
            "-c",
            r#"test "$DIMUTEX_KEY" = job/1 && test "$DIMUTEX_TOKEN" -gt 0 && echo out && exit 3"#,
        ],
    ))
    .await;
    assert_code(&out, 3, "sh -c 'exit 3'");
    assert_eq!(text(&out.stdout), "out\n", "stdout is inherited");
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0, "released");

    let out = output(env.cmd("run", &["job/1", "--", "true"])).await;
    assert_code(&out, 0, "true");

    let out = output(env.cmd("run", &["job/1", "--", "sh", "-c", "kill -KILL $$"])).await;
    assert_code(&out, 128 + libc::SIGKILL, "a command killed by SIGKILL");

    let out = output(env.cmd("run", &["job/1", "--", "/nonexistent/command"])).await;
    assert_code(&out, 127, "a command that does not exist");
    assert!(text(&out.stderr).contains("cannot run"));
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_are_forwarded_then_the_lock_is_released() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "forward");
    for (sig, name) in [(libc::SIGTERM, "TERM"), (libc::SIGINT, "INT")] {
        let ready = env.path(&format!("ready-{name}"));
        let marker = env.path(&format!("trapped-{name}"));
        let script = format!(
            "trap 'echo {name} > \"{}\"; exit 7' {name}; echo up > '{}'; \
             while :; do sleep 0.05; done",
            marker.display(),
            ready.display()
        );
        let holder = env
            .cmd("run", &["--ttl", "3", "fwd", "--", "sh", "-c", &script])
            .spawn()
            .unwrap();
        wait_for_file(&ready, Duration::from_secs(10)).await;
        signal(holder.id().unwrap(), sig);
        let out = finish(holder).await;
        assert_code(&out, 7, &format!("the holder after SIG{name}"));
        assert_eq!(read_trimmed(&marker), name, "the command trapped SIG{name}");
        let out = output(env.cmd("status", &["fwd"])).await;
        assert_code(&out, 1, "status after the command exited");
        assert!(text(&out.stdout).contains("is free"));
    }
}

// ---------------------------------------------------------------------------------------------
// status and release --force.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_forced_release() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "status");

    let out = output(env.cmd("status", &["ops"])).await;
    assert_code(&out, 1, "status of a free lock");
    assert!(text(&out.stdout).starts_with("lock \"ops\" is free"));
    let out = output(env.cmd("status", &["--json", "ops"])).await;
    assert_code(&out, 1, "status --json of a free lock");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["held"], false);
    assert_eq!(v["state"], "free");
    assert!(v["token"].is_null());

    let out = output(env.cmd("release", &["--force", "ops"])).await;
    assert_code(&out, 1, "release --force with no lock");

    // A holder whose command records its token.
    let token_file = env.path("token");
    let script = format!(
        "echo \"$DIMUTEX_TOKEN\" > '{}'; exec sleep 60",
        token_file.display()
    );
    let holder = env
        .cmd("run", &["--ttl", "3", "ops", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let holder_pid = holder.id().unwrap();
    wait_for_file(&token_file, Duration::from_secs(10)).await;
    let token: i64 = read_trimmed(&token_file).parse().unwrap();

    let out = output(env.cmd("status", &["ops"])).await;
    assert_code(&out, 0, "status of a held lock");
    let human = text(&out.stdout);
    assert!(human.starts_with("lock \"ops\" is held\n"), "{human}");
    assert!(human.contains(&format!("token:   {token}\n")), "{human}");
    assert!(
        human.contains(&format!(":{holder_pid}\n")),
        "owner is host:pid\n{human}"
    );
    assert!(human.contains("gs://test-bucket/dimutex/ops"), "{human}");
    assert!(
        human.contains("since:") && human.contains("until:"),
        "{human}"
    );

    let out = output(env.cmd("status", &["--json", "ops"])).await;
    assert_code(&out, 0, "status --json of a held lock");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["held"], true);
    assert_eq!(v["state"], "held");
    assert_eq!(v["key"], "ops");
    assert_eq!(v["object"], "gs://test-bucket/dimutex/ops");
    assert_eq!(v["token"], token);
    assert!(
        v["owner"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{holder_pid}"))
    );
    let remaining = v["remaining_secs"].as_f64().unwrap();
    // At most ttl + 1 s, counted from a `Date` truncated to whole seconds.
    assert!(remaining > 0.0 && remaining <= 5.0, "remaining {remaining}");
    for field in ["since", "expires", "server_time"] {
        let s = v[field].as_str().unwrap();
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("{field} = {s:?} is not RFC 3339: {e}"));
    }
    assert_eq!(v["written_by_python"], false);

    // The wrong token: nothing deleted.
    let wrong = (token + 1).to_string();
    let out = output(env.cmd("release", &["--force", "ops", "--token", &wrong])).await;
    assert_code(&out, 1, "release --force --token WRONG");
    assert!(text(&out.stdout).contains("left in place"));
    let out = output(env.cmd("status", &["ops"])).await;
    assert_code(&out, 0, "still held after a mismatched release");

    // The right token: deleted; the holder notices at its next refresh and exits 74.
    let right = token.to_string();
    let out = output(env.cmd("release", &["--force", "ops", "--token", &right])).await;
    assert_code(&out, 0, "release --force --token RIGHT");
    let out = output(env.cmd("status", &["ops"])).await;
    assert_code(&out, 1, "free after the release");
    let out = finish(holder).await;
    assert_code(&out, 74, "the holder whose lock was broken");
    assert!(text(&out.stderr).contains("lost the lock \"ops\""));

    // Without a token.
    let _ = std::fs::remove_file(&token_file);
    let holder = env
        .cmd("run", &["--ttl", "3", "ops", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for_file(&token_file, Duration::from_secs(10)).await;
    let out = output(env.cmd("release", &["--force", "ops"])).await;
    assert_code(&out, 0, "release --force without a token");
    let out = output(env.cmd("release", &["--force", "ops"])).await;
    assert_code(&out, 1, "release --force on no lock");
    let out = output(env.cmd("release", &["--force", "ops", "--token", &right])).await;
    assert_code(&out, 1, "release --force --token on no lock");
    let out = finish(holder).await;
    assert_code(&out, 74, "the second holder");
}

/// `dimutex run ARGS -- CMD` in `env` with a CMD that ignores SIGTERM, once CMD runs: the
/// holder, CMD's pid, and what kills CMD when the test ends.
async fn run_ignoring_sigterm(env: &Env, args: &[&str]) -> (Child, u32, Reap) {
    let pid_file = env.path("pid");
    let script = format!(
        "trap '' TERM; echo $$ > '{}'; exec sleep 60",
        pid_file.display()
    );
    let mut run = args.to_vec();
    run.extend(["--", "sh", "-c", &script]);
    let holder = env.cmd("run", &run).spawn().unwrap();
    wait_for_file(&pid_file, Duration::from_secs(10)).await;
    let pid: u32 = read_trimmed(&pid_file).parse().unwrap();
    (holder, pid, Reap(vec![pid]))
}

/// A command that ignores SIGTERM after a lost lease is killed once `--grace` has passed: a
/// holder whose backend stops answering (a proxy in front of the fake refuses every
/// connection) loses its lease a tenth of the ttl before anyone could take it over, and with
/// a ttl of 20 s that leaves more than `--grace 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_escalates_to_sigkill_after_the_grace_period() {
    let fake = FakeGcs::start().await.unwrap();
    let proxy = Proxy::start(fake.addr()).await.unwrap();
    let via_proxy = Env::new(&proxy.endpoint(), FakeGcs::DEFAULT_BUCKET, "grace");
    let (holder, child_pid, _reap) =
        run_ignoring_sigterm(&via_proxy, &["--ttl", "20", "--grace", "1", "g"]).await;
    proxy.pause();
    let cut = Instant::now();
    let died = tokio::spawn(async move {
        while is_alive(child_pid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cut.elapsed()
    });
    let out = finish(holder).await;
    let died = died.await.unwrap();
    assert_code(&out, 74, "the holder");
    let stderr = text(&out.stderr);
    // Lost at most 18 s after the cut (ttl minus a tenth, from the last refresh before it),
    // killed 1 s later. (dimutex itself exits later: it tries to delete its lock first.)
    assert!(
        died < Duration::from_secs(21),
        "the command died {died:?} after the backend went away"
    );
    assert!(stderr.contains("SIGKILL after 1 s"), "{stderr}");
    assert!(stderr.contains("did not exit within 1 s"), "{stderr}");
    assert!(!is_alive(child_pid), "the command was killed");
}

/// A command whose lock another owner removed is killed at once, whatever `--grace` says
/// (here the default, 10 s): that owner may hold the lock already. The holder learns of it
/// from its next refresh (every ttl/3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_removed_by_another_kills_the_command_at_once() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "refused");
    let (holder, child_pid, _reap) = run_ignoring_sigterm(&env, &["--ttl", "10", "r"]).await;
    let out = output(env.cmd("release", &["--force", "r"])).await;
    assert_code(&out, 0, "release --force");
    let removed_at = Instant::now();
    let out = finish(holder).await;
    let took = removed_at.elapsed();
    assert_code(&out, 74, "the holder");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("SIGKILL at once"), "{stderr}");
    assert!(!is_alive(child_pid), "the command was killed");
    // A refresh interval (3.3 s) and the kill, not the rest of the lease (up to 9.5 s more).
    assert!(
        took < Duration::from_millis(4800),
        "the holder exited {took:?} after its lock was removed"
    );
}

// ---------------------------------------------------------------------------------------------
// Hole 5: after a lost lease, the command is dead before another owner can take over.

/// Nanoseconds since the Unix epoch, as `date +%s%N` prints them.
fn wall_ns(t: SystemTime) -> i128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128
}

/// The last line of a file of `date +%s%N` lines.
fn last_ns(path: &Path) -> i128 {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .expect("at least one timestamp");
    line.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{line:?} in {}: {e}", path.display()))
}

/// A holder whose backend stops answering right after its create (a proxy in front of the
/// fake refuses every connection from then on; the contender talks to the fake directly),
/// with a command that ignores SIGTERM and writes a heartbeat every 50 ms, and the default
/// `--grace 10`. A contender waiting on the same key records when it got the lock. The
/// holder's last heartbeat must come before the contender's command starts, and the holder
/// exits 74.
async fn lost_lease_command_dies_before_a_takeover(ttl: u64, test: &str) {
    let _heavy = HEAVY.lock().await;
    let fake = FakeGcs::start().await.unwrap();
    let proxy = Proxy::start(fake.addr()).await.unwrap();
    let env = Env::fake(&fake, test);
    let via_proxy = Env::new(&proxy.endpoint(), FakeGcs::DEFAULT_BUCKET, test);
    let ttl_arg = ttl.to_string();
    let heartbeat = env.path("heartbeat");
    let pid_file = env.path("pid");
    let script = format!(
        "trap '' TERM; echo $$ > '{}'; while :; do date +%s%N >> '{}'; sleep 0.05; done",
        pid_file.display(),
        heartbeat.display()
    );
    let holder = via_proxy
        .cmd(
            "run",
            &["--ttl", &ttl_arg, "hole5", "--", "sh", "-c", &script],
        )
        .spawn()
        .unwrap();
    wait_for_file(&heartbeat, Duration::from_secs(10)).await;
    // The create has landed (the command runs): from now on the holder reaches nothing.
    proxy.pause();
    let cut = SystemTime::now();
    let cut_at = Instant::now();
    wait_for_file(&pid_file, Duration::from_secs(5)).await;
    let child_pid: u32 = read_trimmed(&pid_file).parse().unwrap();
    let _reap = Reap(vec![child_pid]);

    let got = env.path("got");
    let contender_script = format!("date +%s%N > '{}'", got.display());
    let contender = env
        .cmd(
            "run",
            &[
                "--ttl",
                &ttl_arg,
                "--wait",
                "30",
                "hole5",
                "--",
                "sh",
                "-c",
                &contender_script,
            ],
        )
        .spawn()
        .unwrap();

    let (holder_out, contender_out) = tokio::join!(finish(holder), finish(contender));
    let holder_exit = cut_at.elapsed();
    let stderr = text(&holder_out.stderr);
    assert_code(&contender_out, 0, "the contender");
    let last_alive = last_ns(&heartbeat);
    let taken = last_ns(&got);
    let cut = wall_ns(cut);
    let ms = |ns: i128| ns as f64 / 1e6;
    eprintln!(
        "hole 5 (ttl {ttl} s, --grace 10): after the cut, the holder's command last alive at \
         {:.0} ms, the contender's command started at {:.0} ms (overlap {:.0} ms); the holder \
         exited {:?} after {holder_exit:.1?}",
        ms(last_alive - cut),
        ms(taken - cut),
        ms((last_alive - taken).max(0)),
        holder_out.status.code(),
    );
    assert!(
        last_alive < taken,
        "the holder's command was alive {:.0} ms after the contender's command started \
         (holder stderr:\n{stderr})",
        ms(last_alive - taken)
    );
    // Whenever the contender polls: the create was sent before the cut, so nobody may take
    // over before cut + ttl (the server's rule adds 1 s more), and the command is dead by then.
    assert!(
        last_alive < cut + i128::from(ttl) * 1_000_000_000,
        "the holder's command was alive {:.0} ms after the cut, past the ttl \
         (holder stderr:\n{stderr})",
        ms(last_alive - cut)
    );
    assert!(
        stderr.contains("before another owner can take the lock over"),
        "the kill came before --grace ran out: {stderr}"
    );
    assert!(!is_alive(child_pid), "the holder's command was killed");
    assert_code(&holder_out, 74, "the holder that lost its lease");
    assert!(
        stderr.contains("lost the lease on lock \"hole5\""),
        "{stderr}"
    );
}

/// ttl 3: the lease's own margin (0.3 s) is shorter than the command's safety (0.5 s), so the
/// command is killed before the lease driver even calls the lease lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_command_is_killed_before_a_takeover_ttl_3() {
    lost_lease_command_dies_before_a_takeover(3, "hole5-3").await;
}

/// ttl 6: the lease is called lost 0.6 s before it may be taken over; the command gets 0.1 s
/// of its 10 s grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_command_is_killed_before_a_takeover_ttl_6() {
    lost_lease_command_dies_before_a_takeover(6, "hole5-6").await;
}

// ---------------------------------------------------------------------------------------------
// An acquisition in flight is cleaned up.

/// Waits up to `within` for the bucket to hold `n` objects; the count at the end.
async fn wait_for_objects(fake: &FakeGcs, n: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let count = fake.object_count(FakeGcs::DEFAULT_BUCKET);
        if count == n || Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGINT while the create is in flight (it has landed; its reply comes 3 s late): dimutex
/// exits 130 without running the command and leaves no lock object behind. Needs the client
/// to clean up a dropped acquisition (`Client::shutdown` waits for that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_the_create_leaves_no_lock() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "int-create");
    fake.inject(
        FaultRule::new(Fault::CommitThenDelay(Duration::from_secs(3)))
            .with_method(http::Method::POST)
            .with_object("dimutex/int-create"),
    );
    let marker = env.path("ran");
    let waiter = env
        .cmd(
            "run",
            &[
                "--wait",
                "30",
                "int-create",
                "--",
                "touch",
                marker.to_str().unwrap(),
            ],
        )
        .spawn()
        .unwrap();
    // The create landed (committed before its delayed reply): it is in flight now.
    assert_eq!(
        wait_for_objects(&fake, 1, Duration::from_secs(10)).await,
        1,
        "the create landed"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.pending_faults(), 0, "the slow reply is the create's");
    signal(waiter.id().unwrap(), libc::SIGINT);
    let signalled = Instant::now();
    let out = finish(waiter).await;
    let exited = signalled.elapsed();
    assert_code(&out, 130, "interrupted during the create");
    assert!(!marker.exists(), "the command never ran");
    let left = wait_for_objects(&fake, 0, Duration::from_secs(3)).await;
    eprintln!(
        "SIGINT during a create with a 3 s late reply: exited {exited:.2?} after the signal, \
         {left} lock object(s) left 3 s later"
    );
    assert_eq!(left, 0, "no lock left behind");
}

/// The create lands but its reply comes 12 s late (past the 5 s request timeout): the
/// acquisition is ours all the same, the command runs, and the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_past_the_timeout_still_runs_the_command() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "slow-create");
    fake.inject(
        FaultRule::new(Fault::CommitThenDelay(Duration::from_secs(12)))
            .with_method(http::Method::POST)
            .with_object("dimutex/slow-create"),
    );
    let marker = env.path("ran");
    let started = Instant::now();
    let out = output(env.cmd(
        "run",
        &[
            "--wait",
            "60",
            "slow-create",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ],
    ))
    .await;
    let took = started.elapsed();
    let left = wait_for_objects(&fake, 0, Duration::from_secs(3)).await;
    eprintln!(
        "a create answered 12 s late: exit {:?} after {took:.1?}, {left} lock object(s) left",
        out.status.code()
    );
    assert_code(&out, 0, "run with a create answered 12 s late");
    assert!(marker.exists(), "the command ran");
    assert_eq!(left, 0, "no lock left behind");
}

// ---------------------------------------------------------------------------------------------
// `run --once-per`: the command once per period across processes.

/// Runs `dimutex run --once-per 1h [--wait 60] nightly -- sh -c 'echo TOKEN >> ran; sleep 1'`
/// in 8 processes started together; returns their outputs.
async fn once_per_wave(env: &Env, wait: bool) -> Vec<Output> {
    let ran = env.path("ran");
    let script = format!("echo \"$DIMUTEX_TOKEN\" >> '{}'; sleep 1", ran.display());
    let mut args = vec!["--once-per", "1h"];
    if wait {
        args.extend(["--wait", "60"]);
    }
    args.extend(["nightly", "--", "sh", "-c", &script]);
    let children: Vec<Child> = (0..8)
        .map(|_| env.cmd("run", &args).spawn().expect("spawn dimutex"))
        .collect();
    let mut outputs = Vec::new();
    for child in children {
        outputs.push(finish(child).await);
    }
    outputs
}

fn lines_of(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// How many of `outputs` say on stderr when the key last ran (and did not run the command).
fn said_done(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .filter(|out| {
            let err = text(&out.stderr);
            err.contains("\"nightly\" last ran at 20")
                && err.contains("Z and may run again after 20")
                && err.contains("not running the command")
        })
        .count()
}

/// 8 processes with `--once-per 1h --wait 60` started together: the command runs exactly once
/// and all exit 0 (the 7 others waited for the one running it, or found its record); a second
/// wave of 8, without --wait, runs it no more and all exit 0 at once, saying when it ran. The
/// record stands for the period: plain `run` finds the key held.
async fn once_per_across_processes(env: &Env) {
    let ran = env.path("ran");
    let first = once_per_wave(env, true).await;
    for out in &first {
        assert_code(out, 0, "first wave");
    }
    assert_eq!(
        lines_of(&ran),
        1,
        "the command ran exactly once in the first wave"
    );
    assert_eq!(said_done(&first), 7, "the 7 others said when it ran");

    let started = Instant::now();
    let second = once_per_wave(env, false).await;
    for out in &second {
        assert_code(out, 0, "second wave");
    }
    assert_eq!(lines_of(&ran), 1, "the command did not run again");
    assert_eq!(said_done(&second), 8, "all 8 said when it ran");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the second wave did not wait: {:?}",
        started.elapsed()
    );

    // The record: completed a moment ago, standing for the hour (+ the 1 s of `Date`
    // resolution the expiry rule adds).
    let client = env.client().await;
    let dimutex::Acquisition::Done(done) = client.try_acquire_unless_done("nightly").await.unwrap()
    else {
        panic!("the success is recorded");
    };
    let stands = done.until().duration_since(done.completed_at()).unwrap();
    assert!(
        (Duration::from_secs(3600)..=Duration::from_secs(3602)).contains(&stands),
        "the record stands for the period: {stands:?}"
    );
    let out = output(env.cmd("run", &["nightly", "--", "true"])).await;
    assert_code(&out, 75, "plain run while the record stands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_per_runs_the_command_once_across_processes_fake_gcs() {
    let _heavy = HEAVY.lock().await;
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "once-fake");
    once_per_across_processes(&env).await;
    assert_eq!(
        fake.object_count(FakeGcs::DEFAULT_BUCKET),
        1,
        "the record, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_per_runs_the_command_once_across_processes_fake_gcs_server() {
    let _heavy = HEAVY.lock().await;
    let server = FakeGcsServer::start().await;
    let env = Env::new(server.endpoint(), server.bucket(), "once-fgcs");
    once_per_across_processes(&env).await;
}

/// A failed command records nothing: dimutex exits with its status, and the next
/// `--once-per` run runs the command; a success is then recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_per_records_nothing_when_the_command_fails() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "once-fail");
    let ran = env.path("ran");
    let append = format!("echo x >> '{}'", ran.display());
    let run = |tail: &str| {
        let script = format!("{append}{tail}");
        env.cmd(
            "run",
            &["--once-per", "1h", "report", "--", "sh", "-c", &script],
        )
    };

    let out = output(run("; exit 3")).await;
    assert_code(&out, 3, "a failing command");
    assert_eq!(lines_of(&ran), 1);
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0, "no record");

    let out = output(run("; kill -KILL $$")).await;
    assert_code(&out, 128 + libc::SIGKILL, "a command killed by SIGKILL");
    assert_eq!(lines_of(&ran), 2, "it ran again: nothing was recorded");
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 0, "no record");

    let out = output(run("")).await;
    assert_code(&out, 0, "a succeeding command");
    assert_eq!(lines_of(&ran), 3, "it ran again: nothing was recorded");
    assert_eq!(fake.object_count(FakeGcs::DEFAULT_BUCKET), 1, "the record");

    let out = output(run("")).await;
    assert_code(&out, 0, "after the success");
    assert_eq!(lines_of(&ran), 3, "not run again");
    assert!(
        text(&out.stderr).contains("\"report\" last ran at"),
        "{}",
        text(&out.stderr)
    );
}

/// Without --wait, a `--once-per` run that finds another one running the command fails fast
/// with 75 and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_per_without_wait_exits_75_while_another_runs() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "once-held");
    let (ready, go, ran) = (env.path("ready"), env.path("go"), env.path("ran"));
    let script = format!(
        "echo x >> '{}'; echo up > '{}'; while [ ! -e '{}' ]; do sleep 0.05; done",
        ran.display(),
        ready.display(),
        go.display()
    );
    let args = ["--once-per", "60", "job", "--", "sh", "-c", &script];
    let holder = env.cmd("run", &args).spawn().unwrap();
    wait_for_file(&ready, Duration::from_secs(10)).await;
    let out = output(env.cmd("run", &args)).await;
    assert_code(&out, 75, "held by the run in progress");
    assert!(
        text(&out.stderr).contains("held by another owner"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&go, "go").unwrap();
    assert_code(&finish(holder).await, 0, "the holder");
    assert_eq!(lines_of(&ran), 1, "the command ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_per_bad_values_exit_64() {
    let fake = FakeGcs::start().await.unwrap();
    let env = Env::fake(&fake, "once-usage");
    for bad in [
        "0", "0s", "0h", "0.5", "-1", "-1h", "x", "h", "1w", "1hh", "nan", "inf", "1e10", "3661d",
        "20000d", "",
    ] {
        // `=`, so that "-1" reaches the parser as a value.
        let flag = format!("--once-per={bad}");
        let out = output(env.cmd("run", &[&flag, "k", "--", "true"])).await;
        assert_code(&out, 64, &flag);
        assert!(
            text(&out.stderr).contains("--once-per"),
            "{bad:?}: the message names the option: {}",
            text(&out.stderr)
        );
    }
    // The value missing, or taken for an option.
    for args in [&["--once-per"][..], &["--once-per", "-1"]] {
        let mut args = args.to_vec();
        args.extend(["k", "--", "true"]);
        let out = output(env.cmd("run", &args)).await;
        assert_code(&out, 64, &format!("{args:?}"));
    }
    assert_eq!(fake.request_count(), 0, "bad arguments send no request");

    let out = output(env.raw(&["run", "--help"])).await;
    assert_code(&out, 0, "run --help");
    let help = text(&out.stdout);
    for needle in ["--once-per", "PERIOD", "20h", "recorded"] {
        assert!(
            help.contains(needle),
            "run --help mentions {needle}:\n{help}"
        );
    }
}
