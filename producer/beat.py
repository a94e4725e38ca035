"""`lorabatch beat`: Celery beat driven by the schedules in the database.

Celery's own beat keeps its schedule in a local file and sends a task when an entry is due.
Here the schedule is the `lb_schedules` table, read again on every tick (adding or removing
a schedule needs no restart), and firing a schedule is a producer's job done in this process:
claim the slot, read the dataset, submit a job for the rows not answered before. The beat
also writes the output files of runs whose jobs have ended. Several beats may run: each slot
is claimed by exactly one (see schedules.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import datetime

from celery.beat import Scheduler

from lorabatch.producer import schedules
from lorabatch.producer.annotation import annotation_sessions
from lorabatch.schemas.settings import hide_password
from lorabatch.schemas.tables import utcnow
from lorabatch.store.context import Context
from lorabatch.store.db import database_url

log = logging.getLogger("lorabatch.beat")

DEFAULT_INTERVAL = 10.0
"""Most seconds between ticks: how soon a new schedule or a finished job is noticed."""
MIN_SLEEP = 0.05


class DatabaseScheduler(Scheduler):
    """A Celery beat scheduler whose entries are the rows of `lb_schedules`.

    `now` returns naive UTC; tests pass a fake clock.
    """

    def __init__(self, *args, context: Context, now: Callable[[], datetime] = utcnow, **kwargs):
        # Set before Scheduler.__init__, which may call setup_schedule.
        self.context = context
        self.now = now
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        """No local schedule file and no default entries: the database holds the schedule."""

    def tick(self, *args, **kwargs) -> float:
        """Fire what is due, write what finished; return how long to sleep."""
        try:
            wait = schedules.beat_tick(self.context, now=self.now())
        except Exception:  # never let one bad tick stop the beat
            log.exception("beat tick failed")
            wait = None
        return max(MIN_SLEEP, min(wait if wait is not None else self.max_interval, self.max_interval))

    @property
    def info(self) -> str:
        return f"    . schedules -> lb_schedules in {hide_password(database_url(self.context.settings))}"


def run_beat(ctx: Context, *, interval: float = DEFAULT_INTERVAL, loglevel: str = "info",
             now: Callable[[], datetime] = utcnow) -> None:
    """Run beat in the foreground until SIGTERM or Ctrl-C."""
    schedules.check_cron("* * * * *")  # fail now, with the install hint, if croniter is missing
    annotation_sessions(ctx)  # create the tables before the first tick
    app = ctx.celery
    scheduler = functools.partial(DatabaseScheduler, context=ctx, now=now)
    app.Beat(max_interval=interval, scheduler=scheduler, loglevel=loglevel.upper(), remote_control=False).run()
