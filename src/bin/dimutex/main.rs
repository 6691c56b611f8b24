//! `dimutex`: run a command under a distributed lock on Google Cloud Storage — flock(1) for a
//! fleet. See `dimutex --help` for the contract (commands, exit codes, environment).
#![deny(unsafe_code)]
#![warn(rust_2018_idioms)]

mod args;
mod exit;
mod once;
mod run;
mod status;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dimutex::backend::GcsBackend;
use dimutex::{Client, LockKey};

use crate::args::{Cli, Command, Target};
use crate::exit::Failure;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with status 0; usage errors to stderr with 64
            // (clap's own default would be 2).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    init_tracing(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dimutex: cannot start the async runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Status(args) => status::status(args).await,
            Command::Release(args) => status::release(args).await,
        }
    });
    // Nothing of ours is left running: leases were released (or handed to expiry) above.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("dimutex: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Diagnostics on stderr: `RUST_LOG` when set, else by the number of `-v`.
fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(match verbose {
            0 => "error",
            1 => "warn,dimutex=debug",
            2 => "info,dimutex=trace",
            _ => "trace",
        }),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Validates the key, builds the GCS backend (honouring `STORAGE_EMULATOR_HOST`) and the
/// client. Cheap argument checks come first, so bad arguments are reported as such (64) even
/// where no credentials are available.
pub(crate) async fn connect(
    target: &Target,
    ttl: Option<Duration>,
) -> Result<(Client, LockKey), Failure> {
    let key = LockKey::new(&target.key)
        .map_err(|e| Failure::usage(format!("invalid lock key {:?}: {e}", target.key)))?;
    if let Some(ttl) = ttl {
        if ttl < dimutex::MIN_TTL {
            return Err(Failure::usage(format!(
                "--ttl must be at least {} s, got {} s",
                dimutex::MIN_TTL.as_secs(),
                ttl.as_secs_f64()
            )));
        }
    }
    let backend = GcsBackend::builder(target.bucket.as_str())
        .build()
        .await
        .map_err(Failure::from_backend_config)?;
    tracing::debug!(
        endpoint = backend.endpoint(),
        bucket = backend.bucket(),
        "backend ready"
    );
    let mut builder = Client::builder(backend).prefix(target.prefix.as_str());
    if let Some(ttl) = ttl {
        builder = builder.ttl(ttl);
    }
    let client = builder.build().map_err(Failure::from_client_config)?;
    // Prefix + key must fit in an object name: an invalid key, reported before any request.
    client
        .object_name(&key)
        .map_err(|e| Failure::usage(format!("invalid lock key {:?}: {e}", target.key)))?;
    Ok((client, key))
}
