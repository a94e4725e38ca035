"""What is in flight in Redis: the references that some queue message will still deliver.

A reference (job, idx) is in flight when a message naming it
- waits in a queue list (every `lorabatch*` list: each base model's queue and its priority lists), or
- was delivered and is not acknowledged yet (kombu's `unacked` hash, delivery time in
  `unacked_index`) AND its worker is alive: a live worker reports what it holds under
  HELD_PREFIX<worker id> every heartbeat, with a time to live of HELD_TTL_BEATS heartbeats, or the
  delivery is younger than that (a message on its way to a worker's feed, before its next report).
A SIGKILLed worker's unacknowledged messages thus stop counting HELD_TTL_BEATS heartbeats after its
death, long before Redis's visibility timeout gives them out again.

It reads and writes Redis only: it does not know which requests are queued (store.lost_messages
compares with the database).
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping

from celery import Celery

from lorabatch.store import broker

HELD_PREFIX = "lorabatch:held:"
HELD_TTL_BEATS = 3
"""A held report lives this many heartbeats: a worker that stopped beating stops vouching for its messages."""
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
"""kombu's Redis transport keeps delivered, unacknowledged messages here (its defaults)."""


def held_ttl(heartbeat_seconds: float) -> float:
    return HELD_TTL_BEATS * heartbeat_seconds


def report_held(app: Celery, worker_id: str, refs: Mapping[str, Iterable[int]], *, heartbeat_seconds: float) -> None:
    """Say, for the next HELD_TTL_BEATS heartbeats, which references this worker holds (its feed's messages)."""
    body = json.dumps({job_id: sorted(set(idxs)) for job_id, idxs in refs.items()})
    broker.redis_client(app).set(HELD_PREFIX + worker_id, body, px=max(1, int(held_ttl(heartbeat_seconds) * 1000)))


def in_flight(app: Celery, *, heartbeat_seconds: float) -> dict[str, set[int]]:
    """{job_id: idxs} of every reference in flight (see the module's docstring). Raises on Redis errors."""
    client = broker.redis_client(app)
    refs: dict[str, set[int]] = defaultdict(set)
    for key in client.scan_iter(match=broker.QUEUE + "*", count=1000):
        kind = client.type(key)
        if kind == b"list":
            for start in range(0, client.llen(key), 1000):  # pages: a queue may hold tens of thousands
                for raw in client.lrange(key, start, start + 999):
                    _add(refs, raw)
        elif kind == b"string" and key.startswith(HELD_PREFIX.encode()):
            raw = client.get(key)
            for job_id, idxs in (json.loads(raw) if raw else {}).items():
                refs[job_id].update(idxs)
    young = time.time() - held_ttl(heartbeat_seconds)
    delivered = dict(client.zrange(UNACKED_INDEX, 0, -1, withscores=True))
    for tag, raw in client.hgetall(UNACKED).items():
        if delivered.get(tag, 0.0) >= young:  # on its way to a feed: its worker's report may not name it yet
            _add(refs, json.loads(raw)[0])
    return refs


def _add(refs: dict[str, set[int]], message) -> None:
    """The references of one kombu message (a raw JSON envelope or an already parsed one)."""
    try:
        if isinstance(message, (bytes, str)):
            message = json.loads(message)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        refs[args[0]].update(args[2])
    except (ValueError, KeyError, IndexError, TypeError):
        pass  # not one of lorabatch's run messages
