"""Pure helpers of the engine: admission, stop strings, prefill chunks (sampling: test_sampling.py)."""

from __future__ import annotations

import pytest
import torch

from lorabatch.worker.engine.batching import plan_admission
from lorabatch.worker.engine.stops import StopStrings, cut_at_stop


def admit(waiting, running=None, merged=None, weights="auto", size=8, max_adapters=8, min_merged_rows=None):
    decision = plan_admission(waiting, running=running or {}, merged=merged, weights=weights, max_batch_size=size,
                              max_adapters=max_adapters, min_merged_rows=min_merged_rows)
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
    ],
)
def test_plan_admission(case, expected):
    """Each weights mode admits the rows and keeps or switches the merged adapter as documented."""
    assert admit(**case) == expected


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
