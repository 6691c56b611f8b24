//! Set-up shared by the HTTP examples (not an example itself; each example includes it with
//! `#[path = "support/backend.rs"] mod support;`).
//!
//! Environment:
//! - `DIMUTEX_BUCKET` unset: the in-memory backend — locks live in this process only, no set-up.
//! - `DIMUTEX_BUCKET=my-bucket`: Google Cloud Storage with Application Default Credentials, or
//!   the emulator at `STORAGE_EMULATOR_HOST` (`host:port`; no credentials are sent to it).
//! - `DIMUTEX_TTL=SECONDS`: the lease length (default 30; at least 2).
//! - `ADDR=host:port`: where to listen (`127.0.0.1:0` picks a free port; the bound address is
//!   printed).

use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dimutex::Client;
use dimutex::backend::{Backend, MemoryBackend};
use tokio::net::TcpListener;

pub type BoxError = Box<dyn Error + Send + Sync>;

/// Logs to stderr; `RUST_LOG=dimutex=debug` shows every acquire and release.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The lock client: the backend chosen by `DIMUTEX_BUCKET`, the lease length by `DIMUTEX_TTL`.
/// Prints which backend is used (never credentials).
pub async fn client_from_env() -> Result<Client, BoxError> {
    let ttl = lease_ttl()?;
    let backend = backend_from_env().await?;
    let client = match ttl {
        Some(ttl) => Client::builder(backend)
            .ttl(ttl)
            .build()
            .map_err(|e| format!("invalid DIMUTEX_TTL: {e}"))?,
        None => Client::new(backend),
    };
    println!("lease ttl: {:?}", client.ttl());
    Ok(client)
}

fn lease_ttl() -> Result<Option<Duration>, BoxError> {
    match std::env::var("DIMUTEX_TTL") {
        Ok(v) if !v.trim().is_empty() => {
            let secs: u64 = v.trim().parse().map_err(|_| {
                format!("invalid DIMUTEX_TTL {v:?}: expected a whole number of seconds, such as 30")
            })?;
            Ok(Some(Duration::from_secs(secs)))
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err("DIMUTEX_TTL is not valid UTF-8".into()),
    }
}

async fn backend_from_env() -> Result<Arc<dyn Backend>, BoxError> {
    let bucket = std::env::var("DIMUTEX_BUCKET").unwrap_or_default();
    let bucket = bucket.trim();
    if bucket.is_empty() {
        println!(
            "backend: in-memory (locks are local to this process; set DIMUTEX_BUCKET to use GCS)"
        );
        return Ok(Arc::new(MemoryBackend::new()));
    }
    gcs_backend(bucket).await
}

#[cfg(feature = "gcs")]
async fn gcs_backend(bucket: &str) -> Result<Arc<dyn Backend>, BoxError> {
    use dimutex::backend::{GCS_ENDPOINT, GcsBackend};

    let backend = GcsBackend::builder(bucket)
        .build()
        .await
        .map_err(|e| format!("cannot use bucket {bucket:?}: {e}"))?;
    if backend.endpoint() == GCS_ENDPOINT {
        println!(
            "backend: Google Cloud Storage, bucket `{}` (Application Default Credentials)",
            backend.bucket()
        );
    } else {
        println!(
            "backend: GCS emulator at {} (STORAGE_EMULATOR_HOST), bucket `{}`",
            without_userinfo(backend.endpoint()),
            backend.bucket()
        );
    }
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "gcs"))]
async fn gcs_backend(_bucket: &str) -> Result<Arc<dyn Backend>, BoxError> {
    Err("DIMUTEX_BUCKET is set but dimutex was built without the `gcs` feature".into())
}

/// `http://user:secret@host:port` → `http://host:port`: never print credentials.
#[cfg(feature = "gcs")]
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Binds `ADDR` (or `default_addr`) and prints `listening on http://HOST:PORT`. Returns the
/// listener and a base URL to put in `curl` lines.
pub async fn listen(default_addr: &str) -> Result<(TcpListener, String), BoxError> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| default_addr.to_owned());
    let listener = TcpListener::bind(addr.as_str())
        .await
        .map_err(|e| format!("cannot listen on {addr:?} (from ADDR): {e}"))?;
    let mut local = listener.local_addr()?;
    println!("listening on http://{local}");
    if local.ip().is_unspecified() {
        // Bound to every interface: `curl` the loopback one.
        let loopback: SocketAddr = if local.is_ipv4() {
            ([127, 0, 0, 1], local.port()).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, local.port()).into()
        };
        local = loopback;
    }
    std::io::stdout().flush()?;
    Ok((listener, format!("http://{local}")))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                eprintln!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    println!("shutting down: finishing in-flight requests, then releasing locks");
    let _ = std::io::stdout().flush();
}

/// Releases what the client still holds (waiting up to 10 s), after the server has stopped.
pub async fn release_all(client: &Client) -> Result<(), BoxError> {
    client.shutdown(Duration::from_secs(10)).await?;
    println!("all locks released; bye");
    Ok(())
}

/// The process exit status: an error is printed as `error: ...` and exits with 1.
pub fn exit_code(result: Result<(), BoxError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
