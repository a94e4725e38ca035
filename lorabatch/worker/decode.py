"""The batched decode loop, in the gpt-fast style: left_pad -> prefill_batch -> decode_step ... -> generate_batch.

One batch of token-id prompts goes in; every row leaves with its own tokens and finish reason. Rows are
left-padded, so every row's next token sits in the last column; position ids count real tokens only,
which makes a padded row compute what it computes alone. Prompts of very different lengths are prefilled
in chunks of similar length (a padded position costs as much as a real one) into one cache. Rows that
finish are dropped from the batch and from the KV cache once a fair share of the batch has finished, so
they stop costing compute.

This module knows nothing about tokenizers, text, adapters or requests: whatever must change per row
as rows move (PEFT's per-row adapter names) is told through ``on_rows``.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lorabatch.worker.sampling import RowSampler, sample_next

DROP_FRACTION = 0.125
"""Finished rows are cut out of the batch and cache once they are this share of it (at least one row).
A cut copies the cache once, about what one decode step appends; so waiting for 1/8 of the batch wastes
at most 1/8 of a step's compute per step and keeps the copies rare."""


@dataclass
class Row:
    """One sequence in the batch: its prompt, its limits, and what it generated so far."""

    prompt: list[int]
    max_new_tokens: int
    sampler: RowSampler = field(default_factory=RowSampler)
    eos: frozenset[int] = frozenset()
    is_stopped: Callable[[list[int]], bool] | None = None
    """Called with the tokens so far after each new token: True when a stop string has been produced."""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def append(self, token: int) -> bool:
        """Record one generated token; True once the row is finished."""
        if self.finish_reason is not None:
            return True
        self.tokens.append(token)
        if token in self.eos or (self.is_stopped is not None and self.is_stopped(self.tokens)):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None


def left_pad(prompts: list[list[int]], *, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask: [B, S] with S the longest prompt; padding on the left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def cache_keyword(model: Any) -> str:
    """transformers 5.x calls the KV cache argument ``cache``; 4.x called it ``past_key_values``."""
    return _cache_keyword(type(model))


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


PREFILL_PAD_FRACTION = 0.05
"""A prefill chunk takes the next (longer) prompt while padding stays under this share of its tokens..."""
PREFILL_PAD_TOKENS = 32
"""...or under this many tokens: tiny chunks would cost more in per-forward overhead than the padding.
On the benchmark workload (prompts of 8-256 tokens, 0.5B shape, 1 thread) one padded prefill per batch wasted
48% of prompt tokens in merged mode; chunks at 10%/64 wasted 9%, at 5%/32 about 5%, and ran fastest."""


def prefill_chunks(lengths: list[int]) -> list[range]:
    """Consecutive runs of (ascending) prompt lengths that pad little when prefilled together.

    Prefill is most of the compute for prompts longer than the completion, and a padded position costs as
    much as a real one; a batch spanning short and long prompts is therefore prefilled in chunks.
    """
    chunks: list[range] = []
    start = 0
    for end in range(1, len(lengths) + 1):
        if end == len(lengths):
            chunks.append(range(start, end))
            break
        rows, longest = end + 1 - start, lengths[end]
        padding = rows * longest - sum(lengths[start : end + 1])
        if padding > max(PREFILL_PAD_FRACTION * rows * longest, PREFILL_PAD_TOKENS):
            chunks.append(range(start, end))
            start = end
    return chunks


def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """Run whole prompts, fill the cache. input_ids, attention_mask: [B, S] -> logits of the last column: [B, V]."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]: padding never shifts a row
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,  # the lm_head over every prompt position would be wasted work
        **{cache_keyword(model): cache},
    )
    return out.logits[:, -1, :]


def prefill_batch(
    model: Any,
    prompts: list[list[int]],
    *,
    pad_id: int,
    device: torch.device,
    on_chunk: Callable[[range], None] | None = None,
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Prefill prompts sorted by length, chunk by chunk, into one left-padded cache.

    ``on_chunk(rows)`` is told which rows the next forward runs. -> logits: [B, V], cache of width S (the
    longest prompt), attention_mask: [B, S]
    """
    chunks = prefill_chunks([len(p) for p in prompts])
    width = max(len(p) for p in prompts)
    input_ids, attention_mask = left_pad(prompts, pad_id=pad_id, device=device)  # [B, S]
    if len(chunks) == 1:
        if on_chunk is not None:
            on_chunk(chunks[0])
        cache = new_cache(model)
        return prefill(model, input_ids, attention_mask, cache), cache, attention_mask
    logits, parts = [], []
    for rows in chunks:
        if on_chunk is not None:
            on_chunk(rows)
        input_ids, mask = left_pad(prompts[rows.start : rows.stop], pad_id=pad_id, device=device)  # [b, s]
        part = new_cache(model)
        logits.append(prefill(model, input_ids, mask, part))
        parts.append(part)
    cache = new_cache(model)
    for layer in range(len(parts[0].layers)):
        # keys, values: [B, H, S, D]; each chunk's columns right-aligned (its rows are left-padded to S)
        keys = torch.cat([_left_pad_kv(p.layers[layer].keys, width) for p in parts])
        values = torch.cat([_left_pad_kv(p.layers[layer].values, width) for p in parts])
        cache.update(keys, values, layer)
    return torch.cat(logits), cache, attention_mask


def _left_pad_kv(states: torch.Tensor, width: int) -> torch.Tensor:
    """[b, H, s, D] -> [b, H, width, D], zeros on the left (masked out, never attended to)."""
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))


def decode_step(
    model: Any, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> torch.Tensor:
    """One token per row. tokens, positions: [B, 1]; attention_mask: [B, S + 1] -> logits: [B, V]."""
    out = model(
        input_ids=tokens,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **{cache_keyword(model): cache},
    )
    return out.logits[:, -1, :]


def drop_threshold(active: int) -> int:
    return max(1, math.ceil(active * DROP_FRACTION))


@torch.inference_mode()
def generate_batch(
    model: Any,
    rows: list[Row],
    *,
    pad_id: int,
    device: torch.device,
    on_rows: Callable[[list[int]], None] | None = None,
) -> None:
    """Generate until every row is finished; fills each row's ``tokens`` and ``finish_reason`` in place.

    Rows run sorted by prompt length. ``on_rows(indices)`` is told, whenever it changes, which rows (indices
    into ``rows``) the next forwards run, in batch order: per prefill chunk, then after each drop.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt))  # batch position -> index into rows
    tell_chunk = None if on_rows is None else (lambda chunk: on_rows([order[j] for j in chunk]))
    logits, cache, attention_mask = prefill_batch(
        model, [rows[i].prompt for i in order], pad_id=pad_id, device=device, on_chunk=tell_chunk
    )  # [B, V], cache of width S, [B, S]
    positions = attention_mask.sum(-1, keepdim=True)  # [B, 1]: the next token's position in each row
    active = order  # batch position -> index into rows
    if on_rows is not None:
        on_rows(active)
    while True:
        next_tokens = sample_next(logits, [rows[i].sampler for i in active])  # [b]
        done = [j for j, token in enumerate(next_tokens.tolist()) if rows[active[j]].append(token)]
        if len(done) == len(active):
            return
        if len(done) >= drop_threshold(len(active)):
            finished = set(done)
            kept = [j for j in range(len(active)) if j not in finished]
            index = torch.tensor(kept, device=device)
            cache.batch_select_indices(index)
            attention_mask, positions, next_tokens = attention_mask[index], positions[index], next_tokens[index]
            active = [active[j] for j in kept]
            if on_rows is not None:
                on_rows(active)
        ones = attention_mask.new_ones((attention_mask.shape[0], 1))
        attention_mask = torch.cat([attention_mask, ones], dim=-1)  # [b, S + t + 1]
        logits = decode_step(model, next_tokens[:, None], attention_mask, positions, cache)
        positions = positions + 1
