//! The protected resource of the tests: a counter per key, incremented by read-modify-write.
//!
//! [`Resource::fenced`] accepts a write only when its fencing token is at least as new as the
//! last token it accepted for that key (GCS generations increase in practice, see
//! `FencingToken::get`). [`Resource::unfenced`] is its twin without the check: the last writer
//! wins, so a holder that read, paused and wrote after someone else's increment loses that
//! increment — a lost update, which the store notices at write time (the value it read is no
//! longer the current one) and the checker reports.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::history::History;

/// One write as the store saw it.
#[derive(Debug, Clone)]
pub struct WriteRecord {
    /// When it was applied or refused (the history's clock).
    pub at: Duration,
    pub key: String,
    pub client: String,
    pub token: i64,
    /// The value the writer had read.
    pub read: u64,
    /// The value it wrote (`read + 1`).
    pub value: u64,
    pub accepted: bool,
    /// Accepted although the value had changed since the writer read it: an update was lost.
    pub stale_read: bool,
}

#[derive(Default)]
struct Cell {
    value: u64,
    last_token: Option<i64>,
}

#[derive(Default)]
struct State {
    cells: HashMap<String, Cell>,
    log: Vec<WriteRecord>,
}

/// A counter per key, fenced or not.
pub struct Resource {
    name: &'static str,
    fenced: bool,
    history: Arc<History>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("fenced", &self.fenced)
            .finish()
    }
}

impl Resource {
    /// Refuses writes carrying a token older than the newest it accepted.
    pub fn fenced(history: Arc<History>) -> Self {
        Self {
            name: "fenced",
            fenced: true,
            history,
            state: Mutex::default(),
        }
    }

    /// Accepts every write: last writer wins.
    pub fn unfenced(history: Arc<History>) -> Self {
        Self {
            name: "unfenced",
            fenced: false,
            history,
            state: Mutex::default(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The current value.
    pub fn read(&self, key: &str) -> u64 {
        self.lock().cells.get(key).map_or(0, |c| c.value)
    }

    /// Writes `read + 1` with `token`; whether the store accepted it.
    pub fn write(&self, key: &str, client: &str, token: i64, read: u64) -> bool {
        let mut state = self.lock();
        let at = self.history.now();
        let cell = state.cells.entry(key.to_owned()).or_default();
        let accepted = !self.fenced || cell.last_token.is_none_or(|last| token >= last);
        let stale_read = accepted && cell.value != read;
        if accepted {
            cell.value = read + 1;
            cell.last_token = Some(cell.last_token.map_or(token, |last| last.max(token)));
        }
        state.log.push(WriteRecord {
            at,
            key: key.to_owned(),
            client: client.to_owned(),
            token,
            read,
            value: read + 1,
            accepted,
            stale_read,
        });
        accepted
    }

    /// Reads, waits `think` (the work between read and write), writes.
    pub async fn increment(&self, key: &str, client: &str, token: i64, think: Duration) -> bool {
        let read = self.read(key);
        if !think.is_zero() {
            tokio::time::sleep(think).await;
        }
        self.write(key, client, token, read)
    }

    pub fn writes(&self) -> Vec<WriteRecord> {
        self.lock().log.clone()
    }

    /// Writes refused, writes accepted.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        let accepted = state.log.iter().filter(|w| w.accepted).count();
        (state.log.len() - accepted, accepted)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
