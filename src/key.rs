//! Lock keys: validated names, and how they become GCS object names.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The longest object name GCS accepts, in bytes of UTF-8 (prefix included).
pub const MAX_OBJECT_NAME_LEN: usize = 1024;

/// A validated lock key: 1–1024 bytes of UTF-8, no control characters, not `.` or `..`.
///
/// The lock object is named by the client's prefix followed by the key; that whole name must
/// also fit in 1024 bytes, which the client checks before sending any request. Cloning is cheap
/// (the text is shared).
///
/// ```
/// use dimutex::LockKey;
/// let key: LockKey = "tenant/42/export".parse()?;
/// assert_eq!(key.as_str(), "tenant/42/export");
/// assert!(LockKey::new("").is_err());
/// assert!(LockKey::new("line\nbreak").is_err());
/// # Ok::<(), dimutex::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockKey(Arc<str>);

/// Why a string is not a valid lock key.
///
/// ```
/// use dimutex::{KeyError, LockKey};
/// assert!(matches!(LockKey::new(".."), Err(KeyError::DotSegment)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    #[error("lock key is empty")]
    Empty,
    /// The key (or prefix + key) is longer than GCS allows.
    #[error("lock object name is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// The length in bytes of the offending name.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The key contains a control character (GCS forbids CR and LF; we refuse all).
    #[error("lock key contains a control character")]
    ControlCharacter,
    /// The key is `.` or `..`, which GCS forbids as object names.
    #[error("lock key must not be `.` or `..`")]
    DotSegment,
    /// The key is not valid UTF-8 (for keys taken from bytes, such as HTTP headers).
    #[error("lock key is not valid UTF-8")]
    InvalidUtf8,
}

impl LockKey {
    /// Validates `key`.
    ///
    /// ```
    /// assert!(dimutex::LockKey::new("job-17").is_ok());
    /// ```
    pub fn new(key: impl AsRef<str>) -> Result<Self, KeyError> {
        let key = key.as_ref();
        validate(key)?;
        Ok(Self(key.into()))
    }

    /// Validates a key given as bytes, such as an HTTP header value.
    ///
    /// ```
    /// use dimutex::{KeyError, LockKey};
    /// assert_eq!(LockKey::from_bytes(b"abc")?.as_str(), "abc");
    /// assert_eq!(LockKey::from_bytes(b"\xff"), Err(KeyError::InvalidUtf8));
    /// # Ok::<(), KeyError>(())
    /// ```
    pub fn from_bytes(key: &[u8]) -> Result<Self, KeyError> {
        std::str::from_utf8(key)
            .map_err(|_| KeyError::InvalidUtf8)
            .and_then(Self::new)
    }

    /// The key as given.
    ///
    /// ```
    /// assert_eq!(dimutex::LockKey::new("a")?.as_str(), "a");
    /// # Ok::<(), dimutex::KeyError>(())
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a lock object prefix: any UTF-8 without control characters, short enough to leave
/// room for a key.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), KeyError> {
    if prefix.len() >= MAX_OBJECT_NAME_LEN {
        return Err(KeyError::TooLong {
            len: prefix.len(),
            max: MAX_OBJECT_NAME_LEN - 1,
        });
    }
    if prefix.chars().any(char::is_control) {
        return Err(KeyError::ControlCharacter);
    }
    Ok(())
}

/// A lock object's name (prefix + key), shared by the lease and its requests.
pub(crate) type ObjectName = Arc<str>;

/// The object name of `key` under `prefix`, checked against GCS's length limit.
pub(crate) fn object_name(prefix: &str, key: &LockKey) -> Result<ObjectName, KeyError> {
    let len = prefix.len() + key.as_str().len();
    if len > MAX_OBJECT_NAME_LEN {
        return Err(KeyError::TooLong {
            len,
            max: MAX_OBJECT_NAME_LEN,
        });
    }
    let name = format!("{prefix}{key}");
    if name == "." || name == ".." {
        return Err(KeyError::DotSegment);
    }
    Ok(name.into())
}

fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_OBJECT_NAME_LEN {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: MAX_OBJECT_NAME_LEN,
        });
    }
    let control = if key.is_ascii() {
        key.bytes().any(|b| b.is_ascii_control())
    } else {
        key.chars().any(char::is_control)
    };
    if control {
        return Err(KeyError::ControlCharacter);
    }
    if key == "." || key == ".." {
        return Err(KeyError::DotSegment);
    }
    Ok(())
}

impl FromStr for LockKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for LockKey {
    type Error = KeyError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for LockKey {
    type Error = KeyError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&String> for LockKey {
    type Error = KeyError;

    fn try_from(s: &String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl AsRef<str> for LockKey {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LockKey").field(&self.as_str()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for key in [
            "a",
            "job-1",
            "tenant/42",
            "ünïcødé",
            "a b",
            "x".repeat(1024).as_str(),
            "...",
            ".a",
        ] {
            assert!(LockKey::new(key).is_ok(), "{key:?}");
        }
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(LockKey::new(""), Err(KeyError::Empty));
        assert_eq!(
            LockKey::new("x".repeat(1025)),
            Err(KeyError::TooLong {
                len: 1025,
                max: 1024
            })
        );
        assert!(LockKey::new("café-7").is_ok());
        for key in [
            "a\nb",
            "\r",
            "\0",
            "tab\there",
            "\u{7f}",
            "\u{85}",
            "café\n",
        ] {
            assert_eq!(
                LockKey::new(key),
                Err(KeyError::ControlCharacter),
                "{key:?}"
            );
        }
        assert_eq!(LockKey::new("."), Err(KeyError::DotSegment));
        assert_eq!(LockKey::new(".."), Err(KeyError::DotSegment));
        assert_eq!(LockKey::from_bytes(b"a\xc3"), Err(KeyError::InvalidUtf8));
    }

    #[test]
    fn object_name_counts_the_prefix() {
        let key = LockKey::new("x".repeat(1020)).unwrap();
        assert_eq!(object_name("abcd", &key).unwrap().len(), 1024);
        assert_eq!(
            object_name("abcde", &key),
            Err(KeyError::TooLong {
                len: 1025,
                max: 1024
            })
        );
        assert_eq!(
            object_name("", &LockKey::new("k").unwrap()).as_deref(),
            Ok("k")
        );
    }

    #[test]
    fn keys_and_names_read_back_as_given_and_order_as_their_text() {
        for text in ["k", "é", &"x".repeat(300)] {
            let key = LockKey::new(text).unwrap();
            assert_eq!(key.as_str(), text);
            assert_eq!(
                &*object_name("dimutex/", &key).unwrap(),
                format!("dimutex/{text}")
            );
        }
        assert!(LockKey::new("b").unwrap() > LockKey::new("a".repeat(100)).unwrap());
        assert_eq!(
            object_name("", &LockKey::new("x").unwrap()).as_deref(),
            Ok("x")
        );
        let dot = LockKey::new(".").unwrap_err();
        assert_eq!(dot, KeyError::DotSegment);
        let name = object_name(".", &LockKey::new(".x").unwrap());
        assert_eq!(name.as_deref(), Ok("..x"));
    }

    #[test]
    fn prefix_validation() {
        assert!(validate_prefix("dimutex/").is_ok());
        assert!(validate_prefix("").is_ok());
        assert_eq!(validate_prefix("a\nb"), Err(KeyError::ControlCharacter));
        assert!(validate_prefix(&"p".repeat(1024)).is_err());
    }
}
