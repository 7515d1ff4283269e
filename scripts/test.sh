#!/usr/bin/env bash
# The test suite (offline, CPU), in TEST_WORKERS processes (default 2; 0 runs it in this one).
# Extra arguments go to pytest, e.g. -k resume, or -m 'not slow' for the quick tier.
source "$(dirname "$0")/env.sh"
workers=${TEST_WORKERS:-2}
case "$workers" in ''|*[!0-9]*) echo "error: TEST_WORKERS=$workers: give a whole number (0: no worker processes)" >&2; exit 2 ;; esac
parallel=()
# a file's tests stay together: they share its fixtures (a reference run, a trained model)
if [ "$workers" -gt 0 ]; then parallel=(-n "$workers" --dist loadfile); fi
exec $PY -m pytest -q "${parallel[@]}" "$@"
