//! `dimutex run`: acquire, run the command as a child, supervise it, release.

use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use dimutex::{Acquisition, Client, Done, Error, FencingToken, LockGuard, LockKey};
use tokio::process::Child;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::args::RunArgs;
use crate::exit::{self, Failure};
use crate::once;

/// How long the final releases, and the clean-up of an abandoned acquisition, may take
/// before their locks are left to expire. A clean-up with the default settings (5 s request
/// timeout and retry budget) reads, pauses a request timeout for a write still on its way,
/// reads again and deletes: 20 s at the worst.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the status read that explains a lost lease may take.
const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long before the lease could be taken over ([`LockGuard::expires_at`]) the command is
/// killed at the latest, whatever `--grace` says: time for SIGKILL to take effect and for
/// our timer to be late.
const TAKEOVER_SAFETY: Duration = Duration::from_millis(500);

pub async fn run(args: RunArgs) -> Result<u8, Failure> {
    let (client, key) = crate::connect(&args.target, Some(args.ttl)).await?;
    // From here on, SIGINT/SIGTERM/SIGHUP no longer kill us: we decide what they mean.
    let mut signals = Signals::new()
        .map_err(|e| Failure::new(exit::UNAVAILABLE, format!("cannot handle signals: {e}")))?;
    let guard = match acquire(&client, &key, &args, &mut signals).await? {
        Acquired::Lock(guard) => guard,
        Acquired::Done(done) => {
            eprintln!("dimutex: {}", once::done_line(&key, &done));
            shut_down(&client, &mut signals).await;
            return Ok(0);
        }
        Acquired::Interrupted(sig) => return Ok(signal_exit_code(sig)),
    };
    tracing::debug!(key = key.as_str(), "acquired; starting the command");

    let program = &args.command[0];
    let mut command = tokio::process::Command::new(program);
    command
        .args(&args.command[1..])
        .env("DIMUTEX_KEY", key.as_str())
        .env("DIMUTEX_TOKEN", guard.token().to_string());
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            finish(&client, &key, guard, args.ttl, &mut signals).await;
            let code = match e.kind() {
                io::ErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::CANNOT_EXECUTE,
            };
            return Err(Failure::new(code, format!("cannot run {program:?}: {e}")));
        }
    };

    let code = supervise(child, &client, &key, guard, &args, &mut signals).await;
    shut_down(&client, &mut signals).await;
    code
}

/// What the acquisition came to.
enum Acquired {
    Lock(LockGuard),
    /// `--once-per`: a run of the key succeeded within the period.
    Done(Done),
    /// Interrupted by this signal; the client is shut down.
    Interrupted(i32),
}

/// Acquires the lock as the arguments say (fail fast, `--wait`, `--once-per`), until a
/// signal interrupts. A failed acquisition shuts the client down.
async fn acquire(
    client: &Client,
    key: &LockKey,
    args: &RunArgs,
    signals: &mut Signals,
) -> Result<Acquired, Failure> {
    let acquire = async {
        let deadline = args.wait.map(|wait| Instant::now() + wait);
        match (args.once_per, deadline) {
            (Some(_), deadline) => once::acquire(client, key, deadline).await,
            (None, None) => client.try_acquire(key.clone()).await.map(Acquisition::Lock),
            (None, Some(deadline)) => client
                .acquire(key.clone(), deadline)
                .await
                .map(Acquisition::Lock),
        }
    };
    // `select!` owns the acquisition and drops it before a branch runs: an interrupted one is
    // abandoned before the shutdown below waits for its cleanup.
    let acquired = tokio::select! {
        acquired = acquire => acquired,
        sig = signals.recv() => {
            tracing::debug!(signal = sig, "interrupted while acquiring");
            shut_down(client, signals).await;
            return Ok(Acquired::Interrupted(sig));
        }
    };
    match acquired {
        Ok(Acquisition::Lock(guard)) => Ok(Acquired::Lock(guard)),
        Ok(Acquisition::Done(done)) => Ok(Acquired::Done(done)),
        Err(e) => {
            // An acquisition that failed after a create of unknown outcome may have left a
            // lock object that the client cleans up in the background: let it.
            shut_down(client, signals).await;
            Err(Failure::from_lock_error(key.as_str(), e))
        }
    }
}

/// Shuts the client down: waits (up to [`SHUTDOWN_TIMEOUT`]) for releases and for the cleanup
/// of abandoned acquisitions. A signal arriving meanwhile cuts the wait short.
async fn shut_down(client: &Client, signals: &mut Signals) {
    tokio::select! {
        done = client.shutdown(SHUTDOWN_TIMEOUT) => {
            if let Err(e) = done {
                eprintln!("dimutex: warning: {e}; the lease will expire by itself");
            }
        }
        sig = signals.recv() => {
            tracing::debug!(signal = sig, "interrupted while shutting down");
            eprintln!("dimutex: warning: interrupted before the lock was released; the lease \
                       will expire by itself");
        }
    }
}

/// Waits for the child while forwarding signals and watching the lease. Returns the exit code.
async fn supervise(
    mut child: Child,
    client: &Client,
    key: &LockKey,
    guard: LockGuard,
    args: &RunArgs,
    signals: &mut Signals,
) -> Result<u8, Failure> {
    match watch(&mut child, &guard, signals).await {
        Watched::Exited(status) => {
            let status = status.map_err(|e| {
                Failure::new(
                    exit::UNAVAILABLE,
                    format!("cannot wait for the command: {e}"),
                )
            })?;
            Ok(after_exit(key, guard, status_code(status), args).await)
        }
        Watched::Lost => {
            stop_after_lost(&mut child, key, &guard, args, signals).await;
            let token = guard.token();
            let released = guard.release().await;
            let why = explain(client, key, token, released).await;
            eprintln!("dimutex: lost the lock {:?}: {why}", key.as_str());
            Ok(exit::LOST)
        }
    }
}

/// How the command's run under the lock ended.
enum Watched {
    /// The command exited while the lease was ours.
    Exited(std::io::Result<std::process::ExitStatus>),
    /// The lease is lost (or as good as lost) while the command still runs.
    Lost,
}

/// Waits for the command to exit or the lease to be lost, forwarding signals meanwhile.
async fn watch(child: &mut Child, guard: &LockGuard, signals: &mut Signals) -> Watched {
    let mut lost = guard.lost();
    loop {
        // Past this, the lease may be taken over soon: if no refresh has moved it on by then,
        // the lease is as good as lost, whether or not the client has said so yet (it does at
        // ttl/10 before the takeover, which can be later than this for a short ttl).
        let cutoff = kill_deadline(guard);
        tokio::select! {
            status = child.wait() => return Watched::Exited(status),
            () = &mut lost => return Watched::Lost,
            () = tokio::time::sleep_until(cutoff.into()) => {
                if Instant::now() >= kill_deadline(guard) {
                    tracing::debug!("no refresh succeeded in time; stopping the command");
                    return Watched::Lost;
                }
            }
            sig = signals.recv() => forward(child, sig),
        }
    }
}

/// Stops a command whose lease is gone: SIGTERM, then SIGKILL after `--grace` or before
/// another owner can take the lock over, whichever comes first.
async fn stop_after_lost(
    child: &mut Child,
    key: &LockKey,
    guard: &LockGuard,
    args: &RunArgs,
    signals: &mut Signals,
) {
    let now = Instant::now();
    let latest = kill_deadline(guard);
    let kill_at = now
        .checked_add(args.grace)
        .map_or(latest, |t| t.min(latest));
    let grace = kill_at.saturating_duration_since(now);
    let (when, overdue) = if grace >= args.grace {
        let secs = args.grace.as_secs_f64();
        (
            format!("SIGKILL after {secs} s"),
            format!("did not exit within {secs} s of SIGTERM"),
        )
    } else if grace.is_zero() {
        (
            "SIGKILL at once, before another owner can take the lock over (one may have already)"
                .to_owned(),
            "is still running and another owner may hold the lock".to_owned(),
        )
    } else {
        (
            format!(
                "SIGKILL {}, before another owner can take the lock over",
                in_secs(grace)
            ),
            "is still running and the lease may soon be taken over".to_owned(),
        )
    };
    eprintln!(
        "dimutex: lost the lease on lock {:?} while the command was running; sending it \
         SIGTERM ({when})",
        key.as_str(),
    );
    let status = terminate(child, kill_at, &overdue, signals).await;
    tracing::debug!(?status, "the command exited after the lost lease");
}

/// After the command exited with `code` while the lease was ours: records its success
/// (`--once-per`) or releases the lock. The exit code of `dimutex`.
async fn after_exit(key: &LockKey, guard: LockGuard, code: u8, args: &RunArgs) -> u8 {
    match args.once_per {
        Some(period) if code == 0 => once::complete(key, guard, period, args).await,
        _ => release_after_exit(key, guard, code, args).await,
    }
}

/// Releases the lock after the command exited with `code`; the exit code of `dimutex`.
pub(crate) async fn release_after_exit(
    key: &LockKey,
    guard: LockGuard,
    code: u8,
    args: &RunArgs,
) -> u8 {
    tracing::debug!(code, "the command exited; releasing");
    match guard.release().await {
        Ok(true) => tracing::debug!("released"),
        Ok(false) => {
            // Another owner changed or removed the lock before we noticed: the command did
            // not run under an exclusive lock all along.
            eprintln!(
                "dimutex: lost the lock {:?}: another owner changed or removed it before the \
                 command exited (status {code})",
                key.as_str()
            );
            return exit::LOST;
        }
        Err(e) => eprintln!(
            "dimutex: warning: could not release lock {:?}: {e}; it expires within {} s",
            key.as_str(),
            exit::ceil_secs(args.ttl)
        ),
    }
    code
}

/// The latest moment the command may live after a lost lease: [`TAKEOVER_SAFETY`] before the
/// lease could be taken over.
fn kill_deadline(guard: &LockGuard) -> Instant {
    let expires = guard.expires_at();
    expires.checked_sub(TAKEOVER_SAFETY).unwrap_or(expires)
}

/// "at once", or "within 2.4 s" (rounded up to a tenth of a second).
fn in_secs(d: Duration) -> String {
    if d.is_zero() {
        return "at once".to_owned();
    }
    let tenths = d.as_nanos().div_ceil(100_000_000);
    format!("within {}.{} s", tenths / 10, tenths % 10)
}

/// SIGTERM, then SIGKILL at `kill_at` (saying that the command `overdue`); keeps forwarding
/// our signals meanwhile.
async fn terminate(
    child: &mut Child,
    kill_at: Instant,
    overdue: &str,
    signals: &mut Signals,
) -> io::Result<ExitStatus> {
    forward(child, libc::SIGTERM);
    let mut killed = false;
    loop {
        tokio::select! {
            status = child.wait() => return status,
            () = tokio::time::sleep_until(kill_at.into()), if !killed => {
                eprintln!("dimutex: the command {overdue}; sending SIGKILL");
                killed = true;
                if let Err(e) = child.start_kill() {
                    tracing::debug!(error = %e, "SIGKILL failed");
                }
            }
            sig = signals.recv() => forward(child, sig),
        }
    }
}

/// Why a lease was lost, for the operator, judged from the release and a fresh status read.
async fn explain(
    client: &Client,
    key: &LockKey,
    ours: FencingToken,
    released: Result<bool, Error>,
) -> String {
    if let Ok(true) = released {
        return "no refresh succeeded before the lease ran out (backend unreachable, or dimutex \
                was paused); no one had taken the lock over, and it has been released"
            .into();
    }
    match tokio::time::timeout(EXPLAIN_TIMEOUT, client.status(key.clone())).await {
        Ok(Ok(Some(status))) if status.token() != ours => format!(
            "it was taken over by another owner ({}) after our lease ran out or was broken",
            status.owner().unwrap_or("Python dimutex")
        ),
        Ok(Ok(Some(_))) => "no refresh succeeded before the lease ran out (backend unreachable, \
                            or dimutex was paused); the lease will expire"
            .into(),
        Ok(Ok(None)) => {
            "the lock object was deleted by someone else (force-released, or taken over and \
             released since)"
                .into()
        }
        Ok(Err(e)) => format!("the lease could not be refreshed in time ({e})"),
        Err(_) => "the lease could not be refreshed in time (the backend does not answer)".into(),
    }
}

/// Releases after a failed spawn.
async fn finish(
    client: &Client,
    key: &LockKey,
    guard: LockGuard,
    ttl: Duration,
    signals: &mut Signals,
) {
    if let Err(e) = guard.release().await {
        eprintln!(
            "dimutex: warning: could not release lock {:?}: {e}; it expires within {} s",
            key.as_str(),
            exit::ceil_secs(ttl)
        );
    }
    shut_down(client, signals).await;
}

/// The exit code that reports a child's exit status: its code, or 128+N for signal N.
fn status_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        // Exit codes are 0-255 on Unix; the mask is a no-op there.
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => signal_exit_code(sig),
        (None, None) => 1,
    }
}

fn signal_exit_code(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(u8::MAX)
}

/// Sends `sig` to the child unless it has been reaped already (then its pid may be reused).
fn forward(child: &Child, sig: i32) {
    let Some(pid) = child.id() else {
        return;
    };
    tracing::debug!(pid, signal = sig, "forwarding a signal to the command");
    if let Err(e) = send_signal(pid, sig) {
        tracing::debug!(pid, signal = sig, error = %e, "could not signal the command");
    }
}

/// `kill(2)`.
#[allow(unsafe_code)]
fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours. `pid` is our child,
    // not yet reaped (tokio's `Child::id` returns None once it is), so it names that process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The signals dimutex forwards to its child.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal received (its number).
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            Some(()) = self.int.recv() => libc::SIGINT,
            Some(()) = self.term.recv() => libc::SIGTERM,
            Some(()) = self.hup.recv() => libc::SIGHUP,
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_delays_are_rounded_up() {
        assert_eq!(in_secs(Duration::ZERO), "at once");
        assert_eq!(in_secs(Duration::from_nanos(1)), "within 0.1 s");
        assert_eq!(in_secs(Duration::from_millis(100)), "within 0.1 s");
        assert_eq!(in_secs(Duration::from_millis(2_401)), "within 2.5 s");
        assert_eq!(in_secs(Duration::from_secs(12)), "within 12.0 s");
    }
}
