//! Target 5: hand-over with the wait policy (`Client::acquire`), on the in-repo fake.
//!
//! The hand-over time is measured from the moment the holder's `release().await` returns to
//! the moment the waiter's `acquire` returns.
//! - local: the waiter uses the holder's client (it queues locally and is woken by the release,
//!   then creates); shown next to it, one raw create request on the same server (p50 next to
//!   the p50, p99 next to the p99), and in the notes the same hand-over on the in-memory
//!   backend, where no server adds its time;
//! - remote: the waiter uses another client on another backend instance (as another process
//!   would) and polls with GETs, backoff 50 ms .. 1 s; the holder keeps the lock a random
//!   0.3–2.5 s so the release falls anywhere in the waiter's polling.

use std::time::{Duration, Instant};

use dimutex::backend::GcsBackend;
use dimutex::{Backoff, Client};

use super::cycle::{Floor, our_client};
use super::servers::GcsTarget;
use super::util::{self, Figure, Goal, Result};

pub struct Plan {
    pub local_trials: usize,
    pub remote_trials: usize,
}

const POLL_MIN: Duration = Duration::from_millis(50);
const POLL_CAP: Duration = Duration::from_secs(1);

/// One hand-over: `holder` holds `key`, `waiter` waits for it; the time from the release's
/// return to the waiter's acquisition.
async fn hand_over(
    holder: &Client,
    waiter: &Client,
    key: &str,
    hold: Duration,
) -> Result<Duration> {
    let guard = holder.try_acquire(key).await?;
    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), key.to_owned());
        async move {
            let guard = waiter
                .acquire(key.as_str(), Instant::now() + Duration::from_secs(30))
                .await?;
            let at = Instant::now();
            guard.release().await?;
            Ok::<_, dimutex::Error>(at)
        }
    });
    tokio::time::sleep(hold).await;
    guard.release().await?;
    let released = Instant::now();
    let acquired = waiting.await??;
    Ok(acquired.saturating_duration_since(released))
}

/// One hand-over between two users of `client` (the lock held 10 ms), in milliseconds.
async fn local_hand_over(client: &Client, key: &str) -> Result<f64> {
    let took = hand_over(client, client, key, Duration::from_millis(10)).await?;
    Ok(util::ms(took))
}

pub async fn run(target: &GcsTarget, plan: &Plan) -> Result<(Vec<Figure>, Vec<String>)> {
    let holder = our_client(target).await?;
    let floor = Floor::new(target)?;
    // Warm both pools.
    for i in 0..5 {
        super::cycle::our_cycle(&holder, &format!("ho-warm-{i}")).await?;
        floor.cycle(&format!("bench-floor/ho-warm-{i}")).await?;
    }
    let mut local = Vec::new();
    let mut creates = Vec::new();
    for i in 0..plan.local_trials {
        local.push(local_hand_over(&holder, &format!("ho-local-{i}")).await?);
        let name = format!("bench-floor/ho-create-{i}");
        let t = Instant::now();
        let generation = floor.create(&name).await?;
        creates.push(util::ms(t.elapsed()));
        floor.delete(&name, generation, Some(1)).await?;
    }

    // The same hand-over on the in-memory backend: the local queue alone, no server.
    let memory = Client::new(dimutex::backend::MemoryBackend::new());
    let mut in_memory = Vec::new();
    for i in 0..plan.local_trials {
        in_memory.push(local_hand_over(&memory, &format!("ho-mem-{i}")).await?);
    }
    memory.shutdown(Duration::from_secs(10)).await?;

    let other = Client::builder(
        GcsBackend::builder(&target.bucket)
            .endpoint(&target.endpoint)
            .anonymous()
            .build()
            .await?,
    )
    .prefix("bench/")
    .poll(Backoff::new(POLL_MIN, POLL_CAP, 3.0)?)
    .build()?;
    super::cycle::our_cycle(&other, "ho-warm-other").await?;
    let mut remote = Vec::new();
    for i in 0..plan.remote_trials {
        let hold = Duration::from_millis(rand::random_range(300..2500));
        remote.push(util::ms(
            hand_over(&holder, &other, &format!("ho-remote-{i}"), hold).await?,
        ));
    }
    holder.shutdown(Duration::from_secs(10)).await?;
    other.shutdown(Duration::from_secs(10)).await?;

    let create = util::median(&creates);
    let cap = util::ms(POLL_CAP);
    let figures = vec![
        Figure::new(
            "handover_local_p50",
            util::median(&local),
            Some(create),
            "ms",
            Goal::AtMost(1.0),
        ),
        // Next to the p99 of the one create it contains.
        Figure::new(
            "handover_local_p99",
            util::percentile(&local, 99.0),
            Some(util::percentile(&creates, 99.0)),
            "ms",
            Goal::AtMost(1.0),
        ),
        Figure::new(
            "handover_remote_max",
            util::percentile(&remote, 100.0),
            Some(cap),
            "ms",
            Goal::RatioAtMost(1.0),
        ),
    ];
    let notes = vec![format!(
        "handover on {}: local {} trials (baseline: one raw create, p50 {create:.3} ms, p99 {:.3} ms, max {:.3} ms), max {:.3} ms; the same on the in-memory backend (the local queue alone): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; remote {} trials, poll {:?}..{:?}, p50 {:.1} ms (baseline of the remote figure: the poll cap)",
        target.label,
        local.len(),
        util::percentile(&creates, 99.0),
        util::percentile(&creates, 100.0),
        util::percentile(&local, 100.0),
        util::median(&in_memory),
        util::percentile(&in_memory, 99.0),
        util::percentile(&in_memory, 100.0),
        remote.len(),
        POLL_MIN,
        POLL_CAP,
        util::median(&remote),
    )];
    Ok((figures, notes))
}
