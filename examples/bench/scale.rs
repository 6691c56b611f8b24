//! Target 4: one client holding many locks at once on the in-repo fake (served by a child
//! process, so this process's heap and CPU are the client's alone).
//!
//! - memory: live heap bytes (the bench's counting global allocator) while holding, minus
//!   before, per lock; the guards the caller keeps are included;
//! - refresh spread: the fake counts the requests it answers in every whole second of an idle
//!   window (only refresh PATCHes are sent then; the method histogram checks it);
//! - idle CPU: this process's user+sys CPU over that window; the baseline is the CPU of the
//!   same number of PATCH requests per second sent directly with reqwest (measured before);
//! - shutdown: `Client::shutdown` releases everything, and the fake then holds 0 objects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dimutex::Client;
use dimutex::backend::GcsBackend;

use super::cycle::Floor;
use super::servers::{ChildFake, GcsTarget};
use super::util::{self, Figure, Goal, Result};

pub struct Plan {
    pub locks: usize,
    pub ttl: Duration,
    /// How long to hold idle while measuring refreshes and CPU (whole seconds).
    pub window: Duration,
    /// How many acquisitions run at once while taking the locks.
    pub acquire_concurrency: usize,
    /// How long to run the raw PATCH floor at the same rate.
    pub floor_window: Duration,
}

/// The CPU (% of one core) of sending `rate` raw PATCH requests per second for `window`.
async fn paced_patch_cpu(target: &GcsTarget, rate: f64, window: Duration) -> Result<f64> {
    let floor = Arc::new(Floor::new(target)?);
    let name = "bench-floor/refresh-target";
    let generation = floor.create(name).await?;
    for _ in 0..20 {
        floor.patch(name, generation).await?;
    }
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let before = util::self_cpu()?;
    let t0 = Instant::now();
    while t0.elapsed() < window {
        ticks.tick().await;
        let floor = floor.clone();
        tasks.spawn(async move { floor.patch(name, generation).await });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let after = util::self_cpu()?;
    let elapsed = t0.elapsed();
    floor.delete(name, generation, None).await?;
    Ok(util::cpu_between(&before, &after).as_secs_f64() / elapsed.as_secs_f64() * 100.0)
}

pub async fn run(plan: &Plan) -> Result<(Vec<Figure>, Vec<String>)> {
    let mut fake = ChildFake::start()?;
    let target = fake.target.clone();
    let backend = GcsBackend::builder(&target.bucket)
        .endpoint(&target.endpoint)
        .anonymous()
        .build()
        .await?;
    let client = Client::builder(backend)
        .prefix("scale/")
        .ttl(plan.ttl)
        .build()?;
    // Warm the connection pool and the code paths; then the baseline heap.
    super::cycle::run_workers(plan.acquire_concurrency, 2, {
        let client = client.clone();
        move |w| {
            let client = client.clone();
            async move { super::cycle::our_cycle(&client, &format!("warm-{w}")).await }
        }
    })
    .await?;
    // The floor of the idle CPU: the same number of refreshes per second, sent directly with
    // reqwest (one task per PATCH, paced by a timer).
    let rate = plan.locks as f64 / client.refresh_interval().as_secs_f64();
    let floor_pct = paced_patch_cpu(&target, rate, plan.floor_window).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let heap0 = util::live_bytes();
    let rss0 = util::rss_bytes();

    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..plan.acquire_concurrency {
        let client = client.clone();
        let (locks, step) = (plan.locks, plan.acquire_concurrency);
        tasks.push(tokio::spawn(async move {
            let mut guards = Vec::new();
            for i in (w..locks).step_by(step) {
                guards.push(client.try_acquire(format!("lock-{i:05}")).await?);
            }
            Ok::<_, dimutex::Error>(guards)
        }));
    }
    let mut guards = Vec::with_capacity(plan.locks);
    for task in tasks {
        guards.extend(task.await??);
    }
    let acquire_time = t.elapsed();
    let heap1 = util::live_bytes();
    let rss1 = util::rss_bytes();
    let fds1 = util::open_fds();

    fake.call("window-start")?;
    let cpu0 = util::self_cpu()?;
    let server0 = util::cpu_sample(fake.pid())?;
    let t0 = Instant::now();
    tokio::time::sleep(plan.window + Duration::from_millis(300)).await;
    let cpu1 = util::self_cpu()?;
    let server1 = util::cpu_sample(fake.pid())?;
    let fds2 = util::open_fds();
    let held_for = t0.elapsed();
    let stats = fake.call("window-stop")?;
    let heap2 = util::live_bytes();
    let healthy = guards.iter().filter(|g| g.is_healthy()).count();

    let t = Instant::now();
    let shutdown = client.shutdown(Duration::from_secs(120)).await;
    let shutdown_time = t.elapsed();
    drop(guards);
    let left = fake.call("count")?["objects"].as_u64().unwrap_or(u64::MAX);

    let n = plan.locks as f64;
    let per_lock = (heap1.max(heap2) - heap0) as f64 / n;
    let per_second: Vec<u64> = stats["per_second"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    let busiest = per_second.iter().copied().max().unwrap_or(0) as f64;
    let mean = per_second.iter().sum::<u64>() as f64 / per_second.len().max(1) as f64;
    let cpu = util::cpu_between(&cpu0, &cpu1);
    let cpu_pct = cpu.as_secs_f64() / held_for.as_secs_f64() * 100.0;

    let label = format!("{} locks", plan.locks);
    let mut figures = vec![
        Figure::new(
            format!("scale_heap_per_lock ({label})"),
            per_lock,
            None,
            "B",
            Goal::AtMost(2048.0),
        ),
        Figure::new(
            format!("scale_refresh_busiest_second ({label})"),
            busiest,
            Some(mean),
            "req/s",
            Goal::RatioAtMost(2.0),
        ),
        Figure::new(
            format!("scale_idle_cpu ({label})"),
            cpu_pct,
            Some(floor_pct),
            "% core",
            Goal::AtMost(5.0),
        ),
    ];
    figures.push(match &shutdown {
        Ok(()) => Figure::new(
            format!("scale_shutdown_objects_left ({label})"),
            left as f64,
            Some(n),
            "objects",
            Goal::Equals(0.0),
        ),
        Err(e) => Figure::missing(
            format!("scale_shutdown_objects_left ({label})"),
            "objects",
            Goal::Equals(0.0),
            format!("shutdown failed: {e}"),
        ),
    });
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let notes = vec![
        format!(
            "scale: ttl {:?}, refresh every {:?}; {} locks taken in {:.2} s ({} at a time); heap +{:.2} MiB after acquiring, +{:.2} MiB after the window; RSS {:.1} -> {:.1} MiB; {healthy} of {} guards healthy after the window",
            client.ttl(),
            client.refresh_interval(),
            plan.locks,
            acquire_time.as_secs_f64(),
            plan.acquire_concurrency,
            mib((heap1 - heap0).max(0) as u64),
            mib((heap2 - heap0).max(0) as u64),
            mib(rss0.unwrap_or(0)),
            mib(rss1.unwrap_or(0)),
            plan.locks,
        ),
        format!(
            "scale: idle window {:.1} s: requests per second {:?} (expected mean {:.0}); methods {}; client CPU {:.3} s ({:.0} us per request), server (child) CPU {:.3} s; client fds {fds1} after acquiring, {fds2} after the window; shutdown {:.2} s, {left} objects left",
            held_for.as_secs_f64(),
            per_second,
            n / client.refresh_interval().as_secs_f64(),
            stats["methods"],
            cpu.as_secs_f64(),
            util::us(cpu) / per_second.iter().sum::<u64>().max(1) as f64,
            util::cpu_between(&server0, &server1).as_secs_f64(),
            shutdown_time.as_secs_f64(),
        ),
    ];
    Ok((figures, notes))
}
