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
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dimutex::Client;
use dimutex::backend::GcsBackend;
use serde::Deserialize;

use super::servers::{GcsTarget, PyDriver};
use super::util::{self, Figure, Goal, Result};

const BOUNDARY: &str = "dimutex-7a1c3f0e9b2d4c86";

/// The object prefix of [`our_client`].
pub const OUR_PREFIX: &str = "bench/";

/// Our client on `target`, with default settings and the object prefix [`OUR_PREFIX`].
pub async fn our_client(target: &GcsTarget) -> Result<Client> {
    let backend = GcsBackend::builder(&target.bucket)
        .endpoint(&target.endpoint)
        .anonymous()
        .build()
        .await?;
    Ok(Client::builder(backend).prefix(OUR_PREFIX).build()?)
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

/// The generation in an object resource (a string in the JSON API, a number in some fakes).
fn generation_of(resource: &[u8]) -> Result<i64> {
    let created: Created = serde_json::from_slice(resource)?;
    integer(&created.generation)
}

fn integer(v: &serde_json::Value) -> Result<i64> {
    Ok(match v {
        serde_json::Value::String(s) => s.parse()?,
        v => v.as_i64().ok_or("generation is not an integer")?,
    })
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

    /// A multipart upload of `name` with the custom `metadata` and the contents `data`, with
    /// the query `query` (`uploadType` and the preconditions): the reply's status and body.
    async fn upload(
        &self,
        name: &str,
        metadata: serde_json::Value,
        query: &[(&str, &str)],
        data: &[u8],
    ) -> Result<(reqwest::StatusCode, bytes::Bytes)> {
        let resource = serde_json::json!({
            "name": name,
            "cacheControl": "no-store",
            "contentType": "text/plain",
            "metadata": metadata,
        });
        // The body in one buffer, as the client's upload builds it.
        let mut body = Vec::with_capacity(1024 + data.len());
        write!(
            body,
            "--{BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n"
        )?;
        body.extend_from_slice(data);
        write!(body, "\r\n--{BOUNDARY}--\r\n")?;
        let response = self
            .http
            .post(&self.upload_url)
            .query(query)
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/related; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.bytes().await?))
    }

    /// The lock's metadata fields, as the client writes them (a ttl of `ttl` seconds).
    fn lock_metadata(&self, ttl: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut md = serde_json::Map::new();
        md.insert("ttl".into(), ttl.into());
        md.insert(
            "owner".into(),
            format!("bench-floor:1#{:032x}", rand::random::<u128>()).into(),
        );
        md.insert("expires".into(), self.expires.as_str().into());
        md
    }

    /// The create's upload: the same multipart upload (same metadata fields) as the client's.
    async fn create_upload(&self, name: &str) -> Result<(reqwest::StatusCode, bytes::Bytes)> {
        let metadata = self.lock_metadata("30").into();
        let query = [("uploadType", "multipart"), ("ifGenerationMatch", "0")];
        self.upload(name, metadata, &query, b"lock").await
    }

    /// The create; the new object's generation.
    pub async fn create(&self, name: &str) -> Result<i64> {
        let (status, bytes) = self.create_upload(name).await?;
        if !status.is_success() {
            return Err(format!("floor create {name}: HTTP {status}").into());
        }
        generation_of(&bytes)
    }

    /// The create of an object that exists: refused with 412.
    pub async fn create_refused(&self, name: &str) -> Result<()> {
        let (status, _) = self.create_upload(name).await?;
        if status != reqwest::StatusCode::PRECONDITION_FAILED {
            return Err(format!("floor create of existing {name}: HTTP {status}, not 412").into());
        }
        Ok(())
    }

    /// A completed record's write: the upload of `fields` plus the lock's fields (ttl
    /// `ttl`, a fresh owner, `record=1`) and the contents `data`, conditional on `generation`
    /// and `metageneration`.
    pub async fn record(
        &self,
        name: &str,
        generation: i64,
        metageneration: i64,
        fields: &serde_json::Map<String, serde_json::Value>,
        ttl: &str,
        data: &[u8],
    ) -> Result<()> {
        let mut metadata = fields.clone();
        metadata.extend(self.lock_metadata(ttl));
        metadata.insert("record".into(), "1".into());
        let (generation, metageneration) = (generation.to_string(), metageneration.to_string());
        let query = [
            ("uploadType", "multipart"),
            ("ifGenerationMatch", generation.as_str()),
            ("ifMetagenerationMatch", metageneration.as_str()),
        ];
        let (status, _) = self.upload(name, metadata.into(), &query, data).await?;
        if !status.is_success() {
            return Err(format!("floor record {name}: HTTP {status}").into());
        }
        Ok(())
    }

    /// The object resource (JSON API), read whole.
    pub async fn get(&self, name: &str) -> Result<bytes::Bytes> {
        let response = self
            .http
            .get(format!("{}{}", self.objects_url, name.replace('/', "%2F")))
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            return Err(format!("floor get {name}: HTTP {status}").into());
        }
        Ok(bytes)
    }

    /// Deletes `name` as it is now: a GET for its generation, then the DELETE conditional on
    /// it.
    pub async fn delete_current(&self, name: &str) -> Result<()> {
        let resource = self.get(name).await?;
        self.delete(name, generation_of(&resource)?, None).await
    }

    /// The names and generations of the objects whose names start with `prefix` (every
    /// page of the listing).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            items: Vec<Item>,
            next_page_token: Option<String>,
        }
        #[derive(Deserialize)]
        struct Item {
            name: String,
            generation: serde_json::Value,
        }
        let list_url = self.objects_url.trim_end_matches('/');
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("prefix", prefix.to_owned())];
            if let Some(t) = token.take() {
                query.push(("pageToken", t));
            }
            let response = self.http.get(list_url).query(&query).send().await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            if !status.is_success() {
                return Err(format!("floor list {prefix}: HTTP {status}").into());
            }
            let page: Page = serde_json::from_slice(&bytes)?;
            for item in page.items {
                out.push((item.name, integer(&item.generation)?));
            }
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    /// Deletes every object whose name starts with `prefix`, each conditional on the
    /// generation listed, `workers` deletes at a time: how many were deleted.
    pub async fn delete_under(self: &Arc<Self>, prefix: &str, workers: usize) -> Result<usize> {
        let objects = Arc::new(self.list(prefix).await?);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers.max(1) {
            let (floor, objects) = (self.clone(), objects.clone());
            tasks.spawn(async move {
                for (name, generation) in objects.iter().skip(w).step_by(workers.max(1)) {
                    floor.delete(name, *generation, None).await?;
                }
                Ok::<_, util::BoxError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(objects.len())
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
) -> impl Fn(usize) -> Timed + Send + Sync + 'static {
    let client = client.clone();
    move |w| {
        let client = client.clone();
        Box::pin(async move { our_cycle(&client, &format!("{tag}-w{w}")).await })
    }
}

fn floor_runner(
    floor: &Arc<Floor>,
    tag: &'static str,
) -> impl Fn(usize) -> Timed + Send + Sync + 'static {
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
    let samples = interleaved(concurrency, plan, |_| async move {
        let client = our_client(target).await?;
        let floor = Arc::new(Floor::new(target)?);
        Ok(Round {
            ours: Arc::new(ours_runner(&client, "lat")),
            floor: Arc::new(floor_runner(&floor, "lat")),
            finish: Box::pin(async move {
                client.shutdown(Duration::from_secs(10)).await?;
                Ok(())
            }),
        })
    })
    .await?;
    let metric = format!(
        "cycle_latency_p50 {} c={concurrency}",
        short_label(&target.label)
    );
    let head = format!("{} c={concurrency}", target.label);
    Ok((
        samples.figure(metric, Goal::RatioAtMost(1.10)),
        samples.note(&head, "cycles"),
    ))
}

/// One measured operation (a cycle, a request) of worker `w`: its latency.
pub type Timed = std::pin::Pin<Box<dyn Future<Output = Result<Duration>> + Send>>;

/// Makes worker `w`'s next measured operation.
pub type Runner = Arc<dyn Fn(usize) -> Timed + Send + Sync>;

/// One round of [`interleaved`]: ours and the floor on pools of their own, made for the
/// round, and what ends the round once both have run (not measured).
pub struct Round {
    pub ours: Runner,
    pub floor: Runner,
    pub finish: std::pin::Pin<Box<dyn Future<Output = Result<()>>>>,
}

/// The latencies of [`interleaved`], in microseconds.
pub struct Latencies {
    pub ours: Vec<f64>,
    pub floor: Vec<f64>,
    pub rounds: usize,
    /// Each round's medians, `ours/floor`.
    pub round_medians: Vec<String>,
    /// This process's CPU time over the measured operations of each (the client's: every
    /// server is another process).
    pub ours_cpu: Duration,
    pub floor_cpu: Duration,
}

impl Latencies {
    /// The figure: the median of all of ours against the median of all of the floor's.
    pub fn figure(&self, metric: String, goal: Goal) -> Figure {
        Figure::new(
            metric,
            util::median(&self.ours),
            Some(util::median(&self.floor)),
            "us",
            goal,
        )
    }

    /// The note: how many `what` were measured, p90 and p99 of both, the client CPU per
    /// operation, the round medians.
    pub fn note(&self, head: &str, what: &str) -> String {
        let per = |cpu: Duration, n: usize| util::us(cpu) / n.max(1) as f64;
        format!(
            "{head}: {} {what} each in {} rounds; p90 ours {:.0} us vs floor {:.0} us; p99 ours {:.0} us vs floor {:.0} us; client CPU per operation ours {:.0} us vs floor {:.0} us; round medians ours/floor (us): {}",
            self.ours.len(),
            self.rounds,
            util::percentile(&self.ours, 90.0),
            util::percentile(&self.floor, 90.0),
            util::percentile(&self.ours, 99.0),
            util::percentile(&self.floor, 99.0),
            per(self.ours_cpu, self.ours.len()),
            per(self.floor_cpu, self.floor.len()),
            self.round_medians.join(" "),
        )
    }
}

/// Runs `runner` in `workers` workers, `per_worker` operations each.
async fn run_runner(workers: usize, per_worker: usize, runner: &Runner) -> Result<Vec<Duration>> {
    let runner = runner.clone();
    run_workers(workers, per_worker, move |w| runner(w)).await
}

/// Ours against the floor in `plan.rounds` rounds, each on a fresh [`Round`] made by
/// `round(i)`: both warmed (3 operations per worker, one connection per worker), then
/// `plan.per_worker` operations per worker of each, the floor first in even rounds and ours
/// first in odd ones; then the round's `finish`. On a current-thread runtime of its own (see
/// [`latency`]).
pub async fn interleaved<M, Fut>(
    concurrency: usize,
    plan: &LatencyPlan,
    mut round: M,
) -> Result<Latencies>
where
    M: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<Round>>,
{
    let mut out = Latencies {
        ours: Vec::new(),
        floor: Vec::new(),
        rounds: plan.rounds,
        round_medians: Vec::new(),
        ours_cpu: Duration::ZERO,
        floor_cpu: Duration::ZERO,
    };
    // The CPU time of this process over `run`, added to `total`.
    async fn with_cpu<T>(total: &mut Duration, run: impl Future<Output = Result<T>>) -> Result<T> {
        let before = util::self_cpu()?;
        let out = run.await?;
        *total += util::cpu_between(&before, &util::self_cpu()?);
        Ok(out)
    }
    for i in 0..plan.rounds {
        // Fresh pools every round: the server's runtime places each connection too (see
        // `latency`); new connections each round average that over many placements instead
        // of drawing it once per run.
        let Round {
            ours,
            floor,
            finish,
        } = round(i).await?;
        // Warm both pools (one connection per worker) and both code paths.
        run_runner(concurrency, 3, &floor).await?;
        run_runner(concurrency, 3, &ours).await?;
        let floor_run = run_runner(concurrency, plan.per_worker, &floor);
        let ours_run = run_runner(concurrency, plan.per_worker, &ours);
        let (o, b) = if i % 2 == 0 {
            let b = with_cpu(&mut out.floor_cpu, floor_run).await?;
            (with_cpu(&mut out.ours_cpu, ours_run).await?, b)
        } else {
            let o = with_cpu(&mut out.ours_cpu, ours_run).await?;
            (o, with_cpu(&mut out.floor_cpu, floor_run).await?)
        };
        finish.await?;
        let (o, b): (Vec<f64>, Vec<f64>) = (
            o.into_iter().map(util::us).collect(),
            b.into_iter().map(util::us).collect(),
        );
        out.round_medians
            .push(format!("{:.0}/{:.0}", util::median(&o), util::median(&b)));
        out.ours.extend(o);
        out.floor.extend(b);
    }
    Ok(out)
}

pub fn short_label(label: &str) -> &str {
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
pub async fn on_current_thread<T, F, Fut>(work: F) -> Result<T>
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
