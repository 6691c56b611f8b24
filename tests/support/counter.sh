#!/bin/sh
# A deliberately non-atomic read-sleep-increment-write of a counter file: concurrent runs lose
# updates unless something serializes them (tests/cli.rs runs it under `dimutex run`).
#
# usage: counter.sh COUNTER_FILE [LOG_FILE]
# With LOG_FILE, appends "DIMUTEX_KEY DIMUTEX_TOKEN" to it (one line per run).
set -eu
n=$(cat "$1")
sleep 0.02
echo $((n + 1)) >"$1"
if [ -n "${2:-}" ]; then
    echo "${DIMUTEX_KEY:-} ${DIMUTEX_TOKEN:-}" >>"$2"
fi
