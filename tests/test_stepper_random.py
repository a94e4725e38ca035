"""Both steppers driven at random the way the worker's engine loop drives them: ordinary admissions, suspect
groups larger than the batch, cancels, aborts, preempted rows queued again, adapters evicted (two resident
for four adapters and the base model). Whatever the order, nothing raises and every request admitted ends
exactly once, within its max_new_tokens.

Each seed is one fixed sequence, so a failure names a replayable case."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
from lorabatch.worker.engine.adapters import AdapterManager
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams, take_counts
from tests.test_engine import NAMES, PROMPTS, load

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENDED = {"stop", "length", "cancelled"}


def engine_for(demo_root: Path, forward: str, weights: str) -> Engine:
    model, tokenizer = load(demo_root)
    adapters = AdapterManager({n: demo_root / p for n, p in DEMO_ADAPTERS.items()},
                              base_model=str(demo_root / DEMO_MODEL_DIR), max_resident=2)
    return Engine(model, tokenizer, adapters, forward=forward, weights=weights, max_batch_size=4,
                  max_batch_tokens=600, max_context=512)


@pytest.mark.parametrize("forward", ["native", "transformers"])
@pytest.mark.parametrize("weights", ["auto", "separate", "merged"])
def test_random_driving_never_raises_and_ends_each_request_once(demo_root, forward, weights):
    seen: Counter = Counter()
    for seed in range(3):
        seen += _drive_at_random(engine_for(demo_root, forward, weights), random.Random(f"{forward}-{weights}-{seed}"))
    assert all(seen[event] for event in ("preempted", "group over the batch", "cancelled", "aborted")), seen


def _drive_at_random(engine: Engine, rnd: random.Random) -> Counter:
    """Returns how often each event of interest happened (so that the test knows it exercised them)."""
    stepper = engine.stepper()
    made = 0
    seen: Counter = Counter()

    def new_request(adapter: str | None = None) -> GenerationRequest:
        nonlocal made
        made += 1
        params = SamplingParams(max_new_tokens=rnd.randint(1, 14), temperature=rnd.choice([0.0, 0.0, 0.8]), seed=made)
        return GenerationRequest(made, adapter or rnd.choice(NAMES), params, prompt=rnd.choice(PROMPTS))

    waiting = [new_request() for _ in range(20)]
    asked = {r.key: r for r in waiting}
    ended: Counter = Counter()
    inside: set = set()  # admitted, not ended

    def settle(results) -> None:
        for res in results:
            assert res.key in inside, f"a result for {res.key}, which is not running"
            inside.discard(res.key)
            seen[res.finish_reason] += 1
            if res.finish_reason == "preempted":  # uncharged: queued again, as the worker does
                waiting.append(asked[res.key])
                continue
            assert res.error is None and res.finish_reason in ENDED, res
            assert res.completion_tokens <= asked[res.key].params.max_new_tokens
            ended[res.key] += 1

    def admit_planned() -> None:
        """An ordinary admission: what admission() plans, oldest first."""
        chosen, waiting[:] = take_counts(waiting, stepper.admission(Counter(r.adapter for r in waiting)))
        inside.update(r.key for r in chosen)
        settle(stepper.admit(chosen))

    for _ in range(160):
        op = rnd.random()
        if op < 0.35 and waiting:
            admit_planned()
        elif op < 0.42 and stepper.idle:  # suspects: one message's group, maybe more than the batch holds
            adapter = rnd.choice(NAMES)
            group = [new_request(adapter) for _ in range(rnd.randint(1, 9))]
            seen["group over the batch"] += len(group) > engine.max_batch_size
            asked.update((r.key, r) for r in group)
            inside.update(r.key for r in group)
            settle(stepper.admit(group, group=True))
        elif op < 0.50 and not stepper.idle:
            keys = stepper.keys()
            settle(stepper.cancel(rnd.sample(keys, rnd.randint(1, min(2, len(keys))))))
        elif op < 0.53:  # shutdown or engine trouble: every row handed back, queued again
            seen["aborted"] += stepper.running
            keys = stepper.abort()
            assert stepper.idle and set(keys) == inside, "abort must hand back exactly the rows inside"
            inside.clear()
            waiting += [asked[key] for key in keys]
        else:
            settle(stepper.step())
        if rnd.random() < 0.1:
            fresh = [new_request() for _ in range(rnd.randint(1, 6))]
            asked.update((r.key, r) for r in fresh)
            waiting += fresh
    for _ in range(2000):  # the rest runs out
        if not waiting and stepper.idle:
            break
        admit_planned()
        settle(stepper.step())
    else:
        raise AssertionError(f"still {len(waiting)} waiting and {stepper.running} running after 2000 steps")
    assert not inside
    assert set(ended) == set(asked) and set(ended.values()) == {1}, "a request ended twice or never"
    return seen
