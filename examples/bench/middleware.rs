//! Section 3: the cost of `LockLayer` in an axum app on the in-memory backend. Information
//! only, without a target: on GCS every lock costs two network round trips, which dwarf what
//! is measured here, and no user sees the in-memory figure.
//!
//! Two apps serve `GET /k/{key}` with the same handler on 127.0.0.1: `bare` without the layer,
//! `layer` with `route_layer(LockLayer::new(client, FromPathParam::new("key")))`. A load loop
//! of our own (raw HTTP/1.1 keep-alive on 64 connections, on its own thread and runtime) drives
//! them in alternating rounds:
//! - distinct keys (`/k/{conn}-{seq}`): every request takes and releases its own lock;
//! - the local fast path (`/k/hot`, a key this process holds): every request is a 409 decided
//!   without a backend request; compared with the bare app on the same path.
//!
//! A third app, `raw writes`, is a floor for any lock on this backend: its handler sends the
//! two writes of a lock cycle (create with the three metadata fields, delete) to the
//! `MemoryBackend` directly, with no client, no lease and no layer. Its rate is reported in
//! the notes, next to the bare app's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use dimutex::Client;
use dimutex::backend::MemoryBackend;
use dimutex::layer::{FromPathParam, LockLayer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::util::{Figure, Goal, Result};

pub struct Plan {
    pub connections: usize,
    pub rounds: usize,
    pub round: Duration,
    pub warmup: Duration,
    /// Requests per variant of the in-process (no network) cost diagnostic.
    pub in_process_calls: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    Distinct,
    Hot,
}

#[derive(Debug, Default)]
struct Load {
    ok: u64,
    unexpected: u64,
    elapsed: Duration,
}

async fn handler() -> &'static str {
    "ok"
}

/// The two backend writes of a lock cycle and nothing else (the floor of any lock here).
async fn raw_writes(
    axum::extract::State(backend): axum::extract::State<MemoryBackend>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> &'static str {
    use dimutex::backend::{Backend, Metadata};
    let md = Metadata::from([
        ("ttl".into(), "30".to_owned()),
        (
            "owner".into(),
            format!("bench#{:032x}", rand::random::<u128>()),
        ),
        (
            "expires".into(),
            "2030-01-01 00:00:00.000000 UTC".to_owned(),
        ),
    ]);
    let name = format!("raw/{key}");
    match backend.create(&name, &md).await {
        Ok(reply) => match backend.release(&name, reply.value().version()).await {
            Ok(_) => "ok",
            Err(_) => "release failed",
        },
        Err(_) => "create failed",
    }
}

async fn serve(app: Router) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

pub async fn run(plan: &Plan) -> Result<(Vec<Figure>, Vec<String>)> {
    let backend = MemoryBackend::new();
    let client = Client::new(backend.clone());
    let bare = serve(Router::new().route("/k/{key}", get(handler))).await?;
    let layered = serve(
        Router::new()
            .route("/k/{key}", get(handler))
            .route_layer(LockLayer::new(client.clone(), FromPathParam::new("key"))),
    )
    .await?;
    let raw = serve(
        Router::new()
            .route("/k/{key}", get(raw_writes))
            .with_state(backend.clone()),
    )
    .await?;
    let hot = client.try_acquire("hot").await?;
    let diagnostic = in_process_costs(&client, &backend, plan.in_process_calls).await?;

    let variants = [
        ("bare distinct", bare, Keys::Distinct, 200),
        ("layer distinct", layered, Keys::Distinct, 200),
        ("bare hot", bare, Keys::Hot, 200),
        ("layer hot", layered, Keys::Hot, 409),
        ("raw writes distinct", raw, Keys::Distinct, 200),
    ];
    for (_, addr, keys, status) in variants {
        load(addr, plan.connections, plan.warmup, keys, status).await?;
    }
    let mut totals: Vec<Load> = variants.iter().map(|_| Load::default()).collect();
    let mut per_round: Vec<Vec<f64>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds {
        // Alternate the order so no variant always runs first.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..variants.len()).collect()
        } else {
            (0..variants.len()).rev().collect()
        };
        for i in order {
            let (_, addr, keys, status) = variants[i];
            let l = load(addr, plan.connections, plan.round, keys, status).await?;
            per_round[i].push(l.ok as f64 / l.elapsed.as_secs_f64());
            totals[i].ok += l.ok;
            totals[i].unexpected += l.unexpected;
            totals[i].elapsed += l.elapsed;
        }
    }
    let bad: Vec<String> = variants
        .iter()
        .zip(&totals)
        .filter(|(_, t)| t.unexpected > 0)
        .map(|((name, ..), t)| format!("{name}: {} unexpected statuses", t.unexpected))
        .collect();
    if !bad.is_empty() {
        return Err(bad.join("; ").into());
    }
    hot.release().await?;
    client.shutdown(Duration::from_secs(10)).await?;
    let rps: Vec<f64> = totals
        .iter()
        .map(|t| t.ok as f64 / t.elapsed.as_secs_f64())
        .collect();
    let figures = vec![
        Figure::new(
            format!("layer_rps distinct keys, {} conns", plan.connections),
            rps[1],
            Some(rps[0]),
            "req/s",
            Goal::Info,
        ),
        Figure::new(
            format!("layer_rps local fast path 409, {} conns", plan.connections),
            rps[3],
            Some(rps[2]),
            "req/s",
            Goal::Info,
        ),
    ];
    let notes = vec![
        format!(
            "middleware floor: the same app whose handler sends the two backend writes itself (no client, no lease, no layer): {:.0} req/s = {:.3} of the bare app; the layer reaches {:.3} of it",
            rps[4],
            rps[4] / rps[0],
            rps[1] / rps[4],
        ),
        format!(
            "middleware: {} rounds x {:?} per variant, {} connections; req/s per round: {}; objects left in the memory backend: {}",
            plan.rounds,
            plan.round,
            plan.connections,
            variants
                .iter()
                .zip(&per_round)
                .map(|((name, ..), r)| {
                    let r: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
                    format!("{name} {}", r.join("/"))
                })
                .collect::<Vec<_>>()
                .join(", "),
            backend.object_count(),
        ),
        format!(
            "middleware per-round ratios (rounds paired in time): layer/bare distinct {}, 409/bare {}",
            spread(&per_round[1], &per_round[0]),
            spread(&per_round[3], &per_round[2]),
        ),
        diagnostic,
    ];
    Ok((figures, notes))
}

/// The spread of the per-round ratios `ours[i] / base[i]`: min, median, max, and the standard
/// error of their mean (how far a run's figure may sit from the true ratio).
fn spread(ours: &[f64], base: &[f64]) -> String {
    use super::util::{median, percentile};
    let r: Vec<f64> = ours.iter().zip(base).map(|(o, b)| o / b).collect();
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    format!(
        "min {:.3} median {:.3} max {:.3} (standard error of the mean {:.3})",
        percentile(&r, 0.0),
        median(&r),
        percentile(&r, 100.0),
        (var / n).sqrt(),
    )
}

/// Drives `addr` with `connections` keep-alive connections for `duration`, on a thread and
/// current-thread runtime of its own.
async fn load(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    keys: Keys,
    expect: u16,
) -> Result<Load> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    let start = Instant::now();
                    let deadline = start + duration;
                    let mut tasks = Vec::new();
                    for c in 0..connections {
                        tasks.push(tokio::spawn(connection(addr, c, deadline, keys, expect)));
                    }
                    let mut total = Load::default();
                    for t in tasks {
                        let (ok, unexpected) = t
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                        total.ok += ok;
                        total.unexpected += unexpected;
                    }
                    total.elapsed = start.elapsed();
                    Ok(total)
                })
            });
        let _ = tx.send(result);
    });
    Ok(rx.await?.map_err(|e| format!("load generator: {e}"))?)
}

async fn connection(
    addr: SocketAddr,
    c: usize,
    deadline: Instant,
    keys: Keys,
    expect: u16,
) -> std::io::Result<(u64, u64)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut request = String::with_capacity(128);
    let (mut ok, mut unexpected) = (0u64, 0u64);
    let mut seq = 0u64;
    let epoch = rand::random::<u32>();
    while Instant::now() < deadline {
        request.clear();
        match keys {
            Keys::Distinct => {
                use std::fmt::Write;
                let _ = write!(
                    request,
                    "GET /k/{epoch:08x}-{c}-{seq} HTTP/1.1\r\nHost: bench\r\n\r\n"
                );
            }
            Keys::Hot => request.push_str("GET /k/hot HTTP/1.1\r\nHost: bench\r\n\r\n"),
        }
        seq += 1;
        stream.write_all(request.as_bytes()).await?;
        let status = read_response(&mut stream, &mut buf).await?;
        if status == expect {
            ok += 1;
        } else {
            unexpected += 1;
        }
    }
    Ok((ok, unexpected))
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body); its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(std::io::Error::other)?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut length = None;
    let mut chunked = false;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    loop {
        let complete = match (length, chunked) {
            (Some(n), _) => buf.len() >= head_end + n,
            (None, true) => buf[head_end..].ends_with(b"0\r\n\r\n"),
            (None, false) => true,
        };
        if complete {
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The process CPU time and allocations per request of each variant called in-process with
/// `tower::ServiceExt::oneshot` (no sockets): the user-space cost the layer adds, lease tasks
/// included.
async fn in_process_costs(client: &Client, backend: &MemoryBackend, calls: u64) -> Result<String> {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    // `with_state` builds the routes (and the layer's service) once, as `axum::serve` does for
    // each connection; a router without it builds them at every request.
    let bare = Router::new().route("/k/{key}", get(handler)).with_state(());
    let layered = Router::new()
        .route("/k/{key}", get(handler))
        .route_layer(LockLayer::new(client.clone(), FromPathParam::new("key")))
        .with_state(());
    let raw = Router::new()
        .route("/k/{key}", get(raw_writes))
        .with_state(backend.clone());
    let mut out = Vec::new();
    for (name, app, hot) in [
        ("bare", &bare, false),
        ("raw writes", &raw, false),
        ("layer distinct", &layered, false),
        ("layer 409", &layered, true),
    ] {
        let epoch = rand::random::<u32>();
        let call = |i: u64| {
            let app = app.clone();
            async move {
                let uri = if hot {
                    "/k/hot".to_owned()
                } else {
                    format!("/k/ip{epoch:08x}-{i}")
                };
                let request = http::Request::get(uri).body(axum::body::Body::empty())?;
                let response = app.oneshot(request).await?;
                response.into_body().collect().await?;
                Ok::<_, super::util::BoxError>(())
            }
        };
        for i in 0..calls / 10 {
            call(i).await?;
        }
        let (cpu0, allocs0) = (super::util::self_cpu()?, super::util::allocations());
        for i in 0..calls {
            call(i + calls).await?;
        }
        // Let the lease tasks finish their releases before reading the CPU time.
        while client.active_leases() > 1 {
            tokio::task::yield_now().await;
        }
        let (cpu1, allocs1) = (super::util::self_cpu()?, super::util::allocations());
        let cpu = super::util::cpu_between(&cpu0, &cpu1);
        out.push(format!(
            "{name} {:.2} us CPU, {:.1} allocations",
            super::util::us(cpu) / calls as f64,
            (allocs1 - allocs0) as f64 / calls as f64
        ));
    }
    Ok(format!(
        "middleware in-process (oneshot, no sockets) per request: {}",
        out.join("; ")
    ))
}
