#!/usr/bin/env bash
# The test suite (offline, CPU). Extra arguments go to pytest, e.g. -k resume
source "$(dirname "$0")/env.sh"
exec $PY -m pytest -q "$@"
