"""`lorabatch run INPUT -o OUTPUT`: one-shot generation in process, same lines, formats and outputs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, tune_config, wait_for_job
from tests.reference import reference_output

pytestmark = pytest.mark.slow
MAX_NEW = 6


def test_run_writes_exact_results_in_input_order(config_path, tmp_path, demo_root):
    """Native and OpenAI (chat and completions) lines over adapters and base: outputs equal plain PEFT
    run alone; jsonl keeps input order; the openai file validates with the SDK's own models."""
    openai = pytest.importorskip("openai")
    lines = [
        {"custom_id": "n1", "adapter": "dpo", "prompt": "Once upon a time", "max_new_tokens": MAX_NEW},
        {"custom_id": "o1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "sft", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": MAX_NEW,
                  "temperature": 0, "n": 1}},
        {"custom_id": "o2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "base", "prompt": "The weather today is", "max_tokens": MAX_NEW}},
        {"custom_id": "n2", "adapter": "sft", "prompt": "Dear friend,", "max_new_tokens": MAX_NEW},
    ]
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(l) + "\n" for l in lines))
    r = run_cli(config_path, "run", str(infile), "-o", str(tmp_path / "out.jsonl"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote 4 results to" in r.stderr
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["n1", "o1", "o2", "n2"]
    expected = [
        reference_output(demo_root, adapter="dpo", prompt="Once upon a time", max_new_tokens=MAX_NEW),
        reference_output(demo_root, adapter="sft", messages=[{"role": "user", "content": "Hello"}], max_new_tokens=MAX_NEW),
        reference_output(demo_root, adapter="base", prompt="The weather today is", max_new_tokens=MAX_NEW),
        reference_output(demo_root, adapter="sft", prompt="Dear friend,", max_new_tokens=MAX_NEW),
    ]
    assert [o["output"] for o in out] == expected and all(o["status"] == "succeeded" for o in out)

    r = run_cli(config_path, "run", str(infile), "-o", str(tmp_path / "out.openai.jsonl"), "--format", "openai",
                timeout=300)
    assert r.returncode == 0, r.stderr
    records = [json.loads(l) for l in (tmp_path / "out.openai.jsonl").read_text().splitlines()]
    assert not (tmp_path / "out.openai.jsonl.errors.jsonl").exists()
    chat = openai.types.chat.ChatCompletion.model_validate(records[1]["response"]["body"])
    text = openai.types.Completion.model_validate(records[2]["response"]["body"])
    assert chat.choices[0].message.content == expected[1] and text.choices[0].text == expected[2]


def test_run_refuses_bad_input_before_loading_the_model(config_path, tmp_path):
    """A bad line, an unserved OpenAI field, or a directory: exit 2 with the line named, nothing written."""
    infile = tmp_path / "bad.jsonl"
    infile.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "sft", "messages": [{"role": "user", "content": "x"}], "n": 2}})
                      + "\n")
    r = run_cli(config_path, "run", str(infile), "-o", str(tmp_path / "out.jsonl"))
    assert r.returncode == 2 and "line 1: has body.n=2" in r.stderr and "loading" not in r.stderr
    assert not (tmp_path / "out.jsonl").exists()
    r = run_cli(config_path, "run", str(tmp_path), "-o", str(tmp_path / "out.jsonl"))
    assert r.returncode == 2 and "is a directory" in r.stderr


def lines_over_everything(n: int) -> list[dict]:
    adapters = ["sft", "dpo", "base", "sft-ckpt39", "dpo-ckpt3"]
    return [{"custom_id": f"r{i}", "adapter": adapters[i % 5], "prompt": f"Item {i}: tell me about number {i}",
             "max_new_tokens": 2 + (i * 7) % 13} for i in range(n)]


@pytest.mark.parametrize("forward", ["auto", "transformers"])
def test_run_streams_a_file_larger_than_its_window_in_input_order(config_path, tmp_path, forward):
    """With batches of 2 (a window of 8), 30 requests ending out of order come out in input order, every line
    with its provenance (base model, adapter weights' sha256, run@host) as a worker records it; no library
    warning reaches the user (PEFT's wrapping of the model raised a transformers FutureWarning)."""
    from lorabatch.schemas.settings import load_settings
    from lorabatch.store.deployment import deployment_of

    tune_config(config_path, "worker", max_batch_size=2, forward=forward)
    lines = lines_over_everything(30)
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(l) + "\n" for l in lines))
    r = run_cli(config_path, "run", str(infile), "-o", str(tmp_path / "out.jsonl"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "FutureWarning" not in r.stderr and "Warning" not in r.stderr, r.stderr
    out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [l["custom_id"] for l in lines]
    assert [o["completion_tokens"] <= l["max_new_tokens"] for o, l in zip(out, lines)] == [True] * 30
    deployment = deployment_of(load_settings(config_path, environ={}))
    for o in out:
        assert o["status"] == "succeeded" and o["base_model"] == deployment.base and o["worker"].startswith("run@")
        expected = None if o["adapter"] == "base" else deployment.adapters[o["adapter"]]
        assert o["adapter_sha256"] == expected and (o["adapter"] == "base" or len(expected) == 64)


def test_run_gives_the_queue_path_tokens(config_path, tmp_path, ctx, start_worker):
    """Greedy: `lorabatch run` and submit + worker + results give the same output for every line."""
    tune_config(config_path, "worker", max_batch_size=4)
    lines = lines_over_everything(20)
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(l) + "\n" for l in lines))
    r = run_cli(config_path, "run", str(infile), "-o", str(tmp_path / "run.jsonl"), timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_cli(config_path, "submit", str(infile), "--json")
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["id"]
    w = start_worker()
    wait_for_job(ctx, job_id, workers=[w])
    r = run_cli(config_path, "results", job_id, "-o", str(tmp_path / "queue.jsonl"))
    assert r.returncode == 0, r.stderr
    ran = [json.loads(l) for l in (tmp_path / "run.jsonl").read_text().splitlines()]
    queued = [json.loads(l) for l in (tmp_path / "queue.jsonl").read_text().splitlines()]
    assert [o["output"] for o in ran] == [o["output"] for o in queued]
    assert all(o["status"] == "succeeded" for o in ran + queued)
    assert [(o["base_model"], o["adapter_sha256"]) for o in ran] == [(o["base_model"], o["adapter_sha256"]) for o in queued]


def test_run_and_submit_word_an_empty_file_alike(config_path, tmp_path):
    """A file of blank lines: run and submit refuse it (exit 2) with the same message."""
    infile = tmp_path / "empty.jsonl"
    infile.write_text("\n\n")
    ran = run_cli(config_path, "run", str(infile), "-o", str(tmp_path / "out.jsonl"))
    submitted = run_cli(config_path, "submit", str(infile))
    assert ran.returncode == submitted.returncode == 2
    assert "has no requests" in ran.stderr and ran.stderr == submitted.stderr
