"""Admission into the running batch: a pure decision over counts of waiting and running rows per adapter.

``plan_admission`` answers "how many requests of each adapter join the batch now, and are the batch's
adapter weights merged into the base weights or kept apart afterwards?". It sees adapter names and counts
only; the stepper (stepper.py) applies the decision. Why each rule holds, with measurements: the README's
engine section.

``TokenBudget`` turns max_batch_tokens into rows for it: before a claim, how many rows fit by the mean cost
learned so far (``room``); after the claim, when the real prompt lengths are known, which of the claimed rows
fit (``accept``; the caller hands the others back). Every stepper uses these two, so a worker claims only what
the batch it runs now can hold.

This module knows nothing about models, tokenizers, PEFT, prompts or requests beyond those counts and costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

BASE = "base"
"""The adapter name of rows that run the base model alone (settings.BASE_ADAPTER)."""

Weights = Literal["auto", "merged", "separate"]

ADMIT_FRACTION = 0.125
"""While rows are running, admit only once this share of max_batch_size is free (or everything admissible
fits): one prefill forward per freed row would pay its per-forward overhead and one cache join per row."""

AUTO_MERGED_FILL = 0.75
"""Auto mode, idle batch: merge one adapter when it has at least this share of max_batch_size rows waiting
(or is the only one waiting); otherwise mix adapters, weights apart."""


@dataclass(frozen=True)
class Admission:
    """How many rows of each adapter to admit now, and the weights the batch runs with afterwards."""

    counts: dict[str, int] = field(default_factory=dict)
    merged: str | None = None
    """The adapter merged into the base weights for the batch's forwards; None: adapters kept apart."""


def plan_admission(
    waiting: Mapping[str, int],
    *,
    running: Mapping[str, int],
    merged: str | None,
    weights: Weights,
    max_batch_size: int,
    max_adapters: int,
    min_merged_rows: int | None = None,
    admit_fraction: float = ADMIT_FRACTION,
    token_room: int | None = None,
) -> Admission:
    """The admission for ``waiting`` (rows per adapter, in the caller's priority order) into a batch running
    ``running`` (rows per adapter) with ``merged`` merged (None: apart).

    separate: any adapter joins, at most ``max_adapters`` distinct adapters in the batch.
    merged: an idle batch takes the adapter with most waiting rows; then only that adapter's rows join, until
    the batch drains. Base rows form a group of their own and run with nothing merged.
    ``token_room``: at most this many rows join now (``TokenBudget.room``; None: no token limit); the batch
    then counts as full at ``running + token_room`` rows for the "wait for more free slots" rule.
    auto: an idle batch merges an adapter that fills ``min_merged_rows`` (or is the only one waiting), else runs
    apart; a merged batch stays merged while its adapter's waiting rows fill the free slots (or nothing else
    waits) and otherwise switches to weights apart (exact: only float rounding differs) and admits any adapter.
    """
    waiting = {name: n for name, n in waiting.items() if n > 0}
    busy = sum(running.values())
    free = max_batch_size - busy
    capacity = max_batch_size
    if token_room is not None:
        free, capacity = min(free, token_room), min(capacity, busy + token_room)
    if not waiting or free <= 0:
        return Admission({}, merged)
    if min_merged_rows is None:
        min_merged_rows = max(1, round(max_batch_size * AUTO_MERGED_FILL))
    if busy == 0:
        biggest = max(waiting, key=lambda name: waiting[name])  # the first of equals: the caller's order
        one_group = {biggest: min(free, waiting[biggest])}
        as_merged = None if biggest == BASE else biggest
        if weights == "merged":
            return Admission(one_group, as_merged)
        if weights == "auto" and as_merged and (waiting[biggest] >= min_merged_rows or len(waiting) == 1):
            return Admission(one_group, as_merged)
        return Admission(_take_any(waiting, free, running, max_adapters), None)
    group = next(iter(running)) if len(running) == 1 else None
    if weights == "merged" or (weights == "auto" and merged is not None and _stays_merged(waiting, merged, free)):
        # Only the batch's own group joins (merged mode keeps one group per batch by construction).
        own = merged or group
        admissible = waiting.get(own, 0) if own is not None else 0
        counts = {own: min(free, admissible)} if admissible else {}
        after = merged
    else:
        counts = _take_any(waiting, free, running, max_adapters)
        admissible = sum(_take_any(waiting, sum(waiting.values()), running, max_adapters).values())
        after = None
    # Few free slots and more admissible rows waiting than fit: wait for more slots, change nothing.
    taken = sum(counts.values())
    if taken == 0 or (taken < max(1, math.ceil(capacity * admit_fraction)) and taken < admissible):
        return Admission({}, merged)
    return Admission(counts, after)


def _stays_merged(waiting: Mapping[str, int], merged: str, free: int) -> bool:
    own = waiting.get(merged, 0)
    return own >= free or set(waiting) == {merged}


def _take_any(waiting: Mapping[str, int], free: int, running: Mapping[str, int], max_adapters: int) -> dict[str, int]:
    """One row of each adapter in turn (the caller's order) until the free slots are taken, while the batch
    holds at most ``max_adapters`` distinct adapters (base aside).

    Taking in turn, not adapter after adapter: the caller's queue is usually sorted (by priority, or by prompt
    length in Engine.generate), and the first rows of every adapter are what it would admit first.
    """
    adapters = {name for name in running if name != BASE}
    allowed = []
    for name in waiting:
        if name == BASE or name in adapters or len(adapters) < max_adapters:
            adapters.add(name)
            allowed.append(name)
    counts: dict[str, int] = {}
    while free > 0:
        progressed = False
        for name in allowed:
            if free > 0 and counts.get(name, 0) < waiting[name]:
                counts[name] = counts.get(name, 0) + 1
                free -= 1
                progressed = True
        if not progressed:
            break
    return counts


class TokenBudget:
    """max_batch_tokens counted in rows. A row costs its prompt + max_new_tokens: the KV cache it may come to hold.

    The queue says how many rows wait, not how long they are (prompts are read at claim time), so before a
    claim rows are counted by the mean cost of every row claimed so far; after the claim the real costs are
    known and ``accept`` says which rows fit. One per running batch; it holds only that running mean.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.tokens = 0

    @property
    def mean_cost(self) -> float | None:
        return self.tokens / self.rows if self.rows else None

    def room(self, *, max_batch_tokens: int | None, used: int, idle: bool) -> int | None:
        """How many more rows to claim now beside ``used`` tokens of running rows (None: no token limit).

        An idle batch always takes one row, whatever its cost (a row alone runs, or fails as too large); with
        nothing learned yet it takes exactly one, and learns from it. A busy batch with nothing learned waits.
        """
        if max_batch_tokens is None:
            return None
        mean = self.mean_cost
        if mean is None:
            return 1 if idle else 0
        rows = int((max_batch_tokens - used) // mean) if max_batch_tokens > used else 0
        return max(rows, 1) if idle else rows

    def accept(self, costs: Sequence[int], *, max_batch_tokens: int | None, used: int, idle: bool) -> list[bool]:
        """Which of these claimed rows (in order) join beside ``used`` tokens; learns their costs.

        First fit in order: a row that does not fit leaves its budget to the smaller rows after it. The first
        row into an idle batch always joins.
        """
        self.rows += len(costs)
        self.tokens += sum(costs)
        if max_batch_tokens is None:
            return [True] * len(costs)
        return first_fit(costs, left=max_batch_tokens - used, first_always=idle)


def first_fit(costs: Sequence[int], *, left: int, first_always: bool) -> list[bool]:
    """Which rows (in order) fit ``left`` tokens, first fit: a row that does not fit leaves its budget to the
    smaller rows after it. ``first_always``: the first row fits whatever its cost (a row alone must run)."""
    fits: list[bool] = []
    for cost in costs:
        ok = cost <= left or (first_always and not fits)
        fits.append(ok)
        left -= cost if ok else 0
    return fits
