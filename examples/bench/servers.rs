//! The processes the benchmark talks to: fake-gcs-server (or the emulator named by
//! `STORAGE_EMULATOR_HOST` + `DIMUTEX_BUCKET`), the in-repo fake in a child process (this
//! binary with `--serve-fake`), and the Python `dimutex` driver (`benches/python_cycle.py`).
//!
//! Every server runs in its own process, so the CPU time and heap of the bench process are the
//! client's alone.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dimutex::testing::FakeGcs;
use serde_json::{Value, json};

use super::util::{BoxError, Result};

/// Where lock objects go: a base URL and a bucket.
#[derive(Debug, Clone)]
pub struct GcsTarget {
    pub label: String,
    pub endpoint: String,
    pub bucket: String,
}

const SETUP_HINT: &str = "run `bash .ci/setup-python.sh` from the repository root (it installs \
                          fake-gcs-server and a venv with Python dimutex 1.3.1 into .ci-cache/ \
                          and writes .ci-cache/env)";

/// `KEY=value` from the environment, else from `.ci-cache/env`.
fn setting(key: &str) -> Option<(String, String)> {
    if let Ok(v) = std::env::var(key) {
        if !v.trim().is_empty() {
            return Some((v.trim().to_owned(), format!("${key}")));
        }
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci-cache/env");
    let text = std::fs::read_to_string(&file).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        (k.trim() == key && !v.trim().is_empty())
            .then(|| (v.trim().to_owned(), file.display().to_string()))
    })
}

// ---------------------------------------------------------------------------------------------
// fake-gcs-server

/// A fake-gcs-server child process (killed on drop), or nothing when an external emulator is
/// used.
pub struct Emulator {
    pub target: GcsTarget,
    child: Option<(Child, PathBuf)>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some((child, dir)) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Emulator {
    /// The emulator of `STORAGE_EMULATOR_HOST` + `DIMUTEX_BUCKET` when both are set, else a
    /// fresh fake-gcs-server. `Err` says why there is none (to print as "skipped").
    pub async fn start() -> Result<Emulator, String> {
        let host = std::env::var("STORAGE_EMULATOR_HOST").unwrap_or_default();
        let bucket = std::env::var("DIMUTEX_BUCKET").unwrap_or_default();
        if !host.trim().is_empty() && !bucket.trim().is_empty() {
            let host = host.trim().trim_end_matches('/');
            let endpoint = if host.contains("://") {
                host.to_owned()
            } else {
                format!("http://{host}")
            };
            return Ok(Emulator {
                target: GcsTarget {
                    label: "emulator".into(),
                    endpoint,
                    bucket: bucket.trim().to_owned(),
                },
                child: None,
            });
        }
        let Some((bin, source)) = setting("FAKE_GCS_SERVER_BIN") else {
            return Err(format!(
                "fake-gcs-server not found (FAKE_GCS_SERVER_BIN unset, no .ci-cache/env); {SETUP_HINT}"
            ));
        };
        if !Path::new(&bin).is_file() {
            return Err(format!(
                "fake-gcs-server not found at {bin} (from {source}); {SETUP_HINT}"
            ));
        }
        let mut last = String::new();
        for _ in 0..3 {
            match start_fake_gcs_server(&bin).await {
                Ok(e) => return Ok(e),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("fake-gcs-server did not start: {last}"))
    }
}

async fn start_fake_gcs_server(bin: &str) -> Result<Emulator> {
    const BUCKET: &str = "test-bucket";
    let dir = std::env::temp_dir().join(format!(
        "dimutex-bench-fgcs-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(dir.join("data").join(BUCKET))?;
    let log = std::fs::File::create(dir.join("server.log"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(bin)
        .args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
        .arg(port.to_string())
        .args(["-backend", "memory", "-data"])
        .arg(dir.join("data"))
        .args(["-log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    let emulator = Emulator {
        target: GcsTarget {
            label: "fake-gcs-server".into(),
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: BUCKET.into(),
        },
        child: Some((child, dir.clone())),
    };
    let probe = reqwest::Client::new();
    let url = format!("{}/storage/v1/b/{BUCKET}/o", emulator.target.endpoint);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(r) = probe.get(&url).send().await {
            if r.status().is_success() {
                return Ok(emulator);
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            return Err(format!("no answer on {url} within 15 s; log:\n{log}").into());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The in-repo fake, in a child process

/// The in-repo `FakeGcs` served by a child process (this binary, `--serve-fake`), driven by
/// one-line commands on its stdin.
pub struct ChildFake {
    pub target: GcsTarget,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Asks a line-driven child to `quit`, waits up to `grace`, then kills it.
fn quit_child(child: &mut Child, stdin: &mut ChildStdin, grace: Duration) {
    let _ = writeln!(stdin, "quit");
    let _ = stdin.flush();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for ChildFake {
    fn drop(&mut self) {
        quit_child(&mut self.child, &mut self.stdin, Duration::from_secs(2));
    }
}

impl ChildFake {
    pub fn start() -> Result<ChildFake> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-fake")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| format!("the fake child said {line:?}: {e}"))?;
        let endpoint = v["endpoint"].as_str().ok_or("no endpoint")?.to_owned();
        let bucket = v["bucket"].as_str().ok_or("no bucket")?.to_owned();
        Ok(ChildFake {
            target: GcsTarget {
                label: "in-repo fake".into(),
                endpoint,
                bucket,
            },
            child,
            stdin,
            stdout,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command, returns its one-line JSON answer.
    pub fn call(&mut self, command: &str) -> Result<Value> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        tokio::task::block_in_place(|| self.stdout.read_line(&mut line))?;
        Ok(serde_json::from_str(&line)
            .map_err(|e| format!("the fake child answered {line:?}: {e}"))?)
    }
}

/// `--serve-fake`: serves a `FakeGcs` and answers commands on stdin until `quit` or EOF.
///
/// - `count` → `{"requests": N, "objects": M}`
/// - `window-start` → clears the log, then counts answered requests every whole second
/// - `window-stop` → `{"per_second": [..], "methods": {"PATCH": n, ..}, "total": N, "logged": L}`
pub fn serve_fake_child() -> std::process::ExitCode {
    match serve_fake() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench --serve-fake: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type Sampler = (Arc<AtomicBool>, std::thread::JoinHandle<Vec<u64>>);

fn serve_fake() -> Result<()> {
    // One worker: where the runtime places each connection's task would otherwise move every
    // cycle on that connection (see `cycle::latency`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let fake = Arc::new(rt.block_on(FakeGcs::builder().log_capacity(200_000).start())?);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        json!({"endpoint": fake.endpoint(), "bucket": FakeGcs::DEFAULT_BUCKET})
    )?;
    out.flush()?;
    let mut sampler: Option<Sampler> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let answer = match line.trim() {
            "quit" => break,
            "count" => json!({
                "requests": fake.request_count(),
                "objects": fake.object_count(FakeGcs::DEFAULT_BUCKET),
            }),
            "window-start" => {
                fake.clear_log();
                let stop = Arc::new(AtomicBool::new(false));
                let (f, s) = (fake.clone(), stop.clone());
                let handle = std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let mut samples = Vec::new();
                    for k in 1u32.. {
                        let at = t0 + Duration::from_secs(k.into());
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                        if s.load(Ordering::SeqCst) {
                            break;
                        }
                        samples.push(f.request_count());
                    }
                    samples
                });
                sampler = Some((stop, handle));
                json!({"ok": true})
            }
            "window-stop" => {
                let Some((stop, handle)) = sampler.take() else {
                    return Err("window-stop without window-start".into());
                };
                stop.store(true, Ordering::SeqCst);
                let samples = handle.join().map_err(|_| "sampler panicked")?;
                let per_second: Vec<u64> = samples
                    .iter()
                    .scan(0, |prev, &n| {
                        let d = n - *prev;
                        *prev = n;
                        Some(d)
                    })
                    .collect();
                let log = fake.requests();
                let mut methods = BTreeMap::<String, u64>::new();
                for r in &log {
                    *methods.entry(r.method().to_string()).or_default() += 1;
                }
                json!({
                    "per_second": per_second,
                    "methods": methods,
                    "total": fake.request_count(),
                    "logged": log.len(),
                })
            }
            other => json!({"error": format!("unknown command {other:?}")}),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    drop(fake);
    rt.shutdown_background();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Python dimutex

/// The Python interpreter with `dimutex` installed: `$DIMUTEX_PYTHON`, else `.ci-cache/env`.
pub fn python() -> Result<PathBuf, String> {
    match setting("DIMUTEX_PYTHON") {
        Some((p, _)) if Path::new(&p).is_file() => Ok(PathBuf::from(p)),
        Some((p, source)) => Err(format!(
            "Python with dimutex not found at {p} (from {source}); {SETUP_HINT}"
        )),
        None => Err(format!(
            "Python with dimutex not found (DIMUTEX_PYTHON unset, no .ci-cache/env); {SETUP_HINT}"
        )),
    }
}

/// `benches/python_cycle.py` running `cycles` acquire+release cycles of Python `dimutex` at
/// `concurrency`, started and stopped on command so only the cycles are measured.
pub struct PyDriver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub version: String,
}

impl Drop for PyDriver {
    fn drop(&mut self) {
        quit_child(&mut self.child, &mut self.stdin, Duration::from_secs(5));
    }
}

impl PyDriver {
    pub fn start(
        python: &Path,
        target: &GcsTarget,
        concurrency: usize,
        cycles: usize,
        prefix: &str,
    ) -> Result<PyDriver> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python_cycle.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--api-url", &target.endpoint, "--bucket", &target.bucket])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--cycles", &cycles.to_string()])
            .args(["--prefix", prefix])
            .env_remove("STORAGE_EMULATOR_HOST")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut driver = PyDriver {
            child,
            stdin,
            stdout,
            version: String::new(),
        };
        let ready = driver.read()?;
        if ready["ready"] != Value::Bool(true) {
            return Err(format!("python_cycle.py did not start: {ready}").into());
        }
        driver.version = ready["dimutex"].as_str().unwrap_or("?").to_owned();
        Ok(driver)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        tokio::task::block_in_place(|| self.stdout.read_line(&mut line))?;
        if line.is_empty() {
            return Err(BoxError::from(
                "python_cycle.py exited (see its stderr above)",
            ));
        }
        Ok(serde_json::from_str(&line)
            .map_err(|e| format!("python_cycle.py said {line:?}: {e}"))?)
    }

    /// Runs the cycles; returns the driver's `done` line.
    pub fn go(&mut self) -> Result<Value> {
        writeln!(self.stdin, "go")?;
        self.stdin.flush()?;
        let done = self.read()?;
        if done["done"] != Value::Bool(true) {
            return Err(format!("python_cycle.py failed: {done}").into());
        }
        Ok(done)
    }
}
