//! The fencing token of an acquisition.

use std::fmt;

/// A fencing token: the generation of the lock object this acquisition created.
///
/// Each acquisition of a key gets a token no other acquisition of that key gets. Pass it to the
/// resource you protect and have the resource refuse writes carrying a token other than the
/// newest it has seen. GCS promises that generations are unique, not that they increase, so
/// compare tokens by **equality**; they do increase on GCS and on this crate's backends in
/// practice, which is what [`get`](Self::get) is for. It serializes as a JSON integer.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
/// let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
/// let a = client.try_acquire("k").await?;
/// let token_a = a.token();
/// a.release().await?;
/// let b = client.try_acquire("k").await?;
/// assert_ne!(b.token(), token_a);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct FencingToken(i64);

impl FencingToken {
    pub(crate) fn from_generation(generation: i64) -> Self {
        Self(generation)
    }

    /// The object generation.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dimutex::Error> {
    /// # let client = dimutex::Client::new(dimutex::backend::MemoryBackend::new());
    /// let guard = client.try_acquire("k").await?;
    /// assert!(guard.token().get() > 0);
    /// # Ok(()) }
    /// ```
    pub fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for FencingToken {
    /// A token from its number, as printed by [`Display`](fmt::Display) (for operators
    /// passing a token back, say).
    fn from(generation: i64) -> Self {
        Self(generation)
    }
}

impl std::str::FromStr for FencingToken {
    type Err = std::num::ParseIntError;

    /// Parses a token as printed by [`Display`](fmt::Display).
    ///
    /// ```
    /// let t: dimutex::FencingToken = "1795674826528415".parse().unwrap();
    /// assert_eq!(t.get(), 1795674826528415);
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(Self)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}
