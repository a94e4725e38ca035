#!/usr/bin/env bash
# The engine on a GPU, in one run of under 5 minutes: Qwen2.5-1.5B's shape (vocab 4096) in bf16 with random
# weights and the four demo adapters; tokens/s of the even and the ragged workload (bench/engine_bench.py);
# greedy agreement with plain PEFT in bf16, one prompt at a time (mismatches counted: bf16 near-ties may flip);
# a real out-of-memory split (the allocator capped with set_per_process_memory_fraction at 2 GiB over the
# weights, 48 prompts of 1000-1940 tokens: the prefill halves until it fits); vLLM's GPU build on
# the even workload if `import vllm` works in this venv (this machine may have no network to install it).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --tiny     # the demo shape on CPU: checks the script itself
# Figures go to stdout as markdown and to ${OUT:-/tmp}/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout 290 "$PYTHON" - "$@" <<'PY'
import json, os, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from engine_bench import even_like, make_ragged, make_workload  # noqa: E402

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR, build_demo  # noqa: E402
from lorabatch.schemas.settings import BASE_ADAPTER  # noqa: E402
from lorabatch.worker.engine import decode  # noqa: E402
from lorabatch.worker.engine.adapters import AdapterManager  # noqa: E402
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402

TINY = "--tiny" in sys.argv
device = torch.device("cpu" if TINY or not torch.cuda.is_available() else "cuda")
dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
shape = (dict(hidden_size=256, num_layers=4) if TINY else
         dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960))
n, batch, new_tokens = (24, 8, 16) if TINY else (256, 64, 64)
report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
          "shape": shape, "requests": n, "max_batch_size": batch}
t0 = time.perf_counter()
root = build_demo(Path(os.environ.get("GPU_CHECK_ROOT", "/tmp/gpu-check")) / ("tiny" if TINY else "qwen1.5b"),
                  dtype="float32" if TINY else "bfloat16", **shape)
report["build_s"] = round(time.perf_counter() - t0, 1)


def load(root):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(root / DEMO_MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(root / DEMO_MODEL_DIR, dtype=dtype).to(device).eval()
    return model, tokenizer


model, tokenizer = load(root)
dirs = {name: root / path for name, path in DEMO_ADAPTERS.items()}
engine = Engine(model, tokenizer, AdapterManager(dirs, base_model=str(root / DEMO_MODEL_DIR)),
                max_batch_size=batch, max_batch_tokens=1 << 22)
names = [BASE_ADAPTER, *DEMO_ADAPTERS]
prompts = make_workload(tokenizer, n=n, adapters=names, new_tokens=new_tokens)
ragged = make_ragged(engine, prompts, max_new_tokens=2 * new_tokens)
total = sum(r.completion_tokens for r in engine.generate(ragged))
even = even_like(prompts, total)


def timed(requests, weights):
    engine.weights = weights
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate(requests)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert not [r for r in results if r.error], [r.error for r in results if r.error][:1]
    return results, round(sum(r.completion_tokens for r in results) / seconds, 1)


for weights in ("auto", "separate"):
    _, report[f"even_{weights}_tps"] = timed(even, weights)
    _, report[f"ragged_{weights}_tps"] = timed(ragged, weights)
    report[f"ragged_over_even_{weights}"] = round(report[f"ragged_{weights}_tps"] / report[f"even_{weights}_tps"], 2)

# Greedy agreement with plain PEFT, one prompt at a time, in the same dtype.
from peft import PeftModel  # noqa: E402
ref_model, _ = load(root)
peft = PeftModel.from_pretrained(ref_model, dirs["sft"], adapter_name="sft")
for name in list(DEMO_ADAPTERS)[1:]:
    peft.load_adapter(dirs[name], adapter_name=name)
peft.eval()
subset = [GenerationRequest(r.key, r.adapter, SamplingParams(max_new_tokens=32, ignore_eos=True), prompt=r.prompt)
          for r in prompts[: 10 if TINY else 40]]
ours, _ = timed(subset, "auto")
mismatches = 0
for request, result in zip(subset, ours):
    ids = torch.tensor([engine.encode(request)], device=device)
    with torch.inference_mode():
        kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
        if request.adapter == BASE_ADAPTER:
            with peft.disable_adapter():
                out = peft.generate(input_ids=ids, **kwargs)
        else:
            peft.set_adapter(request.adapter)
            out = peft.generate(input_ids=ids, **kwargs)
    mismatches += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) != result.output
report["peft_agreement"] = f"{len(subset) - mismatches}/{len(subset)}"
del peft, ref_model

# A real out-of-memory: cap the allocator a little above the weights, then prefill more than fits.
calls = []
real_prefill = decode.prefill_batch
decode.prefill_batch = lambda model, prompts, **kw: (calls.append(len(prompts)), real_prefill(model, prompts, **kw))[1]
if device.type == "cuda":
    torch.cuda.empty_cache()
    total_memory = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + (2 << 30)) / total_memory)
    oom = [GenerationRequest(i, names[i % 5], SamplingParams(max_new_tokens=4, ignore_eos=True),
                             prompt_ids=[7 + i] * (1000 + 20 * i)) for i in range(48)]  # the context is 2048
    engine.max_batch_size = 64
    results = engine.generate(oom)
    report["oom_prefill_sizes"] = calls[:30]
    report["oom_ok"] = sum(r.error is None for r in results)
    report["oom_failed"] = [r.error[:120] for r in results if r.error][:3]
    torch.cuda.set_per_process_memory_fraction(1.0)
else:
    report["oom"] = "skipped on CPU"
decode.prefill_batch = real_prefill

try:
    import vllm  # noqa: F401
    report["vllm"] = "importable: run bench/vllm_compare.py with --vllm-python " + sys.executable
except ImportError as e:
    report["vllm"] = f"not installed here ({e.__class__.__name__})"

report["total_s"] = round(time.perf_counter() - t0, 1)
print("| key | value |\n|---|---|")
for key, value in report.items():
    print(f"| {key} | {value} |")
out = Path(os.environ.get("OUT", "/tmp")) / "gpu_check.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1))
PY
