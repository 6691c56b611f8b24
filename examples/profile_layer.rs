//! The layer's cost per request, in-process, for profilers: an axum app served by
//! `tower::ServiceExt::oneshot` from 64 tasks on a current-thread runtime (no sockets, no load
//! generator), with and without `LockLayer`, on the in-memory backend. It prints the CPU time
//! and heap allocations per request of the chosen variant.
//!
//! ```text
//! cargo build --release --example profile_layer
//! target/release/examples/profile_layer layer 300      # or: bare 300
//! valgrind --tool=callgrind target/release/examples/profile_layer layer 300
//! ```
//!
//! With callgrind, instructions per request = the total / (64 × the count given), start-up
//! included (a few hundred thousand instructions).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::routing::get;
use dimutex::Client;
use dimutex::backend::MemoryBackend;
use dimutex::layer::{FromPathParam, LockLayer};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Counts allocations; the system allocator does the work.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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
    let layered = match variant.as_str() {
        "layer" => true,
        "bare" => false,
        other => {
            return Err(format!(
                "usage: profile_layer [layer|bare] [requests per task]; got {other:?}"
            )
            .into());
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = Client::new(MemoryBackend::new());
        let mut app = Router::new().route("/k/{key}", get(handler));
        if layered {
            app = app.route_layer(LockLayer::new(client.clone(), FromPathParam::new("key")));
        }
        let (started, allocations) = (Instant::now(), ALLOCATIONS.load(Ordering::Relaxed));
        let cpu = cpu_time();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let app = app.clone();
            tasks.spawn(async move {
                for i in 0..per_task {
                    let request = http::Request::get(format!("/k/t{task}-{i}"))
                        .body(axum::body::Body::empty())?;
                    let response = app.clone().oneshot(request).await?;
                    if response.status() != http::StatusCode::OK {
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
        while client.active_leases() > 0 {
            tokio::task::yield_now().await;
        }
        let requests = (TASKS * per_task) as f64;
        println!(
            "{variant}: {requests} requests, {:.2} us wall, {} CPU, {:.1} allocations per request",
            started.elapsed().as_secs_f64() * 1e6 / requests,
            cpu.map_or("(no CPU clock)".to_owned(), |c0| format!(
                "{:.2} us",
                (cpu_time().unwrap_or(c0) - c0) * 1e6 / requests
            )),
            (ALLOCATIONS.load(Ordering::Relaxed) - allocations) as f64 / requests,
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// This process's user + system CPU time in seconds (Linux: `/proc/self/stat`).
fn cpu_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
