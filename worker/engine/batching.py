"""Planning batches from a pool of requests: pure functions over (adapter, prompt length, max_new_tokens).

A batch costs rows x (longest prompt + largest max_new_tokens) tokens of KV cache and compute, so rows
are sorted by prompt length before packing: neighbours then pad little. How each batch applies its
adapters ("merged" or "separate") is decided here too; see ``plan_batches`` for the auto rule.

This module knows nothing about models, tokenizers, PEFT or requests beyond those three numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

Weights = Literal["merged", "separate"]

AUTO_MERGED_FILL = 0.75
"""Auto mode: an adapter's partial batch runs merged on its own when it has at least this share of
max_batch_size rows; smaller leftovers of several adapters are pooled into mixed separate batches.
Measured with bench/engine_bench.py --measure-auto; the numbers are in the engine module's docstring."""


@dataclass(frozen=True)
class Item:
    """One request as the planner sees it."""

    index: int
    adapter: str
    prompt_len: int
    max_new_tokens: int


@dataclass(frozen=True)
class Batch:
    items: tuple[Item, ...]
    weights: Weights

    @property
    def adapters(self) -> list[str]:
        return sorted({item.adapter for item in self.items})


def batch_cost(items: Iterable[Item]) -> int:
    """Tokens a batch holds at its peak: rows x (longest prompt + largest max_new_tokens)."""
    items = list(items)
    if not items:
        return 0
    return len(items) * (max(i.prompt_len for i in items) + max(i.max_new_tokens for i in items))


def sort_by_length(items: Iterable[Item]) -> list[Item]:
    return sorted(items, key=lambda i: (i.prompt_len, i.max_new_tokens, i.index))


def group_by_adapter(items: Iterable[Item]) -> dict[str, list[Item]]:
    """Items per adapter, adapters in order of first appearance."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.adapter, []).append(item)
    return groups


def pack(
    items: list[Item], *, max_batch_size: int, max_batch_tokens: int, max_adapters: int | None = None
) -> list[list[Item]]:
    """Cut items (in the given order) into consecutive batches within the limits.

    A single item over the token budget still gets a batch of its own: the budget is a packing target, and
    an item that truly cannot fit in memory fails on its own later (out-of-memory split).
    """
    batches: list[list[Item]] = []
    current: list[Item] = []
    for item in items:
        candidate = current + [item]
        over = (
            len(candidate) > max_batch_size
            or batch_cost(candidate) > max_batch_tokens
            or (max_adapters is not None and len({i.adapter for i in candidate}) > max_adapters)
        )
        if current and over:
            batches.append(current)
            candidate = [item]
        current = candidate
    if current:
        batches.append(current)
    return batches


def plan_batches(
    items: Iterable[Item],
    *,
    weights: Literal["auto", "merged", "separate"],
    max_batch_size: int,
    max_batch_tokens: int,
    max_adapters: int,
    min_merged_rows: int | None = None,
) -> list[Batch]:
    """The batches to run, in order.

    merged: one adapter per batch, merged into the base weights; an adapter's batches run back to back.
    separate: all rows sorted by length regardless of adapter, at most ``max_adapters`` adapters per batch.
    auto: per adapter, every full batch runs merged, and so does a partial one of at least
    ``min_merged_rows`` rows; the smaller leftovers of all adapters are pooled, sorted by length and
    packed into mixed separate batches (a pooled batch that happens to hold one adapter runs merged).
    """
    items = list(items)
    limits = {"max_batch_size": max_batch_size, "max_batch_tokens": max_batch_tokens}
    if weights == "separate":
        return [Batch(tuple(b), "separate") for b in pack(sort_by_length(items), max_adapters=max_adapters, **limits)]
    grouped = [pack(sort_by_length(g), **limits) for g in group_by_adapter(items).values()]
    if weights == "merged":
        return [Batch(tuple(b), "merged") for batches in grouped for b in batches]
    if min_merged_rows is None:
        min_merged_rows = max(1, round(max_batch_size * AUTO_MERGED_FILL))
    plan: list[Batch] = []
    leftovers: list[Item] = []
    for batches in grouped:
        *full, last = batches
        plan.extend(Batch(tuple(b), "merged") for b in full)
        if len(last) >= min_merged_rows:
            plan.append(Batch(tuple(last), "merged"))
        else:
            leftovers.extend(last)
    for b in pack(sort_by_length(leftovers), max_adapters=max_adapters, **limits):
        plan.append(Batch(tuple(b), "merged" if len({i.adapter for i in b}) == 1 else "separate"))
    return plan
