"""`lorabatch retarget JOB [--adapter NAME]`: move a job's unfinished requests onto an adapter's current weights.

A job runs each adapter it names on the weights it was pinned to (their sha256); when the adapter was
retrained under the same name, its requests wait rather than run on other weights silently, and
`status` names this command. The current weights are what the live workers of the job's base model
serve under that name (they must agree), else the adapter's files here. The move is
lifecycle.retarget_job (pin changed, recorded on the job with the old and new sha256 and the time,
the adapter unparked, its queued requests' messages owed, one transaction); the messages are
published after the commit. If this process dies in between, the outbox row stays and a worker's
reconcile round publishes it.

It knows nothing about how weights are loaded: it compares sha256s that workers and files report.
"""

from __future__ import annotations

from datetime import timedelta

from lorabatch.producer.jobs import find_job
from lorabatch.schemas.errors import UsageError
from lorabatch.schemas.identity import adapter_sha256
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.schemas.states import JobState
from lorabatch.store import broker, lifecycle, outbox
from lorabatch.store.context import Context
from lorabatch.store.db import transaction
from lorabatch.store.reconcile import publish_owed


def retarget(ctx: Context, job_ref: str, *, adapter: str | None = None) -> tuple[str, list[lifecycle.Retarget]]:
    """Move the job's requests of `adapter` (None: of every adapter whose weights changed and whose
    current weights are known) onto the current weights. Returns (job id, what moved)."""
    lease = timedelta(seconds=ctx.settings.worker.lease_seconds)
    with ctx.sessions() as session:
        job = find_job(session, job_ref)
        if JobState(job.state).is_final:
            raise UsageError(f"job {job.id} is {job.state}: nothing left to move; a completed job's failed "
                             f"requests run again with: lorabatch retry {job.id}")
        named = sorted(set(job.adapter_pins or {}) | set(lifecycle.adapters_named(session, job.id)) - {BASE_ADAPTER})
        workers = [w for w in lifecycle.live_workers(session, lease=lease)
                   if job.deployment is None or w.deployment == job.deployment]
        job_id, pins = job.id, dict(job.adapter_pins or {})
    if adapter is not None and adapter not in named:
        raise UsageError(f"job {job_id} names no adapter {adapter!r} (it names: {', '.join(named) or 'none'}); "
                         "give one of those to --adapter.")
    targets = {}
    for name in [adapter] if adapter else named:
        current = _current_weights(ctx, name, workers, explicit=adapter is not None)
        if current is not None and current != pins.get(name):
            targets[name] = current
    if not targets:
        return job_id, []
    broker.check_broker(ctx.celery)
    with transaction(ctx.sessions) as session:
        moved = lifecycle.retarget_job(session, job_id, targets)
        owed = outbox.owed_ids(session)
    if owed:
        publish_owed(ctx.sessions, ctx.celery, ids=owed)
    return job_id, moved


def _current_weights(ctx: Context, name: str, workers: list, *, explicit: bool) -> str | None:
    """The sha256 live workers serve under `name` (they must agree), else that of the files here.
    None when neither says (an error when the adapter was asked for by name)."""
    served = {(w.adapters or {}).get(name) for w in workers} - {None}
    if len(served) > 1:
        raise UsageError(f"live workers serve different weights under adapter {name!r} "
                         f"({', '.join(sorted(s[:12] for s in served))}); restart them with one version, then retarget.")
    if served:
        return served.pop()
    local = adapter_sha256(ctx.settings.adapter_dir(name)) if name in ctx.settings.adapters else None
    if local is None and explicit:
        raise UsageError(f"no live worker of this job's base model serves adapter {name!r} and its files are not "
                         "here; start a worker that lists it under [adapters], then run this again.")
    return local
