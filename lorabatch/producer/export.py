"""Exporting a job's results, in the input's order: native JSONL, OpenAI batch output, or CSV.

Rows stream from the database in index order, so a million-row job exports in bounded memory.
Requests that have not ended yet are written with their current status and no output.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorabatch.schemas.tables import Request

FORMATS = ("jsonl", "openai", "csv")
CSV_COLUMNS = ("custom_id", "adapter", "status", "output", "finish_reason", "prompt_tokens", "completion_tokens", "error")


def native_record(row: Request) -> dict:
    """The native output line for one request (DESIGN.md)."""
    return {
        "custom_id": row.custom_id,
        "adapter": row.adapter,
        "status": row.state,
        "output": row.output,
        "finish_reason": row.finish_reason,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "error": row.error,
    }


def openai_record(row: Request) -> dict:
    """The OpenAI batch output line for one request."""
    rid = f"{row.job_id}-{row.idx}"
    if row.state != "succeeded":
        return {"id": rid, "custom_id": row.custom_id, "response": None,
                "error": {"code": row.state, "message": row.error or f"request is {row.state}"}}
    usage = {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
             "total_tokens": (row.prompt_tokens or 0) + (row.completion_tokens or 0)}
    if row.messages is not None:
        body = {"id": rid, "object": "chat.completion", "model": row.adapter,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": row.output},
                             "finish_reason": row.finish_reason}], "usage": usage}
    else:
        body = {"id": rid, "object": "text_completion", "model": row.adapter,
                "choices": [{"index": 0, "text": row.output, "finish_reason": row.finish_reason}], "usage": usage}
    return {"id": rid, "custom_id": row.custom_id, "response": {"status_code": 200, "request_id": rid, "body": body},
            "error": None}


def iter_results(session: Session, job_id: str, *, batch: int = 2000) -> Iterator[Request]:
    stmt = select(Request).where(Request.job_id == job_id).order_by(Request.idx).execution_options(yield_per=batch)
    yield from session.execute(stmt).scalars()


def write_results(session: Session, job_id: str, out: TextIO, *, fmt: str = "jsonl") -> int:
    """Write every request of the job to `out` in `fmt`; returns the number written."""
    n = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in iter_results(session, job_id):
            writer.writerow(native_record(row))
            n += 1
        return n
    record = openai_record if fmt == "openai" else native_record
    for row in iter_results(session, job_id):
        out.write(json.dumps(record(row), ensure_ascii=False) + "\n")
        n += 1
    return n
