//! The main demo: an HTTP job runner where each job runs at most once at a time, across every
//! replica that shares the bucket.
//!
//! `POST /jobs/{job_id}/run?hold_ms=N` takes the lock named `{job_id}` through
//! [`LockLayer`] with [`FromPathParam`], "runs" the job for `N` milliseconds (default 0, capped
//! at 60000; a value that is not a number is a 400 — from the handler, so only once the lock is
//! taken: the layer runs first), and answers
//! `200 {"job_id": "...", "token": 1234, "held_ms": N}`. `token` is the lock's fencing token, a
//! JSON integer (the lock object's generation; below 2^53 on GCS and the in-memory backend).
//! A request for a job that is already running — here or in another replica — gets the
//! layer's `409 application/problem+json` with `Retry-After`. `GET /healthz` answers 200.
//!
//! A request with an `Idempotency-Key` header runs once per key ([`IdempotencyLayer`]): the
//! same request again gets the stored response (`Idempotent-Replayed: true`) without running
//! the job, the key with another body gets 422. Without the header, every request runs.
//!
//! ```sh
//! cargo run --example jobs                # in-memory backend, 127.0.0.1:3000
//! curl -i -X POST 'http://127.0.0.1:3000/jobs/nightly-report/run?hold_ms=10000' &
//! curl -i -X POST 'http://127.0.0.1:3000/jobs/nightly-report/run'   # 409 while the first runs
//!
//! curl -i -X POST -H 'Idempotency-Key: k-1' 'http://127.0.0.1:3000/jobs/nightly-report/run'
//! curl -i -X POST -H 'Idempotency-Key: k-1' 'http://127.0.0.1:3000/jobs/nightly-report/run' # replayed
//! curl -i -X POST -H 'Idempotency-Key: k-1' -d '{"other":1}' 'http://127.0.0.1:3000/jobs/nightly-report/run' # 422
//!
//! # Two replicas on one bucket (GCS, or an emulator such as fake-gcs-server):
//! export DIMUTEX_BUCKET=my-locks-bucket STORAGE_EMULATOR_HOST=127.0.0.1:4443
//! ADDR=127.0.0.1:3000 cargo run --example jobs &
//! ADDR=127.0.0.1:3010 cargo run --example jobs &
//! ```
//!
//! Environment: `ADDR` (listen address; `127.0.0.1:0` picks a free port), `DIMUTEX_BUCKET`,
//! `STORAGE_EMULATOR_HOST`, `DIMUTEX_TTL` (lease length in seconds), `RUST_LOG`. Ctrl-C or
//! SIGTERM stops accepting requests, lets running jobs finish, then releases every lock.

#[path = "support/backend.rs"]
mod support;

use std::process::ExitCode;
use std::time::Duration;

use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use dimutex::HeldLock;
use dimutex::idempotency::IdempotencyLayer;
use dimutex::layer::{FromHeader, FromPathParam, LockLayer};
use serde::{Deserialize, Serialize};

/// The longest a job may be asked to hold its lock.
const MAX_HOLD_MS: u64 = 60_000;

#[tokio::main]
async fn main() -> ExitCode {
    support::init_tracing();
    support::exit_code(run().await)
}

async fn run() -> Result<(), support::BoxError> {
    let client = support::client_from_env().await?;

    let app = Router::new()
        .route("/jobs/{job_id}/run", post(run_job))
        // `route_layer`: the layer runs after routing, so `FromPathParam` can see the matched
        // route, and unknown paths get a plain 404 without taking a lock.
        .route_layer(LockLayer::new(client.clone(), FromPathParam::new("job_id")))
        // Outside the job's lock: a duplicate is answered before it queues for the job.
        .route_layer(IdempotencyLayer::with_key(
            client.clone(),
            FromHeader::new("idempotency-key").optional(),
        ))
        .route("/healthz", get(|| async { "ok" }));

    let (listener, base) = support::listen("127.0.0.1:3000").await?;
    println!("try:     curl -i -X POST '{base}/jobs/nightly-report/run?hold_ms=10000'");
    println!("and, while it runs: curl -i -X POST '{base}/jobs/nightly-report/run'   # 409");
    println!(
        "once per key: curl -i -X POST -H 'Idempotency-Key: k-1' '{base}/jobs/nightly-report/run'   # twice: replayed"
    );

    axum::serve(listener, app)
        .with_graceful_shutdown(support::shutdown_signal())
        .await?;
    support::release_all(&client).await
}

#[derive(Debug, Deserialize)]
struct RunParams {
    /// How long the job holds the lock, in milliseconds.
    hold_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct JobRun {
    job_id: String,
    /// The fencing token: pass it to whatever the job writes.
    token: i64,
    held_ms: u64,
}

/// Runs with the lock held: the layer took it before this handler was called and releases it
/// once the response has been sent.
async fn run_job(
    lock: HeldLock,
    Query(params): Query<RunParams>,
) -> Result<Json<JobRun>, (StatusCode, &'static str)> {
    let held_ms = params.hold_ms.unwrap_or(0).min(MAX_HOLD_MS);
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(held_ms)) => {}
        // A long job stops when its lease is lost (say, GCS was unreachable for a whole ttl):
        // another replica may already be running it.
        () = lock.lost() => {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "lost the job's lock; stopped\n"));
        }
    }
    Ok(Json(JobRun {
        job_id: lock.key().as_str().to_owned(),
        token: lock.token().get(),
        held_ms,
    }))
}
