"""The decode stages, in the gpt-fast style: left_pad -> prefill_batch -> decode_step, plus the KV-cache surgery
a running batch needs when rows join and leave (select_rows, join, trim_left).

Rows are left-padded, so every row's next token sits in the last column; position ids count real tokens only,
which makes a padded row compute what it computes alone. Prompts of very different lengths are prefilled in
chunks of similar length (a padded position costs as much as a real one) into one cache. The cache's layers
grow in place (GrowingLayer: spare columns, no copy per step). The stepper (stepper.py) strings these stages
together; this module holds no state between calls.

This module knows nothing about tokenizers, text, adapters, requests or which rows are finished: whatever
must change per row as rows move (PEFT's per-row adapter names) is told through ``on_chunk``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lorabatch.worker.engine.sampling import RowSampler


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


KV_SLACK = 64
"""Columns a layer's key/value buffers hold beyond its width once decoding starts, so that most decode steps
write their column in place (transformers' DynamicLayer concatenates: a copy of the whole cache every step)."""


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose ``keys``/``values`` are views of the first columns of buffers with spare columns.

    An update writes its columns into the spare ones. Only when the buffers are full, or when ``keys`` was
    replaced by another tensor (rows selected, joined or trimmed below), are they copied into new buffers:
    code that assigns ``keys``/``values`` directly need know nothing of this.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        width = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        needed = width + key_states.shape[-2]
        if not self._writable(needed):
            slack = KV_SLACK if key_states.shape[-2] == 1 else 0  # a prefill is usually joined (copied) next
            self._key_buffer = _buffer_like(key_states, self.keys, width, needed + slack)
            self._value_buffer = _buffer_like(value_states, self.values, width, needed + slack)
        self._key_buffer[:, :, width:needed] = key_states
        self._value_buffer[:, :, width:needed] = value_states
        self.keys, self.values = self._key_buffer[:, :, :needed], self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def _writable(self, needed: int) -> bool:
        """Are keys/values still the leading columns of the buffers, with room for ``needed`` columns?"""
        keys, values = self.keys, self.values
        buffers = getattr(self, "_key_buffer", None), getattr(self, "_value_buffer", None)
        return all(
            buffer is not None
            and buffer.shape[-2] >= needed
            and view.data_ptr() == buffer.data_ptr()
            and view.stride() == buffer.stride()
            and view.shape[:2] == buffer.shape[:2]
            for view, buffer in zip((keys, values), buffers)
        )


def _buffer_like(states: torch.Tensor, current: torch.Tensor, width: int, capacity: int) -> torch.Tensor:
    """A [B, H, capacity, D] buffer whose first ``width`` columns hold ``current``."""
    b, h, _, d = states.shape
    buffer = states.new_empty((b, h, capacity, d))
    if width:
        buffer[:, :, :width] = current
    return buffer


def new_cache(model: Any) -> Any:
    """transformers' DynamicCache for ``model``, its full-attention layers growing in place (GrowingLayer)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


PREFILL_PAD_FRACTION = 0.05
"""A prefill chunk takes the next (longer) prompt while padding stays under this share of its tokens..."""
PREFILL_PAD_TOKENS = 32
"""...or under this many tokens: tiny chunks would cost more in per-forward overhead than the padding.
On the benchmark workload (prompts of 8-256 tokens, 0.5B shape, 1 thread) one padded prefill per batch wasted
48% of prompt tokens in merged mode; chunks at 10%/64 wasted 9%, at 5%/32 about 5%, and ran fastest."""


def prefill_chunks(lengths: list[int]) -> list[range]:
    """Consecutive runs of (ascending) prompt lengths that pad little when prefilled together.

    Prefill is most of the compute for prompts longer than the completion, and a padded position costs as
    much as a real one; prompts of very different lengths are therefore prefilled in chunks.
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
    logits, parts = [], []
    for rows in prefill_chunks([len(p) for p in prompts]):
        if on_chunk is not None:
            on_chunk(rows)
        input_ids, mask = left_pad(prompts[rows.start : rows.stop], pad_id=pad_id, device=device)  # [b, s]
        part = new_cache(model)
        logits.append(prefill(model, input_ids, mask, part))
        parts.append((part, mask))
    return (torch.cat(logits), *join(parts))


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


# -- the running batch's cache: rows leave (select_rows), rows join (join), padding goes (trim_left) ----------


def select_rows(cache: Any, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep the rows ``index`` ([b], long) of the cache (in place) -> their attention_mask [b, S]."""
    cache.batch_select_indices(index)
    return mask[index]


def join(parts: list[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """The rows of several (cache, attention_mask) pairs stacked in order, in the first cache (one copy).

    Narrower parts are left-padded with zeros that their masks hide. caches [b_i, H, s_i, D] -> [sum b_i, H, S, D],
    masks [b_i, s_i] -> [sum b_i, S], S = max s_i.
    """
    cache = parts[0][0]
    if len(parts) == 1:
        return parts[0]
    width = max(mask.shape[1] for _, mask in parts)
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([_left_pad_kv(part.layers[i].keys, width) for part, _ in parts])
        layer.values = torch.cat([_left_pad_kv(part.layers[i].values, width) for part, _ in parts])
    pad = torch.nn.functional.pad
    return cache, torch.cat([pad(mask, (width - mask.shape[1], 0)) for _, mask in parts])


def trim_left(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row (left by rows that left) -> the narrower mask.

    A view: the next append copies each layer into new buffers (GrowingLayer), the one copy this costs.
    """
    real = mask.any(dim=0).nonzero()
    first = int(real[0]) if len(real) else mask.shape[1]
    if first == 0:
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return mask[:, first:]


def crop_to(cache: Any, width: int) -> None:
    """Undo a forward that failed halfway: layers it already appended to go back to ``width`` columns."""
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[-2] > width:
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]


MASK_SLACK = 64
"""Columns the attention mask is allocated beyond its width, so most decode steps append in place."""


def grow_mask(buffer: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One more real column for every row, written in place while ``buffer`` has room.

    buffer: [B, C] with its first ``width`` columns the mask -> (buffer [B, C'], mask [B, width + 1], a view)
    """
    if width + 1 > buffer.shape[1]:
        bigger = buffer.new_zeros((buffer.shape[0], width + 1 + MASK_SLACK))
        bigger[:, :width] = buffer[:, :width]
        buffer = bigger
    buffer[:, width] = 1
    return buffer, buffer[:, : width + 1]


def _left_pad_kv(states: torch.Tensor, width: int) -> torch.Tensor:
    """[b, H, s, D] -> [b, H, width, D], zeros on the left (masked out, never attended to)."""
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))
