"""`lorabatch run INPUT -o OUTPUT`: one file in, one file out, on an engine in this process.

The `vllm run-batch -i in.jsonl -o out.jsonl` habit, for people with no queue yet: no Redis, no
database, no worker. The input is validated by the same line parser as `submit` (a bad file exits
2 before the model loads); generation is the worker's engine, so outputs are the same, token for
token; the output is written in the same formats (jsonl, openai with its error file, csv), in the
input's order.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import click

from lorabatch.producer.export import ERRORS_SUFFIX, FORMATS, export_to, write_rows
from lorabatch.producer.inputs import check_input_path, plural, read_specs
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.lines import RequestSpec
from lorabatch.schemas.settings import BASE_ADAPTER, Settings, load_settings
from lorabatch.schemas.tables import Request, utcnow

CHUNK_BATCHES = 4
"""Requests handed to the engine at once, in batches of max_batch_size: small enough for a
progress bar that moves, large enough for full batches of each adapter."""


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
        specs = read_specs(settings, path, default_adapter=adapter)
    missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"lorabatch run needs {', '.join(missing)}, which this install lacks; "
                         "install the worker extra: pip install 'lorabatch[worker]'")
    rows = generate_rows(settings, specs)
    written, error_file = export_to(output, lambda out, err: write_rows(rows, out, fmt=fmt, errors=err), fmt=fmt,
                                    errors=errors_path, default_errors=f"{output}{ERRORS_SUFFIX}")
    failed = sum(1 for r in rows if r.state != "succeeded")
    note = f" ({failed} failed: see {error_file or 'their error field'})" if failed else ""
    click.echo(f"wrote {plural(written.results, 'result')} to {output}{note}", err=True)


def generate_rows(settings: Settings, specs: list[RequestSpec]) -> list[Request]:
    """Run every request on an in-process engine; one unsaved Request row per spec, in input order."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lorabatch.worker.engine.engine import Engine
    from lorabatch.worker.engine.params import GenerationRequest, SamplingParams

    click.echo(f"loading {settings.base_model} ...", err=True)
    engine = Engine.from_settings(settings)
    run_id = "run-" + uuid.uuid4().hex[:16]
    rows: list[Request | None] = [None] * len(specs)
    # Grouped by adapter (stable), so each chunk holds full batches of few adapters; results go back by index.
    order = sorted(range(len(specs)), key=lambda i: specs[i].adapter)
    chunk = max(1, settings.worker.max_batch_size * CHUNK_BATCHES)
    columns = (TextColumn("[bold]generating"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn())
    with Progress(*columns, console=_stderr_console()) as bar:
        task = bar.add_task("run", total=len(specs), tokens=0)
        tokens = 0
        for start in range(0, len(order), chunk):
            idxs = order[start:start + chunk]
            requests = [GenerationRequest(key=i, adapter=specs[i].adapter, prompt=specs[i].prompt,
                                          messages=specs[i].messages, params=_sampling(SamplingParams, specs[i]))
                        for i in idxs]
            for result in engine.generate(requests):
                rows[result.key] = _row(run_id, result.key, specs[result.key], result)
                tokens += result.completion_tokens or 0
            bar.update(task, advance=len(idxs), tokens=tokens)
    return rows  # type: ignore[return-value]  # every slot is filled


def _sampling(cls, spec: RequestSpec):
    return cls(**{**spec.params, "stop": tuple(spec.params.get("stop", ()))})


def _row(run_id: str, idx: int, spec: RequestSpec, result) -> Request:
    return Request(job_id=run_id, idx=idx, custom_id=spec.custom_id, adapter=spec.adapter, prompt=spec.prompt,
                   messages=spec.messages, params=spec.params, state="failed" if result.error else "succeeded",
                   output=result.output, finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                   completion_tokens=result.completion_tokens, error=result.error, finished_at=utcnow())


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
