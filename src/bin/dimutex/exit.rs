//! Exit codes (sysexits.h where one fits) and the mapping of library errors onto them.

use std::fmt;

use dimutex::backend::GcsConfigError;
use dimutex::{ConfigError, Error};

/// Bad arguments or an invalid key (EX_USAGE).
pub const USAGE: u8 = 64;
/// The backend is unavailable or refused us; unusable configuration (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// The lease was lost while the command ran (EX_IOERR).
pub const LOST: u8 = 74;
/// The lock is held by another owner (EX_TEMPFAIL).
pub const HELD: u8 = 75;
/// `status`: the lock is free; `release`: nothing was deleted.
pub const NO: u8 = 1;
/// The command could not be executed (as shells report it).
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found (as shells report it).
pub const NOT_FOUND: u8 = 127;

/// Why dimutex stops early: an exit code and the one line to print on stderr.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl fmt::Display) -> Self {
        Self::new(USAGE, message.to_string())
    }

    /// A library error met while working on `key`.
    pub fn from_lock_error(key: &str, e: Error) -> Self {
        match e {
            Error::Held { remaining } => Self::new(HELD, held_line(key, remaining)),
            Error::InvalidKey(e) => Self::usage(format!("invalid lock key {key:?}: {e}")),
            e @ (Error::Unavailable { .. } | Error::Backend(_)) => {
                Self::new(UNAVAILABLE, format!("lock {key:?}: {e}"))
            }
            e => Self::new(UNAVAILABLE, format!("lock {key:?}: {e}")),
        }
    }

    pub fn from_backend_config(e: GcsConfigError) -> Self {
        match e {
            GcsConfigError::InvalidBucket(_) => Self::usage(e),
            e => Self::new(UNAVAILABLE, format!("cannot set up the GCS backend: {e}")),
        }
    }

    pub fn from_client_config(e: ConfigError) -> Self {
        Self::usage(e)
    }
}

/// The one line printed when the lock is held elsewhere.
pub fn held_line(key: &str, remaining: Option<std::time::Duration>) -> String {
    match remaining {
        Some(r) => format!(
            "lock {key:?} is held by another owner (lease ends in at most {} s)",
            ceil_secs(r)
        ),
        None => format!("lock {key:?} is held by another owner"),
    }
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn held_line_names_key_and_remaining() {
        assert_eq!(
            held_line("a b", Some(Duration::from_millis(26_100))),
            "lock \"a b\" is held by another owner (lease ends in at most 27 s)"
        );
        assert_eq!(held_line("k", None), "lock \"k\" is held by another owner");
    }
}
