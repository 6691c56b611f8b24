//! A webhook receiver that processes each delivery once: [`IdempotencyLayer`] keys each request
//! by its `X-Delivery-Id` header ([`FromHeader`]). A redelivery that arrives while the first
//! attempt is still running gets `409 Conflict` (with `Retry-After`) and the sender retries
//! later, instead of both attempts running side by side; one that arrives after the first
//! attempt succeeded gets its stored response (`Idempotent-Replayed: true`) without being
//! processed again.
//!
//! `POST /webhooks?hold_ms=N` with header `X-Delivery-Id` "processes" the payload for `N`
//! milliseconds (default 0, capped at 60000) and answers
//! `200 {"delivery_id": "...", "token": 1234, "bytes": LEN}` (`token` is the fencing token, a
//! JSON integer). Without the header the layer answers 400. `GET /healthz` answers 200.
//!
//! Deliveries about one customer are also processed one at a time: [`JsonKeyLayer`] reads the
//! customer from the payload (`/data/object/customer`, as Stripe sends it) and a [`LockLayer`]
//! keyed by it answers 409 to a second delivery for that customer while the first runs
//! (deliveries without the field take no customer lock).
//!
//! A failed attempt (5xx) is not stored: the sender's retry is processed again. Records are
//! kept 24 h (a bucket lifecycle rule on the lock prefix removes old ones).
//!
//! ```sh
//! cargo run --example webhooks                            # in-memory backend, 127.0.0.1:3001
//! curl -i -X POST -H 'X-Delivery-Id: d-42' -d '{"event":"push"}' 'http://127.0.0.1:3001/webhooks?hold_ms=10000' &
//! curl -i -X POST -H 'X-Delivery-Id: d-42' -d '{"event":"push"}' 'http://127.0.0.1:3001/webhooks?hold_ms=10000'   # 409
//! # once the first has answered, the same again: its stored response, not processed again
//! curl -i -X POST -H 'X-Delivery-Id: d-42' -d '{"event":"push"}' 'http://127.0.0.1:3001/webhooks?hold_ms=10000'
//! ```
//!
//! Environment: `ADDR`, `DIMUTEX_BUCKET`, `STORAGE_EMULATOR_HOST`, `DIMUTEX_TTL`, `RUST_LOG`, as
//! for the `jobs` example. This example needs no crate feature: the layer is plain tower, and the
//! handler reads the lock with axum's `Extension<HeldLock>`.
//!
//! [`IdempotencyLayer`]: dimutex::idempotency::IdempotencyLayer
//! [`JsonKeyLayer`]: dimutex::json_key::JsonKeyLayer
//! [`LockLayer`]: dimutex::layer::LockLayer

#[path = "support/backend.rs"]
mod support;

use std::process::ExitCode;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use dimutex::HeldLock;
use dimutex::idempotency::IdempotencyLayer;
use dimutex::json_key::{BodyKey, JsonKeyLayer};
use dimutex::layer::{FromExtension, FromHeader, LockLayer};
use serde::{Deserialize, Serialize};

const MAX_HOLD_MS: u64 = 60_000;

#[tokio::main]
async fn main() -> ExitCode {
    support::init_tracing();
    support::exit_code(run().await)
}

async fn run() -> Result<(), support::BoxError> {
    let client = support::client_from_env().await?;

    let app = Router::new()
        .route("/webhooks", post(receive))
        // Innermost: one delivery per customer at a time.
        .route_layer(LockLayer::new(
            client.clone(),
            FromExtension::<BodyKey>::new().optional(),
        ))
        // Each delivery once: a redelivery gets the stored response without taking the
        // customer's lock.
        .route_layer(IdempotencyLayer::with_key(
            client.clone(),
            FromHeader::new("x-delivery-id"),
        ))
        // Outermost: the customer, read from the payload.
        .route_layer(JsonKeyLayer::new("/data/object/customer").optional())
        .route("/healthz", get(|| async { "ok" }));

    let (listener, base) = support::listen("127.0.0.1:3001").await?;
    println!(
        "try:     curl -i -X POST -H 'X-Delivery-Id: d-42' -d '{{\"event\":\"push\"}}' '{base}/webhooks?hold_ms=10000'"
    );
    println!(
        "and the redelivery: curl -i -X POST -H 'X-Delivery-Id: d-42' -d '{{\"event\":\"push\"}}' '{base}/webhooks?hold_ms=10000'   # 409 while the first runs, its response after"
    );

    axum::serve(listener, app)
        .with_graceful_shutdown(support::shutdown_signal())
        .await?;
    support::release_all(&client).await
}

#[derive(Debug, Deserialize)]
struct DeliveryParams {
    /// How long processing takes, in milliseconds (to make overlaps easy to see).
    hold_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Processed {
    delivery_id: String,
    token: i64,
    bytes: usize,
}

async fn receive(
    Extension(lock): Extension<HeldLock>,
    Query(params): Query<DeliveryParams>,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<Json<Processed>, (StatusCode, &'static str)> {
    let hold = Duration::from_millis(params.hold_ms.unwrap_or(0).min(MAX_HOLD_MS));
    tokio::select! {
        () = tokio::time::sleep(hold) => {}
        () = lock.lost() => {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "lost the delivery's lock; stopped\n"));
        }
    }
    Ok(Json(Processed {
        // The layer made sure the header is there; the lock's key is the record's name.
        delivery_id: headers
            .get("x-delivery-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        token: lock.token().get(),
        bytes: payload.len(),
    }))
}
