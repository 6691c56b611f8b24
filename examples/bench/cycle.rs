//! Targets 1 and 2: the acquire+release cycle.
//!
//! - Latency: `Client::try_acquire` + `LockGuard::release` through `GcsBackend`, versus the
//!   floor — the same two requests (multipart create with `ifGenerationMatch=0`, then the
//!   conditional DELETE) sent directly with `reqwest` on a warm pool. Rounds alternate floor
//!   and ours; the figure is the ratio of the medians of all cycle latencies.
//! - CPU: user+sys CPU per cycle of this process (the client only: every server is another
//!   process) versus the same floor, in rounds that alternate ours and the floor; and, as
//!   information without a target, the CPU per cycle of the Python `dimutex` driver process
//!   on the same server, cycles and concurrency.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dimutex::Client;
use dimutex::backend::GcsBackend;
use serde::Deserialize;

use super::servers::{GcsTarget, PyDriver};
use super::util::{self, Figure, Goal, Result};

const BOUNDARY: &str = "dimutex-7a1c3f0e9b2d4c86";

/// Our client on `target`, with default settings and the object prefix `bench/`.
pub async fn our_client(target: &GcsTarget) -> Result<Client> {
    let backend = GcsBackend::builder(&target.bucket)
        .endpoint(&target.endpoint)
        .anonymous()
        .build()
        .await?;
    Ok(Client::builder(backend).prefix("bench/").build()?)
}

/// The two requests of a lock cycle, sent directly: the floor we compare with.
pub struct Floor {
    http: reqwest::Client,
    upload_url: String,
    objects_url: String,
    expires: String,
}

#[derive(Deserialize)]
struct Created {
    generation: serde_json::Value,
}

impl Floor {
    pub fn new(target: &GcsTarget) -> Result<Floor> {
        Ok(Floor {
            http: reqwest::Client::builder().build()?,
            upload_url: format!(
                "{}/upload/storage/v1/b/{}/o",
                target.endpoint, target.bucket
            ),
            objects_url: format!("{}/storage/v1/b/{}/o/", target.endpoint, target.bucket),
            expires: "2030-01-01 00:00:00.000000 UTC".into(),
        })
    }

    /// The create: the same multipart upload (same metadata fields) as the client's.
    pub async fn create(&self, name: &str) -> Result<i64> {
        let resource = serde_json::json!({
            "name": name,
            "cacheControl": "no-store",
            "contentType": "text/plain",
            "metadata": {
                "ttl": "30",
                "owner": format!("bench-floor:1#{:032x}", rand::random::<u128>()),
                "expires": self.expires,
            },
        });
        let body = format!(
            "--{BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nlock\r\n--{BOUNDARY}--\r\n"
        );
        let response = self
            .http
            .post(&self.upload_url)
            .query(&[("uploadType", "multipart"), ("ifGenerationMatch", "0")])
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/related; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            return Err(format!("floor create {name}: HTTP {status}").into());
        }
        let created: Created = serde_json::from_slice(&bytes)?;
        let generation = match &created.generation {
            serde_json::Value::String(s) => s.parse()?,
            v => v.as_i64().ok_or("generation is not an integer")?,
        };
        Ok(generation)
    }

    /// The release: DELETE conditional on the generation and (when given) metageneration.
    pub async fn delete(&self, name: &str, generation: i64, meta: Option<i64>) -> Result<()> {
        let mut query = vec![("ifGenerationMatch", generation.to_string())];
        if let Some(m) = meta {
            query.push(("ifMetagenerationMatch", m.to_string()));
        }
        let response = self
            .http
            .delete(format!("{}{}", self.objects_url, name.replace('/', "%2F")))
            .query(&query)
            .send()
            .await?;
        let status = response.status();
        response.bytes().await?;
        if !status.is_success() {
            return Err(format!("floor delete {name}: HTTP {status}").into());
        }
        Ok(())
    }

    /// A refresh: PATCH of the `expires` metadata, conditional on the generation.
    pub async fn patch(&self, name: &str, generation: i64) -> Result<()> {
        let body = serde_json::json!({ "metadata": { "expires": self.expires } }).to_string();
        let response = self
            .http
            .patch(format!("{}{}", self.objects_url, name.replace('/', "%2F")))
            .query(&[("ifGenerationMatch", generation.to_string())])
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        response.bytes().await?;
        if !status.is_success() {
            return Err(format!("floor patch {name}: HTTP {status}").into());
        }
        Ok(())
    }

    pub async fn cycle(&self, name: &str) -> Result<Duration> {
        let t = Instant::now();
        let generation = self.create(name).await?;
        self.delete(name, generation, Some(1)).await?;
        Ok(t.elapsed())
    }
}

pub async fn our_cycle(client: &Client, key: &str) -> Result<Duration> {
    let t = Instant::now();
    let guard = client.try_acquire(key).await?;
    guard.release().await?;
    Ok(t.elapsed())
}

/// Runs `per_worker` cycles in each of `workers` tasks (worker `i` on its own key); all cycle
/// latencies.
pub async fn run_workers<F, Fut>(workers: usize, per_worker: usize, f: F) -> Result<Vec<Duration>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Duration>> + Send + 'static,
{
    let f = Arc::new(f);
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                out.push(f(w).await?);
            }
            Ok::<_, util::BoxError>(out)
        }));
    }
    let mut all = Vec::with_capacity(workers * per_worker);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

fn ours_runner(
    client: &Client,
    tag: &'static str,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = Result<Duration>> + Send>>
+ Send
+ Sync
+ 'static {
    let client = client.clone();
    move |w| {
        let client = client.clone();
        Box::pin(async move { our_cycle(&client, &format!("{tag}-w{w}")).await })
    }
}

fn floor_runner(
    floor: &Arc<Floor>,
    tag: &'static str,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = Result<Duration>> + Send>>
+ Send
+ Sync
+ 'static {
    let floor = floor.clone();
    move |w| {
        let floor = floor.clone();
        Box::pin(async move { floor.cycle(&format!("bench-floor/{tag}-w{w}")).await })
    }
}

/// `bench --cycles ours|floor N`: `n` cycles of one kind alone, on a current-thread runtime
/// against fake-gcs-server, after 50 cycles of each kind (so that both kinds' code has run
/// once in every run); the CPU per cycle. For profilers: under `valgrind --tool=cachegrind`
/// or `perf`, two runs of one kind with different `n` give per-cycle figures by difference.
pub async fn alone(ours: bool, n: usize) -> Result<String> {
    let emulator = super::servers::Emulator::start().await?;
    let client = our_client(&emulator.target).await?;
    let floor = Arc::new(Floor::new(&emulator.target)?);
    run_workers(1, 50, ours_runner(&client, "alone")).await?;
    run_workers(1, 50, floor_runner(&floor, "alone")).await?;
    let run = if ours {
        cpu_of(1, n, ours_runner(&client, "alone")).await?
    } else {
        cpu_of(1, n, floor_runner(&floor, "alone")).await?
    };
    client.shutdown(Duration::from_secs(10)).await?;
    Ok(format!(
        "{} cycles of {}: {:.1} us CPU per cycle",
        n,
        if ours { "ours" } else { "the floor" },
        util::us(run.cpu) / n.max(1) as f64
    ))
}

#[derive(Clone, Copy)]
pub struct LatencyPlan {
    pub rounds: usize,
    /// Cycles per worker per round.
    pub per_worker: usize,
}

/// Target 1 on one server at one concurrency, ours and the floor alike on a current-thread
/// runtime of their own. On the bench's two-worker runtime, whether a connection's task shares
/// a worker with the cycle's task shifts every cycle on that connection by tens of
/// microseconds, one way or the other, for as long as the connection lives: the medians of
/// that runtime jumped by up to ±40 % between runs on the same code (per-round medians of
/// 110 µs next to 380 µs).
pub async fn latency(
    target: &GcsTarget,
    concurrency: usize,
    plan: &LatencyPlan,
) -> Result<(Figure, String)> {
    let (target, plan) = (target.clone(), *plan);
    on_current_thread(move || async move { latency_here(&target, concurrency, &plan).await }).await
}

async fn latency_here(
    target: &GcsTarget,
    concurrency: usize,
    plan: &LatencyPlan,
) -> Result<(Figure, String)> {
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let mut round_medians = Vec::new();
    for round in 0..plan.rounds {
        // Fresh pools every round: the server's runtime places each connection too (see
        // `latency`); new connections each round average that over many placements instead
        // of drawing it once per run.
        let client = our_client(target).await?;
        let floor = Arc::new(Floor::new(target)?);
        // Warm both pools (one connection per worker) and both code paths.
        run_workers(concurrency, 3, floor_runner(&floor, "lat")).await?;
        run_workers(concurrency, 3, ours_runner(&client, "lat")).await?;
        let floor_run = run_workers(concurrency, plan.per_worker, floor_runner(&floor, "lat"));
        let ours_run = run_workers(concurrency, plan.per_worker, ours_runner(&client, "lat"));
        let (o, b) = if round % 2 == 0 {
            let b = floor_run.await?;
            (ours_run.await?, b)
        } else {
            let o = ours_run.await?;
            (o, floor_run.await?)
        };
        client.shutdown(Duration::from_secs(10)).await?;
        let (o, b): (Vec<f64>, Vec<f64>) = (
            o.into_iter().map(util::us).collect(),
            b.into_iter().map(util::us).collect(),
        );
        round_medians.push(format!("{:.0}/{:.0}", util::median(&o), util::median(&b)));
        ours.extend(o);
        base.extend(b);
    }
    let figure = Figure::new(
        format!(
            "cycle_latency_p50 {} c={concurrency}",
            short_label(&target.label)
        ),
        util::median(&ours),
        Some(util::median(&base)),
        "us",
        Goal::RatioAtMost(1.10),
    );
    let note = format!(
        "{} c={concurrency}: {} cycles each in {} rounds; p90 ours {:.0} us vs floor {:.0} us; p99 ours {:.0} us vs floor {:.0} us; round medians ours/floor (us): {}",
        target.label,
        ours.len(),
        plan.rounds,
        util::percentile(&ours, 90.0),
        util::percentile(&base, 90.0),
        util::percentile(&ours, 99.0),
        util::percentile(&base, 99.0),
        round_medians.join(" "),
    );
    Ok((figure, note))
}

fn short_label(label: &str) -> &str {
    match label {
        "fake-gcs-server" => "fgcs",
        "in-repo fake" => "inrepo",
        other => other,
    }
}

/// The CPU time of this process over some cycles: the total, and its kernel part.
#[derive(Debug, Clone, Copy, Default)]
struct CpuRun {
    cpu: Duration,
    /// /proc/PID/stat's total and system times (10 ms resolution), for the system share.
    stat: Duration,
    stat_sys: Duration,
    /// Heap allocations made meanwhile (all threads).
    allocations: usize,
}

impl CpuRun {
    fn add(&mut self, other: CpuRun) {
        self.cpu += other.cpu;
        self.stat += other.stat;
        self.stat_sys += other.stat_sys;
        self.allocations += other.allocations;
    }

    fn sys_share(&self) -> f64 {
        if self.stat.is_zero() {
            f64::NAN
        } else {
            self.stat_sys.as_secs_f64() / self.stat.as_secs_f64()
        }
    }
}

/// CPU time of this process while `runner` runs `cycles` cycles at `concurrency` (ours or
/// the floor's, whichever it runs).
async fn cpu_of<F, Fut>(concurrency: usize, cycles: usize, runner: F) -> Result<CpuRun>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Duration>> + Send + 'static,
{
    let (before, allocations) = (util::self_cpu()?, util::allocations());
    run_workers(concurrency, cycles / concurrency, runner).await?;
    let (after, allocations) = (util::self_cpu()?, util::allocations() - allocations);
    let (stat, stat_sys) = util::stat_times(&before, &after);
    Ok(CpuRun {
        cpu: util::cpu_between(&before, &after),
        stat,
        stat_sys,
        allocations,
    })
}

/// The CPU of one configuration: ours, the floor, and the floor measured a second time (how
/// far two measurements of the same code differ within the run: the figure's noise).
#[derive(Debug, Clone, Copy, Default)]
struct CpuRuns {
    ours: CpuRun,
    floor: CpuRun,
    floor_again: CpuRun,
}

/// Ours and the floor (twice), `cycles` each at `concurrency`, in `rounds` rounds of a
/// rotating order (a multiple of 3 gives each arm each place equally often): the CPU time of
/// each, summed over the rounds.
async fn cpu_runs(
    target: &GcsTarget,
    concurrency: usize,
    cycles: usize,
    rounds: usize,
) -> Result<CpuRuns> {
    let client = our_client(target).await?;
    let floor = Arc::new(Floor::new(target)?);
    run_workers(concurrency, 5, ours_runner(&client, "cpu")).await?;
    run_workers(concurrency, 5, floor_runner(&floor, "cpu")).await?;
    let per_round = cycles / rounds;
    let mut runs = CpuRuns::default();
    for round in 0..rounds {
        // A rotating order: over three rounds each arm runs first, second and third once.
        for arm in (0..3).map(|place| (place + round) % 3) {
            let run = match arm {
                0 => cpu_of(concurrency, per_round, ours_runner(&client, "cpu")).await?,
                _ => cpu_of(concurrency, per_round, floor_runner(&floor, "cpu")).await?,
            };
            match arm {
                0 => runs.ours.add(run),
                1 => runs.floor.add(run),
                _ => runs.floor_again.add(run),
            }
        }
    }
    client.shutdown(Duration::from_secs(10)).await?;
    Ok(runs)
}

/// [`cpu_runs`] on a current-thread runtime of a thread of its own (the bench's own runtime
/// idles meanwhile).
async fn cpu_runs_current_thread(
    target: &GcsTarget,
    concurrency: usize,
    cycles: usize,
    rounds: usize,
) -> Result<CpuRuns> {
    let target = target.clone();
    on_current_thread(move || async move { cpu_runs(&target, concurrency, cycles, rounds).await })
        .await
}

/// Runs `work` on a current-thread runtime of a thread of its own (the bench's own runtime
/// idles meanwhile).
async fn on_current_thread<T, F, Fut>(work: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(util::BoxError::from)
            .and_then(|rt| rt.block_on(work()));
        let _ = tx.send(result);
    });
    rx.await?
}

/// How target 2 is measured at one concurrency.
#[derive(Clone, Copy)]
pub struct CpuPlan {
    /// Cycles of each kind (ours, the floor, Python's).
    pub cycles: usize,
    /// Rounds that ours and the floor alternate in.
    pub rounds: usize,
}

/// Target 2 at one concurrency: CPU per cycle of our client versus the raw reqwest floor (the
/// same two requests, no lock logic), with both on the bench's multi-thread runtime (as under
/// `#[tokio::main]`) and on a current-thread runtime (one thread, like Python's event loop);
/// and, as information without a target, the CPU per cycle of the Python `dimutex` driver
/// process on the same server (`python`: its interpreter, or why there is none).
pub async fn cpu(
    target: &GcsTarget,
    python: std::result::Result<&std::path::Path, &str>,
    concurrency: usize,
    plan: &CpuPlan,
) -> Result<(Vec<Figure>, String)> {
    let rounds = plan.rounds.max(1);
    let cycles = (plan.cycles / (concurrency * rounds)).max(1) * concurrency * rounds;
    let per = |d: Duration| util::us(d) / cycles as f64;
    let pct = |x: f64| x * 100.0;
    let python_metric = format!("python_dimutex_cpu_per_cycle c={concurrency}");
    // Python first: started and warmed before anything is measured.
    let (python_figure, python_note, python_cpu) = match python {
        Ok(python) => {
            let mut py = PyDriver::start(python, target, concurrency, cycles, "bench-py/")?;
            let before = util::cpu_sample(py.pid())?;
            let done = py.go()?;
            let after = util::cpu_sample(py.pid())?;
            let py_cpu = per(util::cpu_between(&before, &after));
            let py_sys = util::sys_share(&before, &after);
            let py_self = done["user_s"].as_f64().unwrap_or(f64::NAN)
                + done["sys_s"].as_f64().unwrap_or(f64::NAN);
            let note = format!(
                "Python dimutex {}: {py_cpu:.0} us/cycle ({:.0}% sys; its own getrusage: {:.0}), wall {:.0} us/cycle",
                py.version,
                pct(py_sys),
                py_self * 1e6 / cycles as f64,
                done["wall_s"].as_f64().unwrap_or(f64::NAN) * 1e6 / cycles as f64,
            );
            drop(py);
            (
                Figure::new(python_metric, py_cpu, None, "us CPU", Goal::Info),
                note,
                Some(py_cpu),
            )
        }
        Err(why) => (
            Figure::missing(python_metric, "us CPU", Goal::Info, why),
            "Python dimutex not measured (see skipped)".to_owned(),
            None,
        ),
    };

    let mt = cpu_runs(target, concurrency, cycles, rounds).await?;
    let ct = cpu_runs_current_thread(target, concurrency, cycles, rounds).await?;
    let (ours_mt, floor_mt, ours_ct, floor_ct) = (mt.ours, mt.floor, ct.ours, ct.floor);
    let itself = |runs: &CpuRuns| runs.floor_again.cpu.as_secs_f64() / runs.floor.cpu.as_secs_f64();

    let figures = vec![
        Figure::new(
            format!("cpu_per_cycle c={concurrency} multi-thread rt"),
            per(ours_mt.cpu),
            Some(per(floor_mt.cpu)),
            "us CPU",
            Goal::RatioAtMost(1.10),
        ),
        Figure::new(
            format!("cpu_per_cycle c={concurrency} current-thread rt"),
            per(ours_ct.cpu),
            Some(per(floor_ct.cpu)),
            "us CPU",
            Goal::RatioAtMost(1.10),
        ),
        python_figure,
    ];
    let of_python = python_cpu.map_or_else(String::new, |p| {
        format!(
            "; of Python's CPU: floor {:.3} / {:.3}, ours {:.3} / {:.3} (multi-thread / current-thread)",
            per(floor_mt.cpu) / p,
            per(floor_ct.cpu) / p,
            per(ours_mt.cpu) / p,
            per(ours_ct.cpu) / p,
        )
    });
    let note = format!(
        "cpu c={concurrency} on {}: {cycles} cycles each, ours, the floor and the floor again in {rounds} rounds of a rotating order; the floor's second measurement over its first (the noise of these ratios): {:.3} multi-thread, {:.3} current-thread; raw reqwest floor (same 2 requests) {:.1} us/cycle multi-thread ({:.0}% sys), {:.1} current-thread ({:.0}% sys); ours {:.0}% sys (multi-thread) / {:.0}% (current-thread); allocations per cycle: floor {:.1} / {:.1}, ours {:.1} / {:.1}; {python_note}{of_python}",
        target.label,
        itself(&mt),
        itself(&ct),
        per(floor_mt.cpu),
        pct(floor_mt.sys_share()),
        per(floor_ct.cpu),
        pct(floor_ct.sys_share()),
        pct(ours_mt.sys_share()),
        pct(ours_ct.sys_share()),
        floor_mt.allocations as f64 / cycles as f64,
        floor_ct.allocations as f64 / cycles as f64,
        ours_mt.allocations as f64 / cycles as f64,
        ours_ct.allocations as f64 / cycles as f64,
    );
    Ok((figures, note))
}
