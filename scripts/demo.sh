#!/usr/bin/env bash
# The demo command: installs lorabatch with its worker extra into .venv, then runs `lorabatch demo`
# (demo model and adapters, embedded Redis, SQLite, a worker, a job over every adapter).
# Extra arguments go to `lorabatch demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[worker]'
exec .venv/bin/lorabatch demo "$@"
