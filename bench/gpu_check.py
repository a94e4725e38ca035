"""What issue 18 asks the GPU engine to show, measured in one run (bench/gpu_check.sh sets up and calls this).

Workload: nano-vllm's benchmark, 256 sequences of random token ids, prompts uniform 100-1,024 tokens, outputs
uniform 100-1,024 tokens, ignore_eos, rows round-robin over base + the 4 demo adapters, on the demo builder's
model at Qwen2.5-1.5B's exact shape in bf16 (random weights). Sections, each in its own try (a failure is
reported, the rest still runs), each time-boxed so the whole run stays under its budget:

- native engine tok/s on the mixed workload; base-only rows and one adapter merged on the same prompts and lengths
- decode probes over N steps of a stepper built directly, separate mode, 1 adapter vs 5: GPU busy share of
  the decode wall time, host syncs per step (torch.cuda.set_sync_debug_mode("warn") warnings, and
  torch.profiler's synchronize calls), kernels per step (GPU kernels and CPU launch calls)
- the transformers forward path on the mixed workload (the engine before the native path)
- the same file as native JSONL lines through a real worker (embedded Redis, SQLite) against the engine alone
  on the same lines (text prompts; eos honoured both ways, since input lines have no ignore_eos)
- plain PEFT `generate(adapter_names=...)`, one static batch of 64 (scaled down: outputs capped, said below)
- greedy agreement with PEFT one prompt at a time, 64 prompts x 64 tokens, bf16 and fp32 (TF32 off), with the
  first divergence index of each mismatch

Sections run in that order of importance: native, agreement, agreement_fp32, worker, transformers_path,
peft_static_batch; one that would not fit in what is left of the budget is skipped (and named so), and
`--only worker,peft_static_batch` reruns some in a later call. Figures go to stdout (a markdown table) and to
$OUT/gpu_check.json (with --only: gpu_check.<sections>.json), rewritten after each section. `--tiny`: the demo
shape on CPU and a small workload, to check this script itself (tests/test_gpu_check.py).

This script knows nothing of how the device machine is reached; gpu_check.sh prepares the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR, build_demo
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine.adapters import AdapterManager
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams, take_counts

NAMES = [BASE_ADAPTER, *DEMO_ADAPTERS]
CONTEXT = 2048
"""The demo model's max_position_embeddings (prompt + max_new_tokens must fit)."""
QWEN_1_5B = dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                 vocab_size=151_936)


@dataclass(frozen=True)
class Plan:
    """The sizes of one run."""

    n: int = 256
    prompts: tuple[int, int] = (100, 1024)
    outputs: tuple[int, int] = (100, 1024)
    run_seconds: float = 30.0
    """Most seconds one throughput run may take (it stops there and reports the rate so far, marked partial)."""
    transformers_seconds: float = 15.0
    worker_rows: int = 128
    """The worker comparison runs the first this many sequences both ways (the whole file would cost another
    minute of the run's six)."""
    probe_rows: int = 64
    probe_prompt: int = 512
    probe_steps: int = 20
    peft_rows: int = 64
    peft_cap: int = 128
    """PEFT's static batch: outputs capped at this many tokens (a full run of 256 x up to 1,024 would take minutes)."""
    peft_seconds: float = 20.0
    agree_prompts: int = 64
    agree_tokens: int = 64
    gpu_memory_fraction: float = 0.45


FULL = Plan()
TINY = Plan(n=20, prompts=(8, 48), outputs=(8, 32), run_seconds=60, transformers_seconds=30, worker_rows=20, probe_rows=8,
            probe_prompt=32, probe_steps=4, peft_rows=8, peft_cap=16, peft_seconds=30, agree_prompts=6,
            agree_tokens=8)


class Check:
    """The report, a time budget, and sections that fail alone."""

    def __init__(self, budget: float) -> None:
        self.report: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.budget = budget
        self.filename = "gpu_check.json"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    @contextlib.contextmanager
    def section(self, name: str, *, needs: float = 0.0) -> Iterator[bool]:
        """Runs the block unless fewer than ``needs`` seconds are left (then it is reported as skipped)."""
        if self.left() < needs:
            self.report[f"{name}_skipped"] = f"{self.left():.0f} s left, {needs:.0f} s needed"
            print(f"[gpu_check] {name}: skipped ({self.left():.0f} s left)", file=sys.stderr, flush=True)
            yield False
            return
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            yield True
        except Exception as e:  # noqa: BLE001 - one failed section must not hide the others' figures
            traceback.print_exc()
            self.report[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            self.report[f"{name}_s"] = round(time.perf_counter() - start, 1)
            free_memory()
            self.save()  # a run cut short by its time limit still leaves what it measured

    def save(self) -> Path:
        out = Path(os.environ.get("OUT", tempfile.gettempdir())) / self.filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.report, indent=1))
        return out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- the workload -------------------------------------------------------------------------------------------


def nano_workload(plan: Plan, *, vocab: int, seed: int = 0) -> list[GenerationRequest]:
    """nano-vllm's benchmark: random prompt ids and lengths, output lengths, ignore_eos; adapters round-robin."""
    rng = random.Random(seed)
    out = []
    for i in range(plan.n):
        prompt = [rng.randint(0, vocab - 1) for _ in range(rng.randint(*plan.prompts))]
        params = SamplingParams(max_new_tokens=rng.randint(*plan.outputs), ignore_eos=True)
        out.append(GenerationRequest(i, NAMES[i % len(NAMES)], params, prompt_ids=prompt))
    return out


def all_of(requests: list[GenerationRequest], adapter: str) -> list[GenerationRequest]:
    return [replace(r, adapter=adapter) for r in requests]


def as_text(requests: list[GenerationRequest], tokenizer, *, context: int = CONTEXT) -> list[GenerationRequest]:
    """The same rows with text prompts (what input lines carry) and eos honoured (lines have no ignore_eos).

    Decoded random ids do not always encode back to as many tokens; max_new_tokens is lowered where the text's
    own length would take the row past the model's context."""
    rows = []
    for r in requests:
        text = tokenizer.decode(r.prompt_ids, skip_special_tokens=True)
        room = context - len(tokenizer(text)["input_ids"])
        rows.append(replace(r, prompt=text, prompt_ids=None,
                            params=replace(r.params, ignore_eos=False, max_new_tokens=max(1, min(r.params.max_new_tokens, room)))))
    return rows


def text_vocab(tokenizer, vocab: int) -> int:
    """Prompt ids stay below the ids the tokenizer really has (the demo's embedding has unused top rows)."""
    return min(vocab, len(tokenizer))


# -- models and engines -------------------------------------------------------------------------------------


def load(root: Path, *, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / DEMO_MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(root / DEMO_MODEL_DIR, dtype=dtype).to(device).eval()
    return model, tokenizer


def engine_on(root: Path, *, device: torch.device, dtype: torch.dtype, forward: str, plan: Plan, **options) -> Engine:
    model, tokenizer = load(root, device=device, dtype=dtype)
    manager = AdapterManager({n: root / p for n, p in DEMO_ADAPTERS.items()}, base_model=str(root / DEMO_MODEL_DIR))
    if device.type == "cuda":
        options.setdefault("gpu_memory_fraction", plan.gpu_memory_fraction)
    return Engine(model, tokenizer, manager, forward=forward, **options)


def drive(engine: Engine, requests: list[GenerationRequest], *, seconds: float, weights: str = "auto",
          tokens_of: dict | None = None) -> dict:
    """Run ``requests`` on one stepper, admitting as admission allows, for at most ``seconds``.

    Returns output tokens per second (rows that had not ended count the tokens they made), whether every row
    ended, and the seconds. ``tokens_of``: filled with each finished row's token ids, by key.
    """
    engine.weights = weights
    by_key = {r.key: r for r in requests}
    if tokens_of is not None:
        real_result = engine.result

        def result(request, row):
            tokens_of[request.key] = list(row.tokens)
            return real_result(request, row)

        engine.result = result
    stepper = engine.stepper()
    waiting = list(requests)
    tokens = done = 0
    errors: list[str] = []
    sync()
    start = time.perf_counter()
    try:
        while (waiting or not stepper.idle) and time.perf_counter() - start < seconds:
            chosen, waiting = take_counts(waiting, stepper.admission(Counter(r.adapter for r in waiting)))
            for res in stepper.admit(chosen) + stepper.step():
                if res.finish_reason == "preempted":
                    waiting.insert(0, by_key[res.key])
                elif res.error:
                    errors.append(res.error)
                else:
                    tokens += res.completion_tokens
                    done += 1
        unfinished = sum(len(s.row.tokens) for s in stepper._live())
        complete = not waiting and stepper.idle
        stepper.abort()
        sync()
    finally:
        if tokens_of is not None:
            del engine.result
    seconds_taken = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return {"tok_s": round((tokens + unfinished) / seconds_taken, 1), "complete": complete, "rows_done": done,
            "tokens": tokens + unfinished, "seconds": round(seconds_taken, 1)}


# -- decode probes ------------------------------------------------------------------------------------------


def probe_decode(engine: Engine, requests: list[GenerationRequest], *, steps: int) -> dict:
    """N decode steps of ``requests`` (all admitted, prefilled first), separate mode: per-step wall time, GPU
    busy share, host syncs and kernels per step."""
    engine.weights = "separate"
    stepper = engine.stepper()
    stepper.admit(requests)
    stepper.step()  # prefill (and the first decode step)
    for _ in range(2):
        stepper.step()  # warm: graphs, allocator
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        stepper.step()
    sync()
    wall = (time.perf_counter() - start) / steps
    out = {"rows": stepper.occupancy(), "step_ms": round(wall * 1e3, 2)}
    if torch.cuda.is_available():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    stepper.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["host_syncs_per_step"] = round(sum("synchroniz" in str(w.message) for w in caught) / steps, 2)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stepper.step()
        sync()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                 "cuLaunchKernelEx", "cudaGraphLaunch")]
    syncs = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                                              "cudaMemcpy")]
    out.update(kernels_per_step=round(len(kernels) / steps, 1), launches_per_step=round(len(launches) / steps, 1),
               graph_launches_per_step=round(sum(e.name == "cudaGraphLaunch" for e in launches) / steps, 1),
               profiler_syncs_per_step=round(len(syncs) / steps, 2))
    if kernels:
        busy = union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / steps / 1e6
        out["gpu_busy_share"] = round(busy / wall, 3)
    stepper.abort()
    return out


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total time covered by the intervals (overlapping kernels on several streams count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


# -- the worker -------------------------------------------------------------------------------------------


def through_worker(root: Path, requests: list[GenerationRequest], *, plan: Plan, tmp: Path, seconds: float,
                   sizes: tuple[Any, Any]) -> dict:
    """The rows as native JSONL lines: a real `lorabatch worker` (embedded Redis, SQLite), submit to completed."""
    from sqlalchemy import func, select

    from lorabatch.cli.init import render_config
    from lorabatch.schemas.settings import load_settings
    from lorabatch.schemas.tables import Job, Worker
    from lorabatch.store import broker
    from lorabatch.store.context import Context

    cfg = tmp / "lorabatch.toml"
    text = render_config(base=str(root / DEMO_MODEL_DIR), adapters={n: str(root / p) for n, p in DEMO_ADAPTERS.items()})
    text = re.sub(r"(?m)^(max_batch_size|max_batch_tokens|forward|gpu_memory_fraction) = .*\n", "", text)
    worker = (f'forward = "native"\ngpu_memory_fraction = {plan.gpu_memory_fraction}\n'
              f"max_batch_size = {json.dumps(sizes[0])}\nmax_batch_tokens = {json.dumps(sizes[1])}\n")
    text = text.replace("[worker]\n", "[worker]\n" + worker, 1)
    cfg.write_text(text + f'\n[service]\nstate_dir = "{tmp / "state"}"\n')
    lines = tmp / "in.jsonl"
    with lines.open("w") as f:
        for r in requests:
            f.write(json.dumps({"custom_id": f"r{r.key}", "adapter": r.adapter, "prompt": r.prompt,
                                "max_new_tokens": r.params.max_new_tokens}) + "\n")
    settings = load_settings(cfg, environ={})
    ctx = Context(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    cli = [sys.executable, "-m", "lorabatch.cli", "--config", str(cfg)]
    log = (tmp / "worker.log").open("ab")
    proc = subprocess.Popen([*cli, "worker", "--loglevel", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + min(seconds, 180)
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; its log: {(tmp / 'worker.log').read_text()[-1500:]}")
            with ctx.sessions() as s:
                if s.scalar(select(func.count()).select_from(Worker).where(Worker.pid == proc.pid)):
                    break
            time.sleep(0.2)
        start = time.perf_counter()
        r = subprocess.run([*cli, "submit", str(lines), "--json"], capture_output=True, text=True, env=env, timeout=120)
        if r.returncode:
            raise RuntimeError(f"submit failed: {r.stderr[-500:]}")
        job_id = json.loads(r.stdout)["id"]
        while True:
            with ctx.sessions() as s:
                job = s.get(Job, job_id)
                state, tokens, failed = job.state, job.completion_tokens, job.n_failed
            if state in ("completed", "cancelled") or time.perf_counter() - start > seconds:
                break
            time.sleep(0.1)
        took = time.perf_counter() - start
        if failed:
            raise RuntimeError(f"{failed} request(s) failed through the worker")
        return {"tok_s": round(tokens / took, 1), "complete": state == "completed", "tokens": tokens,
                "seconds": round(took, 1)}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ctx.close()
        broker.stop_embedded_redis(settings.state_path)


# -- PEFT ----------------------------------------------------------------------------------------------------


def peft_model(root: Path, *, device: torch.device, dtype: torch.dtype):
    from peft import PeftModel

    model, tokenizer = load(root, device=device, dtype=dtype)
    names = list(DEMO_ADAPTERS)
    peft = PeftModel.from_pretrained(model, root / DEMO_ADAPTERS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(root / DEMO_ADAPTERS[name], adapter_name=name)
    return peft.eval(), tokenizer


def peft_static_batch(root: Path, requests: list[GenerationRequest], *, device, dtype, plan: Plan) -> dict:
    """What a user writes with plain PEFT: one left-padded batch, `generate(adapter_names=...)`."""
    peft, tokenizer = peft_model(root, device=device, dtype=dtype)
    rows = requests[: plan.peft_rows]
    wanted = [min(r.params.max_new_tokens, plan.peft_cap) for r in rows]
    width = max(len(r.prompt_ids) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids):] = 1
    names = ["__base__" if r.adapter == BASE_ADAPTER else r.adapter for r in rows]
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = peft.generate(input_ids=ids.to(device), attention_mask=mask.to(device), adapter_names=names,
                            max_new_tokens=max(wanted), min_new_tokens=max(wanted), do_sample=False,
                            max_time=plan.peft_seconds, pad_token_id=pad)
    sync()
    took = time.perf_counter() - start
    made = out.shape[1] - width
    tokens = sum(min(w, made) for w in wanted)
    return {"tok_s": round(tokens / took, 1), "rows": len(rows), "outputs_capped_at": plan.peft_cap,
            "steps": made, "seconds": round(took, 1)}


def agreement(root: Path, requests: list[GenerationRequest], *, device, dtype, plan: Plan, seconds: float) -> dict:
    """Greedy tokens of the native engine against PEFT one prompt at a time (same dtype); the first divergence
    index of each mismatch."""
    rows = [replace(r, params=SamplingParams(max_new_tokens=plan.agree_tokens, ignore_eos=True))
            for r in requests[: plan.agree_prompts]]
    engine = engine_on(root, device=device, dtype=dtype, forward="native", plan=plan,
                       **({"gpu_memory_fraction": 0.15} if device.type == "cuda" else {}))
    ours: dict = {}
    drive(engine, rows, seconds=600, tokens_of=ours)
    del engine
    free_memory()
    peft, tokenizer = peft_model(root, device=device, dtype=dtype)
    # ignore_eos as the engine does it: eos is an ordinary token (min_new_tokens would forbid it instead).
    config = copy.deepcopy(peft.get_base_model().generation_config)
    config.update(eos_token_id=None, max_new_tokens=plan.agree_tokens, min_new_tokens=None, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    start = time.perf_counter()
    same, diverged, compared = 0, [], 0
    for r in rows:
        if time.perf_counter() - start > seconds:
            break
        ids = torch.tensor([r.prompt_ids], device=device)
        with torch.inference_mode():
            if r.adapter == BASE_ADAPTER:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=ids, generation_config=config)
            else:
                peft.set_adapter(r.adapter)
                out = peft.generate(input_ids=ids, generation_config=config)
        theirs = out[0, ids.shape[1]:].tolist()
        compared += 1
        if theirs == ours[r.key]:
            same += 1
        else:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours[r.key])) if a != b), min(len(theirs), len(ours[r.key])))
            diverged.append({"row": r.key, "adapter": r.adapter, "first_divergence": first})
    return {"identical": f"{same}/{compared}", "of": len(rows), "tokens": plan.agree_tokens, "mismatches": diverged}


# -- the run -------------------------------------------------------------------------------------------------


def native_section(root: Path, mixed: list[GenerationRequest], text_rows: list[GenerationRequest], report: dict, *,
                   device: torch.device, dtype: torch.dtype, plan: Plan, sizes: tuple[Any, Any]) -> None:
    """The native engine: tok/s mixed, base-only and one adapter merged; the text lines alone; decode probes."""
    engine = engine_on(root, device=device, dtype=dtype, forward="native", plan=plan,
                       max_batch_size=sizes[0], max_batch_tokens=sizes[1])
    report["native_batch"] = {"max_batch_size": engine.max_batch_size, "max_batch_tokens": engine.max_batch_tokens,
                              "cuda_graphs": getattr(getattr(engine, "runner", None), "graphs_on", None)}
    # Warm-up: every adapter loaded, prefill shapes of the whole length range, each weights mode once.
    warm = [replace(r, params=SamplingParams(max_new_tokens=8, ignore_eos=True)) for r in mixed[:64]]
    drive(engine, warm, seconds=60)
    attempt(report, "warm_up_merged", lambda: drive(engine, all_of(warm[:16], "sft"), seconds=60, weights="merged"))
    attempt(report, "native_mixed", lambda: drive(engine, mixed, seconds=plan.run_seconds))
    attempt(report, "native_base_only", lambda: drive(engine, all_of(mixed, BASE_ADAPTER), seconds=plan.run_seconds))
    attempt(report, "native_one_adapter_merged", lambda: drive(engine, all_of(mixed, "sft"), seconds=plan.run_seconds,
                                                               weights="merged"))
    base = report.get("native_base_only", {}).get("tok_s")
    if base:
        for key, ratio in (("native_mixed", "mixed_over_base"), ("native_one_adapter_merged", "merged_over_base")):
            if key in report:
                report[ratio] = round(report[key]["tok_s"] / base, 3)
    attempt(report, "engine_alone_text_lines", lambda: drive(engine, text_rows, seconds=plan.run_seconds))
    probe = [replace(r, prompt_ids=(r.prompt_ids * (plan.probe_prompt // len(r.prompt_ids) + 1))[: plan.probe_prompt],
                     params=SamplingParams(max_new_tokens=1000 if device.type == "cuda" else 64, ignore_eos=True))
             for r in mixed[: plan.probe_rows]]
    attempt(report, "decode_probe_1_adapter", lambda: probe_decode(engine, all_of(probe, "sft"), steps=plan.probe_steps))
    attempt(report, "decode_probe_5_adapters", lambda: probe_decode(engine, probe, steps=plan.probe_steps))


def attempt(report: dict, key: str, measure) -> None:
    """report[key] = measure(), or report[key + "_error"]: one failed measurement leaves the section's others."""
    try:
        value = measure()
        if not key.startswith("warm_up"):
            report[key] = value
    except Exception as e:  # noqa: BLE001 - reported, and the next measurement runs
        traceback.print_exc()
        report[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"


def worker_section(root: Path, text_rows: list[GenerationRequest], report: dict, *, device: torch.device,
                   dtype: torch.dtype, plan: Plan, sizes: tuple[Any, Any], seconds: float) -> None:
    """The text lines through a real worker, against the engine alone on them (measured here when the native
    section did not run in this process)."""
    if "engine_alone_text_lines" not in report:
        engine = engine_on(root, device=device, dtype=dtype, forward="native", plan=plan,
                           max_batch_size=sizes[0], max_batch_tokens=sizes[1])
        drive(engine, [replace(r, params=replace(r.params, max_new_tokens=8)) for r in text_rows[:64]], seconds=60)
        report["engine_alone_text_lines"] = drive(engine, text_rows, seconds=plan.run_seconds)
        del engine
        free_memory()
    with tempfile.TemporaryDirectory(prefix="gpu-check-worker-") as tmp:
        report["worker_text_lines"] = through_worker(root, text_rows, plan=plan, tmp=Path(tmp), sizes=sizes,
                                                     seconds=seconds)
    report["worker_over_engine"] = round(report["worker_text_lines"]["tok_s"] / report["engine_alone_text_lines"]["tok_s"], 3)


def fp32_agreement(root: Path, mixed: list[GenerationRequest], *, device: torch.device, plan: Plan,
                   seconds: float) -> dict:
    """The agreement in fp32 with TF32 off (matmuls in full fp32 on the GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return agreement(root, mixed, device=device, dtype=torch.float32, plan=plan, seconds=seconds)


def transformers_path(root: Path, mixed: list[GenerationRequest], *, device: torch.device, dtype: torch.dtype,
                      plan: Plan) -> dict:
    """The engine on transformers' forward (the path before the native one), batches of 64."""
    engine = engine_on(root, device=device, dtype=dtype, forward="transformers", plan=plan,
                       max_batch_size=64, max_batch_tokens=1 << 22)
    drive(engine, [replace(r, params=replace(r.params, max_new_tokens=8)) for r in mixed[:8]], seconds=60)
    return drive(engine, mixed, seconds=plan.transformers_seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the demo shape on CPU, a small workload: checks the script")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 330)),
                    help="seconds the whole run may take; sections that would not fit are skipped")
    ap.add_argument("--only", help="comma-separated sections to run (to rerun what a run skipped): native, agreement, "
                                   "agreement_fp32, worker, transformers_path, peft_static_batch")
    args = ap.parse_args(argv)
    tiny = args.tiny
    plan = TINY if tiny else FULL
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape = {} if tiny else QWEN_1_5B
    check = Check(args.budget)
    report = check.report
    report.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
                  torch=torch.__version__, shape=shape or "demo (hidden 256, 4 layers, vocab 4096)",
                  workload=f"{plan.n} sequences, prompts {plan.prompts[0]}-{plan.prompts[1]} random ids, outputs "
                           f"{plan.outputs[0]}-{plan.outputs[1]} tokens, ignore_eos, base + 4 adapters round-robin")
    if device.type == "cpu":
        report["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    root_dir = Path(os.environ.get("GPU_CHECK_ROOT", Path(tempfile.gettempdir()) / "gpu-check"))
    start = time.perf_counter()
    root = build_demo(root_dir / ("tiny" if tiny else "qwen2.5-1.5b-shape"), dtype="float32" if tiny else "bfloat16",
                      **shape)
    report["build_s"] = round(time.perf_counter() - start, 1)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / DEMO_MODEL_DIR)
    mixed = nano_workload(plan, vocab=text_vocab(tokenizer, shape.get("vocab_size", 4096)))
    text_rows = as_text(mixed[: plan.worker_rows], tokenizer)
    report["worker_rows"] = (f"{len(text_rows)} of the {plan.n} sequences as text lines (prompts "
                             f"{sum(len(tokenizer(r.prompt)['input_ids']) for r in text_rows) // len(text_rows)} tokens on "
                             "average), eos honoured, both ways")

    sizes = ("auto", "auto") if device.type == "cuda" else (32, 1 << 20)  # the engine alone and the worker alike
    sections = {
        "native": (60, lambda: native_section(root, mixed, text_rows, report, device=device, dtype=dtype, plan=plan,
                                              sizes=sizes)),
        "agreement": (40, lambda: report.update({"agreement_" + str(dtype).split(".")[-1]: agreement(
            root, mixed, device=device, dtype=dtype, plan=plan, seconds=max(20.0, min(45.0, check.left() - 100)))})),
        "agreement_fp32": (40, lambda: report.update(agreement_float32_tf32_off=fp32_agreement(
            root, mixed, device=device, plan=plan, seconds=max(20.0, min(45.0, check.left() - 60))))),
        "worker": (60, lambda: worker_section(root, text_rows, report, device=device, dtype=dtype, plan=plan,
                                              sizes=sizes, seconds=max(30.0, min(plan.run_seconds * 2, check.left() - 30)))),
        "transformers_path": (25, lambda: report.update(transformers_mixed=transformers_path(
            root, mixed, device=device, dtype=dtype, plan=plan))),
        "peft_static_batch": (30, lambda: report.update(peft_static_batch_64=peft_static_batch(
            root, mixed, device=device, dtype=dtype, plan=plan))),
    }
    if device.type != "cuda":
        del sections["agreement_fp32"]  # on CPU the agreement above is already fp32
    only = [name.strip() for name in args.only.split(",")] if args.only else list(sections)
    if args.only:  # a rerun of some sections keeps the full run's file
        check.filename = f"gpu_check.{'+'.join(only)}.json"
    unknown = [name for name in only if name not in sections]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(sections)}", file=sys.stderr)
        return 2
    for name in only:
        needs, run = sections[name]
        with check.section(name, needs=0 if tiny else needs) as go:
            if go:
                run()

    report["total_s"] = round(time.perf_counter() - check.started, 1)
    summarize(report, tiny=tiny)
    print(f"\nwritten to {check.save()}")
    return 0


TARGETS = [
    ("native tok/s (mixed, 256 sequences)", lambda r: r["native_mixed"]["tok_s"], ">= 6000"),
    ("mixed / base-only", lambda r: r["mixed_over_base"], ">= 0.85"),
    ("one adapter merged / base-only", lambda r: r["merged_over_base"], ">= 0.95"),
    ("GPU busy share of decode wall (5 adapters)", lambda r: r["decode_probe_5_adapters"]["gpu_busy_share"], ">= 0.70"),
    ("host syncs per decode step (5 adapters)", lambda r: r["decode_probe_5_adapters"]["host_syncs_per_step"], "<= 2"),
    ("kernels per decode step, 1 adapter / 5", lambda r: f'{r["decode_probe_1_adapter"]["kernels_per_step"]} / '
                                                      f'{r["decode_probe_5_adapters"]["kernels_per_step"]}', "equal"),
    ("worker / engine alone (same lines)", lambda r: r["worker_over_engine"], ">= 0.9"),
    ("bf16 greedy = PEFT one at a time", lambda r: r["agreement_bfloat16"]["identical"], "report"),
    ("fp32 (TF32 off) greedy = PEFT", lambda r: r["agreement_float32_tf32_off"]["identical"], ">= 63/64"),
    ("transformers path tok/s (before)", lambda r: r["transformers_mixed"]["tok_s"], "report"),
    ("PEFT static batch of 64 tok/s", lambda r: r["peft_static_batch_64"]["tok_s"], "report"),
]


def summarize(report: dict, *, tiny: bool) -> None:
    print("| what | measured | target |\n|---|---|---|")
    for what, get, target in TARGETS:
        try:
            value = get(report)
        except (KeyError, TypeError):
            value = "not measured (see the json)"
        print(f"| {what} | {value} | {target if not tiny else 'n/a (--tiny)'} |")
    print("\n| key | value |\n|---|---|")
    for key, value in report.items():
        print(f"| {key} | {json.dumps(value) if isinstance(value, (dict, list)) else value} |")


if __name__ == "__main__":
    sys.exit(main())
