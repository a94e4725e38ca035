"""An engine that answers at once, for measuring everything around generation (claims, records,
Redis, the database) and for chaos soaks. Never the default: a worker uses it only with
`[worker] engine = "instant"` in its configuration, which benchmarks and tests write.

Its stepper follows the real Stepper's contract (worker/engine/stepper.py): an admitted row ends
after 1 to 8 steps (by its index, so lengths are ragged), with a fixed output.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

from lorabatch.worker.engine.params import GenerationRequest, GenerationResult


class InstantEngine:
    def __init__(self, *, max_batch_size: int = 32, step_seconds: float = 0.0) -> None:
        self.max_batch_size, self.step_seconds = max_batch_size, step_seconds

    def stepper(self) -> InstantStepper:
        return InstantStepper(self)


class InstantStepper:
    def __init__(self, engine: InstantEngine) -> None:
        self.engine = engine
        self.rows: list[GenerationRequest] = []
        self.steps_left: dict[Hashable, int] = {}

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def idle(self) -> bool:
        return not self.rows

    def keys(self) -> list[Hashable]:
        return [r.key for r in self.rows]

    def admission(self, waiting: Mapping[str, int]) -> dict[str, int]:
        room, plan = self.engine.max_batch_size - len(self.rows), {}
        for adapter, n in waiting.items():
            if room <= 0:
                break
            plan[adapter] = min(n, room)
            room -= plan[adapter]
        return plan

    def admit(self, requests: list[GenerationRequest], *, group: bool = False) -> list[GenerationResult]:
        """`group` (suspects, admitted together) changes nothing here: instant rows never go back."""
        self.rows += requests
        for r in requests:
            self.steps_left[r.key] = 1 + hash(r.key) % 8
        return []

    def step(self) -> list[GenerationResult]:
        if self.engine.step_seconds:
            import time

            time.sleep(self.engine.step_seconds)
        for r in self.rows:
            self.steps_left[r.key] -= 1
        done = [r for r in self.rows if self.steps_left[r.key] <= 0]
        self.rows = [r for r in self.rows if self.steps_left[r.key] > 0]
        for r in done:
            del self.steps_left[r.key]
        return [GenerationResult(r.key, f"instant answer to {r.key[1]}", "stop", prompt_tokens=1, completion_tokens=1)
                for r in done]

    def cancel(self, keys: Iterable[Hashable]) -> list[GenerationResult]:
        keys = set(keys)
        gone = [r for r in self.rows if r.key in keys]
        self.rows = [r for r in self.rows if r.key not in keys]
        for r in gone:
            del self.steps_left[r.key]
        return [GenerationResult(r.key, "", "cancelled", prompt_tokens=1, completion_tokens=0) for r in gone]

    def abort(self) -> list[Hashable]:
        keys, self.rows = self.keys(), []
        self.steps_left.clear()
        return keys
