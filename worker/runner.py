"""`lorabatch worker`: load the engine once, then run a Celery worker (threads pool) feeding it.

Each Celery thread holds one message; the engine loop (worker.service) admits their requests into
its running batch. The number of threads bounds what a worker holds beyond what it runs: about two
batches (`held_messages`), so that other workers and cancel can reach the rest.
"""

from __future__ import annotations

import logging
import math
import socket

from celery.signals import worker_shutting_down

from lorabatch.schemas.settings import Settings
from lorabatch.store import broker
from lorabatch.store.context import Context
from lorabatch.worker import tasks
from lorabatch.worker.service import EngineFailed, WorkerService

log = logging.getLogger("lorabatch.worker")


def held_messages(settings: Settings) -> int:
    """Messages a worker holds at once: [worker] concurrency, or enough for two batches."""
    w = settings.worker
    return w.concurrency or max(2, math.ceil(2 * w.max_batch_size / broker.CHUNK_SIZE))


def run_worker(settings: Settings, *, concurrency: int | None = None, weights: str | None = None,
               loglevel: str = "info", engine=None) -> None:
    """Load the engine once, then consume until stopped (SIGTERM: hand back, finish briefly, exit).
    Raises EngineFailed (exit 1) when the engine broke: everything it held went back to the queue."""
    if weights:
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"weights": weights})})
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = _metrics(settings)
    context = Context(settings)
    context.engine  # the database and its schema first: refused in a second, not after loading a model
    if engine is None and settings.worker.engine == "instant":
        from lorabatch.worker.engine.instant import InstantEngine

        batch = settings.worker.max_batch_size
        engine = InstantEngine(max_batch_size=32 if batch == "auto" else batch,
                               step_seconds=settings.worker.instant_step_seconds)
    elif engine is None:
        from lorabatch.worker.engine.engine import Engine

        engine = Engine.from_settings(settings)
    # "auto" batch sizes as the engine resolved them, before anything else reads them (service, metrics, claims).
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={
        "max_batch_size": engine.max_batch_size, "max_batch_tokens": getattr(engine, "max_batch_tokens", 16384)})})
    adapters = getattr(engine, "adapters", None)  # the instant engine has none
    if adapters is not None:
        _check_adapters(adapters)
        if metrics is not None:
            adapters.on_event = metrics.adapter_event
    service = WorkerService(settings, engine, context=context, metrics=metrics)
    tasks.register(service.app, service)
    worker_shutting_down.connect(lambda **_: service.stop(), weak=False)
    service.start()
    log.info("worker %s ready: model %s (key %s), %d adapter(s) configured, weights=%s", service.worker_id,
             settings.model.base, service.deployment.id, len(settings.adapters), settings.worker.weights)
    try:
        service.app.Worker(
            pool="threads",
            concurrency=concurrency or held_messages(settings),
            # its base model's queue, and the common one of jobs whose base model is not pinned yet
            queues=[broker.queue_name(service.deployment.id), broker.QUEUE],
            loglevel=loglevel.upper(),
            hostname=f"{service.worker_id}@{socket.gethostname()}",
            without_mingle=True,
            without_gossip=True,
            optimization="fair",
        ).start()
    finally:
        service.close()
    if service.failure is not None:
        raise EngineFailed(f"the engine failed ({type(service.failure).__name__}: {service.failure}); its work "
                           "went back to the queue; restart the worker (see its log)")


def _check_adapters(adapters) -> None:
    """Say at start which configured adapters cannot be used (their requests will fail with the reason)."""
    from lorabatch.schemas.errors import AdapterError

    for name in sorted(adapters.configured()):
        try:
            adapters.spec(name)
        except AdapterError as e:
            log.warning("adapter %r cannot be used: %s", name, e)


def _metrics(settings: Settings):
    """Prometheus metrics when [worker] metrics_port is set; None (nothing recorded) otherwise."""
    if not settings.worker.metrics_port:
        return None
    from lorabatch.worker.metrics import from_settings

    return from_settings(settings)
