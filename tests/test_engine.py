"""The generation engine on the demo model and its four real PEFT adapters."""

from __future__ import annotations

import functools
import shutil
import threading
from pathlib import Path

import pytest
import torch

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
from lorabatch.schemas.settings import BASE_ADAPTER, Settings
from lorabatch.worker.engine import decode
from lorabatch.worker.engine.adapters import AdapterManager
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = [BASE_ADAPTER, *DEMO_ADAPTERS]
PROMPTS = [
    "Summarise: the cat sat on the mat.",
    "hello",
    "Write a long story about a dragon who learns to bake bread in a small village by the sea, with many details.",
    "1 2 3 4 5 6 7",
    "What is the capital of France?",
    # long enough that a batch holding it is prefilled in several chunks
    " ".join(["The quick brown fox jumps over the lazy dog near the river bank at dawn."] * 10),
]


def load(demo_root: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_root / DEMO_MODEL_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(demo_root / DEMO_MODEL_DIR, dtype=torch.float32).eval()
    return model, tokenizer


def make_engine(demo_root: Path, adapter_dirs: dict | None = None, **options) -> Engine:
    model, tokenizer = load(demo_root)
    dirs = adapter_dirs if adapter_dirs is not None else {n: demo_root / p for n, p in DEMO_ADAPTERS.items()}
    return Engine(model, tokenizer, AdapterManager(dirs, base_model=str(demo_root / DEMO_MODEL_DIR)), **options)


@pytest.fixture(scope="module")
def engine(demo_root: Path) -> Engine:
    return make_engine(demo_root, max_batch_size=8)


@pytest.fixture(scope="module")
def reference(demo_root: Path):
    """Plain PEFT, one prompt at a time: what a user writes by hand."""
    return peft_one_at_a_time(demo_root)


def peft_one_at_a_time(demo_root: Path):
    """generate(adapter, prompt ids, max_new_tokens) -> greedy token ids through plain PEFT, one prompt alone."""
    from peft import PeftModel

    model, tokenizer = load(demo_root)
    names = list(DEMO_ADAPTERS)
    peft = PeftModel.from_pretrained(model, demo_root / DEMO_ADAPTERS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(demo_root / DEMO_ADAPTERS[name], adapter_name=name)

    @functools.lru_cache(maxsize=None)
    def generate(adapter: str, ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
        inputs = torch.tensor([ids])
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
        if adapter == BASE_ADAPTER:
            with peft.disable_adapter():
                out = peft.generate(input_ids=inputs, **kwargs)
        else:
            peft.set_adapter(adapter)
            out = peft.generate(input_ids=inputs, **kwargs)
        return out[0, len(ids):].tolist()

    return generate


def pool(max_new=(12, 5, 9)) -> list[GenerationRequest]:
    requests = []
    for i in range(len(NAMES) * len(PROMPTS)):
        adapter, text = NAMES[i % len(NAMES)], PROMPTS[i // len(NAMES)]
        params = SamplingParams(max_new_tokens=max_new[i % len(max_new)])
        if i % 4 == 3:
            requests.append(GenerationRequest(i, adapter, params, messages=[{"role": "user", "content": text}]))
        else:
            requests.append(GenerationRequest(i, adapter, params, prompt=text))
    return requests


def token_ids(engine: Engine, request: GenerationRequest) -> list[int]:
    return engine.encode(request)


@pytest.mark.parametrize("weights", ["merged", "separate", "auto"])
def test_greedy_batches_equal_plain_peft_one_at_a_time(engine, reference, weights):
    """Greedy output, batched in any weights mode, is token for token what PEFT gives for each prompt alone."""
    engine.weights = weights
    requests = pool()
    results = engine.generate(requests)
    assert [r.key for r in results] == [q.key for q in requests]
    for request, result in zip(requests, results):
        assert result.error is None
        expected = reference(request.adapter, tuple(token_ids(engine, request)), request.params.max_new_tokens)
        assert result.output == engine.tokenizer.decode(expected, skip_special_tokens=True), (weights, request)
        assert result.completion_tokens == len(expected)
        assert result.finish_reason == ("stop" if expected[-1] in engine.eos else "length")


def test_mixed_batch_equals_each_row_alone(engine):
    """One separate-mode batch mixing base and every adapter gives each row what it gives alone."""
    engine.weights = "separate"
    requests = [GenerationRequest((name, p), name, SamplingParams(max_new_tokens=10), prompt=PROMPTS[p])
                for p in (0, 2) for name in NAMES]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.output for r in together] == [r.output for r in alone]
    for p in (0, 2):  # every adapter really changes the output
        assert len({r.output for r in together if r.key[1] == p}) == len(NAMES)


def test_merged_logits_match_separate(engine):
    """Merged and separate weights give the same logits within fp32 tolerance."""
    ids = torch.tensor([token_ids(engine, GenerationRequest(0, "sft", SamplingParams(), prompt=PROMPTS[2]))])
    engine.adapters.load("sft")
    with torch.inference_mode():
        with engine.adapters.rows(["sft"]):
            separate = engine.model(input_ids=ids).logits
        engine.adapters.merge("sft")
        merged = engine.model(input_ids=ids).logits
        engine.adapters.restore_base_weights()
        with engine.adapters.rows([BASE_ADAPTER]):
            base = engine.model(input_ids=ids).logits
    torch.testing.assert_close(merged, separate, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, separate, atol=1e-3)


def sampled(seed, **extra):
    return SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=seed, **extra)


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    """A seeded request gives the same output alone or among neighbours with other adapters and settings."""
    engine.weights = "auto"
    target = GenerationRequest("t", "dpo", sampled(7), prompt=PROMPTS[0])
    alone = engine.generate([target])[0].output
    neighbours = [
        GenerationRequest(1, "dpo", SamplingParams(max_new_tokens=3), prompt=PROMPTS[1]),
        GenerationRequest(2, "sft", sampled(None), prompt=PROMPTS[2]),
        GenerationRequest(3, "dpo", SamplingParams(max_new_tokens=20, temperature=1.5, top_k=5, seed=1), prompt=PROMPTS[3]),
        GenerationRequest(4, BASE_ADAPTER, sampled(99), prompt=PROMPTS[4]),
        GenerationRequest(5, "dpo", sampled(3), prompt=PROMPTS[5]),  # another prefill chunk
    ]
    for weights in ("merged", "separate", "auto"):
        engine.weights = weights
        mixed = engine.generate(neighbours[:2] + [target] + neighbours[2:])
        assert mixed[2].output == alone, weights
    other_seed = engine.generate([GenerationRequest("o", "dpo", sampled(8), prompt=PROMPTS[0])])[0].output
    unseeded = {engine.generate([GenerationRequest("u", "dpo", sampled(None), prompt=PROMPTS[0])])[0].output
                for _ in range(3)}
    assert other_seed != alone
    assert len(unseeded) > 1


def test_stop_string_ends_generation_and_is_not_included(engine):
    """A stop string cuts the output before it, with finish_reason 'stop' and fewer tokens."""
    engine.weights = "auto"
    full = engine.generate([GenerationRequest(0, "sft", SamplingParams(max_new_tokens=16, ignore_eos=True), prompt="hello")])[0]
    stop = full.output[6:9]
    assert len(stop) == 3
    cut = engine.generate([GenerationRequest(0, "sft", SamplingParams(max_new_tokens=16, ignore_eos=True, stop=("zzzz", stop)),
                                             prompt="hello")])[0]
    assert cut.output == full.output[: full.output.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_per_row_max_new_tokens_in_one_batch(engine):
    """Rows of one batch stop at their own max_new_tokens; shorter outputs are prefixes of longer ones."""
    engine.weights = "separate"
    lengths = [1, 4, 17, 9]
    requests = [GenerationRequest(n, "sft", SamplingParams(max_new_tokens=n, ignore_eos=True), prompt=PROMPTS[0]) for n in lengths]
    results = engine.generate(requests)
    assert [r.completion_tokens for r in results] == lengths
    assert all(r.finish_reason == "length" for r in results)
    longest = results[2].output
    assert all(longest.startswith(r.output) for r in results)


def test_eos_from_generation_config_stops(engine, monkeypatch):
    """Generation stops at any eos token the model's generation config lists."""
    engine.weights = "auto"
    request = GenerationRequest(0, "sft", SamplingParams(max_new_tokens=12, ignore_eos=True), prompt=PROMPTS[3])
    ids = engine.generate([request])[0]
    tokens = engine.tokenizer(ids.output, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(engine, "eos", frozenset({99999, tokens[2]}))
    stopped = engine.generate([GenerationRequest(0, "sft", SamplingParams(max_new_tokens=12), prompt=PROMPTS[3])])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens <= 3


def test_bad_adapters_fail_only_their_requests(demo_root, tmp_path):
    """Unknown or unloadable adapters fail their own requests; every other request succeeds."""
    broken = shutil.copytree(demo_root / DEMO_ADAPTERS["sft"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    dirs = {"sft": demo_root / DEMO_ADAPTERS["sft"], "broken": broken}
    engine = make_engine(demo_root, dirs, max_batch_size=4)
    names = ["sft", "nope", BASE_ADAPTER, "broken"] * 3
    requests = [GenerationRequest(i, n, SamplingParams(max_new_tokens=4), prompt=PROMPTS[i % 5]) for i, n in enumerate(names)]
    for weights in ("merged", "separate", "auto"):
        engine.weights = weights
        results = engine.generate(requests)
        for request, result in zip(requests, results):
            if request.adapter == "nope":
                assert result.output is None and "'nope' is not configured" in result.error
            elif request.adapter == "broken":
                assert result.output is None and str(broken) in result.error
            else:
                assert result.error is None and result.completion_tokens == 4


def test_prompt_over_context_fails_with_the_numbers(demo_root):
    """A prompt plus max_new_tokens over the context fails alone, and says by how much."""
    engine = make_engine(demo_root, max_context=40)
    requests = [GenerationRequest(0, "sft", SamplingParams(max_new_tokens=30), prompt=PROMPTS[2]),
                GenerationRequest(1, "sft", SamplingParams(max_new_tokens=5), prompt=PROMPTS[1])]
    too_long, fine = engine.generate(requests)
    n = too_long.prompt_tokens
    assert f"prompt of {n} tokens + max_new_tokens 30 = {n + 30} tokens is over the context of 40" in too_long.error
    assert fine.error is None and fine.completion_tokens >= 1


def test_out_of_memory_splits_the_batch_and_retries(engine, monkeypatch):
    """An OOM batch is halved until it fits; the request that cannot fit alone fails, nothing else is lost."""
    engine.weights = "separate"
    requests = pool(max_new=(6,))[:10]
    expected = [r.output for r in engine.generate(requests)]
    real_prefill = decode.prefill_batch
    batch_sizes = []

    def prefill_with_small_memory(model, prompts, **kwargs):
        batch_sizes.append(len(prompts))
        if len(prompts) > 3 or max(len(p) for p in prompts) >= 20:  # the long prompt never fits
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_prefill(model, prompts, **kwargs)

    monkeypatch.setattr(decode, "prefill_batch", prefill_with_small_memory)
    results = engine.generate(requests)
    long_prompt = [i for i, r in enumerate(requests) if len(engine.encode(r)) >= 20]
    # the first row runs alone (nothing is known of row costs yet), the other 7 of the batch of 8 join together
    assert long_prompt and max(batch_sizes) == 7 and 1 in batch_sizes
    for i, (result, output) in enumerate(zip(results, expected)):
        if i in long_prompt:
            assert result.output is None and "out of memory even alone" in result.error
        else:
            assert result.output == output


def test_error_mid_batch_leaves_no_state_behind(engine, monkeypatch):
    """An error inside a mixed batch propagates, and the next batches give the same outputs as before."""
    engine.weights = "separate"
    requests = pool(max_new=(5,))[:10]
    before = [r.output for r in engine.generate(requests)]
    monkeypatch.setattr(decode, "decode_step", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        engine.generate(requests)
    monkeypatch.undo()
    assert all(len(layer._forward_pre_hooks) == 0 for layer in engine.adapters._layers)
    assert [r.output for r in engine.generate(requests)] == before


def test_invalid_requests_fail_alone(engine):
    """Bad sampling parameters, no prompt, or messages the template cannot render fail without stopping others."""
    requests = [
        GenerationRequest(0, "sft", SamplingParams(top_p=0.0), prompt="hi"),
        GenerationRequest(1, "sft", SamplingParams(max_new_tokens=2)),
        GenerationRequest(2, "sft", SamplingParams(max_new_tokens=2), prompt="hi"),
        GenerationRequest(3, "sft", SamplingParams(max_new_tokens=2), messages=[{"no role": "x"}]),
    ]
    bad_params, no_prompt, fine, bad_messages = engine.generate(requests)
    assert "top_p" in bad_params.error and "exactly one of prompt or messages" in no_prompt.error
    assert "chat template" in bad_messages.error
    assert fine.error is None


def test_from_settings_and_any_thread(demo_root):
    """Engine.from_settings loads the configured base model; generate runs from a non-main thread."""
    settings = Settings(model={"base": str(demo_root / DEMO_MODEL_DIR)},
                        adapters={n: str(demo_root / p) for n, p in DEMO_ADAPTERS.items()})
    engine = Engine.from_settings(settings)
    results = []
    request = GenerationRequest("k", "dpo-ckpt3", SamplingParams(max_new_tokens=3), messages=[{"role": "user", "content": "hi"}])
    worker = threading.Thread(target=lambda: results.extend(engine.generate([request])))
    worker.start()
    worker.join(60)
    assert results and results[0].key == "k" and results[0].error is None and results[0].prompt_tokens > 3


def test_load_base_failure_names_the_path(tmp_path):
    """A base model that cannot be loaded fails with one error that names its path."""
    from lorabatch.worker.engine.model import ModelLoadError, load_base

    missing = tmp_path / "no-model-here"
    missing.mkdir()
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_base(Settings(model={"base": str(missing)}))
