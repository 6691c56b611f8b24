//! What a [`LockLayer`](super::LockLayer) is told besides its client, key extractor and
//! rejection hook.

use std::time::Duration;

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Settings {
    /// `None`: fail fast with 409; `Some(d)`: wait up to `d` for the lock.
    pub(crate) wait: Option<Duration>,
    pub(crate) release_on_response: bool,
    pub(crate) fail_open: bool,
}
