//! The command line: the contract of `dimutex`, documented in `--help`.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

const EXIT_CODES: &str = "\
Exit status:
  run      the command's own exit status (128+N when it died by signal N);
           0 with --once-per: a run of KEY succeeded within the period, so the
              command was not run (stderr says when it ran);
           75 the lock is held by another owner (after --wait, if given);
           74 the lease was lost while the command ran (it was sent SIGTERM,
              then SIGKILL after --grace seconds, or sooner: at the latest 0.5 s
              before another owner could take the lock over, at once when
              another owner changed or removed the lock); with --once-per, also
              when the lease was lost before the success was recorded;
           69 the storage backend is unavailable or refused the request, or the
              configuration (credentials, STORAGE_EMULATOR_HOST) is unusable;
              with --once-per, also when the command succeeded but the write
              recording it failed (the next run may run it again);
           64 bad arguments or an invalid lock key;
           126/127 the command could not be executed / was not found;
           130/143 dimutex was interrupted (SIGINT/SIGTERM) while waiting for the lock.
  status   0 the lock is held, 1 it is free (no lock object, or an expired one);
           64 and 69 as above.
  release  0 a lock was deleted, 1 there was none or its token did not match --token;
           64 and 69 as above.

Environment:
  DIMUTEX_BUCKET          the bucket, when --bucket is not given
  STORAGE_EMULATOR_HOST   send requests to this GCS emulator (host:port means
                          http://host:port), without credentials
  RUST_LOG                tracing filter for the diagnostics on stderr (overrides -v)
  GOOGLE_APPLICATION_CREDENTIALS and the other Application Default Credentials
                          sources are used against real GCS
  The command run by `dimutex run` gets DIMUTEX_KEY (the lock key) and DIMUTEX_TOKEN
  (the fencing token: pass it to what you write, so stale holders can be refused).";

/// Run a command under a distributed lock on Google Cloud Storage — flock(1) for a fleet.
///
/// A lock is a GCS object `gs://BUCKET/PREFIX/KEY`, created only if absent and held as a lease
/// that is refreshed in the background; a holder that dies is taken over once its lease has
/// run out (by the server's clock).
#[derive(Debug, Parser)]
#[command(
    name = "dimutex",
    version,
    after_help = EXIT_CODES,
    arg_required_else_help = true,
    propagate_version = true
)]
pub struct Cli {
    /// More diagnostics on stderr (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Acquire KEY, run CMD while holding it, release it when CMD exits.
    ///
    /// Fails fast (exit 75) when another owner holds the lock, unless --wait is given. CMD runs
    /// with stdin, stdout and stderr inherited and DIMUTEX_KEY and DIMUTEX_TOKEN (the fencing
    /// token) in its environment. The lease is refreshed every ttl/3 while CMD runs. If it is
    /// lost anyway (another owner took the lock over after a pause, the backend was unreachable
    /// until the lease ran out, or someone force-released it), CMD is sent SIGTERM, then
    /// SIGKILL after --grace seconds or sooner: CMD is killed at the latest 0.5 s before
    /// another owner could take the lock over (ttl after the send time of its last successful
    /// write; at once when another owner changed or removed the lock), whatever --grace
    /// says. dimutex then exits 74. SIGINT, SIGTERM and SIGHUP sent
    /// to dimutex are forwarded to CMD; the lock is released once CMD has exited. Interrupted
    /// while acquiring, dimutex exits 128+N after cleaning up the acquisition in flight (for
    /// at most 20 s; a second signal stops waiting).
    ///
    /// With --once-per PERIOD, CMD runs only if no run of KEY succeeded within PERIOD: for
    /// cron on every machine of a fleet, "the nightly report once a day on one of them".
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Show whether KEY is held, by whom, since and until when, and its fencing token.
    ///
    /// Exit 0 when held, 1 when free. Times are the server's clock.
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// Break a lock (requires --force); conditionally on --token when given.
    ///
    /// With --token, the lock is deleted only if its fencing token is T, so an operator never
    /// deletes a newer holder's lock by accident. Exit 0 when a lock was deleted, 1 when there
    /// was none or the token did not match. The holder notices at its next refresh: `dimutex
    /// run` then terminates its command and exits 74.
    #[command(after_help = EXIT_CODES)]
    Release(ReleaseArgs),
}

#[derive(Debug, Args)]
pub struct Target {
    /// The GCS bucket holding the lock objects.
    #[arg(long, short, env = "DIMUTEX_BUCKET", value_name = "BUCKET")]
    pub bucket: String,

    /// The prefix of lock object names.
    #[arg(long, default_value = "dimutex/", value_name = "PREFIX")]
    pub prefix: String,

    /// The lock key (1-1024 bytes of UTF-8 without control characters; prefix + key at most
    /// 1024 bytes).
    #[arg(value_name = "KEY")]
    pub key: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: Target,

    /// The lease length in seconds (at least 2). A holder that dies is taken over this long
    /// (plus up to 2 s) after its last refresh.
    #[arg(long, default_value = "30", value_name = "SECS", value_parser = parse_secs)]
    pub ttl: Duration,

    /// Wait up to SECS for the lock when it is held (polling with reads, at most 1 s apart)
    /// instead of failing at once.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub wait: Option<Duration>,

    /// After a lost lease, how long CMD gets between SIGTERM and SIGKILL, at most. SIGKILL
    /// comes sooner if the lease could otherwise be taken over while CMD lives: 0.5 s before
    /// that moment. When the lease ran out unrefreshed (the backend unreachable), it is called
    /// lost ttl/10 before that moment, so CMD gets at most ttl/10 - 0.5 s (2.5 s with the
    /// default ttl; none below a ttl of 5 s): raise --ttl for a longer grace. When another
    /// owner changed or removed the lock, it may hold the lock already: SIGKILL follows SIGTERM
    /// at once.
    #[arg(long, default_value = "10", value_name = "SECS", value_parser = parse_secs)]
    pub grace: Duration,

    /// Run CMD only if no successful run of KEY completed within PERIOD (by the server's
    /// clock); otherwise say on stderr when it last ran and exit 0 at once. PERIOD is seconds
    /// like the other options, or a number with a unit: s, m, h or d (`20h`, `1.5d`); 1 s to
    /// 3660d (10 years). When CMD exits 0, the lock stays behind as the record of its success
    /// for PERIOD (plain `dimutex run KEY` finds KEY held until then; `release --force`
    /// deletes the record); when CMD fails, nothing is recorded and the next run tries again.
    /// If the success cannot be recorded: exit 74 when the lease was lost first, 69 when the
    /// write failed. With --wait, a run that finds another one running CMD waits for it
    /// (polling the lock with reads, at most 1 s apart): exit 0 once that one succeeded, or
    /// take the lock and run CMD if it failed.
    #[arg(long, value_name = "PERIOD", value_parser = parse_period)]
    pub once_per: Option<Duration>,

    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub target: Target,

    /// Required: confirms that you mean to break a lock that may belong to a live process.
    #[arg(long)]
    pub force: bool,

    /// Delete the lock only if its fencing token (as shown by `dimutex status`) is T.
    #[arg(long, value_name = "T")]
    pub token: Option<i64>,
}

/// The longest duration an option takes: about 31 years.
const MAX_SECS: f64 = 1e9;
/// The shortest `--once-per`: the server's clock (`Date`) counts whole seconds.
const MIN_PERIOD: Duration = Duration::from_secs(1);
/// The longest `--once-per`, in days: the longest retention the library writes (10 years).
const MAX_PERIOD_DAYS: u64 = 3660;

/// Parses a non-negative number of seconds, fractions allowed (`2`, `0.5`).
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    checked_secs(s, secs)
}

/// `secs` (parsed from `s`) as a duration, if it is non-negative and at most [`MAX_SECS`].
fn checked_secs(s: &str, secs: f64) -> Result<Duration, String> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a non-negative number of seconds"));
    }
    if secs > MAX_SECS {
        return Err(format!("{s:?}: at most {MAX_SECS} seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Parses a `--once-per` period: seconds as [`parse_secs`] takes them, or a number followed
/// by a unit, `s`, `m`, `h` or `d` (`90m`, `1.5d`); at least [`MIN_PERIOD`].
fn parse_period(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let factor = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86_400.0,
        _ => {
            return Err(format!(
                "{s:?} is not a period (seconds, or a number with a unit s, m, h or d)"
            ));
        }
    };
    let n: f64 = number.trim().parse().map_err(|_| {
        format!("{s:?} is not a period (seconds, or a number with a unit s, m, h or d)")
    })?;
    let period = checked_secs(s, n * factor)?;
    if period < MIN_PERIOD {
        return Err(format!("{s:?}: the period must be at least 1 s"));
    }
    if period > Duration::from_secs(MAX_PERIOD_DAYS * 86_400) {
        return Err(format!(
            "{s:?}: the period must be at most {MAX_PERIOD_DAYS}d"
        ));
    }
    Ok(period)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_secs("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("nan").is_err());
        assert!(parse_secs("x").is_err());
        // Past what the clock can count: refused, not a panic when the deadline is made.
        assert!(parse_secs("1e19").is_err());
        assert!(parse_secs("1e9").is_ok());
    }

    #[test]
    fn periods_parse() {
        assert_eq!(parse_period("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_period("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_period("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_period("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_period(" 2d "), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_period("1"), Ok(MIN_PERIOD));
        assert_eq!(
            parse_period("3660d"),
            Ok(Duration::from_secs(MAX_PERIOD_DAYS * 86_400))
        );
        for bad in [
            "", "0", "0h", "0.5", "-1h", "h", "1x", "1 h h", "nan", "inf", "1e9d", "1e19", "x1",
            "3661d", "1e9", "1hh",
        ] {
            assert!(parse_period(bad).is_err(), "{bad:?} refused");
        }
    }
}
