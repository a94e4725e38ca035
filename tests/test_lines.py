"""Input line validation: the catalogue of bad lines, each with the reason a user sees."""

from __future__ import annotations

import json

import pytest

from lorabatch.schemas.lines import LineError, parse_line
from lorabatch.schemas.settings import LimitSettings

ADAPTERS = frozenset({"sft", "dpo"})
LIMITS = LimitSettings(max_new_tokens=512, max_prompt_chars=1000)


def parse(obj, **kw):
    raw = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
    return parse_line(raw, line_no=7, adapters=ADAPTERS, limits=LIMITS, **kw)


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "hi"', "not valid JSON"),
        ('{"custom_id": "a" "prompt": "x"}', "is not valid JSON (Expecting ',' delimiter at column 19)"),
        ("prompt: hi", "is not valid JSON (Expecting value at column 1)"),
        ("[1, 2]", "not an object"),
        ('"just a string"', "not an object"),
        (b'{"adapter": "sft", "prompt": "caf\xe9"}', "not valid UTF-8"),
        ({"adapter": "sft"}, "neither \"prompt\" nor \"messages\""),
        ({"adapter": "sft", "prompt": "   "}, "empty prompt"),
        ({"adapter": "sft", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "both"),
        ({"adapter": "sft", "messages": [{"role": "robot", "content": "b"}]}, "role 'robot'"),
        ({"adapter": "sft", "messages": []}, "non-empty list"),
        ({"adapter": "sft", "messages": [{"role": "user", "content": 3}]}, "content of type int"),
        ({"adapter": "nope", "prompt": "a"}, "unknown adapter 'nope'"),
        ({"adapter": "/etc/passwd", "prompt": "a"}, "by path"),
        ({"adapter": "../adapters/sft", "prompt": "a"}, "by path"),
        ({"adapter": 3, "prompt": "a"}, "adapter of type int"),
        ({"prompt": "a"}, "names no adapter"),
        ({"adapter": "sft", "prompt": 5}, "prompt of type int"),
        ({"adapter": "sft", "prompt": "a", "max_new_tokens": -1}, "max_new_tokens=-1"),
        ({"adapter": "sft", "prompt": "a", "max_new_tokens": 10**9}, "from 1 to 512"),
        ({"adapter": "sft", "prompt": "a", "max_new_tokens": "64"}, "max_new_tokens=\"64\""),
        ({"adapter": "sft", "prompt": "a", "max_new_tokens": True}, "max_new_tokens=true"),
        ({"adapter": "sft", "prompt": "a", "temperature": 3}, "temperature=3"),
        ({"adapter": "sft", "prompt": "a", "temperature": -0.1}, "temperature=-0.1"),
        ({"adapter": "sft", "prompt": "a", "top_p": 0}, "top_p=0"),
        ({"adapter": "sft", "prompt": "a", "top_p": 1.5}, "top_p=1.5"),
        ({"adapter": "sft", "prompt": "a", "top_k": -2}, "top_k=-2"),
        ({"adapter": "sft", "prompt": "a", "seed": -1}, "seed=-1"),
        ({"adapter": "sft", "prompt": "a", "stop": [""]}, "invalid stop"),
        ({"adapter": "sft", "prompt": "a", "stop": 5}, "invalid stop"),
        ({"adapter": "sft", "prompt": "a", "max_tokens": 5}, "did you mean max_new_tokens"),
        ({"adapter": "sft", "prompt": "x" * 1001}, "over the limit of 1000"),
        ({"adapter": "sft", "prompt": "a", "custom_id": ["x"]}, "custom_id of type list"),
        ({"custom_id": "r", "method": "POST", "url": "/v1/embeddings", "body": {"model": "sft", "input": "a"}},
         "endpoint '/v1/embeddings'"),
        ({"custom_id": "r", "method": "POST", "url": "/v1/chat/completions"}, "no \"body\""),
        ({"custom_id": "r", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]}}, "unknown adapter 'gpt-4'"),
        ({"custom_id": "r", "method": "GET", "url": "/v1/chat/completions",
          "body": {"model": "sft", "messages": [{"role": "user", "content": "a"}]}}, "method 'GET'"),
    ],
)
def test_bad_line_is_rejected_with_its_reason(line, reason):
    """Each kind of bad line is refused with a message naming the problem."""
    with pytest.raises(LineError) as e:
        parse(line)
    assert reason in str(e.value)


def test_native_prompt_line():
    """A native prompt line keeps its fields; defaults fill max_new_tokens; greedy stores no temperature."""
    spec = parse({"custom_id": "row-17", "adapter": "sft", "prompt": "Summarise: x"})
    assert (spec.custom_id, spec.adapter, spec.prompt, spec.messages) == ("row-17", "sft", "Summarise: x", None)
    assert spec.params == {"max_new_tokens": LIMITS.default_max_new_tokens}


def test_native_chat_line_with_params():
    """A native chat line carries its sampling parameters; a single stop string becomes a list."""
    spec = parse({"custom_id": "row-18", "adapter": "dpo", "messages": [{"role": "user", "content": "hi"}],
                  "max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1, "stop": "\n\n"})
    assert spec.messages == [{"role": "user", "content": "hi"}]
    assert spec.params == {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1, "stop": ["\n\n"]}


def test_default_adapter_and_base():
    """--adapter fills lines without one; "base" is always allowed."""
    assert parse({"prompt": "a"}, default_adapter="dpo").adapter == "dpo"
    assert parse({"adapter": "base", "prompt": "a"}).adapter == "base"


def test_openai_batch_line():
    """An OpenAI batch line names its adapter in body.model and its limit in max_tokens."""
    spec = parse({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "dpo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 64, "temperature": 0}})
    assert (spec.custom_id, spec.adapter, spec.params) == ("r1", "dpo", {"max_new_tokens": 64})
    spec = parse({"custom_id": "r2", "method": "POST", "url": "/v1/completions", "body": {"model": "sft", "prompt": "p"}})
    assert spec.prompt == "p"


def test_missing_custom_id_gets_line_number():
    """A line without custom_id is named after its line number."""
    assert parse({"adapter": "sft", "prompt": "a"}).custom_id == "line-7"


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"n": 2, "response_format": {"type": "json_object"}},
         "has body.n=2 and body.response_format, which lorabatch does not serve; remove them (or set n to 1); served: "),
        ({"n": 2, "logprobs": True}, "has body.logprobs=true and body.n=2, which lorabatch does not serve; "
                                     "remove them (or set logprobs to false, n to 1)"),
        ({"n": 2}, "has body.n=2, which lorabatch does not serve; remove it or set it to 1"),
    ],
)
def test_every_unserved_field_of_a_line_is_named_at_once(extra, reason):
    """A line asking for several things lorabatch does not serve names them all in its one reason."""
    body = {"model": "sft", "messages": [{"role": "user", "content": "a"}], **extra}
    with pytest.raises(LineError) as e:
        parse({"custom_id": "r", "method": "POST", "url": "/v1/chat/completions", "body": body})
    assert str(e.value).startswith(reason), str(e.value)
