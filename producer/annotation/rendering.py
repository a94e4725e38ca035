"""Rendering rows into requests: every row of a run's datasets through the template, keyed and validated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lorabatch.producer.annotation.cache import request_key
from lorabatch.producer.annotation.datasets import (
    LoadedFile,
    load_file,
    resolve_datasets,
)
from lorabatch.producer.annotation.spec import RunSpec
from lorabatch.producer.annotation.templates import RowError, Template
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.lines import LineError, parse_line
from lorabatch.schemas.settings import Settings


@dataclass
class Rendered:
    files: list[LoadedFile]
    rows: list[list[tuple[str | None, str | None]]]
    """Per file, per row: (key, None), or (None, why the row is invalid)."""
    lines: dict[str, str] = field(default_factory=dict)
    """Each distinct request's native JSONL line (custom_id = its key)."""


def render_datasets(settings: Settings, spec: RunSpec) -> Rendered:
    """Read the spec's dataset files and make each row a validated request, or that row's error."""
    template = Template.from_dict(spec.template)
    adapters, limits = frozenset(settings.adapters), settings.limits
    files = [load_file(f) for f in resolve_datasets(spec.datasets, output=spec.output)]
    rendered = Rendered(files, [])
    for loaded in files:
        _check_fields(template, loaded)
        per_file = []
        for i, row in enumerate(loaded.rows):
            try:
                body = {"adapter": spec.adapter, **template.request(row)}
                req = parse_line(json.dumps(body, ensure_ascii=False), line_no=i + 1, adapters=adapters, limits=limits)
            except RowError as e:
                per_file.append((None, str(e)))
                continue
            except LineError as e:
                per_file.append((None, f"the request made from this row {e}"))
                continue
            key = request_key({"adapter": req.adapter, "prompt": req.prompt, "messages": req.messages, "params": req.params})
            if key not in rendered.lines:
                rendered.lines[key] = json.dumps({"custom_id": key, **body}, ensure_ascii=False)
            per_file.append((key, None))
        rendered.rows.append(per_file)
    return rendered


def _check_fields(template: Template, loaded: LoadedFile) -> None:
    """A placeholder that names no column of the file is one usage error, not every row invalid."""
    columns: dict[str, None] = dict.fromkeys(loaded.header or [])
    for row in loaded.rows:
        columns.update(dict.fromkeys(row))
    missing = [f for f in template.fields if f not in columns]
    if missing and loaded.rows:
        names = ", ".join(map(str, columns)) or "none"
        raise UsageError(f"template placeholder {{{missing[0]}}} matches no column of {loaded.file.input}; "
                         f"its columns are: {names}. Fix the placeholder's name.")
