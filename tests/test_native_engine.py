"""The native forward path (own Qwen2 forward, KV slots, stacked LoRA) on the demo model and real PEFT adapters:
token for token what plain PEFT gives one prompt at a time, in every weights mode and however rows join."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
from lorabatch.schemas.settings import BASE_ADAPTER, Settings
from lorabatch.worker.engine.adapters import AdapterManager
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams
from lorabatch.worker.engine.slot_stepper import SlotStepper
from tests.test_engine import NAMES, PROMPTS, load, make_engine, peft_one_at_a_time, pool, token_ids
from tests.test_stepper import assert_equals_reference, drive, requests_over_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(demo_root: Path) -> Engine:
    return make_engine(demo_root, max_batch_size=8, forward="native")


@pytest.fixture(scope="module")
def reference(demo_root: Path):
    return peft_one_at_a_time(demo_root)


def test_native_engine_is_selected_and_sized(engine):
    """forward="native" builds the own forward, slots for max_batch_size rows and the stacked-LoRA backend."""
    assert engine.forward == "native" and isinstance(engine.stepper(), SlotStepper)
    assert engine.kv.slots == 8 and engine.kv.slot_len == 2048
    assert engine.adapters.backend.kind == "native"


@pytest.mark.parametrize("weights", ["merged", "separate", "auto"])
def test_greedy_batches_equal_plain_peft_one_at_a_time(engine, reference, weights):
    """Greedy output of the native path, batched in any weights mode, is token for token PEFT's for each prompt alone."""
    engine.weights = weights
    requests = pool()
    results = engine.generate(requests)
    for request, result in zip(requests, results):
        assert result.error is None
        expected = reference(request.adapter, tuple(token_ids(engine, request)), request.params.max_new_tokens)
        assert result.output == engine.tokenizer.decode(expected, skip_special_tokens=True), (weights, request)
        assert result.completion_tokens == len(expected)


@pytest.fixture(scope="module")
def small(demo_root: Path) -> Engine:
    return make_engine(demo_root, max_batch_size=4, forward="native")


@pytest.mark.parametrize("weights", ["merged", "separate", "auto"])
def test_rows_admitted_mid_batch_equal_plain_peft(small, reference, weights):
    """Rows joining a running native batch every few steps (filling the slots others left) stay exact."""
    engine = small
    engine.weights = weights
    requests = requests_over_everything()
    log = []
    results = drive(engine.stepper(), list(requests), every=2, log=log)
    assert any(busy > 0 and joined > 0 for busy, joined, _ in log), "no row joined a running batch"
    assert_equals_reference(engine, reference, requests, results)


def test_mixed_batch_equals_each_row_alone(engine):
    """One separate-mode batch mixing base and every adapter gives each row what it gives alone."""
    engine.weights = "separate"
    requests = [GenerationRequest((name, p), name, SamplingParams(max_new_tokens=10), prompt=PROMPTS[p])
                for p in (0, 2) for name in NAMES]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.output for r in together] == [r.output for r in alone]
    for p in (0, 2):
        assert len({r.output for r in together if r.key[1] == p}) == len(NAMES)


def sampled(seed):
    return SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=seed)


@pytest.mark.parametrize("join_after", [0, 3])
def test_seeded_row_gives_the_same_tokens_whatever_it_joins(engine, join_after):
    """A seeded row's output does not depend on its neighbours' adapters and settings, nor on when it joins."""
    engine.weights = "separate"
    target = GenerationRequest("t", "dpo", sampled(7), prompt=PROMPTS[0])
    alone = engine.generate([target])[0].output
    stepper = engine.stepper()
    stepper.admit([
        GenerationRequest(1, "sft", SamplingParams(max_new_tokens=20, temperature=1.5, top_k=5, seed=1), prompt=PROMPTS[3]),
        GenerationRequest(2, BASE_ADAPTER, sampled(99), prompt=PROMPTS[5]),
        GenerationRequest(3, "dpo-ckpt3", SamplingParams(max_new_tokens=15), prompt=PROMPTS[2]),
    ])
    results = {}
    for _ in range(join_after):
        results.update((r.key, r) for r in stepper.step())
    stepper.admit([target])
    while not stepper.idle:
        results.update((r.key, r) for r in stepper.step())
    assert results["t"].output == alone


def test_merged_restore_is_bit_exact(engine):
    """Merging adapters into the native weights and restoring gives back the exact base tensors."""
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    for name in ["sft", "dpo", "sft", "dpo-ckpt3"] * 5:
        engine.adapters.load(name)
        engine.adapters.merge(name)
        assert any(not torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    engine.adapters.restore_base_weights()
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())


def test_cache_is_never_reallocated_as_rows_join_and_leave(engine):
    """Rows joining, ending and filling holes leave the KV cache tensor where it was (no copy of the cache)."""
    engine.weights = "separate"
    pointer = engine.kv.data.data_ptr()
    stepper = engine.stepper()
    requests = requests_over_everything(max_new=(2, 9, 4))
    occupancy = []
    drive(stepper, list(requests), every=1, log=occupancy)
    assert engine.kv.data.data_ptr() == pointer
    assert len({busy for busy, _, _ in occupancy}) > 2  # rows really came and went


def test_decode_kernels_do_not_grow_with_adapters(engine):
    """A separate-mode decode step runs the same ops whether its 8 rows hold 1 adapter or 4 plus base."""
    from torch.profiler import ProfilerActivity, profile

    for name in DEMO_ADAPTERS:
        engine.adapters.load(name)
    stack = engine.adapters.backend.stack
    runner = engine.runner
    tokens = torch.zeros(8, dtype=torch.long)
    positions = list(range(3, 11))

    def ops(adapters: list[int]) -> list[str]:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.decode(tokens, positions, adapters, 12)
        return sorted(e.name for e in prof.events() if e.name.startswith("aten::"))

    one = ops([stack.index("sft")] * 8)
    five = ops([0, 1, 2, 3, 4, 1, 2, 3])
    assert len(one) == len(five) and one == five


@functools.lru_cache(maxsize=None)
def extra_adapters(root: Path) -> dict[str, Path]:
    """Two adapters beyond the demo's: rank 4 on k/o/gate/up/down with an alpha pattern, rank 12 with rsLoRA."""
    from peft import LoraConfig, get_peft_model

    made = {}
    specs = {
        "wide": LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                           alpha_pattern={"down_proj": 2}),
        "rs": LoraConfig(r=12, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                         rank_pattern={"up_proj": 6}),
    }
    for seed, (name, config) in enumerate(specs.items()):
        base, _ = load(root)
        peft = get_peft_model(base, config)
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for pname, param in sorted(peft.named_parameters()):
                if ".lora_" in pname:
                    param.normal_(0.0, 0.5 * param.shape[1] ** -0.5, generator=generator)
        path = root.parent / f"extra-{name}"
        peft.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
        made[name] = path
    return made


def test_adapters_beyond_q_v_and_of_different_ranks_equal_peft(demo_root):
    """k/o/MLP projections, alpha and rank patterns, rsLoRA and ranks padded in one stack: exact against PEFT."""
    from peft import PeftModel

    extra = extra_adapters(demo_root)
    dirs = {"sft": demo_root / DEMO_ADAPTERS["sft"], **extra}
    engine = make_engine(demo_root, dirs, max_batch_size=6, forward="native", weights="separate")
    base, _ = load(demo_root)
    peft = PeftModel.from_pretrained(base, dirs["sft"], adapter_name="sft")
    for name, path in extra.items():
        peft.load_adapter(path, adapter_name=name)
    requests = [GenerationRequest(i, name, SamplingParams(max_new_tokens=8), prompt=PROMPTS[i % len(PROMPTS)])
                for i, name in enumerate(["wide", "rs", "sft", BASE_ADAPTER, "wide", "rs"])]
    results = engine.generate(requests)
    assert engine.adapters.backend.stack.rank == 16
    for request, result in zip(requests, results):
        ids = torch.tensor([engine.encode(request)])
        with torch.inference_mode():
            if request.adapter == BASE_ADAPTER:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
            else:
                peft.set_adapter(request.adapter)
                out = peft.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        assert result.output == engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), request
    assert len({r.output for r in results[:4]}) == 4


def dora_adapter(demo_root: Path, tmp_path: Path) -> Path:
    path = tmp_path / "dora"
    path.mkdir()
    source = demo_root / DEMO_ADAPTERS["sft"]
    config = json.loads((source / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (path / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    return path


def test_dora_adapter_fails_its_requests_with_the_fix(demo_root, tmp_path):
    """forced native: a DoRA adapter's requests fail with one line naming the path and the fix; others run."""
    dirs = {"sft": demo_root / DEMO_ADAPTERS["sft"], "dora": dora_adapter(demo_root, tmp_path)}
    engine = make_engine(demo_root, dirs, max_batch_size=4, forward="native")
    requests = [GenerationRequest(i, n, SamplingParams(max_new_tokens=3), prompt="hi") for i, n in enumerate(["dora", "sft"])]
    dora, fine = engine.generate(requests)
    assert dora.output is None and "DoRA" in dora.error and 'forward = "transformers"' in dora.error
    assert str(dirs["dora"]) in dora.error and "\n" not in dora.error
    assert fine.error is None and fine.completion_tokens == 3


def test_auto_forward_falls_back_for_unfit_adapters_and_resolves_auto_sizes(demo_root, tmp_path):
    """forward="auto" runs natively when it can, else transformers; "auto" batch sizes become ints at once."""
    settings = Settings(model={"base": str(demo_root / DEMO_MODEL_DIR)},
                        adapters={n: str(demo_root / p) for n, p in DEMO_ADAPTERS.items()},
                        worker={"forward": "auto", "max_batch_size": "auto", "max_batch_tokens": "auto"})
    native = Engine.from_settings(settings)
    assert native.forward == "native"
    assert (native.max_batch_size, native.max_batch_tokens) == (32, 16384)
    model, tokenizer = load(demo_root)
    dirs = {"sft": demo_root / DEMO_ADAPTERS["sft"], "dora": dora_adapter(demo_root, tmp_path)}
    manager = AdapterManager(dirs, base_model=str(demo_root / DEMO_MODEL_DIR))
    fallback = Engine(model, tokenizer, manager, forward="auto", max_batch_size="auto", max_batch_tokens="auto")
    assert fallback.forward == "transformers" and fallback.max_batch_size == 32
    request = GenerationRequest(0, "dora", SamplingParams(max_new_tokens=3), prompt="hi")
    assert fallback.generate([request])[0].error is None


def test_out_of_memory_halves_prefills_and_preempts_decodes(engine, monkeypatch):
    """Native OOM: a prefill is halved until it fits, a decode step preempts the youngest half; outputs unchanged."""
    engine.weights = "separate"
    requests = requests_over_everything()[:8]
    expected = [r.output for r in engine.generate(requests)]
    real_prefill, real_decode = engine.native.prefill, engine.runner.decode
    prefills, decodes = [], []

    def small_prefill(ids, *args):
        prefills.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_prefill(ids, *args)

    def small_decode(tokens, positions, *args):
        if len(positions) > 2 and len(decodes) < 1:
            decodes.append(len(positions))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(tokens, positions, *args)

    monkeypatch.setattr(engine.native, "prefill", small_prefill)
    monkeypatch.setattr(engine.runner, "decode", small_decode)
    stepper = engine.stepper()
    stepper.admit(requests[:4])
    preempted = stepper.step()
    assert max(prefills) > 2 and min(prefills) <= 2  # halved until the forwards fit
    assert sorted(r.key for r in preempted) == [2, 3] and all(r.finish_reason == "preempted" for r in preempted)
    assert sorted(stepper.keys()) == [0, 1]
    stepper.abort()
    assert [r.output for r in engine.generate(requests)] == expected


def test_runner_resolves_auto_sizes_into_the_settings(demo_root):
    """Engine.resolved gives settings whose batch sizes are the engine's ints, for every other reader."""
    settings = Settings(model={"base": str(demo_root / DEMO_MODEL_DIR)})
    engine = make_engine(demo_root, max_batch_size="auto", max_batch_tokens="auto", forward="native")
    resolved = engine.resolved(settings)
    assert (resolved.worker.max_batch_size, resolved.worker.max_batch_tokens) == (32, 16384)
    assert settings.worker.max_batch_size == "auto"


def test_cpu_slots_are_sized_by_host_memory_and_auto_falls_back(demo_root, monkeypatch):
    """On CPU the slots never take over a quarter of the available memory; auto then takes transformers' path."""
    from lorabatch.worker.engine import kv_slots

    shape = kv_slots.Shape(28, 2, 128, torch.float32, torch.device("cpu"))  # Qwen2.5-1.5B's KV, fp32
    plan = kv_slots.plan_slots(shape, max_context=32768, max_batch_size="auto", max_batch_tokens="auto",
                               free_bytes=8 << 30)
    assert plan.slot_len == 16384 and plan.slots * plan.slot_len * shape.bytes_per_token <= 2 << 30
    monkeypatch.setattr(kv_slots, "available_host_bytes", lambda: 64 << 20)  # 16 MiB for slots: the demo needs 256
    model, tokenizer = load(demo_root)
    manager = AdapterManager({}, base_model=str(demo_root / DEMO_MODEL_DIR))
    engine = Engine(model, tokenizer, manager, forward="auto", max_batch_size="auto", max_batch_tokens="auto")
    assert engine.forward == "transformers"


def test_rows_admitted_beyond_the_slots_wait_for_free_ones(small, reference):
    """More rows admitted at once than the cache has slots (a group of suspects) wait and join as rows leave."""
    small.weights = "separate"
    stepper = small.stepper()
    requests = requests_over_everything(max_new=(3, 7))[:10]
    assert stepper.admit(requests, group=True) == []
    results = {}
    while not stepper.idle:
        assert stepper.occupancy() <= small.kv.slots
        results.update((r.key, r) for r in stepper.step())
    assert_equals_reference(small, reference, requests, results)
