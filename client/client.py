"""The Python client: the CLI's contract for code (Airflow tasks, notebooks, cron scripts).

    from lorabatch import Client
    client = Client()                                  # same settings resolution as the CLI
    job = client.submit("prompts.jsonl", name="nightly")
    job.wait(on_progress=lambda s: print(s["done"], "/", s["counts"]["total"]))
    for result in job.results():                       # input order, streamed from the database
        print(result["custom_id"], result["output"])

The `lorabatch` commands call this class, so both are one code path. Errors are the CLI's
(lorabatch.schemas.errors), with the same one-line messages. It imports no torch: a
producer-only install can use all of it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lorabatch.schemas.errors import InvalidInput, LorabatchError, UsageError
from lorabatch.schemas.settings import Settings, load_settings
from lorabatch.schemas.states import JobState
from lorabatch.store.context import Context

POLL_SECONDS = 0.5
"""How often `Job.wait` reads the job's state."""


class JobTimeout(LorabatchError, TimeoutError):
    """`Job.wait(timeout=...)` ran out of time; the job goes on."""


class NotFinished(LorabatchError):
    """Results were asked for a job that has not ended (pass partial=True for what is done)."""


class Job:
    """A handle on one job. Cheap: every method reads the database afresh."""

    def __init__(self, client: Client, job_id: str, *, submitted: Any = None):
        self.client = client
        self.id = job_id
        self.submitted = submitted
        """After `Client.submit`: total, and created=False when the idempotency key returned an earlier job."""

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> dict:
        """What `lorabatch status --json` prints: id, state, counts (per request state and total),
        tokens, throughput, ETA, and `workers` (live, serving this job's deployment, last heartbeat)."""
        from lorabatch.producer.status import read_summary

        return read_summary(self.client.context.sessions, self.id,
                            lease_seconds=self.client.settings.worker.lease_seconds)

    def wait(self, timeout: float | None = None, on_progress: Callable[[dict], Any] | None = None) -> dict:
        """Block until the job ends; call `on_progress(status)` at each poll. Returns the final status;
        raises JobTimeout after `timeout` seconds (the job goes on)."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        while True:
            summary = self.status()
            if on_progress is not None:
                on_progress(summary)
            if JobState(summary["state"]).is_final:
                return summary
            if deadline is not None and time.monotonic() >= deadline:
                c = summary["counts"]
                raise JobTimeout(f"job {self.id} did not end within {timeout:g}s ({summary['done']} of {c['total']} "
                                 "requests done); wait longer or check `lorabatch status` for live workers.")
            time.sleep(POLL_SECONDS)

    def results(self, *, partial: bool = False) -> Iterator[dict]:
        """Each request's result (the native output line: custom_id, adapter, status, output,
        finish_reason, prompt_tokens, completion_tokens, error) in input order, streamed in chunks
        from the database. Raises NotFinished on a job still running unless `partial`."""
        if not partial:
            self.check_finished()
        return self._stream()

    def _stream(self) -> Iterator[dict]:
        from lorabatch.producer.export import iter_results, native_record

        with self.client.context.sessions() as session:
            for row in iter_results(session, self.id):
                yield native_record(row)

    def export(self, path: str | Path | None = None, *, fmt: str = "jsonl", errors: str | Path | None = None,
               partial: bool = False) -> tuple[Any, Path | None]:
        """Write the results to `path` (None: standard output) in jsonl, openai or csv, in input order.
        openai: failures and cancellations go to the error file (`errors`, default `<path>.errors.jsonl`),
        created only when there is one. Returns (Written counts, error file path or None)."""
        from lorabatch.producer.export import ERRORS_SUFFIX, FORMATS, export_to, write_results

        if fmt not in FORMATS:
            raise UsageError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
        if not partial:
            self.check_finished()
        with self.client.context.sessions() as session:
            return export_to(path, lambda out, err: write_results(session, self.id, out, fmt=fmt, errors=err),
                             fmt=fmt, errors=errors, default_errors=f"{self.id}{ERRORS_SUFFIX}")

    def check_finished(self) -> dict:
        """The status, or NotFinished naming how many requests are not done."""
        summary = self.status()
        if not JobState(summary["state"]).is_final:
            c = summary["counts"]
            raise NotFinished(f"job {self.id} is {summary['state']}: {c['queued'] + c['running']} of {c['total']} "
                              "requests are not done; wait for it (--wait) or export what is done (--partial).")
        return summary

    def cancel(self) -> dict:
        """Cancel what has not run yet (finished results are kept). Returns the status after."""
        from lorabatch.store import lifecycle
        from lorabatch.store.db import transaction

        with transaction(self.client.context.sessions) as session:
            lifecycle.cancel_job(session, self.id)
        return self.status()

    def retry(self) -> int:
        """Run the failed requests of this (completed) job again; returns how many."""
        from lorabatch.producer.retry import retry_failed

        return retry_failed(self.client.context, self.id)[1]

    def retarget(self, adapter: str | None = None) -> list[dict]:
        """Move this job's unfinished requests onto the current weights of `adapter` (None: of every adapter
        whose weights changed since the job was pinned to them); returns what moved (adapter, from, to,
        requests), as recorded on the job."""
        from lorabatch.producer.retarget import retarget

        moved = retarget(self.client.context, self.id, adapter=adapter)[1]
        return [{"adapter": m.adapter, "from": m.was, "to": m.now, "requests": m.requests} for m in moved]


class Client:
    """Submit, follow and export jobs. `config`: a lorabatch.toml path; None resolves as the CLI
    does ($LORABATCH_CONFIG, else ./lorabatch.toml, then the LORABATCH_* environment)."""

    def __init__(self, config: str | Path | None = None, *, settings: Settings | None = None,
                 context: Context | None = None):
        self.context = context or Context(settings or load_settings(config))
        self.settings = self.context.settings

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def job(self, ref: str) -> Job:
        """The job named by id, unique id prefix or name (UsageError if ambiguous, NotFound if none)."""
        from lorabatch.producer.jobs import find_job

        with self.context.sessions() as session:
            return Job(self, find_job(session, ref).id)

    def submit(self, source: str | Path | Iterable[Mapping[str, Any]], *, adapter: str | None = None,
               name: str | None = None, priority: int = 5, idempotency_key: str | None = None) -> Job:
        """Validate and submit a JSONL file (a path, or '-' for standard input) or an iterable of
        request dicts (native or OpenAI batch lines). Raises InvalidInput listing bad lines; the same
        idempotency key again returns the first job (job.submitted.created is False); with
        different content it is a UsageError naming the key."""
        if isinstance(source, (str, Path)):
            return self._submit_file(str(source), adapter=adapter, name=name, priority=priority,
                                     idempotency_key=idempotency_key)
        with tempfile.TemporaryDirectory(prefix="lorabatch-") as tmp:
            path = Path(tmp) / "requests.jsonl"
            count = 0
            with path.open("w", encoding="utf-8") as f:
                for i, line in enumerate(source):
                    if not isinstance(line, Mapping):
                        raise UsageError(f"item {i} of the requests is a {type(line).__name__}, not a dict; "
                                         "give dicts shaped like input lines.")
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    count += 1
            if not count:
                raise InvalidInput("the requests are empty; give at least one dict shaped like an input line.")
            try:
                return self._submit_file(str(path), adapter=adapter, name=name or "requests", priority=priority,
                                         idempotency_key=idempotency_key)
            except InvalidInput as e:  # name the caller's items, not the temporary file they were written to
                raise self._as_items(e, path) from None

    def _as_items(self, error: InvalidInput, path: Path) -> InvalidInput:
        """`error` about the temporary file, reworded for the list it was written from: line N is item N-1."""
        from lorabatch.producer.inputs import problem_message

        if not error.problems:
            return InvalidInput(str(error).replace(str(path), "the requests"))
        items = [(n - 1, reason) for n, reason in error.problems]
        return InvalidInput(problem_message("the requests", items, settings=self.settings, unit="item"), items)

    def _submit_file(self, source: str, *, adapter, name, priority, idempotency_key) -> Job:
        from lorabatch.producer.submit import submit_file

        result = submit_file(self.context, source, adapter=adapter, name=name, priority=priority,
                             idempotency_key=idempotency_key)
        return Job(self, result.job_id, submitted=result)

    def jobs(self, state: str | None = None, *, limit: int = 100) -> list[dict]:
        """Jobs, newest first, as `lorabatch jobs --json` prints them (each a status dict)."""
        from lorabatch.producer.status import list_jobs

        if state is not None and state not in {s.value for s in JobState}:
            raise UsageError(f"state {state!r} is not a job state; use one of {', '.join(s.value for s in JobState)}.")
        return list_jobs(self.context.sessions, state=state, limit=limit)

    def workers(self) -> list[dict]:
        """Live workers, as `lorabatch workers --json` prints them."""
        from lorabatch.producer.jobs import live_workers, worker_record

        with self.context.sessions() as session:
            workers = live_workers(session, lease_seconds=self.settings.worker.lease_seconds)
            return [worker_record(w) for w in workers]

    def annotate(self, datasets: str | Iterable[str], *, template: str, adapter: str, output: str | None = None,
                 column: str = "annotation", priority: int = 5, name: str | None = None, fresh: bool = False,
                 wait: bool = True, timeout: float | None = None,
                 on_submitted: Callable[[dict], Any] | None = None, **overrides: Any) -> dict:
        """Annotate dataset files (JSONL, CSV, Parquet, or globs) as `lorabatch annotate` does. Returns
        {"run", "job", "waits_on", "rows", "to_submit", "reused", "invalid", "outputs", "counts"}; with
        wait=False it returns once submitted (outputs None). `on_submitted(that dict)` is called once
        the job is submitted, before waiting (the CLI shows its progress bar there). `overrides`:
        max_new_tokens, temperature, seed (None leaves the template's)."""
        from lorabatch.producer import annotation as an

        datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        spec = an.build_spec(self.settings, datasets, template=template, adapter=adapter, column=column,
                             output=output, priority=priority, name=name, overrides=overrides)
        plan = an.plan_run(self.context, spec, fresh=fresh)
        run_id = an.create_run(self.context, spec, detached=not wait)
        an.submit_run(self.context, run_id, plan=plan)
        run = an.get_run(self.context, run_id)
        jobs = an.run_jobs(run)
        info = {"run": run_id, "job": run.job_id, "waits_on": run.waits_on, "jobs": jobs,
                "rows": sum(len(r) for r in plan.rendered.rows), "to_submit": len(plan.to_submit),
                "reused": plan.reused, "invalid": sum(1 for rs in plan.rendered.rows for k, _ in rs if k is None),
                "outputs": None, "counts": None}
        if on_submitted is not None:
            on_submitted(info)
        if not wait and jobs:
            return info
        if not an.wait_for_jobs(self.context, jobs, timeout=timeout):
            raise JobTimeout(f"annotation run {run_id} did not end within {timeout}s; run the same annotate again "
                             "later to collect its answers.")
        written = an.write_run(self.context, run_id, rendered=plan.rendered)
        return {**info, "outputs": [str(p) for p in written.outputs], "counts": written.counts}
