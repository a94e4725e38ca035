"""Continuous batching on the demo model: rows that join a running batch compute what they compute alone."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine import decode
from lorabatch.worker.engine.engine import Engine, GenerationRequest, SamplingParams, take_counts
from lorabatch.worker.engine.stepper import Stepper
from tests.test_engine import NAMES, PROMPTS, make_engine, peft_one_at_a_time, token_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(demo_root) -> Engine:
    return make_engine(demo_root, max_batch_size=4)


@pytest.fixture(scope="module")
def reference(demo_root):
    """Plain PEFT, one prompt at a time."""
    return peft_one_at_a_time(demo_root)


def requests_over_everything(max_new=(3, 11, 6, 9)) -> list[GenerationRequest]:
    return [GenerationRequest(i, NAMES[i % len(NAMES)], SamplingParams(max_new_tokens=max_new[i % len(max_new)]),
                              prompt=PROMPTS[(i * 7) % len(PROMPTS)]) for i in range(6 * len(NAMES))]


def drive(stepper: Stepper, waiting: list[GenerationRequest], *, every: int = 1, log: list | None = None) -> dict:
    """Admit what admission allows every ``every`` steps, step until done; results by key."""
    results = {}
    steps = 0
    while waiting or not stepper.idle:
        if steps % every == 0:
            chosen, waiting[:] = take_counts(waiting, stepper.admission(Counter(r.adapter for r in waiting)))
            if log is not None:
                log.append((stepper.occupancy(), len(chosen), stepper.merged))
            for result in stepper.admit(chosen):
                results[result.key] = result
        for result in stepper.step():
            results[result.key] = result
        steps += 1
    return results


def assert_equals_reference(engine, reference, requests, results):
    for request in requests:
        result = results[request.key]
        assert result.error is None, result
        expected = reference(request.adapter, tuple(token_ids(engine, request)), request.params.max_new_tokens)
        assert result.output == engine.tokenizer.decode(expected, skip_special_tokens=True), (engine.weights, request)
        assert result.completion_tokens == len(expected)


@pytest.mark.parametrize("weights", ["merged", "separate", "auto"])
def test_rows_admitted_mid_batch_equal_plain_peft(engine, reference, weights):
    """Greedy rows joining a running batch (every few steps) give what plain PEFT gives for each prompt alone."""
    engine.weights = weights
    requests = requests_over_everything()
    log = []
    results = drive(engine.stepper(), list(requests), every=2, log=log)
    assert sorted(results) == [r.key for r in requests]
    assert any(busy > 0 and joined > 0 for busy, joined, _ in log), "no row joined a running batch"
    assert_equals_reference(engine, reference, requests, results)


def test_auto_switches_merged_to_separate_mid_batch_exactly(engine, reference):
    """A merged batch that other adapters join continues with the weights apart, every row still exact."""
    engine.weights = "auto"
    stepper = engine.stepper()
    first = [GenerationRequest(i, "sft", SamplingParams(max_new_tokens=10), prompt=PROMPTS[i]) for i in range(3)]
    assert stepper.admission({"sft": 3}) == {"sft": 1}  # nothing learned of row costs yet: one row
    assert stepper.admit(first) == []  # the three fit max_batch_tokens: none is handed back
    results = {r.key: r for _ in range(3) for r in stepper.step()}
    assert stepper.merged == "sft"
    later = [GenerationRequest(10, "dpo", SamplingParams(max_new_tokens=8), prompt=PROMPTS[4])]
    assert stepper.admission({"dpo": 1}) == {"dpo": 1}
    stepper.admit(later)
    assert stepper.merged is None
    while not stepper.idle:
        results.update((r.key, r) for r in stepper.step())
    assert_equals_reference(engine, reference, first + later, results)


def sampled(seed: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=seed)


@pytest.mark.parametrize("weights", ["separate", "auto"])
@pytest.mark.parametrize("join_after", [0, 2, 5])
def test_seeded_row_gives_the_same_tokens_whenever_it_joins(engine, weights, join_after):
    """A seeded request's output does not depend on the batch it joins, nor on when it joins."""
    engine.weights = weights
    target = GenerationRequest("t", "dpo", sampled(7), prompt=PROMPTS[0])
    alone = engine.generate([target])[0].output
    stepper = engine.stepper()
    neighbours = [
        GenerationRequest(1, "dpo", SamplingParams(max_new_tokens=20, temperature=1.5, top_k=5, seed=1), prompt=PROMPTS[3]),
        GenerationRequest(2, BASE_ADAPTER, sampled(99), prompt=PROMPTS[5]),
        GenerationRequest(3, "sft", SamplingParams(max_new_tokens=15), prompt=PROMPTS[2]),
    ]
    stepper.admit(neighbours)
    results = {}
    for _ in range(join_after):
        results.update((r.key, r) for r in stepper.step())
    stepper.admit([target])
    while not stepper.idle:
        results.update((r.key, r) for r in stepper.step())
    assert results["t"].output == alone


@pytest.mark.parametrize("forward", ["transformers", "native"])
def test_cancel_returns_the_text_so_far(demo_root, forward):
    """A cancelled row leaves at once with finish_reason 'cancelled' and the prefix generated so far; its
    neighbour goes on a step; abort hands it back. On both forward paths."""
    engine = make_engine(demo_root, max_batch_size=8, forward=forward, weights="separate")
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    full = engine.generate([GenerationRequest("c", "sft", params, prompt=PROMPTS[1])])[0]
    stepper = engine.stepper()
    stepper.admit([GenerationRequest("c", "sft", params, prompt=PROMPTS[1]),
                   GenerationRequest("o", "dpo", params, prompt=PROMPTS[0])])
    for _ in range(5):
        assert stepper.step() == []
    (cancelled,) = stepper.cancel(["c"])
    assert cancelled.finish_reason == "cancelled" and cancelled.error is None
    assert 1 < cancelled.completion_tokens < 40 and full.output.startswith(cancelled.output)
    assert stepper.keys() == ["o"] and stepper.running == 1
    assert stepper.step() == []
    assert stepper.abort() == ["o"] and stepper.idle


def test_ragged_ends_keep_the_batch_full(engine):
    """When a row ends and work is waiting, the next admission fills its slot: the batch stays full."""
    engine.weights = "separate"
    lengths = [2, 9, 4, 13, 3, 7, 5, 11, 2, 6, 8, 3]
    waiting = [GenerationRequest(i, NAMES[i % len(NAMES)], SamplingParams(max_new_tokens=n, ignore_eos=True),
                                 prompt=PROMPTS[i % len(PROMPTS)]) for i, n in enumerate(lengths)]
    log = []
    results = drive(engine.stepper(), waiting, log=log)
    assert [results[i].completion_tokens for i in range(len(lengths))] == lengths
    # the batch (4 rows) is full after every admission while requests still wait
    full_while_waiting = [busy + joined for busy, joined, _ in log[: len(lengths) - 4]]
    assert log[0][1] == 1  # nothing learned of row costs yet: one row, then full batches
    assert all(n == 4 for n in full_while_waiting[1:] if n), full_while_waiting


def test_decode_steps_write_the_cache_in_place(engine):
    """A decode step writes its column into the layers' spare columns: no copy of the cache per step."""
    engine.weights = "separate"
    params = SamplingParams(max_new_tokens=decode.KV_SLACK, ignore_eos=True)
    stepper = engine.stepper()
    stepper.admit([GenerationRequest(i, NAMES[i], params, prompt=PROMPTS[i]) for i in range(3)])
    stepper.step()  # prefill, then the first decode step moves each layer into buffers with spare columns
    layers = stepper.cache.layers
    assert all(isinstance(layer, decode.GrowingLayer) for layer in layers)
    start = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in layers]
    width = layers[0].keys.shape[-2]
    for n in range(1, decode.KV_SLACK // 2):
        stepper.step()
        assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in layers] == start
        assert layers[0].keys.shape[-2] == width + n
    stepper.admit([GenerationRequest(9, "sft", params, prompt=PROMPTS[4])])
    stepper.step()  # a row joins: the cache is copied once, into new buffers
    assert stepper.cache.layers[0].keys.data_ptr() != start[0][0]


def test_decode_out_of_memory_preempts_the_youngest_half(engine, monkeypatch):
    """OOM in a decode step hands the youngest half back as 'preempted'; generate re-queues them, same outputs."""
    engine.weights = "separate"
    requests = requests_over_everything()[:8]
    expected = [r.output for r in engine.generate(requests)]
    real_step, failures = decode.decode_step, []

    def step_with_small_memory(model, tokens, *args):
        if tokens.shape[0] > 2 and len(failures) < 2:
            failures.append(tokens.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(model, tokens, *args)

    monkeypatch.setattr(decode, "decode_step", step_with_small_memory)
    stepper = engine.stepper()
    stepper.admit(requests[:4])
    preempted = stepper.step()
    assert sorted(r.key for r in preempted) == [2, 3]
    assert all(r.finish_reason == "preempted" and r.output is None and r.error is None for r in preempted)
    assert sorted(stepper.keys()) == [0, 1]
    stepper.abort()
    assert [r.output for r in engine.generate(requests)] == expected


def test_admit_refuses_what_cannot_run_at_once(engine):
    """Unknown adapters and invalid parameters come back from admit() and never join."""
    stepper = engine.stepper()
    refused = stepper.admit([GenerationRequest(0, "nope", SamplingParams(), prompt="hi"),
                             GenerationRequest(1, "sft", SamplingParams(top_p=0.0), prompt="hi"),
                             GenerationRequest(2, "sft", SamplingParams(max_new_tokens=2), prompt="hi")])
    assert [r.key for r in refused] == [0, 1] and all(r.error for r in refused)
    assert stepper.keys() == [2]
    (done,) = [r for _ in range(2) for r in stepper.step()]
    assert done.key == 2 and done.completion_tokens == 2 and stepper.idle


def test_prompt_ids_run_as_given(engine):
    """A request given as token ids computes what the same ids given as text compute; ids out of range fail."""
    text = GenerationRequest(0, "sft", SamplingParams(max_new_tokens=6), prompt=PROMPTS[0])
    ids = GenerationRequest(1, "sft", SamplingParams(max_new_tokens=6), prompt_ids=engine.encode(text))
    bad = GenerationRequest(2, "sft", SamplingParams(max_new_tokens=6), prompt_ids=[engine.vocab_size])
    a, b, c = engine.generate([text, ids, bad])
    assert a.output == b.output and a.completion_tokens == b.completion_tokens == 6
    assert "prompt_ids must lie in" in c.error


@pytest.mark.parametrize("max_batch_tokens, fitting", [(200, 1), (1000, 3)])
def test_admission_claims_only_rows_that_fit_the_token_budget(demo_root, max_batch_tokens, fitting):
    """With rows of 330 tokens, no more rows are admitted (running) than max_batch_tokens holds, and all finish."""
    engine = make_engine(demo_root, max_batch_size=32, max_batch_tokens=max_batch_tokens, weights="separate")
    stepper = engine.stepper()
    waiting = [GenerationRequest(i, NAMES[i % len(NAMES)], SamplingParams(max_new_tokens=30, ignore_eos=True),
                                 prompt_ids=[10 + i] * 300) for i in range(10)]
    results, most, handed_back = {}, 0, 0
    while waiting or not stepper.idle:
        counts = stepper.admission(Counter(r.adapter for r in waiting))
        chosen, waiting = take_counts(waiting, counts)
        for result in stepper.admit(chosen):
            assert result.finish_reason == "preempted"
            handed_back += 1
            waiting.append(next(r for r in chosen if r.key == result.key))
        most = max(most, stepper.running)
        results.update((r.key, r) for r in stepper.step())
    assert most == fitting
    assert handed_back == 0  # the rows are alike: the learned mean cost is exact, nothing was claimed in vain
    assert sorted(results) == list(range(10)) and all(r.completion_tokens == 30 for r in results.values())


def test_claimed_rows_that_do_not_fit_go_back_unless_they_run_as_a_group(engine):
    """Claimed rows beyond max_batch_tokens come back 'preempted' at once; a group (suspects) waits in the stepper."""
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    rows = [GenerationRequest(i, "sft", params, prompt_ids=[20 + i] * 96) for i in range(4)]  # 100 tokens each
    limit, engine.max_batch_tokens = engine.max_batch_tokens, 250
    try:
        stepper = engine.stepper()
        back = stepper.admit(rows)
        assert [(r.key, r.finish_reason, r.error, r.completion_tokens) for r in back] == [
            (2, "preempted", None, 0), (3, "preempted", None, 0)]
        assert sorted(stepper.keys()) == [0, 1]
        grouped = engine.stepper()
        assert grouped.admit(rows, group=True) == []
        assert sorted(grouped.keys()) == [0, 1, 2, 3]
        done = []
        while not grouped.idle:
            done += grouped.step()
        assert sorted(r.key for r in done) == [0, 1, 2, 3]
    finally:
        engine.max_batch_tokens = limit
