"""OpenAI batch files: input fields served or refused by line, output bodies the official SDK accepts."""

from __future__ import annotations

import io
import json
from datetime import datetime

import pytest

from lorabatch.producer.export import LazyFile, openai_record, write_rows
from lorabatch.schemas.lines import LineError, parse_line
from lorabatch.schemas.settings import LimitSettings
from lorabatch.schemas.tables import Request

openai = pytest.importorskip("openai", reason="the openai SDK is a test dependency")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

ADAPTERS = frozenset({"sft", "dpo"})
CHAT = {"model": "sft", "messages": [{"role": "user", "content": "hi"}]}


def line(body: dict, url: str = "/v1/chat/completions", **extra) -> dict:
    return {"custom_id": "r1", "method": "POST", "url": url, "body": body, **extra}


def parse(obj: dict):
    return parse_line(json.dumps(obj), line_no=3, adapters=ADAPTERS, limits=LimitSettings())


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("logprobs", True), ("top_logprobs", 3), ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("presence_penalty", 0.5), ("frequency_penalty", 1), ("logit_bias", {"50256": -100}), ("stream", True),
    ("min_tokens", 4), ("stream_options", {"include_usage": True}), ("functions", []), ("modalities", ["text"]),
    ("reasoning_effort", "low"), ("service_tier", "auto"), ("prediction", {"type": "content", "content": "x"}),
])
def test_unserved_body_fields_are_refused(field, value):
    """Every body field lorabatch does not serve is refused by name, never silently ignored."""
    with pytest.raises(LineError, match=f"body.{field}"):
        parse(line({**CHAT, field: value}))


@pytest.mark.parametrize("field, value", [
    ("n", 1), ("logprobs", False), ("stream", False), ("presence_penalty", 0), ("frequency_penalty", 0.0),
    ("logit_bias", {}), ("user", "u-1"), ("top_logprobs", None), ("tools", None), ("seed", None),
])
def test_fields_at_their_neutral_value_are_accepted(field, value):
    """n=1, logprobs=false, penalties 0, null anything: they ask for nothing lorabatch lacks."""
    assert parse(line({**CHAT, field: value})).adapter == "sft"


def test_served_fields_become_sampling_parameters():
    """max_tokens / max_completion_tokens, temperature, top_p, top_k, seed and stop are served."""
    spec = parse(line({**CHAT, "max_completion_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
                       "seed": 7, "stop": "\n"}))
    assert spec.params == {"max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 7, "stop": ["\n"]}
    with pytest.raises(LineError, match="both body.max_tokens and body.max_completion_tokens"):
        parse(line({**CHAT, "max_tokens": 4, "max_completion_tokens": 9}))


def test_unknown_top_level_field_is_refused():
    with pytest.raises(LineError, match="unknown field 'extra'"):
        parse(line(CHAT, extra=1))


def test_vllm_run_batch_lines_are_accepted():
    """vLLM's run-batch input is the OpenAI batch format: chat and /v1/completions lines both parse."""
    chat = {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "dpo", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                  {"role": "user", "content": "Hello world!"}],
                     "max_completion_tokens": 1000}}
    completion = {"custom_id": "request-2", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "sft", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}}
    assert parse(chat).params["max_new_tokens"] == 1000 and parse(chat).messages[0]["role"] == "system"
    assert parse(completion).prompt == "Once upon a time"


def row(idx: int, **kw) -> Request:
    base = dict(job_id="job-abc", idx=idx, custom_id=f"c{idx}", adapter="sft", prompt=None, messages=None,
                params={}, state="succeeded", output="out", finish_reason="stop", prompt_tokens=5,
                completion_tokens=3, error=None, finished_at=datetime(2026, 1, 2, 3, 4, 5))
    return Request(**{**base, **kw})


def test_output_bodies_validate_with_the_sdk():
    """Chat bodies validate as ChatCompletion, completion bodies as Completion; created is the finish time."""
    chat, ok = openai_record(row(0, messages=[{"role": "user", "content": "x"}], finish_reason="length"))
    assert ok and chat["response"]["status_code"] == 200
    body = ChatCompletion.model_validate(chat["response"]["body"])
    assert body.choices[0].message.content == "out" and body.choices[0].finish_reason == "length"
    assert body.created == 1767323045 and body.usage.total_tokens == 8 and body.model == "sft"
    text, ok = openai_record(row(1, prompt="p"))
    assert ok and Completion.model_validate(text["response"]["body"]).choices[0].text == "out"


def test_failures_and_cancellations_go_to_the_error_file(tmp_path):
    """Successes in the output, failures and cancellations in the error file, each in input order."""
    rows = [row(0, prompt="p"), row(1, prompt="p", state="failed", output=None, error="adapter broke"),
            row(2, prompt="p", state="cancelled", output=None), row(3, prompt="p")]
    out, errors = io.StringIO(), LazyFile(tmp_path / "err.jsonl")
    written = write_rows(rows, out, fmt="openai", errors=errors)
    errors.close()
    assert (written.results, written.errors) == (2, 2)
    assert [json.loads(l)["custom_id"] for l in out.getvalue().splitlines()] == ["c0", "c3"]
    failed, cancelled = [json.loads(l) for l in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert failed["response"]["status_code"] == 400 and "adapter broke" in failed["response"]["body"]["error"]["message"]
    assert cancelled["response"] is None and cancelled["error"]["code"] == "batch_cancelled"


def test_no_error_file_when_nothing_failed(tmp_path):
    errors = LazyFile(tmp_path / "err.jsonl")
    write_rows([row(0, prompt="p")], io.StringIO(), fmt="openai", errors=errors)
    errors.close()
    assert not (tmp_path / "err.jsonl").exists() and not list(tmp_path.iterdir())


def test_text_content_parts_are_served_and_images_refused():
    """Content as a list of text parts (common in OpenAI and vLLM batch files) is joined by newlines;
    an image part is refused by name."""
    parts = [{"type": "text", "text": "Describe"}, {"type": "text", "text": "briefly"}]
    spec = parse(line({"model": "sft", "messages": [{"role": "user", "content": parts}]}))
    assert spec.messages == [{"role": "user", "content": "Describe\nbriefly"}]
    image = [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    with pytest.raises(LineError, match="'image_url' content part"):
        parse(line({"model": "sft", "messages": [{"role": "user", "content": image}]}))
