"""Sampling on a CUDA device never makes the host wait (skipped without CUDA; bench/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

from lorabatch.worker.engine.sampling import RowSampler, sample_next

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def mixed_samplers() -> list[RowSampler]:
    settings = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=40),
                dict(temperature=0.9, top_p=0.9), dict(temperature=1.1, top_k=20, top_p=0.8), dict(temperature=0)]
    return [RowSampler.create(temperature=s["temperature"], top_p=s.get("top_p", 1.0), top_k=s.get("top_k", 0),
                              seed=i) for i, s in enumerate(settings)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_next_makes_no_device_to_host_sync(dtype):
    """Greedy, plain, top-k and top-p rows in one batch: no sync until the caller reads the tokens."""
    samplers = mixed_samplers()
    logits = torch.randn(len(samplers), 151_936, device="cuda", dtype=dtype)
    sample_next(logits, samplers)  # warm-up: first-call allocations are not what is measured
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tokens = sample_next(logits, samplers)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.device.type == "cuda"
    greedy = tokens.cpu()[[0, 5]]
    assert greedy.tolist() == logits.float().argmax(-1).cpu()[[0, 5]].tolist()


def test_cuda_and_cpu_agree_on_greedy_and_seeded_rows():
    """The same seeds on CUDA and CPU: greedy rows equal; sampled rows equal where the distribution is peaked."""
    logits = torch.randn(6, 1000) * 20  # peaked: float rounding cannot move a uniform across a token boundary
    on_cpu = sample_next(logits, mixed_samplers()).tolist()
    on_cuda = sample_next(logits.cuda(), mixed_samplers()).cpu().tolist()
    assert on_cpu == on_cuda
