"""The Celery task: thin glue between a queue message, the database and the engine.

One message names up to CHUNK_SIZE requests of one job and adapter. The task claims them
in the database, hands them to the shared engine loop (which batches them with everything
else this worker holds, across jobs), records the outcomes, and returns; only then does
Celery acknowledge the message (acks_late). Exceptions are caught here and nowhere else.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from lorabatch.schemas.tables import Request
from lorabatch.store import broker, lifecycle
from lorabatch.store.retry import with_db_retry

if TYPE_CHECKING:
    from celery import Celery

    from lorabatch.worker.runner import WorkerService

log = logging.getLogger("lorabatch.worker")
T = TypeVar("T")

class ShuttingDown(Exception):
    """The worker is stopping; requests not yet run are handed back."""



def run_chunk(service: WorkerService, job_id: str, adapter: str, idxs: list[int]) -> dict:
    """Claim, generate, record. Returns counts for Celery's log."""
    rows = _claim(service, job_id, idxs)
    if not rows:
        return {"claimed": 0}
    fresh = [r for r in rows if r.attempts == 0]
    suspects = [r for r in rows if r.attempts > 0]
    # A worker died while running the suspects: one of them may be what killed it. They run apart
    # from all other work, one group at a time across this worker's messages (suspect_lock), each
    # recorded before the next starts. First as this message's group, then, if the worker died
    # again, one by one: the last attempt a request gets is always alone, so only a culprit uses
    # up all its attempts, and a crash that hit a whole batch costs a few groups, not one pass per
    # request.
    max_attempts = service.settings.worker.max_attempts
    if any(r.attempts >= max_attempts - 1 for r in suspects):
        groups = [[r] for r in suspects]
    else:
        groups = [suspects] if suspects else []
    counts: Counter[str] = Counter()
    if fresh:
        counts.update(_generate_and_record(service, job_id, adapter, fresh, alone=False))
    for group in groups:
        with service.suspect_lock:
            counts.update(_generate_and_record(service, job_id, adapter, group, alone=True))
    return dict(counts)


def _claim(service: WorkerService, job_id: str, idxs: list[int]) -> list[Request]:
    settings = service.settings.worker
    claim = with_db_retry(
        service.sessions,
        lambda s: lifecycle.claim_requests(s, job_id=job_id, idxs=idxs, worker_id=service.worker_id,
                                           lease=timedelta(seconds=settings.lease_seconds),
                                           max_attempts=settings.max_attempts),
        what=f"claiming {job_id}",
    )
    if claim.gave_up:
        log.warning("%s: %d request(s) failed after their worker died %d times", job_id, len(claim.gave_up),
                    settings.max_attempts)
    return claim.requests


def _generate_and_record(service: WorkerService, job_id: str, adapter: str, rows: list[Request], *,
                         alone: bool) -> dict:
    from lorabatch.worker.engine.engine import GenerationRequest, SamplingParams

    requests = [
        GenerationRequest(key=(job_id, r.idx), adapter=r.adapter, prompt=r.prompt, messages=r.messages,
                          params=SamplingParams(**{**r.params, "stop": tuple(r.params.get("stop", ()))}))
        for r in rows
    ]
    try:
        results = service.generate(requests, alone=alone)
    except ShuttingDown:
        idxs = [r.idx for r in rows]
        with_db_retry(service.sessions, lambda s: lifecycle.release_requests(s, job_id=job_id, worker_id=service.worker_id,
                                                                    idxs=idxs), what="handing back work")
        broker.enqueue(service.app, job_id, adapter, idxs, priority=5)
        return {"handed_back": len(rows)}
    except Exception as e:  # an engine bug must not strand the requests as running
        log.exception("engine failed on %s", job_id)
        error = f"internal error in the engine: {type(e).__name__}: {e}"
        outcomes = [lifecycle.Outcome(idx=r.idx, output=None, finish_reason=None, prompt_tokens=0,
                                      completion_tokens=0, error=error) for r in rows]
    else:
        outcomes = [lifecycle.Outcome(idx=res.key[1], output=res.output, finish_reason=res.finish_reason,
                                      prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                                      error=res.error) for res in results]
    recorded = with_db_retry(
        service.sessions,
        lambda s: lifecycle.record_outcomes(s, job_id=job_id, worker_id=service.worker_id, outcomes=outcomes),
        what=f"recording results of {job_id}",
    )
    if recorded < len(outcomes):
        log.warning("%s: %d result(s) dropped: another worker took those requests over", job_id, len(outcomes) - recorded)
    return {"claimed": len(rows), "recorded": recorded}


def register(app: Celery, service: WorkerService) -> None:
    """Register the run task on `app`, bound to this process's service (engine, database)."""

    @app.task(name=broker.RUN_TASK, acks_late=True, reject_on_worker_lost=True)
    def run(job_id: str, adapter: str, idxs: list[int]) -> dict:
        return run_chunk(service, job_id, adapter, idxs)
