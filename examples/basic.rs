//! The lock client on the in-memory backend: two tasks contend for one key; the second waits.
//!
//! ```sh
//! cargo run --example basic
//! ```

use std::time::{Duration, Instant};

use dimutex::{Client, Error, backend::MemoryBackend};

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Two clients on one backend behave like two processes sharing a bucket.
    let backend = MemoryBackend::new();
    let first = Client::new(backend.clone());
    let second = Client::new(backend.clone());

    let guard = first.try_acquire("nightly-report").await?;
    println!(
        "task A: acquired `{}` with fencing token {}",
        guard.key(),
        guard.token()
    );

    match second.try_acquire("nightly-report").await {
        Err(Error::Held { remaining }) => {
            println!("task B: `nightly-report` is held; the lease runs at most {remaining:?} more")
        }
        other => panic!("expected the lock to be held, got {other:?}"),
    }

    let waiter = tokio::spawn(async move {
        println!("task B: waiting up to 10 s for the lock");
        let started = Instant::now();
        let guard = second
            .acquire("nightly-report", Instant::now() + Duration::from_secs(10))
            .await?;
        println!(
            "task B: acquired after {:.0?} with fencing token {}",
            started.elapsed(),
            guard.token()
        );
        let still_held = guard.release().await?;
        println!("task B: released (still held at release: {still_held})");
        second.shutdown(Duration::from_secs(5)).await.ok();
        Ok::<_, Error>(())
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("task A: work done after 300 ms; releasing");
    let still_held = guard.release().await?;
    println!("task A: released (still held at release: {still_held})");

    waiter.await.expect("task B panicked")?;
    first.shutdown(Duration::from_secs(5)).await.ok();
    println!("lock objects left: {}", backend.object_count());
    Ok(())
}
