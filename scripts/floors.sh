#!/usr/bin/env bash
# The floor check: installs lorabatch with the LOWEST versions pyproject.toml allows for the libraries
# the engine leans on (transformers, peft) into $FLOORS_VENV (default /tmp/lorabatch-floors-venv), and runs
# the engine's tests there.
# torch stays at constraints.txt's version (its floor, 2.5, is the first with torch.OutOfMemoryError;
# a CPU build of it is rarely at hand). Extra arguments go to pytest.
# Last run (2026-11-28, Python 3.11, torch 2.13.0 CPU): transformers 5.0.0 + peft 0.19.0:
# test_demo_model, test_adapters, test_engine, test_stepper, test_batching: 114 passed in about 2 min
# (2026-11-29, with the KV cache growing in place: 120 passed);
# peft 0.18.1: test_adapters fails (PeftModel.set_adapter() has no inference_mode).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
floor() { sed -n "s/^ *\"$1>=\([0-9.]*\)\".*/\1/p" pyproject.toml; }
VENV=${FLOORS_VENV:-/tmp/lorabatch-floors-venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
TORCH=$(sed -n 's/^torch==//p' constraints.txt)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH" \
    "transformers==$(floor transformers)" "peft==$(floor peft)" '.[worker,test]'
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall .  # this tree's code
# From the root, which holds no lorabatch/ folder: the tests import the installed (non-editable) package.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$VENV/bin/python" -m pytest -p no:cacheprovider \
    tests/test_demo_model.py tests/test_adapters.py tests/test_engine.py tests/test_stepper.py tests/test_batching.py "$@"
