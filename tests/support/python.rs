//! The Python interpreter that has the reference `dimutex` package (PyPI `dimutex==1.3.1`),
//! for the interoperability tests. Installed by `.ci/setup-python.sh`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The venv Python with `dimutex` installed: `$DIMUTEX_PYTHON`, else `DIMUTEX_PYTHON=` in
/// `.ci-cache/env`. Panics when neither names an existing file.
pub fn dimutex_python() -> PathBuf {
    const HINT: &str = "run `bash .ci/setup-python.sh` from the repository root (it creates \
                        .ci-cache/venv-dimutex and writes .ci-cache/env), or set DIMUTEX_PYTHON \
                        to a Python that can `import dimutex`";
    let (path, source) = match std::env::var("DIMUTEX_PYTHON") {
        Ok(v) if !v.trim().is_empty() => (PathBuf::from(v.trim()), "$DIMUTEX_PYTHON".to_owned()),
        _ => {
            let env_file = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(".ci-cache")
                .join("env");
            let value = std::fs::read_to_string(&env_file).ok().and_then(|text| {
                text.lines().find_map(|line| {
                    let (k, v) = line.trim().split_once('=')?;
                    (k.trim() == "DIMUTEX_PYTHON" && !v.trim().is_empty())
                        .then(|| v.trim().to_owned())
                })
            });
            match value {
                Some(v) => (PathBuf::from(v), env_file.display().to_string()),
                None => panic!(
                    "Python with dimutex not found: DIMUTEX_PYTHON is unset and {} has no \
                     DIMUTEX_PYTHON line; {HINT}",
                    env_file.display()
                ),
            }
        }
    };
    if !path.is_file() {
        panic!(
            "Python with dimutex not found at {} (from {source}); {HINT}",
            path.display()
        );
    }
    path
}
