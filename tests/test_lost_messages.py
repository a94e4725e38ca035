"""The lost-message sweep's read (store.lost_messages.unmessaged) against a real Redis and database: it names
exactly the queued requests that no message in flight covers and nothing owes, over fragmented states,
parked adapters and many pages."""

from __future__ import annotations

import random

from sqlalchemy import update

from lorabatch.schemas.states import RequestState
from lorabatch.schemas.tables import Job, Request
from lorabatch.store import broker, inflight, lost_messages, outbox
from lorabatch.store.db import transaction
from tests.test_queue import lines, submit


def test_the_sweep_names_exactly_the_queued_requests_nothing_covers(config_path, tmp_path, ctx, monkeypatch):
    monkeypatch.setattr(lost_messages, "WINDOW", 16)  # many windows over a small job
    n = 300
    job_id = submit(config_path, tmp_path / "a.jsonl", lines(n, adapters=("sft", "dpo", "base")))
    other = submit(config_path, tmp_path / "b.jsonl", lines(40))
    client = broker.redis_client(ctx.celery)
    assert lost_messages.unmessaged(ctx.sessions, ctx.celery, heartbeat_seconds=60) == {}, "the submit's messages cover all"
    for key in [k for k in client.scan_iter(match="lorabatch*") if client.type(k) == b"list"]:
        client.delete(key)  # every queue list lost: nothing in flight any more

    rnd = random.Random(5)
    state = {i: RequestState.QUEUED for i in range(n)}
    for start in sorted(rnd.sample(range(n), 30)):  # runs of other states: the queued ones come in fragments
        for i in range(start, min(n, start + rnd.randint(1, 12))):
            state[i] = rnd.choice([RequestState.RUNNING, RequestState.SUCCEEDED, RequestState.FAILED])
    with transaction(ctx.sessions) as s:
        for kind in {*state.values()} - {RequestState.QUEUED}:
            idxs = [i for i, st in state.items() if st is kind]
            s.execute(update(Request).where(Request.job_id == job_id, Request.idx.in_(idxs)).values(state=kind.value))
        s.execute(update(Job).where(Job.id == job_id).values(parked=["dpo"]))  # dpo waits for its weights
    queued = [i for i, st in state.items() if st is RequestState.QUEUED]
    held = set(rnd.sample(queued, 40))
    inflight.report_held(ctx.celery, "a-live-worker", {job_id: held}, heartbeat_seconds=60)
    owed = set(rnd.sample(sorted(set(queued) - held), 25))
    with transaction(ctx.sessions) as s:
        outbox.owe_messages(s, job_id, sorted(owed))
        outbox.owe_messages(s, other, None)  # all of the other job's: nothing of it is missing

    adapters = ("sft", "dpo", "base")
    expected = {i for i in queued if adapters[i % 3] != "dpo"} - held - owed
    assert expected and len(expected) < len(queued) - 60  # the case is not degenerate
    assert lost_messages.unmessaged(ctx.sessions, ctx.celery, heartbeat_seconds=60) == {job_id: expected}
