//! Shared test support: servers, Python peers, and lock scenarios.
#![allow(dead_code)]

pub mod emulator;
pub mod python;
pub mod scenarios;

/// A prefix unique to one test run and test name.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("dimutex-test/{test}/{nanos:x}/")
}
