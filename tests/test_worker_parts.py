"""Small parts of the worker, in threads as the worker runs them: the token rate, the cancel poll."""

from __future__ import annotations

import threading
import time

from lorabatch.worker.rate import TokenRate


def test_token_rate_survives_appends_from_another_thread():
    """The heartbeat reads the rate while the recorder thread adds to it: never 'deque mutated during iteration'."""
    rate = TokenRate()
    for _ in range(20_000):
        rate.add(1)
    stop, errors = threading.Event(), []

    def recorder() -> None:
        while not stop.is_set():
            rate.add(1)

    t = threading.Thread(target=recorder)
    t.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                rate.per_second()
            except RuntimeError as e:
                errors.append(e)
                break
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert rate.per_second() > 0
