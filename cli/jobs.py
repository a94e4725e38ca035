"""The `retry`, `jobs` and `workers` commands (registered by main.py from COMMANDS)."""

from __future__ import annotations

import click

from lorabatch.cli.common import JOB_HELP, client_of, echo_json
from lorabatch.producer.inputs import plural
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.states import JobState


@click.command(epilog=JOB_HELP)
@click.argument("job")
@click.pass_context
def retry(click_ctx, job) -> None:
    """Run JOB's failed requests again (succeeded ones are kept)."""
    handle = client_of(click_ctx).job(job)
    n = handle.retry()
    if n:
        click.echo(f"job {handle.id}: {plural(n, 'failed request')} queued again; follow with: "
                   f"lorabatch status {handle.id} --watch", err=True)
    else:
        click.echo(f"job {handle.id} has no failed requests; nothing to retry", err=True)


@click.command(epilog=JOB_HELP)
@click.argument("job")
@click.option("--adapter", help="Only this adapter (default: every adapter whose weights changed).")
@click.pass_context
def retarget(click_ctx, job, adapter) -> None:
    """Run JOB's unfinished requests on the adapters' current weights (after a retrained adapter)."""
    handle = client_of(click_ctx).job(job)
    moved = handle.retarget(adapter)
    if not moved:
        click.echo(f"job {handle.id}: {'adapter ' + repr(adapter) if adapter else 'every adapter it names'} already "
                   "runs on the current weights (or none is known); nothing to move", err=True)
        return
    for m in moved:
        click.echo(f"job {handle.id}: adapter {m['adapter']!r} moved from weights {(m['from'] or 'unpinned')[:12]} to "
                   f"{m['to'][:12]} ({plural(m['requests'], 'unfinished request')}); follow with: "
                   f"lorabatch status {handle.id} --watch", err=True)


@click.command()
@click.option("--state", type=click.Choice([s.value for s in JobState]), help="Only jobs in this state.")
@click.option("--limit", type=int, default=100, show_default=True, help="At most this many (newest first).")
@click.option("--older-than", "older_than", help="Only jobs that ended longer ago than this, e.g. 30d, 12h, 2w.")
@click.option("--delete", is_flag=True, help="With --older-than: delete those jobs and their requests.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of status objects.")
@click.pass_context
def jobs(click_ctx, state, limit, older_than, delete, as_json) -> None:
    """List jobs, newest first (or delete old ended ones)."""
    from lorabatch.producer.jobs import delete_jobs_older_than, parse_age
    from lorabatch.store.db import transaction

    client = client_of(click_ctx)
    if delete and not older_than:
        raise UsageError("--delete needs --older-than AGE (e.g. --older-than 30d); running jobs are never deleted.")
    if older_than:
        age = parse_age(older_than)
        with transaction(client.context.sessions) as session:
            ids = delete_jobs_older_than(session, age, dry_run=not delete)
        if delete:
            echo_json({"deleted": ids}) if as_json else click.echo(
                f"deleted {plural(len(ids), 'job')} that ended over {older_than} ago, with their requests", err=True)
            return
        rows = [client.job(i).status() for i in ids[:limit]]
    else:
        rows = client.jobs(state, limit=limit)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        c = r["counts"]
        click.echo(f"{r['id']}  {r['state']:<10} {r['done']:>7}/{c['total']:<7} failed {c['failed']:<5} "
                   f"{r['created_at'][:19]}  {r['name'] or ''}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: host, pid, deployment, tokens/s, ...")
@click.pass_context
def workers(click_ctx, as_json) -> None:
    """Live workers: host, pid, deployment, tokens/s, requests held, last heartbeat."""
    rows = client_of(click_ctx).workers()
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no live worker (none sent a heartbeat within [worker] lease_seconds); start one: lorabatch worker",
                   err=True)
        return
    click.echo(f"{'host':<20} {'pid':>7} {'deployment':<16} {'tokens/s':>9} {'held':>6}  last heartbeat")
    for w in rows:
        tps = f"{w['tokens_per_second']:.1f}" if w["tokens_per_second"] is not None else "-"
        held = "-" if w["requests_held"] is None else str(w["requests_held"])
        click.echo(f"{w['host'][:20]:<20} {w['pid']:>7} {str(w['deployment'] or '-')[:16]:<16} {tps:>9} {held:>6}  "
                   f"{w['last_heartbeat'][:19]} ({w['seconds_since_heartbeat']:.0f}s ago)")


COMMANDS = [retry, retarget, jobs, workers]
