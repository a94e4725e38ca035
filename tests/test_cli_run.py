"""`lorabatch run INPUT -o OUTPUT`: one-shot generation in process, same lines, formats and outputs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
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
