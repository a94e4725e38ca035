"""Job counters from SQL as Prometheus metrics (`lorabatch metrics --serve PORT`).

Each scrape reads the counts the job rows keep (no request is counted row by row), so a dashboard
shows queue depth per job and priority without touching Redis. The names:

| name | type | labels | meaning |
|---|---|---|---|
| lorabatch_jobs | gauge | state | jobs per state (queued, running, cancelling, completed, cancelled) |
| lorabatch_job_requests | gauge | job, name, priority, state | requests per state of each unfinished job |
| lorabatch_queue_depth | gauge | priority | queued requests of unfinished jobs, per priority |
| lorabatch_workers_alive | gauge | | workers whose heartbeat is younger than [worker] lease_seconds |
| lorabatch_sql_up | gauge | | 1 if the last scrape read the database, else 0 (the other metrics are then absent) |
"""

from __future__ import annotations

import logging
from datetime import timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from lorabatch.schemas.states import JobState, RequestState
from lorabatch.schemas.tables import Job, Worker, utcnow
from lorabatch.store.context import Context

log = logging.getLogger("lorabatch.metrics")
UNFINISHED = [s.value for s in JobState if not s.is_final]


class JobCollector(Collector):
    """Reads the job table at every scrape."""

    def __init__(self, context: Context):
        self.context = context

    def collect(self):  # noqa: ANN201
        up = GaugeMetricFamily("lorabatch_sql_up", "1 if the last scrape read the database.")
        try:
            families = self._read()
        except SQLAlchemyError as e:
            log.warning("metrics: cannot read the database (%s)", type(e).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list:
        lease = timedelta(seconds=self.context.settings.worker.lease_seconds)
        with self.context.sessions() as session:
            by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            active = session.scalars(select(Job).where(Job.state.in_(UNFINISHED))).all()
            alive = session.scalar(select(func.count()).select_from(Worker)
                                   .where(Worker.heartbeat_at >= utcnow() - lease))
        jobs = GaugeMetricFamily("lorabatch_jobs", "Jobs per state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], by_state.get(state.value, 0))
        requests = GaugeMetricFamily("lorabatch_job_requests", "Requests per state of each unfinished job.",
                                     labels=["job", "name", "priority", "state"])
        depth = GaugeMetricFamily("lorabatch_queue_depth", "Queued requests of unfinished jobs, per priority.",
                                  labels=["priority"])
        per_priority: dict[int, int] = {}
        for job in active:
            for state in RequestState:
                requests.add_metric([job.id, job.name or "", str(job.priority), state.value],
                                    getattr(job, f"n_{state.value}") or 0)
            per_priority[job.priority] = per_priority.get(job.priority, 0) + (job.n_queued or 0)
        for priority in sorted(per_priority):
            depth.add_metric([str(priority)], per_priority[priority])
        workers = GaugeMetricFamily("lorabatch_workers_alive", "Workers with a recent heartbeat.")
        workers.add_metric([], alive or 0)
        return [jobs, requests, depth, workers]


def job_registry(context: Context) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(JobCollector(context))
    return registry
