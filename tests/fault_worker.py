"""`lorabatch worker` with one injected fault, for the fault-tolerance tests.

A request whose prompt contains POISON kills the whole worker process with SIGKILL when the
engine admits it, as the out-of-memory killer would. With LORABATCH_TEST_FAULT=engine-fails, the
engine's third step raises instead, as a CUDA error would.

With the instant engine (`[worker] engine = "instant"`): a step raises ValueError while a row whose
prompt contains RAISE is in the batch (a Python exception one request causes, e.g. a bad value in its
sampling); a row whose prompt contains ECHO: answers with the JSON string written after it (so
that a test can have the engine "generate" NUL and other control characters, which no prompt may
hold). With LORABATCH_TEST_TASK_RAISES=<idx>, the Celery task raises, once, on the first message that
names request <idx> of a job, before the worker holds it: Celery acknowledges it (acks_late acks
on an exception), so its references are gone from Redis while their requests stay queued.
Everything else is the real worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

import lorabatch.worker.engine.instant as instant_module
import lorabatch.worker.engine.stepper as stepper_module
from lorabatch.cli.main import main

POISON = "POISON"
_admit = stepper_module.Stepper.admit


def _admit_or_die(self, requests, **kw):
    if any(POISON in (r.prompt or "") for r in requests):
        os.kill(os.getpid(), signal.SIGKILL)
    return _admit(self, requests, **kw)


stepper_module.Stepper.admit = _admit_or_die

if os.environ.get("LORABATCH_TEST_FAULT") == "engine-fails":
    _step, _calls = stepper_module.Stepper.step, []

    def _step_or_fail(self):
        _calls.append(1)
        if len(_calls) == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return _step(self)

    stepper_module.Stepper.step = _step_or_fail

RAISE, ECHO = "RAISE", "ECHO:"
_instant_admit, _instant_step = instant_module.InstantStepper.admit, instant_module.InstantStepper.step


def _instant_step_or_raise(self):
    bad = [r.key for r in self.rows if RAISE in (r.prompt or "")]
    if bad:
        raise ValueError(f"injected: the engine raises on request {bad[0]}")
    results = _instant_step(self)
    out = []
    for res in results:
        prompt = self.prompts.pop(res.key, "")
        out.append(dataclasses.replace(res, output=json.loads(prompt.split(ECHO, 1)[1])) if ECHO in prompt else res)
    return out


def _instant_admit_remembering(self, requests, **kw):
    self.prompts = getattr(self, "prompts", {})
    self.prompts.update({r.key: r.prompt or "" for r in requests})
    return _instant_admit(self, requests, **kw)


instant_module.InstantStepper.step = _instant_step_or_raise
instant_module.InstantStepper.admit = _instant_admit_remembering

if (_raise_on := os.environ.get("LORABATCH_TEST_TASK_RAISES")) is not None:
    import lorabatch.worker.service as service_module

    _hold, _raised = service_module.WorkerService.hold, []

    def _hold_or_raise(self, job_id, adapter, idxs, *args, **kw):
        if not _raised and int(_raise_on) in idxs:
            _raised.append(1)
            print(f"injected: the task raises on the message of requests {list(idxs)}", flush=True)
            raise RuntimeError(f"injected: the task raises before holding requests {list(idxs)}")
        return _hold(self, job_id, adapter, idxs, *args, **kw)

    service_module.WorkerService.hold = _hold_or_raise

if __name__ == "__main__":
    sys.exit(main())
