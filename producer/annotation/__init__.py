"""Annotating datasets: fill a template from each row, generate, add the answer as a column.

A run reads the dataset files (JSONL, CSV or Parquet), renders every row through the template
into a native request, and keys each request by its content: adapter, prompt or messages, and
generation parameters, as `parse_line` normalised them. Rows whose request has a successful
answer in the cache reuse it; rows whose request is already in an open job of another run wait
for that job; only the rest go into this run's job. When the jobs end, their results are copied
into the cache ("harvested") and the output files are written from the cache: the same rows in
the same order, plus `<column>`, `<column>_status` and `<column>_error`, in the input's format.

One concept a module: `templates` (a template and one row's request), `spec` (what a run does),
`datasets` (files in and out), `rendering` (every row into a keyed request), `cache` (keys and
the answer cache), `runs` (planning, recording and submitting a run) and `finish` (writing its
outputs). This package knows nothing about cron; `schedules.py` decides when a run starts.
"""

from lorabatch.producer.annotation.cache import annotation_sessions
from lorabatch.producer.annotation.datasets import (
    DatasetFile,
    load_file,
    resolve_datasets,
    write_output,
)
from lorabatch.producer.annotation.finish import (
    Written,
    finish_detached_runs,
    write_run,
)
from lorabatch.producer.annotation.runs import (
    Plan,
    create_run,
    get_run,
    live_workers,
    plan_run,
    run_jobs,
    stalled_runs,
    submit_run,
    wait_for_jobs,
)
from lorabatch.producer.annotation.spec import RunSpec, build_spec
from lorabatch.producer.annotation.templates import (
    RowError,
    check_template,
    load_template,
)

__all__ = [
    "DatasetFile",
    "Plan",
    "RowError",
    "RunSpec",
    "Written",
    "annotation_sessions",
    "build_spec",
    "check_template",
    "create_run",
    "finish_detached_runs",
    "get_run",
    "live_workers",
    "load_file",
    "load_template",
    "plan_run",
    "resolve_datasets",
    "run_jobs",
    "stalled_runs",
    "submit_run",
    "wait_for_jobs",
    "write_output",
    "write_run",
]
