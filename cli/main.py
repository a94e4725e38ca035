"""The `lorabatch` command line.

Errors are caught in exactly one place, `main`: a LorabatchError prints as one line on stderr
and exits with its code (2 for bad input or usage, 1 otherwise); `--debug` adds the traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

import click

from lorabatch.cli.annotate import COMMANDS as ANNOTATION_COMMANDS
from lorabatch.cli.common import context_of, echo_json
from lorabatch.schemas.errors import LorabatchError, UsageError
from lorabatch.schemas.settings import hide_password
from lorabatch.schemas.states import JobState


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), help="Config file (default: $LORABATCH_CONFIG or ./lorabatch.toml).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="lorabatch")
@click.pass_context
def cli(click_ctx: click.Context, config: str | None, debug: bool) -> None:
    """Run large offline LLM jobs over one base model and many LoRA adapters."""
    click_ctx.obj = {"config": config, "debug": debug}


@cli.command()
@click.argument("file")
@click.option("--adapter", help="Adapter for lines that name none ('base' for the base model).")
@click.option("--name", help="A name for the job.")
@click.option("--priority", type=int, default=5, show_default=True, help="0 (lowest) to 9 (highest).")
@click.option("--idempotency-key", help="Submitting again with the same key returns the first job.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object with the job's id.")
@click.pass_context
def submit(click_ctx, file, adapter, name, priority, idempotency_key, as_json) -> None:
    """Validate FILE (a path or -), create a job, enqueue it and print its id."""
    from lorabatch.producer.submit import submit_file

    ctx = context_of(click_ctx)
    result = submit_file(ctx, file, adapter=adapter, name=name, priority=priority, idempotency_key=idempotency_key)
    if as_json:
        echo_json({"id": result.job_id, "total": result.total, "created": result.created})
    else:
        click.echo(result.job_id)
        note = "submitted" if result.created else "already submitted with this idempotency key"
        click.echo(f"{result.total} requests {note}; follow with: lorabatch status {result.job_id} --watch", err=True)


@cli.command()
@click.argument("job")
@click.option("--watch", is_flag=True, help="Show a live progress bar until the job ends.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(click_ctx, job, watch, as_json) -> None:
    """State, counts, tokens, throughput and ETA of JOB."""
    from lorabatch.producer import status as st

    ctx = context_of(click_ctx)
    summary = st.watch(ctx.sessions, job) if watch else st.read_summary(ctx.sessions, job)
    echo_json(summary) if as_json else click.echo(st.format_summary(summary))


@cli.command()
@click.argument("job")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of standard output.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "openai", "csv"]), default="jsonl", show_default=True)
@click.pass_context
def results(click_ctx, job, output, fmt) -> None:
    """Export JOB's results in the input's order."""
    from lorabatch.producer.export import write_results
    from lorabatch.store import lifecycle

    ctx = context_of(click_ctx)
    with ctx.sessions() as session:
        lifecycle.get_job(session, job)
        if output:
            tmp = Path(output).with_suffix(Path(output).suffix + ".part")
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                n = write_results(session, job, f, fmt=fmt)
            tmp.replace(output)
            click.echo(f"wrote {n} results to {output}", err=True)
        else:
            write_results(session, job, sys.stdout, fmt=fmt)


@cli.command()
@click.argument("job")
@click.pass_context
def cancel(click_ctx, job) -> None:
    """Cancel what has not run yet; what already finished is kept."""
    from lorabatch.store import lifecycle
    from lorabatch.store.db import transaction

    ctx = context_of(click_ctx)
    with transaction(ctx.sessions) as session:
        j = lifecycle.cancel_job(session, job)
        click.echo(f"job {j.id} is {j.state}: {j.n_cancelled} cancelled, {j.n_succeeded + j.n_failed} kept, "
                   f"{j.n_running} still running")


@cli.command()
@click.option("--state", type=click.Choice([s.value for s in JobState]))
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs(click_ctx, state, limit, as_json) -> None:
    """List jobs, newest first."""
    from lorabatch.producer.status import list_jobs

    rows = list_jobs(context_of(click_ctx).sessions, state=state, limit=limit)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        c = r["counts"]
        click.echo(f"{r['id']}  {r['state']:<10} {r['done']:>7}/{c['total']:<7} failed {c['failed']:<5} "
                   f"{r['created_at'][:19]}  {r['name'] or ''}")


@cli.command()
@click.option("--concurrency", type=int, help="Queue messages held at once (default: [worker] concurrency).")
@click.option("--weights", type=click.Choice(["auto", "merged", "separate"]), help="Override [worker] weights.")
@click.option("--loglevel", default="info", show_default=True)
@click.pass_context
def worker(click_ctx, concurrency, weights, loglevel) -> None:
    """Run a worker: take work from Redis, generate, write results to the database."""
    missing = [name for name in ("torch", "transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"the worker needs {', '.join(missing)}, which this install lacks; "
                         "install the worker extra: pip install 'lorabatch[worker]'")
    from lorabatch.worker.runner import run_worker

    run_worker(context_of(click_ctx).settings, concurrency=concurrency, weights=weights, loglevel=loglevel)


@cli.command()
@click.option("--check", is_flag=True, help="Validate each adapter against the base model.")
@click.pass_context
def adapters(click_ctx, check) -> None:
    """List configured adapters (and with --check, validate them)."""
    from lorabatch.cli.adapters import show_adapters

    ok = show_adapters(context_of(click_ctx).settings, check=check)
    if not ok:
        sys.exit(1)


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--demo", is_flag=True, help="Also build the demo model and its four adapters there.")
@click.option("--force", is_flag=True, help="Overwrite an existing lorabatch.toml.")
def init(directory, demo, force) -> None:
    """Write a commented lorabatch.toml into DIRECTORY."""
    from lorabatch.cli.init import write_config

    path = write_config(Path(directory), demo=demo, force=force)
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--requests", "n_requests", type=int, default=240, show_default=True)
@click.option("--max-new-tokens", type=int, default=24, show_default=True)
@click.pass_context
def demo(click_ctx, n_requests, max_new_tokens) -> None:
    """The main job from nothing: demo model, embedded Redis and SQLite, a worker, a job over all adapters."""
    from lorabatch.cli.demo import run_demo

    config = click_ctx.find_root().obj.get("config")
    run_demo(config=config, n_requests=n_requests, max_new_tokens=max_new_tokens)


@cli.command()
@click.pass_context
def reconcile(click_ctx) -> None:
    """Put back, from the database, any queued or orphaned work missing from Redis."""
    from lorabatch.store.reconcile import reconcile as do_reconcile

    ctx = context_of(click_ctx)
    report = do_reconcile(ctx.sessions, ctx.celery, lease_seconds=ctx.settings.worker.lease_seconds, everything=True)
    click.echo(f"requeued {report.orphans} orphaned and re-enqueued {report.enqueued} queued requests")


@cli.command("config")
@click.pass_context
def show_config(click_ctx) -> None:
    """Print the settings in force (passwords hidden)."""
    s = context_of(click_ctx).settings
    data = json.loads(s.model_dump_json())
    data["broker_url"] = hide_password(s.broker_url)
    data["database_url"] = hide_password(s.database_url)
    echo_json(data)


for _command in ANNOTATION_COMMANDS:  # annotate, schedule and beat live in their own module
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("LORABATCH_DEBUG"))
    try:
        cli.main(args=argv, prog_name="lorabatch", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except LorabatchError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the one place unexpected errors are turned into a message
        if debug:
            traceback.print_exc()
        click.echo(f"error: {type(e).__name__}: {hide_password(str(e)) if '://' in str(e) else e} "
                   "(run with --debug for the traceback)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
