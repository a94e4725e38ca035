"""`lorabatch worker` with one injected fault, for the fault-tolerance tests.

A request whose prompt contains POISON kills the whole worker process with SIGKILL when the
engine reaches it, as the out-of-memory killer would. Everything else is the real worker.
"""

from __future__ import annotations

import os
import signal
import sys

import lorabatch.worker.engine.engine as engine_module
from lorabatch.cli.main import main

POISON = "POISON"
_generate = engine_module.Engine.generate


def _generate_or_die(self, requests):
    if any(POISON in (r.prompt or "") for r in requests):
        os.kill(os.getpid(), signal.SIGKILL)
    return _generate(self, requests)


engine_module.Engine.generate = _generate_or_die

if __name__ == "__main__":
    sys.exit(main())
