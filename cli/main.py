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
from lorabatch.cli.common import JOB_HELP, client_of, context_of, echo_json
from lorabatch.cli.db import db_group
from lorabatch.cli.jobs import COMMANDS as JOB_COMMANDS
from lorabatch.cli.metrics import metrics_command
from lorabatch.cli.run import run as run_command
from lorabatch.cli.stop import stop_command
from lorabatch.producer.inputs import no_config_message, plural
from lorabatch.schemas.errors import LorabatchError, UsageError
from lorabatch.schemas.settings import hide_password


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
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
@click.option("--idempotency-key", help="Submitting again with the same key returns the first job "
                                        "(an error if the requests differ).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: id, total, created.")
@click.pass_context
def submit(click_ctx, file, adapter, name, priority, idempotency_key, as_json) -> None:
    """Validate FILE (a path or -), create a job, enqueue it and print its id."""
    job = client_of(click_ctx).submit(file, adapter=adapter, name=name, priority=priority,
                                      idempotency_key=idempotency_key)
    result = job.submitted
    if as_json:
        echo_json({"id": job.id, "total": result.total, "created": result.created})
    else:
        click.echo(job.id)
        note = "submitted" if result.created else "already submitted with this idempotency key"
        click.echo(f"{plural(result.total, 'request')} {note}; follow with: lorabatch status {job.id} --watch", err=True)


@cli.command(epilog=JOB_HELP)
@click.argument("job")
@click.option("--watch", is_flag=True, help="Show a live progress bar until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: id, state, counts, tokens, workers.")
@click.pass_context
def status(click_ctx, job, watch, as_json) -> None:
    """State, counts, tokens, throughput, ETA and live workers of JOB."""
    from lorabatch.producer import status as st

    client = client_of(click_ctx)
    handle = client.job(job)
    if watch:
        summary = st.watch(client.context.sessions, handle.id, lease_seconds=client.settings.worker.lease_seconds)
    else:
        summary = handle.status()
    echo_json(summary) if as_json else click.echo(st.format_summary(summary))


@cli.command(epilog=JOB_HELP)
@click.argument("job")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of standard output.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "openai", "csv"]), default="jsonl", show_default=True)
@click.option("--errors", "errors_path", type=click.Path(dir_okay=False),
              help="openai format: the file for failed and cancelled requests "
                   "(default: OUTPUT.errors.jsonl, or JOB.errors.jsonl with standard output); written only if any.")
@click.option("--partial", is_flag=True, help="Export a job that has not ended: what is done, the rest as not done.")
@click.option("--wait", is_flag=True, help="Wait for the job to end first (a progress bar on stderr).")
@click.pass_context
def results(click_ctx, job, output, fmt, errors_path, partial, wait) -> None:
    """Export JOB's results in the input's order.

    An unfinished job is an error (exit 1, how many are not done on stderr) unless --partial or --wait.
    """
    from lorabatch.producer import status as st

    client = client_of(click_ctx)
    handle = client.job(job)
    if wait:
        st.watch(client.context.sessions, handle.id, lease_seconds=client.settings.worker.lease_seconds)
    summary = handle.status() if partial else handle.check_finished()
    c = summary["counts"]
    if c["queued"] + c["running"]:
        click.echo(f"job {handle.id} is {summary['state']}: {c['queued'] + c['running']} of {c['total']} requests "
                   "are not done yet (exported with their current status)", err=True)
    written, error_file = handle.export(output, fmt=fmt, errors=errors_path, partial=True)
    if output:
        click.echo(f"wrote {plural(written.results, 'result')} to {output}", err=True)
    if error_file:
        click.echo(f"wrote {plural(written.errors, 'failed or cancelled request')} to {error_file}", err=True)


@cli.command(epilog=JOB_HELP)
@click.argument("job")
@click.pass_context
def cancel(click_ctx, job) -> None:
    """Cancel what has not run yet; what already finished is kept."""
    s = client_of(click_ctx).job(job).cancel()
    c = s["counts"]
    click.echo(f"job {s['id']} is {s['state']}: {c['cancelled']} cancelled, {c['succeeded'] + c['failed']} kept, "
               f"{c['running']} still running")


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
    settings = context_of(click_ctx).settings
    if settings.config_path is None:  # else it would serve the default hub model with no adapter
        raise UsageError(no_config_message(missing="no model or adapter is configured"))
    from lorabatch.worker.runner import run_worker

    run_worker(settings, concurrency=concurrency, weights=weights, loglevel=loglevel)


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
    w = ctx.settings.worker
    report = do_reconcile(ctx.sessions, ctx.celery, lease_seconds=w.lease_seconds, max_attempts=w.max_attempts,
                          everything=True)
    click.echo(f"requeued {plural(report.orphans, 'orphaned request')}; published "
               f"{plural(report.published, 'message')} for every queued request")


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (every field) instead of TOML.")
@click.pass_context
def show_config(click_ctx, as_json) -> None:
    """Print the settings in force as a lorabatch.toml that loads back (passwords hidden)."""
    s = context_of(click_ctx).settings
    if not as_json:
        from lorabatch.cli.show_config import settings_toml

        click.echo(settings_toml(s), nl=False)
        return
    data = json.loads(s.model_dump_json())
    data["broker_url"] = hide_password(s.broker_url)
    data["database_url"] = hide_password(s.database_url)
    click.echo(json.dumps(data, indent=2))


for _command in [*JOB_COMMANDS, *ANNOTATION_COMMANDS]:  # commands that live in their own modules
    cli.add_command(_command)
cli.add_command(run_command)
cli.add_command(db_group)
cli.add_command(metrics_command)
cli.add_command(stop_command)
for _command in cli.commands.values():  # the command list shows whole first lines, never "..." cut ones
    if _command.short_help is None and _command.help:
        _command.short_help = _command.help.strip().split("\n\n")[0].replace("\n", " ")


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
