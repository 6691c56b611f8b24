//! The performance benchmark: each figure measured side by side with its baseline in one run.
//!
//! ```sh
//! cargo run --release --all-features --example bench             # full: several minutes
//! cargo run --release --all-features --example bench -- --quick  # under a minute (CI)
//! cargo run --release --all-features --example bench -- --only 1,3
//! cargo run --release --all-features --example bench -- --cycles ours 1000  # for profilers
//! ```
//!
//! It prints a table, then one JSON line per figure:
//! `{"metric", "ours", "baseline", "unit", "ratio", "target", "met"}` (`ratio` = ours /
//! baseline; `met` is computed from the measurement; a figure that could not be measured has
//! `"met": false` and a `"skipped"` reason). An information figure has no target:
//! `"target": null, "met": null`, and "info" in the table's `met` column.
//!
//! 1. cycle latency (acquire + release through `Client`) vs the same two HTTP requests sent with
//!    `reqwest` on a warm pool, on fake-gcs-server and on the in-repo fake, 1 and 16 workers:
//!    ratio ≤ 1.10;
//! 2. client CPU per cycle vs that raw reqwest floor on fake-gcs-server, on a multi-thread and
//!    a current-thread runtime, 1 and 16 workers: ratio ≤ 1.10; and, as information, Python
//!    `dimutex` 1.3.1's CPU per cycle on the same server (`python_dimutex_cpu_per_cycle`);
//! 3. information: `LockLayer` throughput vs the same axum app without it (in-memory backend,
//!    64 connections), distinct keys and the local 409 fast path;
//! 4. 10,000 locks held by one client: heap per lock, refresh spread, idle CPU, shutdown;
//! 5. hand-over to a waiter in this process and in "another process" (another client);
//! 6. `IdempotencyLayer` latency, in process, of a first request (create + the record write)
//!    and of a replay (the create refused with 412 + one read of the record) vs the same HTTP
//!    requests sent with `reqwest`, on the servers of 1 and at 1 and 16 workers: ratio ≤ 1.10.
//!
//! The exit status is a failure only when a section could not run; a missed target shows in
//! the table and the JSON, and an information figure never counts either way.
//!
//! Servers: fake-gcs-server from `FAKE_GCS_SERVER_BIN` or `.ci-cache/env` (or the emulator of
//! `STORAGE_EMULATOR_HOST` + `DIMUTEX_BUCKET` when both are set); the in-repo fake in a child
//! process (this binary, `--serve-fake`); Python from `DIMUTEX_PYTHON` or `.ci-cache/env`
//! (`bash .ci/setup-python.sh` makes both; without Python only its figures are skipped). Every
//! server is another process, so this process's CPU time and heap are the client's. Linux only
//! (CPU time and RSS come from /proc).

#[path = "bench/cycle.rs"]
mod cycle;
#[path = "bench/handover.rs"]
mod handover;
#[path = "bench/idempotency.rs"]
mod idempotency;
#[path = "bench/middleware.rs"]
mod middleware;
#[path = "bench/scale.rs"]
mod scale;
#[path = "bench/servers.rs"]
mod servers;
#[path = "bench/util.rs"]
mod util;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use util::{Figure, Goal};

#[global_allocator]
static ALLOC: util::CountingAlloc = util::CountingAlloc;

struct Settings {
    quick: bool,
    only: Option<Vec<u32>>,
}

const USAGE: &str = "usage: bench [--quick] [--only N[,N..]]   (sections 1-6)\n       bench --cycles ours|floor N   (N cycles of one kind alone, for profilers)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut settings = Settings {
        quick: false,
        only: None,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--serve-fake" => return servers::serve_fake_child(),
            "--cycles" => return cycles_alone(args.next(), args.next()),
            "--quick" => settings.quick = true,
            "--only" => {
                let list = args.next().unwrap_or_default();
                match list
                    .split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(v) if v.iter().all(|n| (1..=6).contains(n)) => settings.only = Some(v),
                    _ => {
                        eprintln!("{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(settings))
}

/// `--cycles ours|floor N`: see [`cycle::alone`].
fn cycles_alone(kind: Option<String>, n: Option<String>) -> ExitCode {
    let ours = match kind.as_deref() {
        Some("ours") => true,
        Some("floor") => false,
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(n) = n.and_then(|n| n.parse::<usize>().ok()) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(util::BoxError::from)
        .and_then(|rt| rt.block_on(cycle::alone(ours, n)));
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench --cycles: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Collects figures and notes; a failed section becomes "missing" figures and an error.
struct Report {
    figures: Vec<Figure>,
    notes: Vec<String>,
    errors: Vec<String>,
}

impl Report {
    fn add(&mut self, figures: Vec<Figure>, notes: Vec<String>) {
        for f in &figures {
            eprintln!("  {}", f.json());
        }
        self.figures.extend(figures);
        self.notes.extend(notes);
    }

    fn skip(&mut self, metrics: &[(&str, &'static str, Goal)], why: &str) {
        eprintln!("  skipped: {why}");
        for (metric, unit, goal) in metrics {
            self.figures
                .push(Figure::missing(*metric, unit, *goal, why.to_owned()));
        }
    }

    fn fail(&mut self, metrics: &[(&str, &'static str, Goal)], section: &str, e: &util::BoxError) {
        let why = format!("{section} failed: {e}");
        eprintln!("  ERROR: {why}");
        self.errors.push(why.clone());
        for (metric, unit, goal) in metrics {
            self.figures
                .push(Figure::missing(*metric, unit, *goal, why.clone()));
        }
    }
}

async fn run(settings: Settings) -> ExitCode {
    let quick = settings.quick;
    let wants = |n: u32| settings.only.as_ref().is_none_or(|v| v.contains(&n));
    let started = Instant::now();
    let machine = format!(
        "{} CPUs ({}), {} mode",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        if quick { "quick" } else { "full" }
    );
    eprintln!("dimutex bench: {machine}");
    let mut report = Report {
        figures: Vec::new(),
        notes: Vec::new(),
        errors: Vec::new(),
    };

    let emulator = if wants(1) || wants(2) || wants(6) {
        match servers::Emulator::start().await {
            Ok(e) => {
                eprintln!(
                    "fake-gcs-server role: {} at {}",
                    e.target.label, e.target.endpoint
                );
                Some(Ok(e))
            }
            Err(why) => Some(Err(why)),
        }
    } else {
        None
    };
    let inrepo = if wants(1) || wants(5) || wants(6) {
        match servers::ChildFake::start() {
            Ok(f) => Some(Ok(f)),
            Err(e) => Some(Err(e)),
        }
    } else {
        None
    };

    // The servers of the latency figures (1 and 6), or why one is missing.
    let mut targets = Vec::new();
    match &emulator {
        Some(Ok(e)) => targets.push(Ok(e.target.clone())),
        Some(Err(why)) => targets.push(Err(("fgcs", why.clone()))),
        None => {}
    }
    match &inrepo {
        Some(Ok(f)) => targets.push(Ok(f.target.clone())),
        Some(Err(e)) => targets.push(Err(("inrepo", format!("in-repo fake: {e}")))),
        None => {}
    }

    // 1. Cycle latency vs the two-request floor.
    if wants(1) {
        eprintln!("[1] cycle latency vs the reqwest floor");
        let plan = |c: usize| cycle::LatencyPlan {
            // Fresh connections every round (see `cycle::latency`): more, shorter rounds.
            rounds: if quick { 3 } else { 20 },
            per_worker: match (quick, c) {
                (true, 1) => 100,
                (true, _) => 15,
                (false, 1) => 150,
                (false, _) => 30,
            },
        };
        for target in &targets {
            for c in [1, 16] {
                match target {
                    Ok(t) => match cycle::latency(t, c, &plan(c)).await {
                        Ok((f, note)) => report.add(vec![f], vec![note]),
                        Err(e) => report.fail(
                            &[(
                                &format!("cycle_latency_p50 {} c={c}", t.label),
                                "us",
                                Goal::RatioAtMost(1.10),
                            )],
                            "cycle latency",
                            &e,
                        ),
                    },
                    Err((label, why)) => report.skip(
                        &[(
                            &format!("cycle_latency_p50 {label} c={c}"),
                            "us",
                            Goal::RatioAtMost(1.10),
                        )],
                        why,
                    ),
                }
            }
        }
    }

    // 2. CPU per cycle vs the two-request floor; Python dimutex's as information.
    if wants(2) {
        eprintln!("[2] client CPU per cycle vs the reqwest floor (and Python dimutex's)");
        let plan = cycle::CpuPlan {
            // Per-round ratios of this VM spread by about ±0.1, and two full runs' ratios by
            // up to ±0.07 with 12 rounds: 36 rounds of 500 cycles (about 2 minutes).
            cycles: if quick { 400 } else { 18000 },
            rounds: if quick { 2 } else { 36 },
        };
        let python = servers::python();
        for c in [1, 16] {
            let mt = format!("cpu_per_cycle c={c} multi-thread rt");
            let ct = format!("cpu_per_cycle c={c} current-thread rt");
            let py = format!("python_dimutex_cpu_per_cycle c={c}");
            let spec = [
                (mt.as_str(), "us CPU", Goal::RatioAtMost(1.10)),
                (ct.as_str(), "us CPU", Goal::RatioAtMost(1.10)),
                (py.as_str(), "us CPU", Goal::Info),
            ];
            match &emulator {
                Some(Ok(e)) => {
                    let python = python.as_deref().map_err(String::as_str);
                    match cycle::cpu(&e.target, python, c, &plan).await {
                        Ok((f, note)) => report.add(f, vec![note]),
                        Err(err) => report.fail(&spec, "client CPU", &err),
                    }
                }
                Some(Err(why)) => report.skip(&spec, why),
                None => {}
            }
        }
    }
    // Kept for 6 only.
    let emulator = emulator.filter(|_| wants(6));

    // 3. Middleware overhead on the in-memory backend: information, no target.
    if wants(3) {
        eprintln!("[3] LockLayer overhead in an axum app (in-memory backend; information)");
        let plan = middleware::Plan {
            connections: 64,
            // Per-round ratios on this kind of shared VM spread by about ±0.1 whatever the
            // round's length: only more rounds narrow a run's figure (20: about ±0.02).
            rounds: if quick { 1 } else { 20 },
            round: Duration::from_millis(if quick { 1000 } else { 1500 }),
            warmup: Duration::from_millis(if quick { 300 } else { 1000 }),
            in_process_calls: if quick { 20_000 } else { 200_000 },
        };
        match middleware::run(&plan).await {
            Ok((f, n)) => report.add(f, n),
            Err(e) => report.fail(
                &[
                    ("layer_rps distinct keys", "req/s", Goal::Info),
                    ("layer_rps local fast path 409", "req/s", Goal::Info),
                ],
                "middleware",
                &e,
            ),
        }
    }

    // 4. Scale.
    if wants(4) {
        eprintln!("[4] many locks held by one client");
        let plan = if quick {
            scale::Plan {
                locks: 1000,
                ttl: Duration::from_secs(6),
                window: Duration::from_secs(6),
                acquire_concurrency: 64,
                floor_window: Duration::from_secs(2),
            }
        } else {
            scale::Plan {
                locks: 10_000,
                ttl: Duration::from_secs(60),
                window: Duration::from_secs(60),
                acquire_concurrency: 64,
                floor_window: Duration::from_secs(10),
            }
        };
        match scale::run(&plan).await {
            Ok((f, n)) => report.add(f, n),
            Err(e) => report.fail(
                &[
                    ("scale_heap_per_lock", "B", Goal::AtMost(2048.0)),
                    (
                        "scale_refresh_busiest_second",
                        "req/s",
                        Goal::RatioAtMost(2.0),
                    ),
                    ("scale_idle_cpu", "% core", Goal::AtMost(5.0)),
                    ("scale_shutdown_objects_left", "objects", Goal::Equals(0.0)),
                ],
                "scale",
                &e,
            ),
        }
    }

    // 5. Hand-over.
    if wants(5) {
        eprintln!("[5] hand-over with the wait policy");
        let plan = handover::Plan {
            local_trials: if quick { 30 } else { 300 },
            remote_trials: if quick { 3 } else { 12 },
        };
        let spec = [
            ("handover_local_p50", "ms", Goal::AtMost(1.0)),
            ("handover_local_p99", "ms", Goal::AtMost(1.0)),
            ("handover_remote_max", "ms", Goal::RatioAtMost(1.0)),
        ];
        match &inrepo {
            Some(Ok(f)) => match handover::run(&f.target, &plan).await {
                Ok((f, n)) => report.add(f, n),
                Err(e) => report.fail(&spec, "hand-over", &e),
            },
            Some(Err(e)) => report.skip(&spec, &format!("in-repo fake: {e}")),
            None => {}
        }
    }

    // 6. The idempotency layer's first request and replay vs the floor of the same requests.
    if wants(6) {
        eprintln!("[6] idempotency layer vs the reqwest floor");
        let plan = |c: usize| cycle::LatencyPlan {
            rounds: if quick { 3 } else { 12 },
            per_worker: match (quick, c) {
                (true, 1) => 60,
                (true, _) => 10,
                (false, 1) => 120,
                (false, _) => 25,
            },
        };
        for target in &targets {
            for c in [1, 16] {
                for kind in [idempotency::Kind::First, idempotency::Kind::Replay] {
                    match target {
                        Ok(t) => match idempotency::latency(t, kind, c, &plan(c)).await {
                            Ok((f, note)) => report.add(vec![f], vec![note]),
                            Err(e) => report.fail(
                                &[(
                                    &kind.metric(cycle::short_label(&t.label), c),
                                    "us",
                                    Goal::RatioAtMost(1.10),
                                )],
                                "idempotency latency",
                                &e,
                            ),
                        },
                        Err((label, why)) => report.skip(
                            &[(&kind.metric(label, c), "us", Goal::RatioAtMost(1.10))],
                            why,
                        ),
                    }
                }
            }
        }
    }
    drop(emulator);
    drop(inrepo);

    println!(
        "dimutex bench — {machine}; took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!();
    print!("{}", util::table(&report.figures));
    println!();
    for note in &report.notes {
        println!("note: {note}");
    }
    for f in report.figures.iter().filter(|f| f.missing.is_some()) {
        println!(
            "skipped: {}: {}",
            f.metric,
            f.missing.as_deref().unwrap_or("")
        );
    }
    println!();
    for f in &report.figures {
        println!("{}", f.json());
    }
    if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
