"""Running the native decode step: eagerly, or as CUDA graphs captured per (batch size, width) and replayed.

A graph is captured for a ladder of batch sizes (1, 2, 4, 8, 16, 32, then every 32, up to the slots) and
widths rounded up to WIDTH_BUCKET columns, on first use, sharing one memory pool (nano-vllm's scheme, with the
width as a second key because attention reads ``width`` columns of the cache). A step of B rows replays the
graph of the next size up: rows B.. of the padded batch are slots no row holds (the stepper keeps its rows
in slots 0..B-1), position 0, adapter 0, so what they write is never read. Inputs go through static device
buffers filled from pinned host buffers (no host sync); the logits come back in a static buffer.

The eager path calls the same function on the same inputs, so the CPU tests run everything but the capture.
Graphs are captured only on CUDA with ``cuda_graphs`` on, and re-captured when the LoRA stack is reallocated.

This module knows nothing about requests, rows, sampling or which slots hold what.
"""

from __future__ import annotations

from typing import Any

import torch

WIDTH_BUCKET = 512
"""Graph widths are multiples of this (masked columns cost a little attention; each width costs a graph)."""


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n < max_batch] + list(range(64, max_batch, 32))
    return sorted(set(sizes + [max_batch]))


class DecodeRunner:
    """``decode(tokens, positions, adapters, width)`` for slots 0..B-1 -> logits [B, V]."""

    def __init__(self, native: Any, kv: Any, backend: Any, *, cuda_graphs: bool) -> None:
        self.native, self.kv, self.backend = native, kv, backend
        self.device = kv.data.device
        self.graphs_on = bool(cuda_graphs) and self.device.type == "cuda"
        self.ladder = batch_ladder(kv.slots)
        n = kv.slots
        pin = self.device.type == "cuda"
        self._host = torch.zeros((2, n), dtype=torch.long, pin_memory=pin)  # positions, adapter indices
        self._static = torch.zeros((3, n), dtype=torch.long, device=self.device)  # tokens, positions, adapters
        self._graphs: dict[tuple, tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self._logits: torch.Tensor | None = None
        self.captures = 0

    @property
    def stack(self) -> Any:
        return getattr(self.backend, "stack", None)

    def lora(self, indices: list[int], width: int = 1) -> Any:
        """The LoRA of a forward over rows running stack ``indices``, each row ``width`` tokens (None: no stack)."""
        stack = self.stack
        if stack is None or not stack.a:
            return None
        ids = torch.tensor(indices, dtype=torch.long).to(self.device, non_blocking=True)
        return stack.rows(ids[:, None].expand(len(indices), width))

    def decode(self, tokens: torch.Tensor, positions: list[int], adapters: list[int] | None, width: int) -> torch.Tensor:
        """tokens: [B] on the device; positions, adapters: B host ints (adapters None: no LoRA, e.g. merged)."""
        batch = len(positions)
        size = next(n for n in self.ladder if n >= batch) if self.graphs_on else batch
        host = self._host
        host[0, :batch] = torch.tensor(positions, dtype=torch.long)
        host[1, :batch] = torch.tensor(adapters, dtype=torch.long) if adapters is not None else 0
        host[:, batch:size] = 0
        static = self._static
        static[1:, :size].copy_(host[:, :size], non_blocking=True)
        static[0, :batch].copy_(tokens)
        static[0, batch:size] = 0
        use_lora = adapters is not None and self.stack is not None and bool(self.stack.a)
        if not self.graphs_on:
            return self._forward(size, width, use_lora)
        width = min(self.kv.slot_len, -(-width // WIDTH_BUCKET) * WIDTH_BUCKET)
        key = (size, width, self.stack.version if use_lora else None)
        if key not in self._graphs:
            self._graphs[key] = self._capture(size, width, use_lora)
        graph, out = self._graphs[key]
        graph.replay()
        return out[:batch]

    def _forward(self, size: int, width: int, use_lora: bool) -> torch.Tensor:
        static = self._static
        lora = self.stack.rows(static[2, :size, None]) if use_lora else None  # [B, 1]: one token a row
        return self.native.decode(static[0, :size], static[1, :size], self.kv, width, lora)

    def _capture(self, size: int, width: int, use_lora: bool) -> tuple[Any, torch.Tensor]:
        """Warm up on a side stream (as torch's docs require), then capture one step into the shared pool."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            logits = self._forward(size, width, use_lora)  # a real step on the real inputs: what it writes is right
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._logits is None:
            self._logits = torch.empty((self.kv.slots, logits.shape[-1]), dtype=logits.dtype, device=self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[:size].copy_(self._forward(size, width, use_lora))
        if self._pool is None:
            self._pool = graph.pool()
        self.captures += 1
        return graph, self._logits
