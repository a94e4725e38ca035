"""The native path's KV cache: one tensor for every layer's keys and values, allocated once, a slot per row.

Layout ``[layers, 2, slots, kv_heads, slot_len, head_dim]`` (2: keys, values). A row owns one slot from its
prefill until it ends; its tokens sit in the slot's first columns at their positions. Rows joining or leaving
never copy the cache: a new row writes its prompt into a free slot, a finished row's slot is simply reused.
kv_heads before slot_len so that ``keys[:B, :, :W]`` is a view whose batch dims collapse (no copy in the
attention matmul), and slot i is batch row i in a decode step (no gather of the cache either).

Sizing (``plan_slots``): on CUDA from the free memory left after the weights (and a warm-up forward), times
``gpu_memory_fraction``; on CPU max_batch_size slots of min(context, max_batch_tokens) tokens, fewer when they
would take over CPU_MEMORY_SHARE of the host's available memory.

This module knows nothing about models beyond their shape, adapters, requests or which rows are alive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

AUTO_MAX_SLOTS = 256
"""max_batch_size "auto" on CUDA: at most this many rows, however much memory is free."""
CPU_AUTO_BATCH = 32
CPU_AUTO_TOKENS = 16384
CPU_MEMORY_SHARE = 0.25
"""On CPU the slots may take at most this share of the host's available memory (fewer slots otherwise;
forward = "auto" then prefers the transformers path, whose cache grows with the rows it holds)."""


@dataclass(frozen=True)
class Shape:
    """What the cache needs to know about the model."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, model: Any) -> Shape:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        parameter = next(model.parameters())
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, parameter.dtype, parameter.device)


@dataclass(frozen=True)
class SlotPlan:
    """The resolved sizes: rows in the cache, columns per row, the batch token budget."""

    slots: int
    slot_len: int
    max_batch_tokens: int


def plan_slots(
    shape: Shape,
    *,
    max_context: int,
    max_batch_size: int | str,
    max_batch_tokens: int | str,
    gpu_memory_fraction: float = 0.9,
    free_bytes: int | None = None,
) -> SlotPlan:
    """Resolve "auto" sizes and the slot length. ``free_bytes``: device memory free now (CUDA; measured when None).

    A slot holds a whole row (prompt + max_new_tokens), so slot_len is the context (capped by the token budget
    on CPU). On CUDA the slots are what the memory allows, at most max_batch_size (or AUTO_MAX_SLOTS).
    """
    if shape.device.type == "cuda":
        if free_bytes is None:
            free, total = torch.cuda.mem_get_info(shape.device)
            # The fraction is of the whole card (as vLLM's gpu_memory_utilization): what others hold stays theirs.
            used = total - free
            free_bytes = max(0, int(total * gpu_memory_fraction) - used)
        slot_len = max_context
        fit = free_bytes // (slot_len * shape.bytes_per_token)
        wanted = AUTO_MAX_SLOTS if max_batch_size == "auto" else int(max_batch_size)
        slots = min(wanted, fit)
        if slots < 1:
            raise MemoryError(
                f"the KV cache for one row of {slot_len} tokens needs {slot_len * shape.bytes_per_token / 2**30:.1f} GiB "
                f"and {free_bytes / 2**30:.1f} GiB are free; lower [model] max_context or raise gpu_memory_fraction."
            )
        if slots < wanted and max_batch_size != "auto":
            log.warning("KV cache: %d rows of %d tokens fit in memory, not max_batch_size %s", slots, slot_len, wanted)
        tokens = slots * slot_len if max_batch_tokens == "auto" else int(max_batch_tokens)
        return SlotPlan(slots, slot_len, tokens)
    slots = CPU_AUTO_BATCH if max_batch_size == "auto" else int(max_batch_size)
    tokens = CPU_AUTO_TOKENS if max_batch_tokens == "auto" else int(max_batch_tokens)
    slot_len = max(1, min(max_context, tokens))
    available = available_host_bytes() if free_bytes is None else free_bytes
    if available is not None:
        fit = max(1, int(available * CPU_MEMORY_SHARE) // (slot_len * shape.bytes_per_token))
        if fit < slots:
            log.warning("KV cache: %d slots of %d tokens fit in %.0f%% of the host's available memory, not %d; "
                        "lower [model] max_context to hold more rows", fit, slot_len, 100 * CPU_MEMORY_SHARE, slots)
            slots = fit
    return SlotPlan(slots, slot_len, tokens)


def fits_on_host(shape: Shape, *, max_context: int, max_batch_size: int | str, max_batch_tokens: int | str) -> bool:
    """Would max_batch_size full slots fit in CPU_MEMORY_SHARE of the available host memory (CPU)?"""
    plan = plan_slots(shape, max_context=max_context, max_batch_size=max_batch_size,
                      max_batch_tokens=max_batch_tokens, free_bytes=1 << 62)
    available = available_host_bytes()
    return available is None or plan.slots * plan.slot_len * shape.bytes_per_token <= available * CPU_MEMORY_SHARE


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class KVSlots:
    """Keys and values of ``slots`` rows of up to ``slot_len`` tokens, for every layer, in one allocation."""

    def __init__(self, shape: Shape, *, slots: int, slot_len: int) -> None:
        self.shape = shape
        self.slots = slots
        self.slot_len = slot_len
        # Zeros, not empty: masked columns are multiplied by a zero weight, and 0 * NaN would be NaN.
        self.data = torch.zeros(
            (shape.layers, 2, slots, shape.kv_heads, slot_len, shape.head_dim), dtype=shape.dtype, device=shape.device
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's keys and values: [slots, kv_heads, slot_len, head_dim] each."""
        return self.data[index, 0], self.data[index, 1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def move(self, source: int, target: int, length: int) -> None:
        """Copy one row's first ``length`` columns from slot ``source`` to slot ``target`` (compaction of holes:
        one row's cache, never the whole cache)."""
        self.data[:, :, target, :, :length] = self.data[:, :, source, :, :length]
