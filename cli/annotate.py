"""The `annotate`, `schedule` and `beat` commands (registered by cli.py from COMMANDS)."""

from __future__ import annotations

import json

import click

from lorabatch.cli.common import client_of, context_of
from lorabatch.schemas.errors import LorabatchError

ANNOTATE_HELP_TEMPLATE = ("Prompt text with {field} placeholders (a column's name), a .txt file holding it, or a "
                          ".json file with \"prompt\" or \"messages\" plus generation parameters.")


def _annotation_options(fn):
    """The options `annotate` and `schedule add` share."""
    options = [
        click.option("--template", "-t", required=True, help=ANNOTATE_HELP_TEMPLATE),
        click.option("--adapter", required=True, help="Adapter to annotate with ('base' for the base model)."),
        click.option("--output", "-o", help="Output file (one input file) or folder (several, or a glob). "
                                            "Default: <stem>.annotated.<ext> beside each input."),
        click.option("--column", default="annotation", show_default=True,
                     help="Column for the answers; <column>_status and <column>_error are added too."),
        click.option("--max-new-tokens", type=int, help="Overrides the template's."),
        click.option("--temperature", type=float, help="Overrides the template's (0: greedy, the default)."),
        click.option("--seed", type=int, help="Overrides the template's."),
        click.option("--priority", type=int, default=5, show_default=True, help="0 (lowest) to 9 (highest)."),
        click.option("--name", "job_name", help="A name for the jobs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _spec(ctx, datasets, *, template, adapter, output, column, max_new_tokens, temperature, seed, priority, job_name,
          absolute=False):
    from lorabatch.producer.annotation import build_spec

    return build_spec(ctx.settings, datasets, template=template, adapter=adapter, column=column, output=output,
                      priority=priority, name=job_name, absolute=absolute,
                      overrides={"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed})


def _echo_json(data) -> None:
    click.echo(json.dumps(data, default=str))


@click.command()
@click.argument("dataset", nargs=-1, required=True)
@_annotation_options
@click.option("--no-wait", is_flag=True, help="Submit and return; `lorabatch beat` (or the same command run again) "
                                              "writes the output once the job ends.")
@click.option("--fresh", is_flag=True, help="Ask again for every row, ignoring earlier answers "
                                            "(after retraining an adapter under the same name).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: run, job, outputs, counts.")
@click.pass_context
def annotate(click_ctx, dataset, no_wait, fresh, as_json, **options) -> None:
    """Annotate DATASET (JSONL, CSV or Parquet files, or quoted globs) with an adapter.

    Writes the same rows, in the same order, plus the answer column and its _status and _error
    columns, in the input's format. Rows answered before with the same template, adapter and
    parameters reuse their answer; only the others go to the workers.
    """
    from lorabatch.producer.status import watch

    client = client_of(click_ctx)
    o = options

    def submitted(info: dict) -> None:
        note = f"{info['rows']} rows: {info['to_submit']} distinct requests to answer, {info['reused']} answered before"
        note += f", {info['invalid']} invalid" if info["invalid"] else ""
        note += f", waiting on job(s) {', '.join(info['waits_on'])}" if info["waits_on"] else ""
        click.echo(f"{('job ' + info['job']) if info['job'] else 'no job needed'}: {note}", err=True)
        if no_wait or not info["jobs"]:
            return
        if not client.workers():
            click.echo("warning: no worker is running (none sent a heartbeat lately); the job waits in the queue "
                       "until you start one: lorabatch worker", err=True)
        if info["job"]:
            watch(client.context.sessions, info["job"], lease_seconds=client.settings.worker.lease_seconds)

    try:
        res = client.annotate(list(dataset), template=o["template"], adapter=o["adapter"], output=o["output"],
                              column=o["column"], priority=o["priority"], name=o["job_name"], fresh=fresh,
                              wait=not no_wait, on_submitted=submitted, max_new_tokens=o["max_new_tokens"],
                              temperature=o["temperature"], seed=o["seed"])
    except KeyboardInterrupt:
        click.echo("stopped waiting; the job goes on. Run the same command again to collect its answers.", err=True)
        raise
    if res["outputs"] is None:
        if as_json:
            _echo_json({"run": res["run"], "job": res["job"], "waits_on": res["waits_on"], "outputs": None})
        else:
            click.echo(res["job"] or res["run"])
            click.echo("`lorabatch beat`, if running, writes the output when the job ends; "
                       "or run the same command again later.", err=True)
        return
    counts = ", ".join(f"{k} {v}" for k, v in res["counts"].items() if v) or "no rows"
    if as_json:
        _echo_json({k: res[k] for k in ("run", "job", "waits_on", "outputs", "counts")})
    else:
        for path in res["outputs"]:
            click.echo(path)
        click.echo(f"wrote {len(res['outputs'])} file(s): {counts}", err=True)
    if res["counts"].get("cancelled"):
        raise LorabatchError(f"{res['counts']['cancelled']} row(s) were cancelled and have no answer; "
                             "run the same command again to annotate them.")


@click.group()
def schedule() -> None:
    """Annotate datasets on a cron schedule (fired by `lorabatch beat`)."""


@schedule.command("add")
@click.argument("name")
@click.argument("dataset", nargs=-1, required=True)
@click.option("--cron", required=True, help="Five-field cron expression, e.g. \"0 2 * * *\" (02:00 every day).")
@click.option("--timezone", "tz", default="UTC", show_default=True, help="Zone the cron expression is read in.")
@_annotation_options
@click.option("--replace", is_flag=True, help="Replace a schedule of the same name.")
@click.pass_context
def schedule_add(click_ctx, name, dataset, cron, tz, replace, **options) -> None:
    """Add schedule NAME annotating DATASET (paths or quoted globs, expanded at each run).

    The template is read now and stored with the schedule; add it again with --replace to change it.
    """
    from lorabatch.producer import schedules
    from lorabatch.producer.annotation import resolve_datasets

    ctx = context_of(click_ctx)
    schedules.check_cron(cron, tz)
    spec, outside = schedules.project_relative(ctx.settings, _spec(ctx, dataset, absolute=True, **options))
    sch = schedules.add_schedule(ctx, name, cron=cron, tz=tz, spec=spec, replace=replace)
    if outside:
        paths, verb = ", ".join(outside), "is" if len(outside) == 1 else "are"
        why = (f"{paths} {verb} outside the project folder {ctx.settings.config_path.parent}, so stored absolute"
               if ctx.settings.config_path else f"no lorabatch.toml here, so {paths} {verb} stored absolute")
        click.echo(f"warning: {why}: `lorabatch beat` must see the same path; keep datasets inside the project "
                   "folder (in Docker Compose: deploy/data) to store them relative to it", err=True)
    try:
        checked = schedules.resolved_spec(ctx.settings, spec.to_dict())
        resolve_datasets(checked.datasets, output=checked.output)
    except LorabatchError as e:
        click.echo(f"warning: {e} (the schedule is saved; each run reads what matches then)", err=True)
    if len(dataset) > 1:
        click.echo("note: DATASET named several paths; quote a glob ('data/*.jsonl') so new files are picked up.",
                   err=True)
    from lorabatch.schemas.tables import utcnow

    nxt = schedules.next_slot(sch.cron, sch.timezone, utcnow())
    click.echo(f"schedule {name} saved; next run {nxt:%Y-%m-%d %H:%M} UTC (needs `lorabatch beat` running)")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: name, cron, next and latest run.")
@click.pass_context
def schedule_list(click_ctx, as_json) -> None:
    """List schedules with their next run and latest run."""
    from lorabatch.producer import schedules

    rows = schedules.list_schedules(context_of(click_ctx))
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        last = r["last_run"]
        state = "disabled" if not r["enabled"] else f"next {r['next_at'][:16]}"
        last_text = "never ran"
        if last:
            job = f"job {last['job']} {last['job_state']}" if last["job"] else "no job needed"
            done = "error: " + last["error"] if last["error"] else \
                ("written " + last["written_at"][:16] if last["written_at"] else "not written yet")
            last_text = f"last run {last['id']} ({job}, {done})"
        click.echo(f"{r['name']}  {r['cron']!r} {r['timezone']}  {state}  {r['adapter']}  "
                   f"{' '.join(r['datasets'])}  {last_text}")


@schedule.command("remove")
@click.argument("name")
@click.pass_context
def schedule_remove(click_ctx, name) -> None:
    """Remove schedule NAME (its past jobs stay)."""
    from lorabatch.producer import schedules

    schedules.remove_schedule(context_of(click_ctx), name)
    click.echo(f"schedule {name} removed")


@schedule.command("enable")
@click.argument("name")
@click.pass_context
def schedule_enable(click_ctx, name) -> None:
    """Resume schedule NAME (slots that passed while it was disabled do not fire)."""
    from lorabatch.producer import schedules

    ctx = context_of(click_ctx)
    schedules.set_enabled(ctx, name, enabled=True)
    click.echo(f"schedule {name} enabled")


@schedule.command("disable")
@click.argument("name")
@click.pass_context
def schedule_disable(click_ctx, name) -> None:
    """Pause schedule NAME."""
    from lorabatch.producer import schedules

    schedules.set_enabled(context_of(click_ctx), name, enabled=False)
    click.echo(f"schedule {name} disabled")


@schedule.command("run-now")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait for the job and write the output here, instead of leaving it to beat.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: run, job, outputs.")
@click.pass_context
def schedule_run_now(click_ctx, name, wait, as_json) -> None:
    """Run schedule NAME now, as a firing would (its next slot is unchanged)."""
    from lorabatch.producer import annotation as an
    from lorabatch.producer import schedules

    ctx = context_of(click_ctx)
    run_id, plan = schedules.run_now(ctx, name)
    run = an.get_run(ctx, run_id)
    outputs = None
    if wait:
        an.wait_for_jobs(ctx, an.run_jobs(run))
        outputs = [str(p) for p in an.write_run(ctx, run_id, rendered=plan.rendered).outputs]
    if as_json:
        _echo_json({"run": run_id, "job": run.job_id, "waits_on": run.waits_on, "outputs": outputs})
        return
    click.echo(run.job_id or run_id)
    if outputs:
        click.echo(f"wrote {', '.join(outputs)}", err=True)
    else:
        click.echo("`lorabatch beat` writes the output when the job ends.", err=True)


@click.command()
@click.option("--interval", type=float, default=10.0, show_default=True,
              help="Most seconds between checks for due schedules and finished runs.")
@click.option("--loglevel", default="info", show_default=True)
@click.pass_context
def beat(click_ctx, interval, loglevel) -> None:
    """Run Celery beat from the schedules in the database (one or more; each slot fires once)."""
    from lorabatch.producer.beat import run_beat

    if interval <= 0:
        from lorabatch.schemas.errors import UsageError

        raise UsageError(f"--interval {interval} must be above 0; give seconds, e.g. 10.")
    run_beat(context_of(click_ctx), interval=interval, loglevel=loglevel)


COMMANDS = [annotate, schedule, beat]
