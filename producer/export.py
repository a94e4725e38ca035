"""Exporting a job's results, in the input's order: native JSONL, OpenAI batch output, or CSV.

Rows stream from the database in index order, so a million-row job exports in bounded memory.
In jsonl and csv every request is one line, with its status. In openai format, as OpenAI's Batch
API does, the output file holds only successes; failures, cancellations (and, with --partial,
requests not done yet) go to a separate error file, opened only when the first such line comes.
"""

from __future__ import annotations

import calendar
import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorabatch.schemas.tables import Request

FORMATS = ("jsonl", "openai", "csv")
CSV_COLUMNS = ("custom_id", "adapter", "status", "output", "finish_reason", "prompt_tokens", "completion_tokens", "error",
               "base_model", "adapter_sha256", "worker")
ERRORS_SUFFIX = ".errors.jsonl"
"""Default error file of `--format openai`: the output file's name plus this."""


def native_record(row: Request) -> dict:
    """The native output line for one request (the contract README documents)."""
    return {
        "custom_id": row.custom_id,
        "adapter": row.adapter,
        "status": row.state,
        "output": row.output,
        "finish_reason": row.finish_reason,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "error": row.error,
        # Provenance: what produced the result (the deployment's base model, the adapter weights' sha256,
        # the worker); None for requests that never ran.
        "base_model": row.base_model,
        "adapter_sha256": row.adapter_sha256,
        "worker": row.worker_id,
    }


def _unix(row: Request) -> int:
    stamp = row.finished_at or row.claimed_at
    return calendar.timegm(stamp.utctimetuple()) if stamp else 0


def openai_body(row: Request) -> dict:
    """The `response.body` of a succeeded request: what `openai.types.chat.ChatCompletion` (chat lines)
    or `openai.types.Completion` (/v1/completions lines) validate."""
    rid = f"{row.job_id}-{row.idx}"
    usage = {"prompt_tokens": row.prompt_tokens or 0, "completion_tokens": row.completion_tokens or 0,
             "total_tokens": (row.prompt_tokens or 0) + (row.completion_tokens or 0)}
    finish = row.finish_reason if row.finish_reason in ("stop", "length") else "stop"
    common = {"created": _unix(row), "model": row.adapter, "system_fingerprint": None, "usage": usage}
    if row.messages is not None:
        choice = {"index": 0, "message": {"role": "assistant", "content": row.output, "refusal": None},
                  "logprobs": None, "finish_reason": finish}
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "choices": [choice], **common}
    choice = {"index": 0, "text": row.output or "", "logprobs": None, "finish_reason": finish}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "choices": [choice], **common}


def openai_record(row: Request) -> tuple[dict, bool]:
    """The OpenAI batch output line for one request, and whether it belongs in the output file
    (True) or the error file (False)."""
    rid = f"{row.job_id}-{row.idx}"
    line = {"id": f"batch_req_{rid}", "custom_id": row.custom_id, "response": None, "error": None}
    if row.state == "succeeded":
        line["response"] = {"status_code": 200, "request_id": rid, "body": openai_body(row)}
        return line, True
    if row.state == "failed":  # the request ran and failed: an error body, as the API answers a bad request
        error = {"message": row.error or "the request failed", "type": "invalid_request_error",
                 "param": None, "code": "request_failed"}
        line["response"] = {"status_code": 400, "request_id": rid, "body": {"error": error}}
    elif row.state == "cancelled":
        line["error"] = {"code": "batch_cancelled", "message": row.error or "the job was cancelled before this request ran"}
    else:
        line["error"] = {"code": "not_finished", "message": f"the request is still {row.state}; export again once the job ends"}
    return line, False


def iter_results(session: Session, job_id: str, *, batch: int = 2000) -> Iterator[Request]:
    """The job's requests in input order, streamed `batch` rows at a time."""
    stmt = select(Request).where(Request.job_id == job_id).order_by(Request.idx).execution_options(yield_per=batch)
    yield from session.execute(stmt).scalars()


class LazyFile:
    """A text file created on the first write, through `<path>.part` renamed on `close()`: an export
    with no failures leaves no empty error file, and an interrupted one no half file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f: TextIO | None = None
        self.lines = 0

    def write(self, text: str) -> None:
        if self._f is None:
            self._f = open(self._part, "w", encoding="utf-8", newline="")
        self._f.write(text)
        self.lines += text.count("\n")

    @property
    def _part(self) -> Path:
        return self.path.with_name(self.path.name + ".part")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._part.replace(self.path)
            self._f = None


@dataclass
class Written:
    """What an export wrote: lines to the output, lines to the error file (openai format only)."""

    results: int = 0
    errors: int = 0


def write_results(session: Session, job_id: str, out: TextIO, *, fmt: str = "jsonl",
                  errors: TextIO | LazyFile | None = None) -> Written:
    """Write every request of the job to `out` in `fmt` (openai: failures to `errors`)."""
    return write_rows(iter_results(session, job_id), out, fmt=fmt, errors=errors)


def write_rows(rows: Iterable[Request], out: TextIO, *, fmt: str = "jsonl",
               errors: TextIO | LazyFile | None = None) -> Written:
    """Write requests (stored rows, or unsaved ones from `lorabatch run`) to `out` in `fmt`."""
    written = Written()
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(native_record(row))
            written.results += 1
        return written
    if fmt == "openai":
        if errors is None:
            raise ValueError("the openai format needs an error file")
        for row in rows:
            line, ok = openai_record(row)
            (out if ok else errors).write(json.dumps(line, ensure_ascii=False) + "\n")
            if ok:
                written.results += 1
            else:
                written.errors += 1
        return written
    for row in rows:
        out.write(json.dumps(native_record(row), ensure_ascii=False) + "\n")
        written.results += 1
    return written


def export_to(path: str | Path | None, write: Callable[[TextIO, LazyFile | None], Written], *, fmt: str,
              errors: str | Path | None, default_errors: str) -> tuple[Written, Path | None]:
    """Run `write(out, error_file)` into `path` (through `<path>.part`, renamed when complete) or standard
    output when None. The openai format's error file is `errors`, else `<path>.errors.jsonl` (or
    `default_errors` beside the current folder when writing to standard output); created only if needed.
    Returns what was written and the error file's path when one was written."""
    error_file = None
    if fmt == "openai":
        error_file = LazyFile(errors or (f"{path}{ERRORS_SUFFIX}" if path else default_errors))
    try:
        if path is None:
            written = write(sys.stdout, error_file)
        else:
            part = Path(path).with_name(Path(path).name + ".part")
            with open(part, "w", encoding="utf-8", newline="") as f:
                written = write(f, error_file)
            part.replace(path)
    finally:
        if error_file is not None:
            error_file.close()
    return written, (error_file.path if error_file is not None and error_file.lines else None)
