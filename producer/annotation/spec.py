"""What a run annotates and how (a RunSpec), validated from the options of `annotate` and `schedule add`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lorabatch.producer.annotation.templates import check_template, load_template
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.settings import Settings

DEFAULT_COLUMN = "annotation"


@dataclass
class RunSpec:
    """What to annotate and how; stored with each run and schedule, so a run can be redone."""

    datasets: list[str]
    """Paths or globs, expanded when the run starts."""
    template: dict
    adapter: str
    column: str = DEFAULT_COLUMN
    output: str | None = None
    """A file (one input file) or a folder (several, or a glob); None: beside each input."""
    priority: int = 5
    name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        return cls(**data)


def build_spec(settings: Settings, datasets: Sequence[str], *, template: str, adapter: str,
               column: str = DEFAULT_COLUMN, output: str | None = None, priority: int = 5, name: str | None = None,
               overrides: Mapping[str, Any] | None = None, absolute: bool = False) -> RunSpec:
    """Validate the options of `annotate` and `schedule add` into a RunSpec. `absolute`: make paths
    absolute, for a run started later from another folder."""
    from lorabatch.store import lifecycle

    lifecycle.check_priority(priority)
    if not column or not column.strip():
        raise UsageError("--column is empty; give the name of the column to write the answers to.")
    tmpl = load_template(template, overrides=overrides)
    check_template(tmpl, adapter=adapter, settings=settings)
    if absolute:
        datasets = [os.path.abspath(os.path.expanduser(d)) for d in datasets]
        output = os.path.abspath(os.path.expanduser(output)) if output else None
    return RunSpec(list(datasets), tmpl.to_dict(), adapter, column, output, priority, name)
