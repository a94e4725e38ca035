"""The token rate a worker reports with its heartbeat: completion tokens recorded over a sliding window.

It does not know where the tokens come from (the recorder reports what it recorded) nor where the
rate goes (the heartbeat and the metrics).
"""

from __future__ import annotations

import time
from collections import deque

RATE_WINDOW_SECONDS = 30.0
"""tokens/s in heartbeats is measured over this window."""


class TokenRate:
    """Completion tokens per second over the last RATE_WINDOW_SECONDS."""

    def __init__(self) -> None:
        self._finished_tokens: deque[tuple[float, int]] = deque()
        self._started = time.monotonic()

    def add(self, tokens: int) -> None:
        now = time.monotonic()
        self._finished_tokens.append((now, tokens))

    def per_second(self) -> float:
        now = time.monotonic()
        while self._finished_tokens and self._finished_tokens[0][0] < now - RATE_WINDOW_SECONDS:
            self._finished_tokens.popleft()
        window = min(RATE_WINDOW_SECONDS, now - self._started)
        return round(sum(n for _, n in self._finished_tokens) / max(window, 1.0), 1)
