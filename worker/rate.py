"""The token rate a worker reports with its heartbeat: completion tokens recorded over a sliding window.

It does not know where the tokens come from (the recorder reports what it recorded) nor where the
rate goes (the heartbeat and the metrics).
"""

from __future__ import annotations

import threading
import time
from collections import deque

RATE_WINDOW_SECONDS = 30.0
"""tokens/s in heartbeats is measured over this window."""


class TokenRate:
    """Completion tokens per second over the last RATE_WINDOW_SECONDS. `add` (the recorder thread) and
    `per_second` (the heartbeat thread) take one lock: summing a deque another thread appends to
    raises "deque mutated during iteration", which cost a heartbeat."""

    def __init__(self) -> None:
        self._finished_tokens: deque[tuple[float, int]] = deque()
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._finished_tokens.append((time.monotonic(), tokens))

    def per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._finished_tokens and self._finished_tokens[0][0] < now - RATE_WINDOW_SECONDS:
                self._finished_tokens.popleft()
            total = sum(n for _, n in self._finished_tokens)
        window = min(RATE_WINDOW_SECONDS, now - self._started)
        return round(total / max(window, 1.0), 1)
