//! `dimutex run --once-per PERIOD`: run the command only if no run of the key succeeded within
//! the period, and record a success as the lock left behind for the period.

use std::time::{Duration, Instant, SystemTime};

use dimutex::{Acquisition, Client, Done, Error, FencingToken, LockGuard, LockKey, LockStatus};

use crate::args::RunArgs;
use crate::exit;
use crate::status::format_rfc3339;

/// The first pause between the status reads of a waiting run; it doubles up to [`POLL_MAX`].
const POLL_MIN: Duration = Duration::from_millis(100);
/// The longest pause between the status reads of a waiting run.
const POLL_MAX: Duration = Duration::from_secs(1);

/// Takes the lock of `key` unless a run of it succeeded within its record's period. Held by
/// another owner: [`Error::Held`] at once without `deadline`; with one, waits for the holder
/// to finish (reading the lock's status, so that waiters spend none of the object's write
/// budget) and tries again whenever the lock changed, until `deadline`.
pub async fn acquire(
    client: &Client,
    key: &LockKey,
    deadline: Option<Instant>,
) -> Result<Acquisition, Error> {
    let mut seen = None;
    loop {
        match client.try_acquire_unless_done(key.clone()).await {
            Err(e) if e.is_held() => {
                let Some(deadline) = deadline else {
                    return Err(e);
                };
                match changed(client, key, seen, deadline).await? {
                    Some(look) => seen = Some(look),
                    None => return Err(e),
                }
            }
            other => return other,
        }
    }
}

/// What a status read shows of a key: the live lock's token and lease end (a refresh, or the
/// completion of the run, moves the end), or `None` when the key is free (no lock object, or
/// an expired one).
type Look = Option<(FencingToken, SystemTime)>;

async fn look(client: &Client, key: &LockKey) -> Result<Look, Error> {
    let status = client.status(key.clone()).await?;
    Ok(status
        .filter(LockStatus::is_live)
        .map(|s| (s.token(), s.expires())))
}

/// Reads the status of `key` until it is worth trying again: the key is free, or its lock
/// differs from `seen` (read before the try that last found it held). The first call, with no
/// `seen`, returns the first read. `None` when `deadline` passed with the lock unchanged.
async fn changed(
    client: &Client,
    key: &LockKey,
    seen: Option<Look>,
    deadline: Instant,
) -> Result<Option<Look>, Error> {
    let Some(seen) = seen else {
        return Ok(Some(look(client, key).await?));
    };
    let mut pause = POLL_MIN;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::time::sleep_until(deadline.min(now + pause).into()).await;
        pause = (pause * 2).min(POLL_MAX);
        let current = look(client, key).await?;
        if current.is_none() || current != seen {
            return Ok(Some(current));
        }
    }
}

/// The line that says why the command was not run.
pub fn done_line(key: &LockKey, done: &Done) -> String {
    format!(
        "{:?} last ran at {} and may run again after {} (server time); not running the command",
        key.as_str(),
        format_rfc3339(done.completed_at()),
        format_rfc3339(done.until())
    )
}

/// The command succeeded under `guard`: records the success for `period`, or says why it was
/// not recorded. The exit code of `dimutex`.
pub async fn complete(key: &LockKey, guard: LockGuard, period: Duration, args: &RunArgs) -> u8 {
    let name = key.as_str();
    if !guard.is_healthy() {
        // No refresh succeeded in time: another owner may have run the command meanwhile.
        crate::run::release_after_exit(key, guard, 0, args).await;
        eprintln!(
            "dimutex: warning: the success of {name:?} was not recorded: the lease was lost \
             before the command exited; the next run will run it again"
        );
        return exit::LOST;
    }
    match guard.complete(period).await {
        Ok(true) => {
            tracing::debug!(key = name, "completed; the record stands for the period");
            0
        }
        Ok(false) => {
            eprintln!(
                "dimutex: warning: the success of {name:?} was not recorded: the lease was lost \
                 first (another owner changed or removed the lock); the next run will run it \
                 again"
            );
            exit::LOST
        }
        Err(e) => {
            eprintln!(
                "dimutex: warning: could not record the success of {name:?}: {e}; the lock is \
                 released if the write did not land, and the next run may run it again"
            );
            exit::UNAVAILABLE
        }
    }
}
