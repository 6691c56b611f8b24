//! `dimutex run`: acquire, run the command as a child, supervise it, release.

use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use dimutex::{Client, Error, FencingToken, LockGuard, LockKey};
use tokio::process::Child;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::args::RunArgs;
use crate::exit::{self, Failure};

/// How long the final releases may take before their leases are left to expire.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the status read that explains a lost lease may take.
const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(args: RunArgs) -> Result<u8, Failure> {
    let (client, key) = crate::connect(&args.target, Some(args.ttl)).await?;
    // From here on, SIGINT/SIGTERM/SIGHUP no longer kill us: we decide what they mean.
    let mut signals = Signals::new()
        .map_err(|e| Failure::new(exit::UNAVAILABLE, format!("cannot handle signals: {e}")))?;

    let acquire = async {
        match args.wait {
            None => client.try_acquire(key.clone()).await,
            Some(wait) => client.acquire(key.clone(), Instant::now() + wait).await,
        }
    };
    let guard = tokio::select! {
        acquired = acquire => acquired.map_err(|e| Failure::from_lock_error(key.as_str(), e))?,
        sig = signals.recv() => {
            tracing::debug!(signal = sig, "interrupted while acquiring");
            return Ok(signal_exit_code(sig));
        }
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
            finish(&client, &key, guard, args.ttl).await;
            let code = match e.kind() {
                io::ErrorKind::NotFound => exit::NOT_FOUND,
                _ => exit::CANNOT_EXECUTE,
            };
            return Err(Failure::new(code, format!("cannot run {program:?}: {e}")));
        }
    };

    let code = supervise(child, &client, &key, guard, &args, &mut signals).await?;
    if let Err(e) = client.shutdown(SHUTDOWN_TIMEOUT).await {
        eprintln!("dimutex: warning: {e}; the lease will expire by itself");
    }
    Ok(code)
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
    let token = guard.token();
    let mut lost = guard.lost();
    let waited = loop {
        tokio::select! {
            status = child.wait() => break Some(status),
            () = &mut lost => break None,
            sig = signals.recv() => forward(&child, sig),
        }
    };
    let Some(status) = waited else {
        // The lease is gone while the command still runs: stop it.
        eprintln!(
            "dimutex: lost the lease on lock {:?} while the command was running; sending it \
             SIGTERM (SIGKILL after {} s)",
            key.as_str(),
            args.grace.as_secs_f64()
        );
        let status = terminate(&mut child, args.grace, signals).await;
        tracing::debug!(?status, "the command exited after the lost lease");
        let released = guard.release().await;
        let why = explain(client, key, token, released).await;
        eprintln!("dimutex: lost the lock {:?}: {why}", key.as_str());
        return Ok(exit::LOST);
    };
    let status = status.map_err(|e| {
        Failure::new(
            exit::UNAVAILABLE,
            format!("cannot wait for the command: {e}"),
        )
    })?;
    let mut code = status_code(status);
    tracing::debug!(%status, code, "the command exited; releasing");
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
            code = exit::LOST;
        }
        Err(e) => eprintln!(
            "dimutex: warning: could not release lock {:?}: {e}; it expires within {} s",
            key.as_str(),
            exit::ceil_secs(args.ttl)
        ),
    }
    Ok(code)
}

/// SIGTERM, then SIGKILL after `grace`; keeps forwarding our signals meanwhile.
async fn terminate(
    child: &mut Child,
    grace: Duration,
    signals: &mut Signals,
) -> io::Result<ExitStatus> {
    forward(child, libc::SIGTERM);
    let kill_at = tokio::time::Instant::now() + grace;
    let mut killed = false;
    loop {
        tokio::select! {
            status = child.wait() => return status,
            () = tokio::time::sleep_until(kill_at), if !killed => {
                eprintln!("dimutex: the command did not exit within {} s of SIGTERM; sending SIGKILL", grace.as_secs_f64());
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
async fn finish(client: &Client, key: &LockKey, guard: LockGuard, ttl: Duration) {
    if let Err(e) = guard.release().await {
        eprintln!(
            "dimutex: warning: could not release lock {:?}: {e}; it expires within {} s",
            key.as_str(),
            exit::ceil_secs(ttl)
        );
    }
    let _ = client.shutdown(SHUTDOWN_TIMEOUT).await;
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
