"""`lorabatch worker` with one injected fault, for the fault-tolerance tests.

A request whose prompt contains POISON kills the whole worker process with SIGKILL when the
engine admits it, as the out-of-memory killer would. With LORABATCH_TEST_FAULT=engine-fails, the
engine's third step raises instead, as a CUDA error would. Everything else is the real worker.
"""

from __future__ import annotations

import os
import signal
import sys

import lorabatch.worker.engine.stepper as stepper_module
from lorabatch.cli.main import main

POISON = "POISON"
_admit = stepper_module.Stepper.admit


def _admit_or_die(self, requests):
    if any(POISON in (r.prompt or "") for r in requests):
        os.kill(os.getpid(), signal.SIGKILL)
    return _admit(self, requests)


stepper_module.Stepper.admit = _admit_or_die

if os.environ.get("LORABATCH_TEST_FAULT") == "engine-fails":
    _step, _calls = stepper_module.Stepper.step, []

    def _step_or_fail(self):
        _calls.append(1)
        if len(_calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return _step(self)

    stepper_module.Stepper.step = _step_or_fail

if __name__ == "__main__":
    sys.exit(main())
