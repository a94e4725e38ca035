"""Pure planning and text helpers of the engine: batching, stop strings, sampling filters."""

from __future__ import annotations

import pytest
import torch

from lorabatch.worker.engine.batching import (
    Item,
    batch_cost,
    pack,
    plan_batches,
    sort_by_length,
)
from lorabatch.worker.engine.sampling import sample_filtered
from lorabatch.worker.engine.stops import StopStrings, cut_at_stop


def items(*specs: tuple[str, int, int]) -> list[Item]:
    return [Item(i, adapter, plen, new) for i, (adapter, plen, new) in enumerate(specs)]


@pytest.mark.parametrize(
    "specs, cost",
    [
        ([], 0),
        ([("a", 10, 5)], 15),
        ([("a", 10, 5), ("b", 3, 20)], 2 * (10 + 20)),
        ([("a", 1, 1)] * 4, 8),
    ],
)
def test_batch_cost(specs, cost):
    """A batch costs rows x (longest prompt + largest max_new_tokens)."""
    assert batch_cost(items(*specs)) == cost


@pytest.mark.parametrize(
    "specs, limits, sizes",
    [
        ([("a", 4, 4)] * 5, dict(max_batch_size=2, max_batch_tokens=1000), [2, 2, 1]),
        ([("a", 4, 4)] * 5, dict(max_batch_size=32, max_batch_tokens=24), [3, 2]),
        ([("a", 100, 100), ("a", 1, 1)], dict(max_batch_size=8, max_batch_tokens=50), [1, 1]),
        ([("a", 1, 1), ("b", 1, 1), ("c", 1, 1)], dict(max_batch_size=8, max_batch_tokens=99, max_adapters=2), [2, 1]),
        ([("a", 2, 2), ("a", 50, 2), ("a", 2, 2)], dict(max_batch_size=8, max_batch_tokens=110), [2, 1]),
    ],
)
def test_pack_respects_every_limit(specs, limits, sizes):
    """Packing keeps order and closes a batch at the row, token or adapter limit; an oversize item goes alone."""
    batches = pack(items(*specs), **limits)
    assert [len(b) for b in batches] == sizes
    assert [i.index for b in batches for i in b] == list(range(len(specs)))


def test_sort_by_length_orders_by_prompt_then_new_tokens():
    """Rows of similar length end up side by side, so batches pad little."""
    ordered = sort_by_length(items(("a", 9, 1), ("b", 2, 7), ("a", 2, 3), ("c", 5, 1)))
    assert [(i.prompt_len, i.max_new_tokens) for i in ordered] == [(2, 3), (2, 7), (5, 1), (9, 1)]


LIMITS = dict(max_batch_size=4, max_batch_tokens=10_000, max_adapters=8)


def summary(plan):
    return [(b.weights, tuple(b.adapters), len(b.items)) for b in plan]


@pytest.mark.parametrize(
    "adapters, weights, min_merged_rows, expected",
    [
        # merged: one adapter per batch, an adapter's batches back to back
        ("aaaaabb", "merged", None, [("merged", ("a",), 4), ("merged", ("a",), 1), ("merged", ("b",), 2)]),
        # separate: adapters mixed freely
        ("aaaaabb", "separate", None, [("separate", ("a",), 4), ("separate", ("a", "b"), 3)]),
        # auto: full batches merged; small leftovers of several adapters pooled into a mixed batch
        ("aaaaabbc", "auto", 2, [("merged", ("a",), 4), ("merged", ("b",), 2), ("separate", ("a", "c"), 2)]),
        # auto: a pooled batch that holds one adapter only runs merged
        ("aaaaa", "auto", 2, [("merged", ("a",), 4), ("merged", ("a",), 1)]),
        # auto: a partial batch at the threshold runs merged alone
        ("aaaaaaabbbbbbb", "auto", 3, [("merged", ("a",), 4), ("merged", ("a",), 3), ("merged", ("b",), 4), ("merged", ("b",), 3)]),
        ("aaaaaaabbbbbbb", "auto", 4, [("merged", ("a",), 4), ("merged", ("b",), 4), ("separate", ("a", "b"), 4), ("merged", ("b",), 2)]),
    ],
)
def test_plan_batches_weights_modes(adapters, weights, min_merged_rows, expected):
    """Each weights mode groups rows as documented, and every row is planned exactly once."""
    pool = [Item(i, a, 10, 5) for i, a in enumerate(adapters)]
    plan = plan_batches(pool, weights=weights, min_merged_rows=min_merged_rows, **LIMITS)
    assert summary(plan) == expected
    assert sorted(i.index for b in plan for i in b.items) == list(range(len(pool)))


def test_separate_plan_caps_distinct_adapters():
    """A mixed batch never needs more adapters resident than the LRU holds."""
    pool = [Item(i, f"ad{i % 5}", 10, 5) for i in range(20)]
    plan = plan_batches(pool, weights="separate", max_batch_size=32, max_batch_tokens=10_000, max_adapters=3)
    assert all(len(b.adapters) <= 3 for b in plan)


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


def test_sample_filtered_limits():
    """top_k=1 or a tiny top_p is greedy; uniform draws map through the kept tokens' CDF."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    ones = torch.ones(4)
    greedy = sample_filtered(logits, ones, torch.tensor([1, 0, 0, 0]), torch.tensor([1.0, 1e-6, 1.0, 1.0]),
                             torch.tensor([0.99, 0.99, 0.0, 0.999999]))
    assert greedy[:2].tolist() == [1, 1]  # top-k 1; top-p tiny
    assert greedy[2].item() == 1  # u = 0: the most likely token
    assert greedy[3].item() == 0  # u near 1: the least likely token
    top2 = sample_filtered(logits[:1], ones[:1], torch.tensor([2]), ones[:1], torch.tensor([0.999]))
    assert top2.item() == 3  # top-k 2 keeps tokens 1 and 3 only


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
