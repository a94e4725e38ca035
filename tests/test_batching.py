"""Pure helpers of the engine: admission, stop strings, prefill chunks (sampling: test_sampling.py)."""

from __future__ import annotations

import pytest
import torch

from lorabatch.worker.engine.batching import TokenBudget, plan_admission
from lorabatch.worker.engine.stops import StopStrings, cut_at_stop


def admit(waiting, running=None, merged=None, weights="auto", size=8, max_adapters=8, min_merged_rows=None,
          token_room=None):
    decision = plan_admission(waiting, running=running or {}, merged=merged, weights=weights, max_batch_size=size,
                              max_adapters=max_adapters, min_merged_rows=min_merged_rows, token_room=token_room)
    return decision.counts, decision.merged


@pytest.mark.parametrize(
    "case, expected",
    [
        # separate: any adapter joins, one of each in turn (the caller's order), up to the free slots
        (dict(waiting={"a": 5, "base": 5}, weights="separate"), ({"a": 4, "base": 4}, None)),
        (dict(waiting={"a": 1, "base": 9}, weights="separate"), ({"a": 1, "base": 7}, None)),
        (dict(waiting={"a": 5, "b": 5}, running={"c": 6}, weights="separate"), ({"a": 1, "b": 1}, None)),
        (dict(waiting={"a": 5, "b": 5, "d": 5}, running={"c": 5}, weights="separate"), ({"a": 1, "b": 1, "d": 1}, None)),
        # ... with at most max_adapters distinct adapters in the batch (base does not count)
        (dict(waiting={"b": 2, "c": 2, "base": 2}, running={"a": 1}, weights="separate", max_adapters=2),
         ({"b": 2, "base": 2}, None)),
        # merged: an idle batch takes the adapter with most waiting rows; then only that adapter joins
        (dict(waiting={"a": 2, "b": 5}, weights="merged"), ({"b": 5}, "b")),
        (dict(waiting={"a": 9, "b": 5}, running={"b": 5}, merged="b", weights="merged"), ({"b": 3}, "b")),
        (dict(waiting={"a": 9}, running={"b": 5}, merged="b", weights="merged"), ({}, "b")),
        # merged: base rows are a group of their own, nothing merged
        (dict(waiting={"base": 4, "a": 1}, weights="merged"), ({"base": 4}, None)),
        (dict(waiting={"base": 4, "a": 1}, running={"base": 4}, weights="merged"), ({"base": 4}, None)),
        # auto, idle: a full batch's worth of one adapter (or the only one waiting) merges ...
        (dict(waiting={"a": 9, "b": 1}, weights="auto"), ({"a": 8}, "a")),
        (dict(waiting={"a": 2}, weights="auto"), ({"a": 2}, "a")),
        # ... a spread of small groups runs apart, mixed
        (dict(waiting={"a": 2, "b": 2, "base": 2}, weights="auto"), ({"a": 2, "b": 2, "base": 2}, None)),
        (dict(waiting={"a": 2, "b": 2}, weights="auto", min_merged_rows=2), ({"a": 2}, "a")),
        # auto, merged batch: stays merged while its adapter fills the free slots ...
        (dict(waiting={"a": 9, "b": 9}, running={"a": 4}, merged="a", weights="auto"), ({"a": 4}, "a")),
        # ... or nothing else waits; otherwise switches to weights apart and takes any adapter
        (dict(waiting={"a": 1}, running={"a": 7}, merged="a", weights="auto"), ({"a": 1}, "a")),
        (dict(waiting={"a": 1, "b": 9}, running={"a": 4}, merged="a", weights="auto"), ({"a": 1, "b": 3}, None)),
        # a full batch admits nothing; few free slots with more waiting than fit: wait (nothing changes)
        (dict(waiting={"a": 3}, running={"a": 8}, merged="a"), ({}, "a")),
        (dict(waiting={"a": 3}, running={"a": 31}, size=32, weights="separate"), ({}, None)),
        (dict(waiting={"a": 3, "b": 9}, running={"a": 31}, merged="a", size=32), ({}, "a")),
        # ... but everything admissible that fits joins at once, even one row
        (dict(waiting={"a": 1}, running={"a": 31}, size=32, weights="separate"), ({"a": 1}, None)),
        (dict(waiting={"a": 4}, running={"b": 28}, size=32, weights="separate"), ({"a": 4}, None)),
        (dict(waiting={"a": 0}, weights="auto"), ({}, None)),
        # the token budget: no more rows than fit it, whatever the free slots ...
        (dict(waiting={"a": 9}, weights="separate", token_room=3), ({"a": 3}, None)),
        (dict(waiting={"a": 9, "b": 1}, weights="auto", token_room=1), ({"a": 1}, "a")),
        (dict(waiting={"a": 5, "b": 5}, running={"a": 2}, weights="separate", token_room=0), ({}, None)),
        # ... and the batch counts as full at the rows the budget holds: one free row of two is worth taking
        (dict(waiting={"a": 9}, running={"a": 1}, size=64, weights="separate", token_room=1), ({"a": 1}, None)),
        (dict(waiting={"a": 9}, running={"a": 40}, size=64, weights="separate", token_room=2), ({}, None)),
        (dict(waiting={"a": 9}, running={"a": 2}, size=64, weights="separate", token_room=None), ({"a": 9}, None)),
    ],
)
def test_plan_admission(case, expected):
    """Each weights mode admits the rows and keeps or switches the merged adapter as documented."""
    assert admit(**case) == expected


@pytest.mark.parametrize(
    "learned, budget, used, idle, room",
    [
        ([], None, 0, True, None),  # no token limit
        ([], 200, 0, True, 1),  # nothing learned: an idle batch takes one row and learns from it
        ([], 200, 50, False, 0),  # nothing learned and busy: wait
        ([330], 200, 0, True, 1),  # a row over the whole budget still runs alone in an idle batch ...
        ([330], 200, 330, False, 0),  # ... and nothing joins it
        ([100, 300], 1000, 0, True, 5),  # by the mean cost (200)
        ([100, 300], 1000, 450, False, 2),
        ([100, 300], 1000, 1200, False, 0),
    ],
)
def test_token_budget_room(learned, budget, used, idle, room):
    """Before a claim, the rows that fit max_batch_tokens are counted by the mean cost of the rows seen so far."""
    tokens = TokenBudget()
    tokens.accept(learned, max_batch_tokens=None, used=0, idle=True)
    assert tokens.room(max_batch_tokens=budget, used=used, idle=idle) == room


@pytest.mark.parametrize(
    "costs, budget, used, idle, fits",
    [
        ([300, 100, 700, 50], 1000, 0, True, [True, True, False, True]),  # first fit, in order
        ([1500, 10], 1000, 0, True, [True, False]),  # an idle batch's first row joins whatever its cost
        ([1500, 10], 1000, 10, False, [False, True]),  # a busy batch's does not
        ([330, 330], 200, 330, False, [False, False]),
        ([5, 5], None, 10**9, False, [True, True]),  # no token limit
    ],
)
def test_token_budget_accepts_what_fits(costs, budget, used, idle, fits):
    """After a claim, the rows whose real cost fits beside the running rows join; the rest go back."""
    tokens = TokenBudget()
    assert tokens.accept(costs, max_batch_tokens=budget, used=used, idle=idle) == fits
    assert tokens.mean_cost == sum(costs) / len(costs)  # learned from every claimed row, fitting or not


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello world", ("o w",), ("hell", True)),
        ("hello world", ("zz",), ("hello world", False)),
        ("hello world", ("world", "l"), ("he", True)),
        ("hello", ("hello",), ("", True)),
        ("hello", ("",), ("hello", False)),
    ],
)
def test_cut_at_stop(text, stops, expected):
    """The output ends before the earliest stop string; the stop string itself is not included."""
    assert cut_at_stop(text, stops) == expected


def test_stop_strings_look_at_the_tail_only():
    """The stop check decodes a bounded tail, so it stays cheap for long outputs."""
    seen = []

    def decode(tokens):
        seen.append(len(tokens))
        return "".join(chr(96 + t) for t in tokens)

    stops = StopStrings(("cd",), decode)
    assert not stops.matched([1, 2])
    assert stops.matched(list(range(1, 200)) + [3, 4])
    assert max(seen) == stops.window


@pytest.mark.parametrize(
    "lengths, chunks",
    [
        ([7], [(0, 1)]),
        ([5, 5, 5], [(0, 3)]),
        ([10, 12, 20], [(0, 3)]),  # a little padding is cheaper than another forward
        ([10, 10, 200, 210], [(0, 2), (2, 4)]),
        ([8, 100, 101, 300], [(0, 1), (1, 3), (3, 4)]),
    ],
)
def test_prefill_chunks_bound_padding(lengths, chunks):
    """Prompts of very different lengths are prefilled in separate chunks, similar ones together."""
    from lorabatch.worker.engine.decode import prefill_chunks

    assert [(c.start, c.stop) for c in prefill_chunks(lengths)] == chunks
