//! Waiting between attempts: decorrelated-jitter backoff and the retry policy.

use std::time::Duration;

use crate::error::ConfigError;

/// Decorrelated-jitter backoff: each delay is drawn uniformly between `min` and the previous
/// delay × `multiplier`, and capped at `max`.
///
/// ```
/// use std::time::Duration;
/// use dimutex::Backoff;
/// let b = Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 3.0)?;
/// assert_eq!(b.max(), Duration::from_secs(1));
/// # Ok::<(), dimutex::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    multiplier: f64,
}

impl Backoff {
    /// A backoff from its bounds. `min` must be positive, `max` at least `min`, and the
    /// multiplier at least 1.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert!(dimutex::Backoff::new(Duration::ZERO, Duration::from_secs(1), 2.0).is_err());
    /// ```
    pub fn new(min: Duration, max: Duration, multiplier: f64) -> Result<Self, ConfigError> {
        if min.is_zero() {
            return Err(ConfigError("backoff min must be positive".into()));
        }
        if max < min {
            return Err(ConfigError("backoff max must be at least min".into()));
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(ConfigError(
                "backoff multiplier must be a finite number >= 1".into(),
            ));
        }
        Ok(Self {
            min,
            max,
            multiplier,
        })
    }

    /// The shortest delay.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = dimutex::Backoff::new(Duration::from_millis(5), Duration::from_millis(9), 1.5)?;
    /// assert_eq!(b.min(), Duration::from_millis(5));
    /// # Ok::<(), dimutex::ConfigError>(())
    /// ```
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The longest delay.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = dimutex::Backoff::new(Duration::from_millis(5), Duration::from_millis(9), 1.5)?;
    /// assert_eq!(b.max(), Duration::from_millis(9));
    /// # Ok::<(), dimutex::ConfigError>(())
    /// ```
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The growth factor of the upper bound.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = dimutex::Backoff::new(Duration::from_millis(5), Duration::from_millis(9), 1.5)?;
    /// assert_eq!(b.multiplier(), 1.5);
    /// # Ok::<(), dimutex::ConfigError>(())
    /// ```
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    pub(crate) fn delays(&self) -> Delays {
        Delays {
            backoff: *self,
            prev: self.min,
        }
    }
}

/// The sequence of delays of one backoff run.
#[derive(Debug)]
pub(crate) struct Delays {
    backoff: Backoff,
    prev: Duration,
}

impl Delays {
    pub(crate) fn next_delay(&mut self) -> Duration {
        let lo = self.backoff.min.as_secs_f64();
        let hi = (self.prev.as_secs_f64() * self.backoff.multiplier).max(lo);
        let pick = if hi > lo {
            crate::random::in_range(lo..=hi)
        } else {
            lo
        };
        let delay = Duration::from_secs_f64(pick).min(self.backoff.max);
        self.prev = delay;
        delay
    }
}

/// How transient backend failures (timeouts, 429, 5xx, dropped connections) are retried:
/// with a [`Backoff`] between attempts, for at most `max_elapsed` per operation.
///
/// ```
/// use std::time::Duration;
/// use dimutex::{Backoff, RetryPolicy};
/// let policy = RetryPolicy::new(
///     Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 3.0)?,
///     Duration::from_secs(5),
/// );
/// assert_eq!(policy.max_elapsed(), Duration::from_secs(5));
/// # Ok::<(), dimutex::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    backoff: Backoff,
    max_elapsed: Duration,
}

impl RetryPolicy {
    /// A retry policy. `max_elapsed` of zero means "one attempt, no retries".
    ///
    /// ```
    /// use std::time::Duration;
    /// let p = dimutex::RetryPolicy::new(dimutex::Backoff::default(), Duration::ZERO);
    /// assert_eq!(p.max_elapsed(), Duration::ZERO);
    /// ```
    pub fn new(backoff: Backoff, max_elapsed: Duration) -> Self {
        Self {
            backoff,
            max_elapsed,
        }
    }

    /// The delays between attempts.
    ///
    /// ```
    /// assert_eq!(dimutex::RetryPolicy::default().backoff(), dimutex::Backoff::default());
    /// ```
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// How long one operation keeps retrying before giving up.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(dimutex::RetryPolicy::default().max_elapsed(), Duration::from_secs(5));
    /// ```
    pub fn max_elapsed(&self) -> Duration {
        self.max_elapsed
    }
}

impl Default for Backoff {
    /// 100 ms to 2 s, multiplier 3.
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 3.0,
        }
    }
}

impl Default for RetryPolicy {
    /// [`Backoff::default`] between attempts, giving up after 5 s.
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            max_elapsed: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds_and_grow() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(500), 3.0).unwrap();
        let mut d = b.delays();
        let all: Vec<_> = (0..200).map(|_| d.next_delay()).collect();
        assert!(all.iter().all(|x| *x >= b.min() && *x <= b.max()));
        assert!(
            all.iter().any(|x| *x > Duration::from_millis(100)),
            "never grew: {all:?}"
        );
    }

    #[test]
    fn invalid_backoffs_are_errors() {
        let s = Duration::from_secs(1);
        assert!(Backoff::new(s, s / 2, 2.0).is_err());
        assert!(Backoff::new(s, s, 0.5).is_err());
        assert!(Backoff::new(s, s, f64::NAN).is_err());
        assert!(Backoff::new(s, s, 1.0).is_ok());
    }
}
