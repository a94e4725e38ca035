"""The native path on a CUDA device: graph replay equals the eager step, no host sync inside a decode step,
bf16 agreement with plain PEFT. Skipped without CUDA (bench/gpu_check.sh runs it on the device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine.adapters import AdapterManager
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams
from tests.test_engine import PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = [BASE_ADAPTER, *DEMO_ADAPTERS]


def cuda_engine(demo_root: Path, *, dtype=torch.float32, **options) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_root / DEMO_MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(demo_root / DEMO_MODEL_DIR, dtype=dtype).to("cuda").eval()
    manager = AdapterManager({n: demo_root / p for n, p in DEMO_ADAPTERS.items()}, base_model=str(demo_root / DEMO_MODEL_DIR))
    options.setdefault("max_batch_size", 16)
    return Engine(model, tokenizer, manager, forward="native", gpu_memory_fraction=0.3, **options)


@pytest.fixture(scope="module")
def engines(demo_root):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return cuda_engine(demo_root, cuda_graphs=True), cuda_engine(demo_root, cuda_graphs=False)


def requests(n: int, max_new: int = 16) -> list[GenerationRequest]:
    return [GenerationRequest(i, NAMES[i % len(NAMES)], SamplingParams(max_new_tokens=max_new, ignore_eos=True),
                              prompt=PROMPTS[i % len(PROMPTS)] * (1 + i % 3)) for i in range(n)]


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_graph_replay_equals_eager(engines, rows):
    """A decode step replayed from a CUDA graph (batch padded up the ladder, width bucketed) gives the eager
    step's logits, with and without LoRA; whole generations then agree token for token (at most one row off)."""
    graphs, eager = engines
    graphs.weights = "separate"
    stepper = graphs.stepper()
    stepper.admit(requests(rows, max_new=40))
    stepper.step()
    runner = graphs.runner
    tokens = stepper.next_tokens[: len(stepper.batch)]
    positions = [len(s.row.prompt) + len(s.row.tokens) - 1 for s in stepper.batch]
    adapters = [stepper._stack_index(s.adapter) for s in stepper.batch]
    with torch.inference_mode():
        for lora in (adapters, None):
            runner.graphs_on = False
            expected = runner.decode(tokens, positions, lora, max(positions) + 1).clone()
            runner.graphs_on = True
            replayed = runner.decode(tokens, positions, lora, max(positions) + 1).clone()
            torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-4)
    stepper.abort()
    assert runner.captures > 0
    for weights in ("separate", "merged"):
        graphs.weights = eager.weights = weights
        work = requests(rows)
        same = sum(a.output == b.output for a, b in zip(graphs.generate(work), eager.generate(work)))
        assert same >= rows - 1, (weights, same, rows)
    assert eager.runner.captures == 0


def test_decode_step_has_no_host_sync_but_the_tokens(engines):
    """Inside a decode step only the sampled tokens cross to the host (sync debug mode "error" elsewhere)."""
    graphs, _ = engines
    graphs.weights = "separate"
    stepper = graphs.stepper()
    stepper.admit(requests(8, max_new=40))
    for _ in range(3):
        stepper.step()  # prefill, captures
    runner = graphs.runner
    tokens = stepper.next_tokens[: len(stepper.batch)]
    positions = [len(s.row.prompt) + len(s.row.tokens) - 1 for s in stepper.batch]
    adapters = [stepper._stack_index(s.adapter) for s in stepper.batch]
    runner.decode(tokens, positions, adapters, max(positions) + 1)  # capture outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            logits = runner.decode(tokens, positions, adapters, max(positions) + 1)
            next_tokens = logits.argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(next_tokens.tolist()) == len(positions)
    stepper.abort()


def test_bf16_greedy_mostly_agrees_with_plain_peft(demo_root):
    """bf16 greedy outputs of the native path mostly agree with PEFT one prompt at a time (rounding flips some)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = cuda_engine(demo_root, dtype=torch.bfloat16)
    engine.weights = "separate"
    work = [GenerationRequest(i, NAMES[i % len(NAMES)], SamplingParams(max_new_tokens=16), prompt=PROMPTS[i % len(PROMPTS)])
            for i in range(20)]
    results = engine.generate(work)
    base = AutoModelForCausalLM.from_pretrained(demo_root / DEMO_MODEL_DIR, dtype=torch.bfloat16).to("cuda").eval()
    names = list(DEMO_ADAPTERS)
    peft = PeftModel.from_pretrained(base, demo_root / DEMO_ADAPTERS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(demo_root / DEMO_ADAPTERS[name], adapter_name=name)
    same = 0
    for request, result in zip(work, results):
        ids = torch.tensor([engine.encode(request)], device="cuda")
        with torch.inference_mode():
            if request.adapter == BASE_ADAPTER:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
            else:
                peft.set_adapter(request.adapter)
                out = peft.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
        same += result.output == engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    # Measured on CPU in bf16 (the same demo model, 20 prompts x 16 tokens): native 13/20, transformers' path
    # 16/20, with equal logit errors against fp32 (0.0186 vs 0.0184): near-ties of a random model. A broken
    # path agrees on next to nothing.
    assert same >= 10, f"{same}/20 identical"


def test_cuda_kernels_per_decode_step_do_not_grow_with_adapters(demo_root):
    """Eager separate-mode decode steps launch the same CUDA kernels with 1 adapter or 4 plus base in the batch."""
    from torch.profiler import ProfilerActivity, profile

    engine = cuda_engine(demo_root, cuda_graphs=False, max_batch_size=8)
    for name in DEMO_ADAPTERS:
        engine.adapters.load(name)
    stack = engine.adapters.backend.stack
    tokens = torch.zeros(8, dtype=torch.long, device="cuda")
    positions = list(range(3, 11))

    def kernels(adapters: list[int]) -> int:
        with torch.inference_mode():
            engine.runner.decode(tokens, positions, adapters, 12)  # warm-up
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.runner.decode(tokens, positions, adapters, 12)
                torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    one, five = kernels([stack.index("sft")] * 8), kernels([0, 1, 2, 3, 4, 1, 2, 3])
    assert one == five and one > 0
