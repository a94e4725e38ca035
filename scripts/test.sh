#!/usr/bin/env bash
# The test command: installs lorabatch with its worker and test extras into .venv, then runs pytest.
# Extra arguments go to pytest. Needs Python 3.10+ (3.11 tested), git and a C compiler; nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[worker,test]'
exec .venv/bin/python -m pytest "$@"
