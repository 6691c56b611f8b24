//! The lock object's metadata format and the expiry rule.
//!
//! A lock written by this crate carries three metadata values (all strings):
//! - `ttl`: the lease length in seconds;
//! - `owner`: `identity#nonce`, a fresh random nonce per acquisition;
//! - `expires`: the expiry in Python `dimutex`'s pattern `%Y-%d-%m %H:%M:%S.%f UTC`
//!   (year-**day**-month), so Python `dimutex` processes sharing the bucket see it as held.
//!
//! Our own locks are judged on the server's clock only: expired ⇔ `updated` + `ttl` + 1 s <
//! the `Date` of the inspecting response. The one-second slack covers `Date`'s resolution.
//! Locks written by Python `dimutex` carry only `expires`, written by their owner's clock; they
//! are judged by it plus [`FOREIGN_SKEW`], against the server's clock. A lock with neither
//! readable falls back to `updated` + the configured ttl — never "instantly stale".

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

use crate::backend::{Metadata, ObjectState, Version};

pub(crate) const TTL: &str = "ttl";
pub(crate) const OWNER: &str = "owner";
pub(crate) const EXPIRES: &str = "expires";
/// Present (`"1"`, the record format's version) on a completed record.
pub(crate) const RECORD: &str = "record";

/// The allowance for clock skew when judging locks written by Python `dimutex`.
pub(crate) const FOREIGN_SKEW: Duration = Duration::from_secs(2);

/// The resolution of the HTTP `Date` header.
const DATE_RESOLUTION: Duration = Duration::from_secs(1);

const EXPIRES_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[day]-[month] [hour]:[minute]:[second].[subsecond digits:6] UTC");

/// Formats a time as Python `dimutex` writes `expires` (`EXPIRES_FORMAT`). Times before
/// 1970 or after 9999 (a broken wall clock) are written as the epoch.
pub(crate) fn format_expires(at: SystemTime) -> String {
    let at = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| OffsetDateTime::from_unix_timestamp_nanos(d.as_nanos() as i128).ok())
        .filter(|at| at.year() <= 9999)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    // Written field by field: `time`'s format-description interpreter took three times the
    // instructions (`expires_digits_match_the_format_description` checks that both agree).
    // Microseconds, as Python's `%f`: truncated, never rounded up into the next second.
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06} UTC",
        at.year(),
        at.day(),
        u8::from(at.month()),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond(),
    )
}

/// Parses Python `dimutex`'s `expires`.
pub(crate) fn parse_expires(s: &str) -> Option<SystemTime> {
    let parsed = time::PrimitiveDateTime::parse(s.trim(), EXPIRES_FORMAT).ok()?;
    Some(parsed.assume_utc().into())
}

/// Formats a ttl as seconds (`"30"`, or `"2.5"` for fractions, millisecond precision).
pub(crate) fn format_ttl(ttl: Duration) -> String {
    let ms = ttl.as_millis();
    if ms % 1000 == 0 {
        format!("{}", ms / 1000)
    } else {
        format!("{}.{:03}", ms / 1000, ms % 1000)
    }
}

/// Parses a ttl written by [`format_ttl`] (or any non-negative decimal number of seconds).
pub(crate) fn parse_ttl(s: &str) -> Option<Duration> {
    let secs: f64 = s.trim().parse().ok()?;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

/// The metadata of a fresh lock.
pub(crate) fn lock_metadata(ttl: Duration, owner: &str, wall_now: SystemTime) -> Metadata {
    Metadata::from([
        (EXPIRES.to_owned(), format_expires(wall_now + ttl)),
        (OWNER.to_owned(), owner.to_owned()),
        (TTL.to_owned(), format_ttl(ttl)),
    ])
}

/// The shortest retention a record is written with: a second.
pub(crate) const MIN_RETENTION: Duration = Duration::from_secs(1);
/// The longest: ten years (a ttl is read back up to 1e9 s, and `expires` up to year 9999).
pub(crate) const MAX_RETENTION: Duration = Duration::from_secs(10 * 366 * 86_400);

/// The metadata of a completed record, kept for `retention` (within [`MIN_RETENTION`] and
/// [`MAX_RETENTION`]): a lock whose ttl is the
/// retention (so that it is judged, and taken over once expired, like any lock), with the
/// record's own `fields` and the [`RECORD`] marker.
pub(crate) fn record_metadata(
    retention: Duration,
    owner: &str,
    wall_now: SystemTime,
    fields: Metadata,
) -> Metadata {
    let retention = retention.clamp(MIN_RETENTION, MAX_RETENTION);
    let mut md = fields;
    md.extend(lock_metadata(retention, owner, wall_now));
    md.insert(RECORD.to_owned(), "1".to_owned());
    md
}

/// Whether `state` is a completed record.
pub(crate) fn is_record(state: &ObjectState) -> bool {
    state.metadata().contains_key(RECORD)
}

/// The metadata a refresh merges in.
pub(crate) fn refresh_metadata(ttl: Duration, wall_now: SystemTime) -> Metadata {
    Metadata::from([(EXPIRES.to_owned(), format_expires(wall_now + ttl))])
}

/// The owner recorded in a lock object, if any.
pub(crate) fn owner_of(state: &ObjectState) -> Option<&str> {
    state.metadata().get(OWNER).map(String::as_str)
}

/// Whether `state` is the lock object of the lease written at `version` by `owner`: the same
/// generation (a takeover or a new create makes a new one) and the same owner id (unique per
/// acquisition). Its metageneration may be newer: a metadata write of that lease whose outcome
/// its client never learned.
pub(crate) fn is_lease(state: &ObjectState, version: Version, owner: &str) -> bool {
    state.version().generation() == version.generation() && owner_of(state) == Some(owner)
}

/// The verdict on an existing lock object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Expired: may be taken over.
    Expired,
    /// Live, for at most this long by the server's clock.
    Held { remaining: Duration },
}

/// Where a lock's expiry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpirySource {
    /// Our own lock: `updated` + `ttl` (+ 1 s), server time.
    Ttl,
    /// A Python `dimutex` lock: its `expires` + skew allowance.
    Expires,
    /// Neither readable: `updated` + the configured ttl (+ 1 s).
    Fallback,
}

/// The time (server clock) after which a lock object counts as expired.
pub(crate) fn lease_end(state: &ObjectState, fallback_ttl: Duration) -> (SystemTime, ExpirySource) {
    let md = state.metadata();
    if let Some(ttl) = md.get(TTL).and_then(|s| parse_ttl(s)) {
        (state.updated() + ttl + DATE_RESOLUTION, ExpirySource::Ttl)
    } else if let Some(expires) = md.get(EXPIRES).and_then(|s| parse_expires(s)) {
        (expires + FOREIGN_SKEW, ExpirySource::Expires)
    } else {
        (
            state.updated() + fallback_ttl + DATE_RESOLUTION,
            ExpirySource::Fallback,
        )
    }
}

/// Judges whether a lock object has expired at `server_now` (the response's `Date`).
pub(crate) fn judge(
    state: &ObjectState,
    server_now: SystemTime,
    fallback_ttl: Duration,
) -> Verdict {
    let (end, _) = lease_end(state, fallback_ttl);
    match end.duration_since(server_now) {
        Ok(remaining) if !remaining.is_zero() => Verdict::Held { remaining },
        _ => Verdict::Expired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Version;

    fn at(secs: u64, micros: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    #[test]
    fn expires_in_one_second_share_the_date_and_not_the_microseconds() {
        let first = format_expires(at(1_767_323_045, 1));
        let same_second = format_expires(at(1_767_323_045, 999_999));
        let next_second = format_expires(at(1_767_323_046, 0));
        let earlier = format_expires(at(86_399, 5));
        assert_eq!(&*first, "2026-02-01 03:04:05.000001 UTC");
        assert_eq!(&*same_second, "2026-02-01 03:04:05.999999 UTC");
        assert_eq!(&*next_second, "2026-02-01 03:04:06.000000 UTC");
        assert_eq!(&*earlier, "1970-01-01 23:59:59.000005 UTC");
    }

    #[test]
    fn expires_digits_match_the_format_description() {
        use std::time::{Duration, UNIX_EPOCH};
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Any microsecond between 1970 and 2200.
            let micros = seed % (230 * 365 * 86_400 * 1_000_000);
            let at = UNIX_EPOCH + Duration::from_micros(micros);
            let expected = OffsetDateTime::from(at).format(EXPIRES_FORMAT).unwrap();
            assert_eq!(*format_expires(at), expected);
            assert_eq!(parse_expires(&expected), Some(at));
        }
        assert_eq!(
            &*format_expires(UNIX_EPOCH + Duration::from_secs(400 * 365 * 86_400 * 100)),
            "1970-01-01 00:00:00.000000 UTC"
        );
    }

    #[test]
    fn expires_uses_year_day_month() {
        // 2026-11-26T06:22:41.123456Z
        let t = at(1_795_674_161, 123_456);
        assert_eq!(&*format_expires(t), "2026-26-11 06:22:41.123456 UTC");
        assert_eq!(parse_expires("2026-26-11 06:22:41.123456 UTC"), Some(t));
        // As Python's strftime writes a day <= 12: still year-day-month.
        assert_eq!(
            &*format_expires(at(1_767_323_045, 0)),
            "2026-02-01 03:04:05.000000 UTC"
        );
        assert_eq!(parse_expires("garbage"), None);
        assert_eq!(
            parse_expires("2026-11-26 06:22:41.123456 UTC"),
            None,
            "month 26 does not exist"
        );
    }

    #[test]
    fn ttl_round_trips() {
        assert_eq!(format_ttl(Duration::from_secs(30)), "30");
        assert_eq!(format_ttl(Duration::from_millis(2500)), "2.500");
        assert_eq!(parse_ttl("2.500"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_ttl("-1"), None);
        assert_eq!(parse_ttl("nan"), None);
    }

    fn object(updated: SystemTime, md: &[(&str, &str)]) -> ObjectState {
        let md = md
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ObjectState::new(Version::new(1, 1), updated, md)
    }

    #[test]
    fn our_locks_are_judged_on_server_time_only() {
        let updated = at(1000, 0);
        // `expires` far in the past (a client clock 300 s slow) changes nothing.
        let o = object(
            updated,
            &[("ttl", "10"), ("expires", "1970-01-01 00:00:00.000000 UTC")],
        );
        assert_eq!(
            judge(&o, at(1010, 0), Duration::from_secs(60)),
            Verdict::Held {
                remaining: Duration::from_secs(1)
            }
        );
        assert_eq!(
            judge(&o, at(1011, 0), Duration::from_secs(60)),
            Verdict::Expired
        );
        assert_eq!(
            judge(&o, at(1011, 1), Duration::from_secs(60)),
            Verdict::Expired
        );
    }

    #[test]
    fn python_locks_are_judged_by_expires_plus_skew() {
        let o = object(at(0, 0), &[("expires", &format_expires(at(1000, 0)))]);
        assert!(matches!(
            judge(&o, at(1001, 0), Duration::from_secs(5)),
            Verdict::Held { .. }
        ));
        assert_eq!(
            judge(&o, at(1002, 0), Duration::from_secs(5)),
            Verdict::Expired
        );
    }

    #[test]
    fn unreadable_locks_fall_back_to_the_configured_ttl() {
        let o = object(at(100, 0), &[("expires", "tomorrow"), ("ttl", "soon")]);
        assert!(matches!(
            judge(&o, at(105, 0), Duration::from_secs(5)),
            Verdict::Held { .. }
        ));
        assert_eq!(
            judge(&o, at(106, 1), Duration::from_secs(5)),
            Verdict::Expired
        );
    }
}
