"""Dataset files: expanding paths and globs, their output paths, reading rows and writing them back.

JSONL, CSV and Parquet; the output is written in the input's format, with the same rows in the
same order plus the answer columns.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabatch.schemas.errors import InvalidInput, UsageError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


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
