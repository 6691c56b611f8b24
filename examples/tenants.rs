//! A per-tenant exclusive operation with the [`Lock`] extractor: at most one export per tenant
//! runs at a time, while exports of different tenants run side by side.
//!
//! `POST /tenants/{tenant}/export?hold_ms=N` locks the key `{tenant}` in the handler's
//! extractors (`Lock<Path<String>>`, with the [`Client`] taken from the router state through
//! `FromRef`), "exports" for `N` milliseconds (default 0, capped at 60000), releases, and
//! answers `200 {"tenant": "...", "token": 1234, "held_ms": N}` (`token` is the fencing token,
//! a JSON integer). An export of a tenant that is already exporting gets
//! `409 application/problem+json` with `Retry-After`. `GET /healthz` answers 200.
//!
//! Unlike `LockLayer`, a `Lock<K>` is released when the handler drops it — at the latest when
//! the handler returns, before the response body is sent. This handler releases explicitly
//! ([`LockGuard::release`](dimutex::LockGuard::release)), so that the lock is free by the time
//! the client sees the answer.
//!
//! ```sh
//! cargo run --example tenants             # in-memory backend, 127.0.0.1:3002
//! curl -i -X POST 'http://127.0.0.1:3002/tenants/acme/export?hold_ms=10000' &
//! curl -i -X POST 'http://127.0.0.1:3002/tenants/acme/export'     # 409 while the first runs
//! curl -i -X POST 'http://127.0.0.1:3002/tenants/globex/export'   # 200: another tenant
//! ```
//!
//! Environment: `ADDR`, `DIMUTEX_BUCKET`, `STORAGE_EMULATOR_HOST`, `DIMUTEX_TTL`, `RUST_LOG`, as
//! for the `jobs` example.

#[path = "support/backend.rs"]
mod support;

use std::process::ExitCode;
use std::time::Duration;

use axum::extract::{FromRef, Path, Query};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use dimutex::Client;
use dimutex::extract::Lock;
use serde::{Deserialize, Serialize};

const MAX_HOLD_MS: u64 = 60_000;

/// The router state. `Lock<K>` finds the lock client in it through `FromRef`.
#[derive(Clone)]
struct AppState {
    locks: Client,
}

impl FromRef<AppState> for Client {
    fn from_ref(state: &AppState) -> Client {
        state.locks.clone()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    support::init_tracing();
    support::exit_code(run().await)
}

async fn run() -> Result<(), support::BoxError> {
    let client = support::client_from_env().await?;

    let app = Router::new()
        .route("/tenants/{tenant}/export", post(export))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(AppState {
            locks: client.clone(),
        });

    let (listener, base) = support::listen("127.0.0.1:3002").await?;
    println!("try:     curl -i -X POST '{base}/tenants/acme/export?hold_ms=10000'");
    println!("and, while it runs: curl -i -X POST '{base}/tenants/acme/export'   # 409");

    axum::serve(listener, app)
        .with_graceful_shutdown(support::shutdown_signal())
        .await?;
    support::release_all(&client).await
}

#[derive(Debug, Deserialize)]
struct ExportParams {
    /// How long the export takes, in milliseconds.
    hold_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Export {
    tenant: String,
    token: i64,
    held_ms: u64,
}

/// Extractors run in order: a bad `hold_ms` is a 400 before any lock is taken.
async fn export(
    Query(params): Query<ExportParams>,
    lock: Lock<Path<String>>,
) -> Result<Json<Export>, (StatusCode, &'static str)> {
    let held_ms = params.hold_ms.unwrap_or(0).min(MAX_HOLD_MS);
    let (Path(tenant), guard) = lock.into_parts();
    let token = guard.token();
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(held_ms)) => {}
        () = guard.lost() => {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "lost the tenant's lock; stopped\n"));
        }
    }
    // Waits for the delete. Had we just dropped the guard, the release would run in the
    // background and a retry arriving at once could still see the lock held.
    if let Err(e) = guard.release().await {
        // The export is done; the lease simply expires (after the ttl) if the release failed.
        tracing::warn!(error = %e, "releasing the tenant lock failed");
    }
    Ok(Json(Export {
        tenant,
        token: token.get(),
        held_ms,
    }))
}
