"""Annotating datasets: fill a template from each row, generate, add the answer as a column.

A run reads the dataset files (JSONL, CSV or Parquet), renders every row through the template
into a native request, and keys each request by its content: adapter, prompt or messages, and
generation parameters, as `parse_line` normalised them. Rows whose request has a successful
answer in the cache reuse it; rows whose request is already in an open job of another run wait
for that job; only the rest go into this run's job. When the jobs end, their results are copied
into the cache ("harvested") and the output files are written from the cache: the same rows in
the same order, plus `<column>`, `<column>_status` and `<column>_error`, in the input's format.

Keying by the rendered request rather than the raw row means a change to a column the template
does not use keeps the answer, and any change to what the model sees (template, field values,
adapter, parameters) asks again. The key knows adapters by name, not by weights: after retraining
one under the same name, `annotate --fresh` asks again for every row.

This module knows nothing about cron; `schedules.py` decides when a run starts.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from string import Formatter
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from lorabatch.db import transaction
from lorabatch.errors import InvalidInput, UsageError
from lorabatch.producer.context import Context
from lorabatch.schemas.annotation_tables import AnnotationCache, AnnotationRun, ensure_tables
from lorabatch.schemas.lines import LineError, parse_line
from lorabatch.schemas.settings import BASE_ADAPTER, Settings
from lorabatch.schemas.states import JobState
from lorabatch.schemas.tables import Job, Request, Worker, utcnow

KEY_VERSION = "lorabatch-annotate-1"
"""Part of every cache key; bump it when rendering changes, so old answers are not reused."""
GEN_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
"""Generation parameters a template file may set."""
TEMPLATE_FILE_SUFFIXES = frozenset({".txt", ".json", ".prompt", ".tmpl", ".md"})
"""A --template value ending in one of these (and without '{') is taken for a file path."""
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_COLUMN = "annotation"
QUERY_CHUNK = 500
"""Keys per IN (...) query."""
STALLED_SUBMIT_SECONDS = 300
"""A detached run not submitted this long after it was created (its starter died) is submitted again."""
OPEN_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.CANCELLING.value)
FINAL_JOB_STATES = (JobState.COMPLETED.value, JobState.CANCELLED.value)
PENDING_ERROR = "no answer yet: the row was added after the run started; the next run annotates it"


class RowError(ValueError):
    """One row cannot be made into a request: that row's error, not the run's."""


# ---------------------------------------------------------------- templates


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


# ---------------------------------------------------------------- what a run does


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
    from lorabatch import lifecycle

    lifecycle.check_priority(priority)
    if not column or not column.strip():
        raise UsageError("--column is empty; give the name of the column to write the answers to.")
    tmpl = load_template(template, overrides=overrides)
    check_template(tmpl, adapter=adapter, settings=settings)
    if absolute:
        datasets = [os.path.abspath(os.path.expanduser(d)) for d in datasets]
        output = os.path.abspath(os.path.expanduser(output)) if output else None
    return RunSpec(list(datasets), tmpl.to_dict(), adapter, column, output, priority, name)


# ---------------------------------------------------------------- dataset files


@dataclass
class DatasetFile:
    input: Path
    output: Path
    fmt: str


def resolve_datasets(patterns: Sequence[str], *, output: str | None = None) -> list[DatasetFile]:
    """Expand paths and globs into input files and their output paths.

    One file named plainly: `output` is the output file. Several, or a glob: `output` is a folder.
    Default output: `<stem>.annotated<ext>` beside the input. A file that is another match's
    output is skipped, so `data/*.jsonl` does not annotate last night's outputs.
    """
    files: list[Path] = []
    any_glob = False
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):  # a glob skips files of other formats
            any_glob = True
            matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True)
                             if Path(m).is_file() and Path(m).suffix.lower() in FORMATS)
        else:
            path = Path(expanded)
            if not path.is_file():
                raise UsageError(f"dataset {pattern} does not exist; give a JSONL, CSV or Parquet file, or a quoted glob.")
            if path.suffix.lower() not in FORMATS:
                raise UsageError(f"dataset {pattern} has extension {path.suffix or '(none)'!r}; "
                                 "lorabatch reads .jsonl, .csv and .parquet.")
            matches = [path]
        for m in matches:
            m = m.resolve()
            if m not in files:
                files.append(m)
    if not files:
        raise UsageError(f"no JSONL, CSV or Parquet file matches {' '.join(patterns)}; check the path "
                         "(quote a glob so the shell leaves it to lorabatch).")
    single = len(patterns) == 1 and not any_glob
    out_dir = None
    if output and not single:
        out_dir = Path(output).expanduser()
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--output {output} is a file, but DATASET names several files (or a glob); give a folder.")
    result = []
    for f in files:
        if single and output:
            out = Path(output).expanduser().resolve()
            if FORMATS.get(out.suffix.lower()) != FORMATS[f.suffix.lower()]:
                raise UsageError(f"--output {output} must end in {f.suffix}: the output is written in the input's format.")
        else:
            out = ((out_dir.resolve() if out_dir else f.parent) / f"{f.stem}.annotated{f.suffix}")
        result.append(DatasetFile(f, out, FORMATS[f.suffix.lower()]))
    outputs = {d.output for d in result}
    result = [d for d in result if d.input not in outputs or len(result) == 1]
    for d in result:
        if d.output == d.input:
            raise UsageError(f"the output for {d.input} is the input itself; give --output another path.")
    if len({d.output for d in result}) < len(result):
        raise UsageError("two input files with the same name would write the same output; annotate them separately.")
    return result


@dataclass
class LoadedFile:
    file: DatasetFile
    rows: list[dict]
    header: list[str] | None = None
    """CSV: the column names, in order."""
    table: Any = None
    """Parquet: the pyarrow Table, so the output keeps its schema."""


def load_file(f: DatasetFile) -> LoadedFile:
    """Read every row of one dataset file. A file that cannot be read whole is InvalidInput."""
    try:
        if f.fmt == "jsonl":
            return LoadedFile(f, _read_jsonl(f.input))
        if f.fmt == "csv":
            return _read_csv(f)
        return _read_parquet(f)
    except UnicodeDecodeError as e:
        raise InvalidInput(f"dataset {f.input} is not UTF-8 (byte {e.start}); save it as UTF-8.") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                obj = e
            if not isinstance(obj, dict):
                raise InvalidInput(f"dataset {path} line {line_no} is not a JSON object; fix that line "
                                   "(every row is written back, so every line must parse).")
            rows.append(obj)
    return rows


_EXTRA = "\0extra"


def _read_csv(f: DatasetFile) -> LoadedFile:
    with f.input.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, restkey=_EXTRA)
        try:
            header = list(reader.fieldnames or [])
            if not header:
                raise InvalidInput(f"dataset {f.input} has no header row; the first line of a CSV names its columns.")
            if len(set(header)) < len(header):
                raise InvalidInput(f"dataset {f.input} repeats a column name in its header; make the names unique.")
            rows = []
            for row in reader:
                if _EXTRA in row:
                    raise InvalidInput(f"dataset {f.input} line {reader.line_num} has more fields than the header; "
                                       "quote fields that contain commas.")
                rows.append(row)
        except csv.Error as e:
            raise InvalidInput(f"dataset {f.input} is not valid CSV ({e}); fix the file.") from None
    return LoadedFile(f, rows, header=header)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError("Parquet datasets need pyarrow; install it with: pip install 'lorabatch[annotate]'.") from None
    return pyarrow, pyarrow.parquet


def _read_parquet(f: DatasetFile) -> LoadedFile:
    pa, pq = _pyarrow()
    try:
        table = pq.read_table(f.input)
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"dataset {f.input} is not a readable Parquet file ({e}); fix or replace it.") from None
    return LoadedFile(f, table.to_pylist(), table=table)


Cell = tuple[str | None, str, str | None]
"""(answer, status, error) for one row."""


def output_columns(column: str) -> tuple[str, str, str]:
    return column, f"{column}_status", f"{column}_error"


def write_output(loaded: LoadedFile, cells: Sequence[Cell], *, column: str) -> Path:
    """Write the rows plus the answer columns to the file's output path, atomically."""
    names = output_columns(column)
    out = loaded.file.output
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        if loaded.file.fmt == "jsonl":
            with tmp.open("w", encoding="utf-8") as fh:
                for row, cell in zip(loaded.rows, cells):
                    fh.write(json.dumps({**row, **dict(zip(names, cell))}, ensure_ascii=False, default=str) + "\n")
        elif loaded.file.fmt == "csv":
            header = list(loaded.header or []) + [n for n in names if n not in (loaded.header or [])]
            with tmp.open("w", encoding="utf-8", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
                writer.writeheader()
                for row, cell in zip(loaded.rows, cells):
                    writer.writerow({**row, **dict(zip(names, cell))})
        else:
            pa, pq = _pyarrow()
            table = loaded.table
            for i, name in enumerate(names):
                values = pa.array([c[i] for c in cells], type=pa.string())
                if name in table.column_names:
                    table = table.set_column(table.column_names.index(name), name, values)
                else:
                    table = table.append_column(name, values)
            pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- rendering rows into requests


def request_key(body: Mapping[str, Any]) -> str:
    """The cache key of one validated request: what the model sees and how it generates."""
    payload = {"v": KEY_VERSION, **{k: body.get(k) for k in ("adapter", "prompt", "messages", "params")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


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


# ---------------------------------------------------------------- cache


def _chunks(items: Sequence[str], size: int = QUERY_CHUNK) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def lookup_cache(sessions: sessionmaker[Session], keys: Iterable[str]) -> dict[str, Cell]:
    """Cached (answer, status, error) by key, for the keys that have an entry."""
    keys = list(dict.fromkeys(k for k in keys if k))
    found: dict[str, Cell] = {}
    with sessions() as s:
        for chunk in _chunks(keys):
            rows = s.execute(select(AnnotationCache.key, AnnotationCache.output, AnnotationCache.status,
                                    AnnotationCache.error).where(AnnotationCache.key.in_(chunk)))
            found.update({k: (o, st, e) for k, o, st, e in rows})
    return found


def _upsert_cache(session: Session, rows: list[dict]) -> None:
    """Insert or update entries; a success is never overwritten by a failure."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        stmt = insert(AnnotationCache)
        stmt = stmt.on_conflict_do_update(
            index_elements=[AnnotationCache.key],
            set_={c: stmt.excluded[c] for c in ("status", "output", "error", "job_id", "updated_at")},
            where=or_(AnnotationCache.status != "succeeded", stmt.excluded.status == "succeeded"),
        )
        session.execute(stmt, rows)
        return
    for row in rows:  # other databases: slower, same rule
        entry = session.get(AnnotationCache, row["key"], with_for_update=True)
        if entry is None:
            session.add(AnnotationCache(**row))
        elif entry.status != "succeeded" or row["status"] == "succeeded":
            for k, v in row.items():
                setattr(entry, k, v)


def harvest_finished(ctx: Context) -> int:
    """Copy the results of every ended annotation job not yet harvested into the cache. Idempotent,
    and safe to run from several processes at once. Returns the number of runs harvested."""
    sessions = annotation_sessions(ctx)
    with sessions() as s:
        todo = s.execute(
            select(AnnotationRun.id, AnnotationRun.job_id).join(Job, Job.id == AnnotationRun.job_id)
            .where(AnnotationRun.harvested_at.is_(None), Job.state.in_(FINAL_JOB_STATES))
        ).all()
    for run_id, job_id in todo:
        with transaction(sessions) as s:
            now = utcnow()
            stmt = (select(Request.custom_id, Request.state, Request.output, Request.error)
                    .where(Request.job_id == job_id).order_by(Request.idx))
            batch = []
            for key, state, output, error in s.execute(stmt):
                batch.append({"key": key, "status": state, "output": output, "error": error, "job_id": job_id,
                              "updated_at": now})
                if len(batch) >= QUERY_CHUNK:
                    _upsert_cache(s, batch)
                    batch = []
            _upsert_cache(s, batch)
            s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id).values(harvested_at=now)
                      .execution_options(synchronize_session=False))
    return len(todo)


def keys_in_flight(sessions: sessionmaker[Session], keys: Sequence[str]) -> dict[str, str]:
    """key -> job id, for keys that are requests of an annotation job that has not ended."""
    found: dict[str, str] = {}
    with sessions() as s:
        open_jobs = s.scalars(select(Job.id).join(AnnotationRun, AnnotationRun.job_id == Job.id)
                              .where(Job.state.in_(OPEN_JOB_STATES))).all()
        if not open_jobs:
            return found
        for chunk in _chunks(list(keys)):
            rows = s.execute(select(Request.custom_id, Request.job_id)
                             .where(Request.job_id.in_(open_jobs), Request.custom_id.in_(chunk)))
            found.update(dict(rows.all()))
    return found


# ---------------------------------------------------------------- runs


def annotation_sessions(ctx: Context) -> sessionmaker[Session]:
    """The context's sessions, with the annotation tables made sure of."""
    ensure_tables(ctx.engine)
    return ctx.sessions


@dataclass
class Plan:
    rendered: Rendered
    to_submit: list[str]
    """Keys this run's job will answer."""
    waits_on: list[str]
    """Jobs of other runs already answering some of this run's keys."""
    reused: int
    """Distinct keys answered before."""


def plan_run(ctx: Context, spec: RunSpec, *, fresh: bool = False) -> Plan:
    """Read and render the datasets and decide which requests need a job.
    `fresh`: ask again for every row (the cache knows nothing of the weights: use it after
    retraining an adapter under the same name)."""
    rendered = render_datasets(ctx.settings, spec)
    sessions = annotation_sessions(ctx)
    if fresh:
        return Plan(rendered, list(rendered.lines), [], 0)
    harvest_finished(ctx)  # answers of ended jobs count as answered before
    cached = lookup_cache(sessions, rendered.lines)
    reused = sum(1 for c in cached.values() if c[1] == "succeeded")
    missing = [k for k in rendered.lines if cached.get(k, (None, None, None))[1] != "succeeded"]
    in_flight = keys_in_flight(sessions, missing)
    return Plan(rendered, [k for k in missing if k not in in_flight], sorted(set(in_flight.values())), reused)


def create_run(ctx: Context, spec: RunSpec, *, schedule: str | None = None, detached: bool = False,
               session: Session | None = None, slot=None) -> str:
    """Record a new run (in `session`'s transaction when given). Returns its id."""
    run = AnnotationRun(id="run-" + uuid.uuid4().hex[:16], schedule=schedule, slot=slot, spec=spec.to_dict(),
                        detached=detached, waits_on=[])
    if session is not None:
        session.add(run)
        session.flush()
    else:
        with transaction(annotation_sessions(ctx)) as s:
            s.add(run)
    return run.id


def submit_run(ctx: Context, run_id: str, *, plan: Plan | None = None) -> Plan:
    """Create the run's job for the rows that need an answer (none when every row has one).

    Submitting twice is harmless: the job's idempotency key is the run's id. A UsageError
    (no file matches, a bad file) is recorded on the run, which then is not retried, and raised.
    """
    from lorabatch.producer.submit import submit_file

    sessions = annotation_sessions(ctx)
    with sessions() as s:
        run = s.get(AnnotationRun, run_id)
    spec = RunSpec.from_dict(run.spec)
    job_id = None
    try:
        plan = plan or plan_run(ctx, spec)
        if plan.to_submit:
            with tempfile.TemporaryDirectory(prefix="lorabatch-annotate-") as tmp:
                path = Path(tmp) / "requests.jsonl"
                with path.open("w", encoding="utf-8") as fh:
                    fh.writelines(plan.rendered.lines[k] + "\n" for k in plan.to_submit)
                job_id = submit_file(ctx, str(path), name=_job_name(spec, run.schedule, plan), priority=spec.priority,
                                     idempotency_key=f"annotation-run:{run_id}", schedule=run.schedule).job_id
    except UsageError as e:
        with transaction(sessions) as s:
            s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id).values(error=str(e))
                      .execution_options(synchronize_session=False))
        raise
    rows = sum(len(r) for r in plan.rendered.rows)
    with transaction(sessions) as s:
        s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id)
                  .values(job_id=job_id, waits_on=plan.waits_on, rows=rows, submitted=len(plan.to_submit),
                          reused=plan.reused, submitted_at=utcnow())
                  .execution_options(synchronize_session=False))
    return plan


def _job_name(spec: RunSpec, schedule: str | None, plan: Plan) -> str:
    if spec.name:
        return spec.name
    if schedule:
        return f"schedule {schedule}"
    files = plan.rendered.files
    more = f" +{len(files) - 1}" if len(files) > 1 else ""
    return f"annotate {files[0].file.input.name}{more}"


def get_run(ctx: Context, run_id: str) -> AnnotationRun:
    with annotation_sessions(ctx)() as s:
        return s.get(AnnotationRun, run_id)


def run_jobs(run: AnnotationRun) -> list[str]:
    return [j for j in [run.job_id, *(run.waits_on or [])] if j]


def jobs_ended(sessions: sessionmaker[Session], job_ids: Sequence[str]) -> bool:
    if not job_ids:
        return True
    with sessions() as s:
        open_count = s.scalar(select(func.count()).select_from(Job)
                              .where(Job.id.in_(list(job_ids)), Job.state.in_(OPEN_JOB_STATES)))
    return not open_count


@dataclass
class Written:
    outputs: list[Path]
    counts: dict[str, int]
    """Rows by status: succeeded, failed, cancelled, invalid, pending."""


def write_run(ctx: Context, run_id: str, *, rendered: Rendered | None = None) -> Written:
    """Write the run's output files from the cache. Call once its jobs have ended.
    `rendered`: the rows as the run read them; None reads the datasets again."""
    sessions = annotation_sessions(ctx)
    run = get_run(ctx, run_id)
    harvest_finished(ctx)
    try:
        rendered = rendered or render_datasets(ctx.settings, RunSpec.from_dict(run.spec))
    except UsageError as e:
        with transaction(sessions) as s:
            s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id).values(error=str(e))
                      .execution_options(synchronize_session=False))
        raise
    cache = lookup_cache(sessions, [k for rows in rendered.rows for k, _ in rows])
    counts = dict.fromkeys(("succeeded", "failed", "cancelled", "invalid", "pending"), 0)
    outputs = []
    for loaded, rows in zip(rendered.files, rendered.rows):
        cells: list[Cell] = []
        for key, error in rows:
            if key is None:
                cell: Cell = (None, "invalid", error)
            elif key in cache:
                output, status, err = cache[key]
                cell = (output if status == "succeeded" else None, status, err)
            else:
                cell = (None, "pending", PENDING_ERROR)
            counts[cell[1]] = counts.get(cell[1], 0) + 1
            cells.append(cell)
        outputs.append(write_output(loaded, cells, column=run.spec["column"]))
    with transaction(sessions) as s:
        s.execute(update(AnnotationRun).where(AnnotationRun.id == run_id, AnnotationRun.written_at.is_(None))
                  .values(written_at=utcnow()).execution_options(synchronize_session=False))
    return Written(outputs, counts)


def live_workers(ctx: Context) -> int:
    """Workers whose heartbeat is within the lease."""
    since = utcnow() - timedelta(seconds=ctx.settings.worker.lease_seconds)
    with ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Worker).where(Worker.heartbeat_at >= since)) or 0


def wait_for_jobs(ctx: Context, job_ids: Sequence[str], *, poll: float = 0.5, timeout: float | None = None) -> bool:
    """Block until the jobs end (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout if timeout is not None else None
    while not jobs_ended(ctx.sessions, job_ids):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


# ---------------------------------------------------------------- detached runs (the beat's side)


def finish_detached_runs(ctx: Context) -> list[tuple[str, Written]]:
    """Write the outputs of detached runs whose jobs have ended. Returns (run id, what was written).
    Two beats may both write one run: the files are replaced atomically with the same content."""
    sessions = annotation_sessions(ctx)
    with sessions() as s:
        runs = s.scalars(select(AnnotationRun).where(
            AnnotationRun.detached.is_(True), AnnotationRun.submitted_at.is_not(None),
            AnnotationRun.written_at.is_(None), AnnotationRun.error.is_(None))).all()
    done = []
    for run in runs:
        if jobs_ended(sessions, run_jobs(run)):
            done.append((run.id, write_run(ctx, run.id)))
    return done


def stalled_runs(ctx: Context) -> list[str]:
    """Schedule firings whose beat died between claiming the slot and submitting the run. (A run
    started by hand that failed to submit told its user so; it is not retried behind their back.)"""
    cutoff = utcnow() - timedelta(seconds=STALLED_SUBMIT_SECONDS)
    with annotation_sessions(ctx)() as s:
        return list(s.scalars(select(AnnotationRun.id).where(
            AnnotationRun.slot.is_not(None), AnnotationRun.submitted_at.is_(None),
            AnnotationRun.error.is_(None), AnnotationRun.created_at < cutoff)))
