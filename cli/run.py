"""`lorabatch run INPUT -o OUTPUT`: one file in, one file out, on an engine in this process.

The `vllm run-batch -i in.jsonl -o out.jsonl` habit, for people with no queue yet: no Redis, no
database, no worker. The input is validated by the same line parser as `submit` (a bad file exits
2 before the model loads); generation is the worker's engine, so outputs are the same, token for
token; the output is written in the same formats (jsonl, openai with its error file, csv), in the
input's order, with the same provenance (base model, adapter weights' sha256, "run@<host>" as the worker).

One stepper runs across the whole file, as in a worker: requests join the running batch as rows end, so
the batch never drains between parts of the file. What is held: the validated requests (each dropped once it
joins the batch) and a window of them waiting to join; results go to a temporary file as rows end (8 bytes
of index per request stay in memory) and are written in the input's order at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import socket
import sys
import tempfile
import uuid
import warnings
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

import click

from lorabatch.producer.export import ERRORS_SUFFIX, FORMATS, export_to, write_rows
from lorabatch.producer.inputs import check_input_path, plural, read_specs
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.lines import RequestSpec
from lorabatch.schemas.settings import BASE_ADAPTER, Settings, load_settings
from lorabatch.schemas.tables import Request, utcnow

WINDOW_BATCHES = 4
"""Requests waiting to join the batch, in batches of max_batch_size: enough for admission to see several
adapters' rows (and merge one that fills the batch), few enough to hold little of a big file."""


@click.command("run")
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The output file.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option("--errors", "errors_path", type=click.Path(dir_okay=False),
              help="openai format: the file for failed requests (default: OUTPUT.errors.jsonl); written only if any.")
@click.option("--adapter", help="Adapter for lines that name none ('base' for the base model).")
@click.option("--weights", type=click.Choice(["auto", "merged", "separate"]), help="Override [worker] weights.")
@click.pass_context
def run(click_ctx, input_path, output, fmt, errors_path, adapter, weights) -> None:
    """Validate INPUT, generate in this process and write OUTPUT: no queue or database needed.

    Takes the same lines as submit (native or OpenAI batch, as for `vllm run-batch`) and writes the
    same formats as results, in the input's order.
    """
    settings = load_settings(click_ctx.find_root().obj.get("config"))
    if weights:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"weights": weights})})
    if adapter is not None and adapter != BASE_ADAPTER and adapter not in settings.adapters:
        known = ", ".join(sorted(set(settings.adapters) | {BASE_ADAPTER}))
        raise UsageError(f"--adapter {adapter!r} is not configured; use one of: {known}.")
    check_input_path(input_path)
    with tempfile.TemporaryDirectory(prefix="lorabatch-run-") as tmp:
        path = Path(input_path)
        if input_path == "-":
            path = Path(tmp) / "stdin.jsonl"
            with path.open("wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
        specs: list[RequestSpec | None] = list(read_specs(settings, path, default_adapter=adapter))
        missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"lorabatch run needs {', '.join(missing)}, which this install lacks; "
                             "install the worker extra: pip install 'lorabatch[worker]'")
        with (Path(tmp) / "results.jsonl").open("w+b") as results:
            offsets = generate_to(settings, specs, results)
            failed = Counter()
            rows = read_in_order(results, offsets, run_id="run-" + uuid.uuid4().hex[:16], failed=failed)
            written, error_file = export_to(output, lambda out, err: write_rows(rows, out, fmt=fmt, errors=err),
                                            fmt=fmt, errors=errors_path, default_errors=f"{output}{ERRORS_SUFFIX}")
    note = f" ({failed['failed']} failed: see {error_file or 'their error field'})" if failed["failed"] else ""
    click.echo(f"wrote {plural(written.results, 'result')} to {output}{note}", err=True)


def generate_to(settings: Settings, specs: list[RequestSpec | None], results: IO[bytes]) -> array:
    """Run every request on one in-process stepper, appending each result to ``results`` as its row ends.

    Returns each request's byte offset in ``results``, by input index. ``specs[i]`` is set to None once
    request i has joined the batch (what the output needs of it then travels with its result).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lorabatch.store.deployment import deployment_of
    from lorabatch.worker.engine.engine import Engine
    from lorabatch.worker.engine.params import GenerationRequest, SamplingParams
    from lorabatch.worker.serving import ServedAdapters

    click.echo(f"loading {settings.base_model} ...", err=True)
    with quiet_library_deprecations():
        engine = Engine.from_settings(settings)
    deployment = deployment_of(settings)
    provenance = Provenance(base_model=deployment.base,
                            adapter_sha256=ServedAdapters(settings, deployment, engine).weights_of,
                            worker=f"run@{socket.gethostname()}")
    n = len(specs)
    offsets = array("q", [-1]) * n
    joined: dict[int, dict] = {}  # what the output needs of each running request
    window = Window(specs, size=max(1, engine.max_batch_size * WINDOW_BATCHES))
    stepper = engine.stepper()
    columns = (TextColumn("[bold]generating"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn())
    with Progress(*columns, console=_stderr_console()) as bar, quiet_library_deprecations():
        task = bar.add_task("run", total=n, tokens=0)
        tokens = 0

        def finished(ended: list) -> None:
            nonlocal tokens
            for result in ended:
                i = result.key
                if result.finish_reason == "preempted":  # out of memory, or over the token budget: wait again
                    window.put_back(i, joined.pop(i))
                    continue
                offsets[i] = results.tell()
                results.write(json.dumps(_record(i, joined.pop(i), result, provenance), ensure_ascii=False)
                              .encode() + b"\n")
                tokens += result.completion_tokens or 0
                bar.update(task, advance=1, tokens=tokens)

        while window or not stepper.idle:
            chosen = window.take(stepper.admission(window.waiting()))
            requests = []
            for i, spec in chosen:
                joined[i] = _what_the_output_needs(spec)
                requests.append(GenerationRequest(key=i, adapter=spec.adapter, prompt=spec.prompt,
                                                  messages=spec.messages, params=_sampling(SamplingParams, spec)))
            finished(stepper.admit(requests))
            if not stepper.idle:
                finished(stepper.step())
    missing = [i for i in range(n) if offsets[i] < 0]
    if missing:  # a bug, not a user error: say which
        raise RuntimeError(f"{len(missing)} request(s) got no result (first: line index {missing[0]})")
    return offsets


class Window:
    """The next requests of the file waiting to join the batch, per adapter, in input order."""

    def __init__(self, specs: list[RequestSpec | None], *, size: int) -> None:
        self.specs, self.size, self.next = specs, size, 0
        self.by_adapter: dict[str, deque[tuple[int, RequestSpec]]] = {}
        self.held = 0
        self._fill()

    def __bool__(self) -> bool:
        return self.held > 0

    def waiting(self) -> dict[str, int]:
        """Waiting rows per adapter, the adapter of the oldest waiting row first (admission's priority order)."""
        heads = sorted((q[0][0], name) for name, q in self.by_adapter.items() if q)
        return {name: len(self.by_adapter[name]) for _, name in heads}

    def take(self, counts: dict[str, int]) -> list[tuple[int, RequestSpec]]:
        """The first ``counts[adapter]`` waiting requests of each adapter; the window refills from the file."""
        chosen = []
        for name, k in counts.items():
            q = self.by_adapter.get(name, deque())
            for _ in range(min(k, len(q))):
                chosen.append(q.popleft())
        self.held -= len(chosen)
        self._fill()
        return chosen

    def put_back(self, i: int, spec: RequestSpec) -> None:
        """A request that left the batch without a result (preempted) waits again, at the front."""
        self.by_adapter.setdefault(spec.adapter, deque()).appendleft((i, spec))
        self.held += 1

    def _fill(self) -> None:
        while self.held < self.size and self.next < len(self.specs):
            spec = self.specs[self.next]
            self.specs[self.next] = None  # the window (then the running row) holds it from now on
            self.by_adapter.setdefault(spec.adapter, deque()).append((self.next, spec))
            self.held += 1
            self.next += 1


class Provenance(NamedTuple):
    """What produced a result, as a worker records it: base model, adapter weights' sha256, who ran it."""

    base_model: str
    adapter_sha256: Callable[[str], str | None]
    """The worker's own rule (worker.serving.ServedAdapters.weights_of): the bytes the engine loaded, else the
    files as they were at start; None for the base model."""
    worker: str


def read_in_order(results: IO[bytes], offsets: array, *, run_id: str, failed: Counter) -> Iterator[Request]:
    """The results as unsaved Request rows, in input order (counts the failed ones in ``failed``)."""
    for i, offset in enumerate(offsets):
        results.seek(offset)
        record = json.loads(results.readline())
        if record["state"] != "succeeded":
            failed["failed"] += 1
        record["finished_at"] = datetime.fromisoformat(record["finished_at"])
        yield Request(job_id=run_id, idx=i, **record)


def _what_the_output_needs(spec: RequestSpec) -> dict:
    return {"custom_id": spec.custom_id, "adapter": spec.adapter, "messages": spec.messages}


def _record(i: int, spec: dict, result: Any, provenance: Provenance) -> dict:
    """One result as the Request columns the output formats read."""
    return {**spec, "state": "failed" if result.error else "succeeded", "output": result.output,
            "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "error": result.error,
            "base_model": provenance.base_model, "adapter_sha256": provenance.adapter_sha256(spec["adapter"]),
            "worker_id": provenance.worker, "finished_at": utcnow().isoformat()}


def _sampling(cls, spec: RequestSpec):
    return cls(**{**spec.params, "stop": tuple(spec.params.get("stop", ()))})


@contextlib.contextmanager
def quiet_library_deprecations() -> Iterator[None]:
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model (at an adapter's
    first load): a FutureWarning about library internals that a user of `run` can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
