"""Templates: a prompt or chat messages with `{field}` placeholders, rendered from one row.

Knows nothing about dataset files or the cache; `rendering.py` renders every row of a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from string import Formatter
from typing import Any

from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.lines import LineError, parse_line
from lorabatch.schemas.settings import BASE_ADAPTER, Settings

GEN_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
"""Generation parameters a template file may set."""
TEMPLATE_FILE_SUFFIXES = frozenset({".txt", ".json", ".prompt", ".tmpl", ".md"})
"""A --template value ending in one of these (and without '{') is taken for a file path."""


class RowError(ValueError):
    """One row cannot be made into a request: that row's error, not the run's."""


class Template:
    """A prompt, or chat messages, with `{field}` placeholders, plus generation parameters.

    A placeholder names a column exactly as written (`{text}`, `{user name}`); a format spec
    and conversion apply as in str.format (`{score:.2f}`, `{title!r}`). There is no attribute
    or index access. `{{` and `}}` are literal braces.
    """

    def __init__(self, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                 params: dict[str, Any] | None = None, source: str = "inline"):
        self.prompt, self.messages, self.params, self.source = prompt, messages, dict(params or {}), source
        texts = [prompt] if prompt is not None else [m["content"] for m in messages or []]
        self._compiled = [_compile(t, source) for t in texts]
        self.fields = sorted({f for parts in self._compiled for _, f, _, _ in parts if f is not None})

    def request(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The native request (without custom_id and adapter) for one row. Raises RowError."""
        rendered = [_render(parts, row) for parts in self._compiled]
        if self.prompt is not None:
            body: dict[str, Any] = {"prompt": rendered[0]}
        else:
            body = {"messages": [{"role": m["role"], "content": c} for m, c in zip(self.messages, rendered)]}
        body.update(self.params)
        return body

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "messages": self.messages, "params": self.params, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Template:
        return cls(prompt=data.get("prompt"), messages=data.get("messages"), params=data.get("params"),
                   source=data.get("source", "inline"))


def load_template(value: str, *, overrides: Mapping[str, Any] | None = None) -> Template:
    """A template from --template: a `.json` file (prompt or messages, plus parameters), any other
    existing file (the prompt text; one final newline is dropped), or the prompt text itself.
    `overrides` (CLI flags) win over parameters in the file."""
    path = Path(value).expanduser()
    try:
        is_file = "\n" not in value and path.is_file()
    except OSError:  # a long inline template is no file name
        is_file = False
    if is_file:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"template file {value} is not UTF-8 text; save it as UTF-8.") from None
        template = _json_template(text, value) if path.suffix.lower() == ".json" else \
            Template(prompt=text[:-1] if text.endswith("\n") else text, source=value)
    elif "{" not in value and path.suffix.lower() in TEMPLATE_FILE_SUFFIXES:
        raise UsageError(f"template file {value} does not exist; give the path of a .txt or .json template, "
                         "or the template text itself, e.g. 'Label this: {text}'.")
    else:
        template = Template(prompt=value)
    template.params.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not template.fields:
        raise UsageError(f"template {template.source} has no {{field}} placeholder, so every row would get the same "
                         "prompt; add one, e.g. {text}.")
    return template


def _json_template(text: str, where: str) -> Template:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"template file {where} is not valid JSON ({e.msg} at line {e.lineno}); fix it.") from None
    if not isinstance(obj, dict):
        raise UsageError(f"template file {where} is not a JSON object; write {{\"messages\": [...], ...}} or {{\"prompt\": ...}}.")
    unknown = sorted(set(obj) - {"prompt", "messages", *GEN_PARAMS})
    if unknown:
        raise UsageError(f"template file {where} has unknown key {unknown[0]!r}; allowed: prompt, messages, "
                         f"{', '.join(GEN_PARAMS)}.")
    if ("prompt" in obj) == ("messages" in obj):
        raise UsageError(f"template file {where} needs exactly one of \"prompt\" and \"messages\"; give one.")
    messages = obj.get("messages")
    if messages is not None and (
        not isinstance(messages, list) or not messages
        or not all(isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["role"], str)
                   and isinstance(m["content"], str) for m in messages)
    ):
        raise UsageError(f"template file {where}: \"messages\" must be a non-empty list of "
                         "{\"role\": ..., \"content\": ...} objects with string values; fix it.")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise UsageError(f"template file {where}: \"prompt\" must be a string; fix it.")
    return Template(prompt=obj.get("prompt"), messages=messages, params={k: obj[k] for k in GEN_PARAMS if k in obj},
                    source=where)


def _compile(text: str, where: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        parts = list(Formatter().parse(text))
    except ValueError as e:
        raise UsageError(f"template {where} is not a valid template ({e}); write {{{{ and }}}} for literal braces.") from None
    for _, name, spec, _ in parts:
        if name is not None and (not name.strip() or name.isdigit()):
            raise UsageError(f"template {where} has a placeholder without a field name; name a column, e.g. {{text}}.")
        if spec and "{" in spec:
            raise UsageError(f"template {where} has a placeholder inside a format spec ({{{name}:{spec}}}); "
                             "use a fixed format spec.")
    return parts


def _render(parts, row: Mapping[str, Any]) -> str:
    out = []
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        if name not in row:
            raise RowError(f"row has no field {name!r}; add it to the row or change the template")
        value = row[name]
        if value is None:
            raise RowError(f"row's field {name!r} is empty (null); fill it or change the template")
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False, default=str)
        if conversion:
            value = {"r": repr, "a": ascii, "s": str}[conversion](value)
        try:
            out.append(format(value, spec or ""))
        except (ValueError, TypeError) as e:
            raise RowError(f"field {name!r} cannot be formatted with {spec!r} ({e}); change the format spec") from None
    return "".join(out)


def check_template(template: Template, *, adapter: str, settings: Settings) -> None:
    """Raise UsageError if the adapter is not configured, or the requests the template makes break
    the rules every input line must follow (parameters, roles, limits)."""
    if adapter != BASE_ADAPTER and adapter not in settings.adapters:
        known = ", ".join(sorted(set(settings.adapters) | {BASE_ADAPTER}))
        raise UsageError(f"--adapter {adapter!r} is not configured; use one of: {known}.")
    sample = template.request({name: "x" for name in template.fields})
    try:
        parse_line(json.dumps({**sample, "adapter": adapter}), line_no=1, adapters=frozenset(settings.adapters),
                   limits=settings.limits)
    except LineError as e:
        raise UsageError(f"template {template.source}: the request it makes {e}.") from None
