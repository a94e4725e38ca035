"""Input and output lines: the contract between users' files and lorabatch.

Input is one JSON object per line, native or OpenAI batch format. `parse_line`
turns one line into a `RequestSpec` or raises `LineError` with a reason a user can act on.
Validation is hand-written rather than a schema library: it runs a million times per large
file, and each rule gets its own message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lorabatch.schemas.settings import BASE_ADAPTER, LimitSettings

ROLES = ("system", "user", "assistant")
OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
NATIVE_KEYS = frozenset(
    {"custom_id", "adapter", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "metadata"}
)
OPENAI_LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
OPENAI_SERVED = frozenset(
    {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "user"}
)
"""Body fields lorabatch serves (`user` is an opaque label: it changes nothing, as at OpenAI)."""
OPENAI_NEUTRAL = {
    "n": (1,), "stream": (False,), "logprobs": (False,), "echo": (False,), "best_of": (1,),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "parallel_tool_calls": (True, False),
}
"""Body fields accepted only at the value that asks for nothing lorabatch lacks (null is always neutral)."""
MAX_STOP_SEQUENCES = 8
MAX_CUSTOM_ID_CHARS = 200
MAX_SEED = 2**63 - 1


class LineError(ValueError):
    """One input line is invalid; the message says why and how to fix it."""


@dataclass(slots=True)
class RequestSpec:
    """One validated request, ready to store."""

    custom_id: str
    adapter: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    params: dict[str, Any] = field(default_factory=dict)


def parse_line(
    raw: bytes | str,
    *,
    line_no: int,
    adapters: frozenset[str] | set[str],
    limits: LimitSettings,
    default_adapter: str | None = None,
) -> RequestSpec:
    """Validate one line (native or OpenAI batch) against the configured adapters and limits."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise LineError(f"is not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" at")  # "Unterminated string starting at" must not read "at at column"
        raise LineError(f"is not valid JSON ({msg} at column {e.colno}); write one JSON object per line") from None
    if not isinstance(obj, dict):
        raise LineError(f"is a JSON {type(obj).__name__}, not an object; write one JSON object per line")
    if "body" in obj or "method" in obj or "url" in obj:
        return _parse_openai(obj, line_no=line_no, adapters=adapters, limits=limits, default_adapter=default_adapter)
    return _parse_native(obj, line_no=line_no, adapters=adapters, limits=limits, default_adapter=default_adapter)


def _parse_native(obj: dict, *, line_no: int, adapters, limits: LimitSettings, default_adapter: str | None) -> RequestSpec:
    unknown = sorted(set(obj) - NATIVE_KEYS)
    if unknown:
        hint = " (did you mean max_new_tokens?)" if "max_tokens" in unknown else ""
        raise LineError(f"has unknown field {unknown[0]!r}{hint}; allowed fields are {', '.join(sorted(NATIVE_KEYS))}")
    adapter = _adapter(obj.get("adapter"), adapters=adapters, default_adapter=default_adapter)
    prompt, messages = _content(obj.get("prompt"), obj.get("messages"), limits=limits)
    params = _params(obj, limits=limits, max_tokens_key="max_new_tokens")
    return RequestSpec(_custom_id(obj.get("custom_id"), line_no), adapter, prompt, messages, params)


def _parse_openai(obj: dict, *, line_no: int, adapters, limits: LimitSettings, default_adapter: str | None) -> RequestSpec:
    url = obj.get("url")
    unknown = sorted(set(obj) - OPENAI_LINE_KEYS)
    if unknown:
        raise LineError(f"has unknown field {unknown[0]!r}; an OpenAI batch line has only {', '.join(sorted(OPENAI_LINE_KEYS))}")
    if url not in OPENAI_ENDPOINTS:
        raise LineError(f"asks for endpoint {url!r}, which lorabatch does not serve; use one of {', '.join(OPENAI_ENDPOINTS)}")
    if obj.get("method", "POST") != "POST":
        raise LineError(f"has method {obj.get('method')!r}; OpenAI batch lines use \"POST\"")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("has no \"body\" object; an OpenAI batch line needs body with model and messages (or prompt)")
    _refuse_unserved(body)
    adapter = _adapter(body.get("model"), adapters=adapters, default_adapter=default_adapter, field_name="body.model")
    if url == "/v1/chat/completions":
        if "prompt" in body:
            raise LineError("sends \"prompt\" to /v1/chat/completions; send \"messages\" there or use /v1/completions")
        prompt, messages = _content(None, body.get("messages"), limits=limits)
    else:
        if "messages" in body:
            raise LineError("sends \"messages\" to /v1/completions; send \"prompt\" there or use /v1/chat/completions")
        prompt, messages = _content(body.get("prompt"), None, limits=limits)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise LineError("has both body.max_tokens and body.max_completion_tokens; give one")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    body = {k: v for k, v in body.items() if v is not None}  # OpenAI's null means "the default"
    params = _params(body, limits=limits, max_tokens_key=key)
    return RequestSpec(_custom_id(obj.get("custom_id"), line_no), adapter, prompt, messages, params)


def _refuse_unserved(body: dict) -> None:
    """Refuse every body field lorabatch would otherwise ignore: a silently dropped `n`, `logprobs` or
    `response_format` returns something other than what was asked for. All of a line's such fields
    are named at once, so one round of fixes is enough."""
    fields, settable = [], []  # settable: (key, the values lorabatch serves it at)
    for key in sorted(body):
        value = body[key]
        if key in OPENAI_SERVED or value is None:
            continue
        neutral = OPENAI_NEUTRAL.get(key)
        if neutral is not None and any(value == v and type(value) is type(v) for v in neutral):
            continue
        if neutral is not None:
            fields.append(f"body.{key}={json.dumps(value)}")
            settable.append((key, " or ".join(json.dumps(v) for v in neutral)))
        else:
            fields.append(f"body.{key}")
    if not fields:
        return
    served = ", ".join(sorted(OPENAI_SERVED))
    if not settable:
        fix = f"remove {'it' if len(fields) == 1 else 'them'} (served: {served})"
    elif len(fields) == 1:
        fix = f"remove it or set it to {settable[0][1]}"
    else:
        fix = f"remove them (or set {', '.join(f'{key} to {values}' for key, values in settable)})"
        if len(settable) < len(fields):
            fix += f"; served: {served}"
    raise LineError(f"has {_and(fields)}, which lorabatch does not serve; {fix}")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _custom_id(value: Any, line_no: int) -> str:
    if value is None:
        return f"line-{line_no}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise LineError(f"has custom_id of type {type(value).__name__}; use a string")
    value = str(value)
    if not value or len(value) > MAX_CUSTOM_ID_CHARS:
        raise LineError(f"has a custom_id that is empty or longer than {MAX_CUSTOM_ID_CHARS} characters; shorten it")
    return value


def _adapter(value: Any, *, adapters, default_adapter: str | None, field_name: str = "adapter") -> str:
    if value is None:
        if default_adapter is None:
            raise LineError(f"names no adapter; add \"{field_name}\" (or pass --adapter NAME), \"{BASE_ADAPTER}\" for the base model")
        value = default_adapter
    if not isinstance(value, str) or not value:
        raise LineError(f"has {field_name} of type {type(value).__name__}; use an adapter name from the configuration")
    if value == BASE_ADAPTER or value in adapters:
        return value
    if "/" in value or "\\" in value or value.startswith("."):
        raise LineError(
            f"names adapter {value!r} by path; jobs name adapters only by the names in lorabatch.toml [adapters]"
        )
    known = ", ".join(sorted(adapters | {BASE_ADAPTER}))
    raise LineError(f"names unknown adapter {value!r}; use one of: {known} (or add it to lorabatch.toml [adapters])")


def _content(prompt: Any, messages: Any, *, limits: LimitSettings) -> tuple[str | None, list | None]:
    if prompt is not None and messages is not None:
        raise LineError("has both \"prompt\" and \"messages\"; give exactly one")
    if prompt is None and messages is None:
        raise LineError("has neither \"prompt\" nor \"messages\"; give exactly one")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise LineError(f"has prompt of type {type(prompt).__name__}; use a string")
        if not prompt.strip():
            raise LineError("has an empty prompt; write the text to complete")
        _check_length(len(prompt), limits)
        return prompt, None
    if not isinstance(messages, list) or not messages:
        raise LineError("has \"messages\" that is not a non-empty list; give a list of {\"role\", \"content\"} objects")
    total = 0
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise LineError(f"has messages[{i}] that is not a {{\"role\", \"content\"}} object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LineError(f"has messages[{i}] with role {role!r}; use one of {', '.join(ROLES)}")
        if isinstance(content, list):
            content = _text_parts(content, i)
        if not isinstance(content, str):
            raise LineError(f"has messages[{i}] with content of type {type(content).__name__}; use a string")
        total += len(content)
        clean.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in clean):
        raise LineError("has messages whose content is all empty; write the text to answer")
    _check_length(total, limits)
    return None, clean


def _text_parts(parts: list, i: int) -> str:
    """OpenAI's content as a list of parts: text parts are served, joined by newlines (as vLLM does);
    images, audio and files are not."""
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise LineError(f"has messages[{i}] with a {kind!r} content part; lorabatch serves text parts only "
                            "({\"type\": \"text\", \"text\": ...})")
        texts.append(part["text"])
    return "\n".join(texts)


def _check_length(chars: int, limits: LimitSettings) -> None:
    if chars > limits.max_prompt_chars:
        raise LineError(
            f"has a prompt of {chars} characters, over the limit of {limits.max_prompt_chars}; "
            "shorten it or raise [limits] max_prompt_chars"
        )


def _params(obj: dict, *, limits: LimitSettings, max_tokens_key: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    n = obj.get(max_tokens_key, limits.default_max_new_tokens)
    if not _is_int(n) or not 1 <= n <= limits.max_new_tokens:
        raise LineError(
            f"has {max_tokens_key}={json.dumps(n)}; use an integer from 1 to {limits.max_new_tokens} "
            "(or raise [limits] max_new_tokens)"
        )
    params["max_new_tokens"] = n
    t = obj.get("temperature", 0.0)
    if not _is_number(t) or not 0.0 <= t <= 2.0:
        raise LineError(f"has temperature={json.dumps(t)}; use a number from 0 (greedy) to 2")
    if t:
        params["temperature"] = float(t)
    p = obj.get("top_p", 1.0)
    if not _is_number(p) or not 0.0 < p <= 1.0:
        raise LineError(f"has top_p={json.dumps(p)}; use a number above 0 and at most 1")
    if p != 1.0:
        params["top_p"] = float(p)
    k = obj.get("top_k", 0)
    if not _is_int(k) or k < 0:
        raise LineError(f"has top_k={json.dumps(k)}; use a whole number, 0 for no limit")
    if k:
        params["top_k"] = k
    seed = obj.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise LineError(f"has seed={json.dumps(seed)}; use a whole number from 0 to 2**63-1")
        params["seed"] = seed
    stop = obj.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise LineError(f"has an invalid stop; use a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
        if stop:
            params["stop"] = stop
    return params


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
