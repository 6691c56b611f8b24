//! The layer's cost per request, in-process, for profilers: an axum app served by
//! `tower::ServiceExt::oneshot` from 64 tasks on a current-thread runtime (no sockets, no load
//! generator), with and without `LockLayer`, on the in-memory backend. It prints the CPU time
//! and heap allocations per request of the chosen variant.
//!
//! ```text
//! cargo build --release --example profile_layer
//! target/release/examples/profile_layer layer 300      # or: bare 300, hot 300
//! target/release/examples/profile_layer layer 3000 multi  # on a multi-thread runtime
//! valgrind --tool=callgrind target/release/examples/profile_layer layer 300
//! ```
//!
//! With callgrind, instructions per request = the total / (64 × the count given), start-up
//! included (a few hundred thousand instructions).

use std::time::Instant;

use axum::Router;
use axum::routing::get;
use dimutex::Client;
use dimutex::backend::MemoryBackend;
use dimutex::layer::{FromPathParam, LockLayer};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The bench's measuring tools: its per-thread counting allocator and `/proc` CPU clock.
#[path = "bench/util.rs"]
#[allow(dead_code)]
mod util;

#[global_allocator]
static ALLOCATOR: util::CountingAlloc = util::CountingAlloc;

const TASKS: u64 = 64;

async fn handler() -> &'static str {
    "ok"
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let variant = args.next().unwrap_or_else(|| "layer".into());
    let per_task: u64 = match args.next() {
        Some(n) => n.parse()?,
        None => 3000,
    };
    // `hot`: the layer, every request for a key this process holds (the 409 fast path).
    let (layered, hot) = match variant.as_str() {
        "layer" => (true, false),
        "hot" => (true, true),
        "bare" => (false, false),
        other => {
            return Err(format!(
                "usage: profile_layer [layer|hot|bare] [requests per task]; got {other:?}"
            )
            .into());
        }
    };
    let runtime = match args.next().as_deref() {
        None | Some("current") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Some("multi") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        Some(other) => return Err(format!("runtime: current or multi; got {other:?}").into()),
    };
    runtime.block_on(async move {
        let client = Client::new(MemoryBackend::new());
        let mut app = Router::new().route("/k/{key}", get(handler));
        if layered {
            app = app.route_layer(LockLayer::new(client.clone(), FromPathParam::new("key")));
        }
        // As `axum::serve` does once per connection: the routes (and the layer's service) are
        // built here, not at every request.
        let app = app.with_state(());
        let held = if hot {
            Some(client.try_acquire("hot").await?)
        } else {
            None
        };
        let expect = if hot {
            http::StatusCode::CONFLICT
        } else {
            http::StatusCode::OK
        };
        let (started, allocations) = (Instant::now(), util::allocations());
        let cpu = util::self_cpu();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let app = app.clone();
            tasks.spawn(async move {
                for i in 0..per_task {
                    let uri = if hot {
                        "/k/hot".to_owned()
                    } else {
                        format!("/k/t{task}-{i}")
                    };
                    let request = http::Request::get(uri).body(axum::body::Body::empty())?;
                    let response = app.clone().oneshot(request).await?;
                    if response.status() != expect {
                        return Err(format!("status {}", response.status()).into());
                    }
                    response.into_body().collect().await?;
                    tokio::task::yield_now().await;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        if let Some(held) = held {
            held.release().await?;
        }
        while client.active_leases() > 0 {
            tokio::task::yield_now().await;
        }
        let requests = (TASKS * per_task) as f64;
        println!(
            "{variant}: {requests} requests, {:.2} us wall, {} CPU, {:.1} allocations per request",
            started.elapsed().as_secs_f64() * 1e6 / requests,
            match (cpu, util::self_cpu()) {
                (Ok(c0), Ok(c1)) =>
                    format!("{:.2} us", util::us(util::cpu_between(&c0, &c1)) / requests),
                _ => "(no CPU clock)".to_owned(),
            },
            (util::allocations() - allocations) as f64 / requests,
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
