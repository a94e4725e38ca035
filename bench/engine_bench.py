"""Throughput of the generation engine against what users write by hand, on random-weight Qwen2 shapes.

Workload: N requests round-robin over the four demo adapters and base, prompt lengths drawn uniformly
from 8-256 tokens (fixed seed), greedy, exactly 64 new tokens each (eos ignored, so every way produces the
same token count). Ways compared, in tokens/s (completion tokens / wall seconds, prefill included):

    peft one-at-a-time  PeftModel with all adapters, set_adapter (or disable_adapter) + generate per prompt,
                        on a subset (it is slow); eos suppressed with min_new_tokens
    ceiling             the engine on a plain base model (no LoRA layers at all), every request "base",
                        batches of max_batch_size sorted by length
    merged / separate / auto   the engine with the four adapters in each weights mode

``--ragged``: the even/ragged pair instead (see ``make_ragged``): the same prompts and the same total of
completion tokens, once as equal-length answers and once ending on stop strings at long-tailed positions that
no request field reveals (every request has the same max_new_tokens). ``--before DIR`` runs an older engine
for comparison: DIR holds a package ``engine_before``, a copy of an older engine with its imports renamed
(the README has the commands). ``--measure-cache ROWS PROMPT_TOKENS``: ms per decode step with the KV cache
growing in place against transformers' concatenating DynamicLayer. ``--sweep A1 D1 A2 D2 ...``: ragged tokens/s
for pairs of admission and cut thresholds.

Each engine way runs ``--rounds`` times, interleaved, and the best round counts: this machine is shared, and
the best round is the one least disturbed by other processes. Functions here are meant to be reused by a
larger benchmark; ``python bench/engine_bench.py --help`` for the command line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR, build_demo
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine.adapters import AdapterManager
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams

SHAPES = {
    "demo": dict(hidden_size=256, num_layers=4),
    "qwen0.5b-4l": dict(hidden_size=896, num_layers=4, num_heads=14, num_kv_heads=2, intermediate_size=4864),
    "qwen0.5b-8l": dict(hidden_size=896, num_layers=8, num_heads=14, num_kv_heads=2, intermediate_size=4864),
}
"""Model shapes: the tiny demo, and Qwen2.5-0.5B's layer shape cut to 4 or 8 layers (vocab 4096)."""


@dataclass
class Measurement:
    way: str
    tokens: int
    seconds: float
    cpu_seconds: float = 0.0
    """This process's CPU time: with one torch thread, a figure that other processes on the machine barely move."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def build_shape(root: Path, shape: str) -> Path:
    """Build (or reuse) the demo model and adapters of ``shape`` under root/shape."""
    return build_demo(root / shape, **SHAPES[shape])


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def make_workload(
    tokenizer, *, n: int = 256, adapters: list[str], min_len: int = 8, max_len: int = 256, new_tokens: int = 64,
    seed: int = 0,
) -> list[GenerationRequest]:
    """n greedy requests, round-robin over ``adapters``, prompt lengths uniform in [min_len, max_len] tokens."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dragons", "bake", "bread", "by", "the", "sea",
             "summarise", "this", "text", "about", "1", "2", "3", "and", "why", "is", "it", "so"]
    requests = []
    for i in range(n):
        target = rng.randint(min_len, max_len)
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(target * 2)))["input_ids"][:target]
        prompt = tokenizer.decode(ids)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        requests.append(GenerationRequest(i, adapters[i % len(adapters)], params, prompt=prompt))
    return requests


def run_engine(engine: Engine, requests: list[GenerationRequest], *, weights: str, way: str) -> Measurement:
    engine.weights = weights
    start, cpu = time.perf_counter(), time.process_time()
    results = engine.generate(requests)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{way}: {len(errors)} requests failed, e.g. {errors[0]}")
    return Measurement(way, sum(r.completion_tokens for r in results), seconds, cpu_seconds)


def run_peft_one_at_a_time(root: Path, requests: list[GenerationRequest]) -> Measurement:
    """What users write by hand: one PeftModel, set_adapter + generate per prompt."""
    from peft import PeftModel

    model, tokenizer = load_model(root / DEMO_MODEL_DIR)
    names = list(DEMO_ADAPTERS)
    peft = PeftModel.from_pretrained(model, root / DEMO_ADAPTERS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(root / DEMO_ADAPTERS[name], adapter_name=name)
    peft.eval()
    tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    for request in requests:
        inputs = tokenizer(request.prompt, return_tensors="pt")
        n = request.params.max_new_tokens
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with torch.inference_mode():
            if request.adapter == BASE_ADAPTER:
                with peft.disable_adapter():
                    out = peft.generate(**inputs, **kwargs)
            else:
                peft.set_adapter(request.adapter)
                out = peft.generate(**inputs, **kwargs)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return Measurement("peft one-at-a-time", tokens, time.perf_counter() - start, time.process_time() - cpu)


def engine_for(
    root: Path, *, adapters: bool, max_batch_size: int, max_batch_tokens: int, before: Path | None = None,
    forward: str = "transformers",
) -> Engine:
    """An engine on the model under ``root``: this checkout's (on ``forward``), or with ``before``, the older
    copy's there."""
    engine_class, manager_class = Engine, AdapterManager
    if before is not None:
        sys.path.insert(0, str(before))
        engine_class = importlib.import_module("engine_before.engine").Engine
        manager_class = importlib.import_module("engine_before.adapters").AdapterManager
    model, tokenizer = load_model(root / DEMO_MODEL_DIR)
    dirs = {n: root / p for n, p in DEMO_ADAPTERS.items()} if adapters else {}
    manager = manager_class(dirs, base_model=str(root / DEMO_MODEL_DIR), max_resident=8)
    options = {} if before is not None else {"forward": forward}
    return engine_class(model, tokenizer, manager, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                        **options)


def make_ragged(
    engine: Engine, requests: list[GenerationRequest], *, max_new_tokens: int, median_share: float = 0.2,
    sigma: float = 1.0, seed: int = 0,
) -> list[GenerationRequest]:
    """The requests, each ending on a stop string at a long-tailed position no request field reveals.

    Greedy generation is run once (max_new_tokens each) to learn every prompt's continuation; then each request
    gets as its stop string the 4 characters of that continuation ending at a share of its length drawn from a
    log-normal (median ``median_share``, clipped at 1: a tail of requests runs to max_new_tokens), moved right
    until they first occur there. Every request keeps the same max_new_tokens: a planner that sorts by it
    learns nothing.
    """
    learned = engine.generate([replace(r, params=SamplingParams(max_new_tokens=max_new_tokens)) for r in requests])
    rng = random.Random(seed)
    ragged = []
    for request, result in zip(requests, learned):
        text = result.output or ""
        end = max(4, round(len(text) * min(1.0, median_share * rng.lognormvariate(0, sigma))))
        while end < len(text) and text.find(text[end - 4 : end]) != end - 4:
            end += 1
        stop = (text[end - 4 : end],) if end < len(text) and text[end - 4 : end].strip() else ()
        ragged.append(replace(request, params=SamplingParams(max_new_tokens=max_new_tokens, stop=stop)))
    return ragged


def ragged_workload(engine: Engine, *, n: int, max_new_tokens: int) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
    """make_workload's prompts over base + the four demo adapters, and their ragged version (make_ragged)."""
    prompts = make_workload(engine.tokenizer, n=n, adapters=[BASE_ADAPTER, *DEMO_ADAPTERS], new_tokens=max_new_tokens)
    return prompts, make_ragged(engine, prompts, max_new_tokens=max_new_tokens)


def even_like(requests: list[GenerationRequest], total_tokens: int) -> list[GenerationRequest]:
    """The same prompts, every answer of equal length, ``total_tokens`` in all (eos ignored)."""
    each = max(1, round(total_tokens / len(requests)))
    return [replace(r, params=SamplingParams(max_new_tokens=each, ignore_eos=True)) for r in requests]


def bench_ragged(
    root: Path, *, n: int, rounds: int, max_batch_size: int, max_batch_tokens: int, max_new_tokens: int,
    before: Path | None = None, weights: tuple[str, ...] = ("auto",), forwards: tuple[str, ...] = ("transformers",),
) -> list[Measurement]:
    """Even and ragged workloads (same prompts, same total tokens) in each weights mode and forward path;
    best of ``rounds``."""
    engine = engine_for(root, adapters=True, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                        forward=forwards[0])
    names = [BASE_ADAPTER, *DEMO_ADAPTERS]
    prompts, ragged = ragged_workload(engine, n=n, max_new_tokens=max_new_tokens)
    total = sum(r.completion_tokens for r in engine.generate(ragged))
    even = even_like(prompts, total)
    engines = {"" if len(forwards) == 1 else f"{forwards[0]}: ": engine}
    for forward in forwards[1:]:
        engines[f"{forward}: "] = engine_for(root, adapters=True, max_batch_size=max_batch_size,
                                             max_batch_tokens=max_batch_tokens, forward=forward)
        engines[f"{forward}: "].generate(even[: len(names) * 2])  # warm-up: adapter loading is not measured
    if before is not None:
        engines["before: "] = engine_for(
            root, adapters=True, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens, before=before
        )
        engines["before: "].generate(even[: len(names) * 2])  # warm-up: adapter loading is not measured
    best: dict[str, Measurement] = {}
    for _ in range(rounds):
        for label, eng in engines.items():
            for mode in weights:
                for kind, workload in (("even", even), ("ragged", ragged)):
                    way = f"{label}{kind} {mode}"
                    m = run_engine(eng, workload, weights=mode, way=way)
                    print(f"  {way}: {m.tokens_per_s:.1f} tokens/s ({m.tokens} tokens, {m.seconds:.1f} s)",
                          file=sys.stderr, flush=True)
                    if way not in best or m.tokens_per_s > best[way].tokens_per_s:
                        best[way] = m
    return list(best.values())


def print_ragged_table(shape: str, measurements: list[Measurement]) -> None:
    by_way = {m.way: m for m in measurements}
    print(f"\n## even vs ragged, {shape}  (torch threads: {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.1f})")
    print("| way | tokens | seconds | tokens/s | ragged / even | tokens per CPU second |")
    print("|---|---|---|---|---|---|")
    for m in measurements:
        even = by_way.get(m.way.replace("ragged", "even"))
        ratio = f"{m.tokens_per_s / even.tokens_per_s:.2f}" if "ragged" in m.way and even else ""
        print(f"| {m.way} | {m.tokens} | {m.seconds:.1f} | {m.tokens_per_s:.1f} | {ratio} | {m.tokens / m.cpu_seconds:.0f} |")


WAYS = {
    "ceiling": "ceiling (engine, base only, no LoRA layers)",
    "merged": "engine merged",
    "separate": "engine separate (mixed)",
    "auto": "engine auto",
}
"""The engine ways, by short name, with the label each gets in the tables."""


@dataclass
class Setup:
    """Both engines and the workload, warmed up: what every engine way runs on."""

    with_adapters: Engine
    plain: Engine
    requests: list[GenerationRequest]
    base_requests: list[GenerationRequest]

    def way(self, name: str) -> tuple[Engine, list[GenerationRequest], str]:
        """"ceiling": the plain base model with every request "base"; else a weights mode with the adapters."""
        if name == "ceiling":
            return self.plain, self.base_requests, "merged"
        return self.with_adapters, self.requests, name


def prepare(root: Path, *, n: int, max_batch_size: int, max_batch_tokens: int, new_tokens: int = 64) -> Setup:
    names = [BASE_ADAPTER, *DEMO_ADAPTERS]
    with_adapters = engine_for(root, adapters=True, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
    plain = engine_for(root, adapters=False, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
    requests = make_workload(with_adapters.tokenizer, n=n, adapters=names, new_tokens=new_tokens)
    base_requests = [GenerationRequest(r.key, BASE_ADAPTER, r.params, prompt=r.prompt) for r in requests]
    # Warm-up: first-call allocations and adapter loading are not what is measured.
    warm = requests[: len(names) * 2]
    plain.generate(base_requests[:4])
    for weights in ("merged", "separate"):
        run_engine(with_adapters, warm, weights=weights, way="warm-up")
    return Setup(with_adapters, plain, requests, base_requests)


def bench_shape(
    root: Path, *, n: int, one_at_a_time: int, rounds: int, max_batch_size: int, max_batch_tokens: int,
    new_tokens: int = 64,
) -> list[Measurement]:
    """Every way on one model shape; the best of ``rounds`` interleaved rounds for each engine way."""
    setup = prepare(root, n=n, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens, new_tokens=new_tokens)
    best: dict[str, Measurement] = {}
    for _ in range(rounds):
        for name, way in WAYS.items():
            engine, reqs, weights = setup.way(name)
            m = run_engine(engine, reqs, weights=weights, way=way)
            print(f"  {way}: {m.tokens_per_s:.0f} tokens/s ({m.seconds:.1f} s)", file=sys.stderr, flush=True)
            if way not in best or m.tokens_per_s > best[way].tokens_per_s:
                best[way] = m
    subset = length_quantiles(setup.requests, one_at_a_time, setup.with_adapters)
    return [run_peft_one_at_a_time(root, subset), *best.values()]


def length_quantiles(requests: list[GenerationRequest], k: int, engine: Engine) -> list[GenerationRequest]:
    """k requests at evenly spaced quantiles of prompt length: a small subset whose tokens/s stands for all."""
    ordered = sorted(requests, key=lambda r: len(engine.encode(r)))
    return [ordered[(2 * i + 1) * len(ordered) // (2 * k)] for i in range(k)]


def measure_auto_rule(root: Path, *, sizes=(4, 8, 12, 16, 24, 32), new_tokens: int = 32, switches: int = 20) -> dict:
    """What the auto rule weighs: tokens/s of one adapter merged in batches of n rows, against one mixed batch
    of the largest size over every adapter and base, and the cost of switching the merged adapter."""
    engine = engine_for(root, adapters=True, max_batch_size=max(sizes), max_batch_tokens=1 << 20)
    names = [BASE_ADAPTER, *DEMO_ADAPTERS]
    requests = make_workload(engine.tokenizer, n=max(sizes), adapters=names, new_tokens=new_tokens, seed=1)
    run_engine(engine, requests[: len(names)], weights="separate", way="warm-up")
    merged = {}
    for n in sizes:
        same = [GenerationRequest(r.key, "sft", r.params, prompt=r.prompt) for r in requests[:: max(sizes) // n][:n]]
        merged[n] = run_engine(engine, same, weights="merged", way=f"merged {n}").tokens_per_s
    mixed = run_engine(engine, requests, weights="separate", way="mixed").tokens_per_s
    adapters = list(DEMO_ADAPTERS)
    start = time.perf_counter()
    for i in range(switches):
        engine.adapters.merge(adapters[i % len(adapters)])
    switch_ms = (time.perf_counter() - start) / switches * 1000
    engine.adapters.restore_base_weights()
    return {"merged": merged, "mixed": mixed, "mixed_rows": max(sizes), "switch_ms": switch_ms}


def measure_cache(root: Path, *, rows: int, prompt_tokens: int, steps: int = 24) -> dict:
    """ms per decode step, rows x prompt_tokens in one merged batch: the KV cache growing in place (decode.py's
    GrowingLayer) against transformers' DynamicLayer, which concatenates (copies the whole cache) every step."""
    from transformers.cache_utils import DynamicLayer

    from lorabatch.worker.engine import decode

    engine = engine_for(root, adapters=False, max_batch_size=rows, max_batch_tokens=1 << 22)
    vocab = engine.vocab_size
    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
    requests = [GenerationRequest(i, BASE_ADAPTER, params, prompt_ids=[(7 * i + j) % (vocab - 100) + 100
                                                                        for j in range(prompt_tokens)])
                for i in range(rows)]
    growing, figures = decode.GrowingLayer, {}
    for label in ("concatenating (DynamicLayer)", "in place (GrowingLayer)") * 2:
        decode.GrowingLayer = DynamicLayer if label.startswith("concat") else growing
        try:
            stepper = engine.stepper()
            stepper.admit(requests)
            stepper.step()
            stepper.step()
            start = time.perf_counter()
            for _ in range(steps):
                stepper.step()
            ms = (time.perf_counter() - start) / steps * 1000
            stepper.abort()
        finally:
            decode.GrowingLayer = growing
        figures[label] = min(ms, figures.get(label, ms))
    return figures


def sweep_thresholds(
    root: Path, *, n: int, rounds: int, max_batch_size: int, max_new_tokens: int,
    settings: list[tuple[float, float]],
) -> dict[tuple[float, float], float]:
    """Ragged tokens/s (weights auto) for each (admit fraction, drop fraction): batching.ADMIT_FRACTION, the
    free share of the batch that triggers an admission, and stepper.DROP_FRACTION, the dead share of the
    cache that triggers a cut. Best of ``rounds``, the settings interleaved within each round."""
    import functools

    from lorabatch.worker.engine import batching, stepper

    engine = engine_for(root, adapters=True, max_batch_size=max_batch_size, max_batch_tokens=1 << 20)
    _, ragged = ragged_workload(engine, n=n, max_new_tokens=max_new_tokens)
    best: dict[tuple[float, float], float] = {}
    saved = stepper.plan_admission, stepper.DROP_FRACTION
    try:
        for _ in range(rounds):
            for admit, drop in settings:
                stepper.plan_admission = functools.partial(batching.plan_admission, admit_fraction=admit)
                stepper.DROP_FRACTION = drop
                tps = run_engine(engine, ragged, weights="auto", way="sweep").tokens_per_s
                print(f"  admit {admit:.3f} drop {drop:.3f}: {tps:.1f} tokens/s", file=sys.stderr, flush=True)
                best[(admit, drop)] = max(tps, best.get((admit, drop), 0.0))
    finally:
        stepper.plan_admission, stepper.DROP_FRACTION = saved
    return best


def print_sweep(shape: str, n: int, best: dict[tuple[float, float], float]) -> None:
    print(f"\n## admission and cut thresholds, {shape}, {n} ragged requests, torch threads "
          f"{torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| admit fraction | drop fraction | ragged tokens/s (best of rounds) |\n|---|---|---|")
    for (admit, drop), tps in best.items():
        print(f"| {admit:.3f} | {drop:.3f} | {tps:.1f} |")


def print_cache(shape: str, rows: int, prompt_tokens: int, figures: dict[str, float]) -> None:
    print(f"\n## decode step, {shape}, {rows} rows x {prompt_tokens} prompt tokens, "
          f"torch threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| KV cache | ms per decode step (best of 2) |\n|---|---|")
    for label, ms in figures.items():
        print(f"| {label} | {ms:.1f} |")


def print_auto_rule(shape: str, m: dict) -> None:
    print(f"\n## auto rule inputs, {shape}: one mixed batch of {m['mixed_rows']} rows (5 adapters): "
          f"{m['mixed']:.0f} tokens/s; switching the merged adapter: {m['switch_ms']:.1f} ms")
    print("| rows, one adapter merged | tokens/s | / mixed |")
    print("|---|---|---|")
    for n, tps in m["merged"].items():
        print(f"| {n} | {tps:.0f} | {tps / m['mixed']:.2f} |")


def print_table(shape: str, measurements: list[Measurement]) -> None:
    by_way = {m.way: m for m in measurements}
    ceiling = next(m for m in measurements if m.way.startswith("ceiling")).tokens_per_s
    one = by_way["peft one-at-a-time"].tokens_per_s
    load = os.getloadavg()[0]
    print(f"\n## {shape}  (torch threads: {torch.get_num_threads()}, 1-minute load average at the end: {load:.1f})")
    if load > (os.cpu_count() or 1) + 0.5:
        print("(other processes competed for the CPU during this run: its numbers are unreliable)")
    print("| way | tokens | seconds | tokens/s | x ceiling | x one-at-a-time | tokens per CPU second |")
    print("|---|---|---|---|---|---|---|")
    for m in measurements:
        print(f"| {m.way} | {m.tokens} | {m.seconds:.1f} | {m.tokens_per_s:.0f} | "
              f"{m.tokens_per_s / ceiling:.2f} | {m.tokens_per_s / one:.1f} | {m.tokens / m.cpu_seconds:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--one-at-a-time", type=int, default=10, help="requests for the slow PEFT baseline")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lorabatch-bench")
    parser.add_argument("--measure-auto", action="store_true", help="measure what the auto rule weighs, only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--measure-cache", nargs=2, type=int, metavar=("ROWS", "PROMPT_TOKENS"),
                        help="ms per decode step with the KV cache growing in place vs concatenating, only")
    parser.add_argument("--sweep", nargs="+", type=float, metavar="FRACTION", default=None,
                        help="ragged tokens/s for pairs of admit and drop fractions, given flat: A1 D1 A2 D2 ...")
    parser.add_argument("--ragged", action="store_true", help="the even/ragged pair only (--new-tokens: max_new_tokens)")
    parser.add_argument("--weights", nargs="+", default=["auto"], choices=["auto", "merged", "separate"])
    parser.add_argument("--before", type=Path, default=None, help="folder holding an older engine_before package")
    parser.add_argument("--forward", nargs="+", default=["transformers"], choices=["transformers", "native"],
                        help="--ragged: the engine's forward paths to compare (the first builds the workload)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for shape in args.shapes:
        root = build_shape(args.root, shape)
        if args.measure_auto:
            print_auto_rule(shape, measure_auto_rule(root))
            continue
        if args.sweep:
            pairs = list(zip(args.sweep[::2], args.sweep[1::2]))
            print_sweep(shape, args.requests, sweep_thresholds(
                root, n=args.requests, rounds=args.rounds, max_batch_size=args.max_batch_size,
                max_new_tokens=args.new_tokens, settings=pairs,
            ))
            continue
        if args.measure_cache:
            rows, prompt_tokens = args.measure_cache
            print_cache(shape, rows, prompt_tokens, measure_cache(root, rows=rows, prompt_tokens=prompt_tokens))
            continue
        if args.ragged:
            print_ragged_table(shape, bench_ragged(
                root, n=args.requests, rounds=args.rounds, max_batch_size=args.max_batch_size,
                max_batch_tokens=args.max_batch_tokens, max_new_tokens=args.new_tokens, before=args.before,
                weights=tuple(args.weights), forwards=tuple(args.forward),
            ))
            continue
        measurements = bench_shape(
            root, n=args.requests, one_at_a_time=args.one_at_a_time, rounds=args.rounds,
            max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens, new_tokens=args.new_tokens,
        )
        print_table(shape, measurements)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
