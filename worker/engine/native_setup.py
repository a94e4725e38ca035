"""Choosing and building an Engine's forward path: native (qwen2.py, kv_slots.py, lora_stack.py, graphs.py)
or transformers'.

``pick_forward`` resolves ``forward = "auto"``: native where the model's architecture and every configured
adapter can run there (and, on CPU, where a full batch of KV slots fits the host's memory). ``build_native``
builds the native forward, swaps the adapter manager to the native backend and sizes the KV slots: on CUDA
from the memory left after a warm-up prefill of the largest prefill forward the slot stepper runs.

This module knows nothing about requests, batching or settings files; it sets the engine's attributes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lorabatch.schemas.errors import AdapterError, LorabatchError

if TYPE_CHECKING:
    from lorabatch.worker.engine.engine import Engine

log = logging.getLogger(__name__)

NATIVE_ON_CPU = True
"""forward = "auto" on CPU: the native path (at least as fast as transformers' on this project's CPU
benchmarks; the README's engine section has the figures)."""


def pick_forward(engine: Engine, forward: str, max_batch_size: Any, max_batch_tokens: Any) -> str:
    """native or transformers; "auto": native where the model and every configured adapter run there (and,
    on CPU, where the slots for a full batch fit the host's memory)."""
    if forward not in ("auto", "native", "transformers"):
        raise ValueError(f"forward must be auto, native or transformers, not {forward!r}")
    if forward != "auto":
        return forward
    if engine.device.type == "cpu" and not NATIVE_ON_CPU:
        return "transformers"
    from lorabatch.worker.engine.lora_stack import check_native
    from lorabatch.worker.engine.qwen2 import check_supported

    try:
        check_supported(engine.model)
        for name in engine.adapters.configured():
            check_native(engine.adapters.spec(name))
    except (LorabatchError, AdapterError) as e:
        log.warning("forward = auto: the transformers path, because %s", e)
        return "transformers"
    if engine.device.type == "cpu":
        from lorabatch.worker.engine.kv_slots import Shape, fits_on_host

        if not fits_on_host(Shape.of(engine.model), max_context=engine.max_context or 2048,
                            max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens):
            log.warning("forward = auto: the transformers path, because the native path's KV slots for a full "
                        "batch would not fit the host's memory; lower [model] max_context to use it")
            return "transformers"
    return "native"


def build_native(engine: Engine, max_batch_size: Any, max_batch_tokens: Any, *, cuda_graphs: bool,
                 gpu_memory_fraction: float) -> None:
    """The native forward, its adapter backend and its KV slots (sized from what is free after a warm-up)."""
    from lorabatch.worker.engine.graphs import DecodeRunner
    from lorabatch.worker.engine.kv_slots import KVSlots, Shape, plan_slots
    from lorabatch.worker.engine.lora_stack import NativeBackend
    from lorabatch.worker.engine.qwen2 import NativeModel

    engine.native = NativeModel(engine.model)
    if getattr(engine.adapters.backend, "kind", None) != "native":
        if engine.adapters.resident:
            raise ValueError("the adapter manager already holds PEFT adapters; give the native engine a fresh one")
        engine.adapters.backend = NativeBackend()
    engine.adapters.bind(engine.model)
    shape = Shape.of(engine.model)
    free = None
    if engine.device.type == "cuda":
        free = free_after_warm_up(engine, shape, gpu_memory_fraction)
    plan = plan_slots(shape, max_context=engine.max_context, max_batch_size=max_batch_size,
                      max_batch_tokens=max_batch_tokens, gpu_memory_fraction=gpu_memory_fraction, free_bytes=free)
    engine.kv = KVSlots(shape, slots=plan.slots, slot_len=plan.slot_len)
    engine.max_batch_size, engine.max_batch_tokens = plan.slots, plan.max_batch_tokens
    engine.max_context = min(engine.max_context or plan.slot_len, plan.slot_len)
    engine.runner = DecodeRunner(engine.native, engine.kv, engine.adapters.backend, cuda_graphs=cuda_graphs)
    log.info("native forward: %d KV slots of %d tokens (%.2f GiB), max_batch_tokens %d, cuda graphs %s",
             plan.slots, plan.slot_len, engine.kv.nbytes / 2**30, plan.max_batch_tokens, engine.runner.graphs_on)


def free_after_warm_up(engine: Engine, shape: Any, fraction: float) -> int:
    """Bytes the KV cache may take: the card's ``fraction``, less what is allocated and a prefill's peak."""
    import torch

    from lorabatch.worker.engine.kv_slots import KVSlots

    from lorabatch.worker.engine.slot_stepper import PREFILL_TOKENS

    width = min(engine.max_context or PREFILL_TOKENS, PREFILL_TOKENS)
    rows = max(1, PREFILL_TOKENS // width)  # the largest prefill forward the slot stepper runs
    scratch = KVSlots(shape, slots=rows, slot_len=width)
    torch.cuda.reset_peak_memory_stats(engine.device)
    before = torch.cuda.memory_allocated(engine.device)
    with torch.inference_mode():
        ids = torch.zeros((rows, width), dtype=torch.long, device=engine.device)
        last = torch.full((rows,), width - 1, dtype=torch.long, device=engine.device)
        engine.native.prefill(ids, last, torch.arange(rows, device=engine.device), scratch)
    peak = torch.cuda.max_memory_allocated(engine.device) - before
    del scratch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(engine.device)
    # Held by others (other processes, the caching allocator's reserve) counts as used.
    return max(0, int(total * fraction) - (total - free) - 2 * peak)
