"""Reading an input file into validated requests outside a submit (`lorabatch run`), and the
messages both give about a bad file. The rules are schemas.lines' (the same parser submit uses)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lorabatch.schemas.errors import InvalidInput, UsageError
from lorabatch.schemas.lines import LineError, RequestSpec, parse_line
from lorabatch.schemas.settings import Settings

MAX_PROBLEMS_SHOWN = 20


def check_input_path(source: str) -> None:
    """A usage error for a path that is a directory or missing ('-' is standard input)."""
    if source == "-":
        return
    path = Path(source)
    if path.is_dir():
        raise UsageError(f"{source} is a directory; give a JSONL file (one request per line), or - for standard input.")
    if not path.exists():
        raise UsageError(f"input file {source} does not exist; give the path of a JSONL file, or - for standard input.")


def iter_specs(settings: Settings, path: Path, *, default_adapter: str | None = None
               ) -> Iterator[tuple[int, RequestSpec | str]]:
    """(line number, request or the line's problem) for every non-blank line."""
    adapters, limits = frozenset(settings.adapters), settings.limits
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line_no, parse_line(raw, line_no=line_no, adapters=adapters, limits=limits,
                                          default_adapter=default_adapter)
            except LineError as e:
                yield line_no, str(e)


def read_specs(settings: Settings, path: Path, *, default_adapter: str | None = None) -> list[RequestSpec]:
    """Every request of the file, or InvalidInput listing the bad lines (as submit does)."""
    specs: list[RequestSpec] = []
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    for line_no, spec in iter_specs(settings, path, default_adapter=default_adapter):
        if isinstance(spec, str):
            problems.append((line_no, spec))
            continue
        if spec.custom_id in seen:
            problems.append((line_no, f"repeats custom_id {spec.custom_id!r}; give each line its own"))
        seen.add(spec.custom_id)
        specs.append(spec)
    if problems:
        raise InvalidInput(problem_message(path, problems, settings=settings), problems)
    if not specs:
        raise InvalidInput(no_requests_message(path))
    return specs


def no_requests_message(source: Path | str) -> str:
    """The one wording for a file with no request in it (empty, or blank lines only): submit and run."""
    return f"{source} has no requests (it is empty or holds only blank lines); give one JSON request per line."


def problem_message(path: Path | str, problems: list[tuple[int, str]], *, settings: Settings,
                    unit: str = "line") -> str:
    """One message for a file's bad lines. With no lorabatch.toml found, lines naming adapters are all
    'unknown': say that once instead of listing every line. `unit` names the problems otherwise
    ("item": the Python client's list of requests, numbered by list index, which has no file or lines)."""
    if settings.config_path is None and any("unknown adapter" in reason for _, reason in problems):
        return no_config_message()
    shown = "\n".join(f"  {unit} {n}: {reason}" for n, reason in problems[:MAX_PROBLEMS_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    return (f"{path}: {plural(len(problems), 'invalid ' + unit)}; nothing was submitted. Fix them and submit again:"
            f"\n{shown}{more}")


def no_config_message(*, missing: str = "no adapter is configured") -> str:
    """The one wording for "there is no lorabatch.toml here" (submit, run, worker)."""
    return (f"no lorabatch.toml found in {Path.cwd()}, so {missing}; run this in your project "
            "folder, pass --config FILE (or set LORABATCH_CONFIG), or create one with `lorabatch init`.")


def plural(n: int, noun: str) -> str:
    """'1 request', '2 requests'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
