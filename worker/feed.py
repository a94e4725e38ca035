"""The references a worker holds: queue messages received but not yet fully admitted into its batch.

A Celery thread hands its message in (`hold`) and waits; the engine loop takes references from here
when its batch has room (`take`), claims them in the database at that moment, and tells the feed
which it is done with (`settle`). A message is acknowledged, its thread returning, once every one of
its references was claimed or found unclaimable (cancelled, run elsewhere, a duplicate). So a worker
holds unclaimed only what its few Celery threads hold (about two batches): the rest of a job stays in
Redis for other workers, and cancel reaches everything held here (it is still `queued` in SQL).

Failure windows:
- the worker dies holding messages: they were not acknowledged, so Redis gives them to another
  worker after the visibility timeout; their requests are still queued in SQL;
- the worker dies after claiming, before the message is acknowledged: the claimed requests run
  under a dead worker and come back through reconcile; the message comes back too, and its claims
  find nothing queued (harmless duplicate).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


MIN_KEPT = 16
"""References a trimmed message keeps: an ordinary message's size (store.broker.CHUNK_SIZE)."""


@dataclass(eq=False)
class Message:
    """One queue message: references to requests of one job and adapter."""

    job_id: str
    adapter: str
    idxs: list[int]
    suspect: int = 0
    """0: ordinary; 1: requests whose worker died running them (admitted as a group, apart from other
    work); 2: a last attempt (admitted alone)."""
    pending: list[int] = field(default_factory=list)
    """References not taken yet."""
    taken: int = 0
    """References taken and not yet settled (being claimed)."""
    closing: bool = False
    """Being handed back (shutdown): nothing more is taken from it."""
    requeue: bool = False
    """Set when the message must go back to Redis as it is (rejected, not acknowledged)."""
    done: threading.Event = field(default_factory=threading.Event)


class Feed:
    """Thread-safe: Celery threads hold, the engine loop takes and settles, shutdown hands back."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._messages: list[Message] = []
        self._closed = False

    def hold(self, message: Message) -> bool:
        """Take a message in; False once the feed was given back (shutdown): the caller deals with it."""
        message.pending = list(message.idxs)
        with self._lock:
            if self._closed:
                return False
            self._messages.append(message)
            self._lock.notify_all()
            return True

    def wait_for_work(self, timeout: float) -> bool:
        """Block until some reference can be taken (True) or `timeout` passes (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: any(self._open(m) for m in self._messages), timeout)

    def held(self) -> int:
        """References held and not yet claimed."""
        with self._lock:
            return sum(len(m.pending) + m.taken for m in self._messages)

    def waiting(self) -> Counter[str]:
        """Pending ordinary references per adapter (what the engine may admit)."""
        counts: Counter[str] = Counter()
        with self._lock:
            for m in self._messages:
                if self._open(m) and not m.suspect:
                    counts[m.adapter] += len(m.pending)
        return counts

    def next_suspect(self) -> Message | None:
        """The oldest message of suspects still pending, if any: it runs before anything new is admitted."""
        with self._lock:
            return next((m for m in self._messages if self._open(m) and m.suspect), None)

    def take(self, plan: dict[str, int]) -> list[tuple[Message, int]]:
        """Up to plan[adapter] ordinary references per adapter, oldest messages first."""
        out: list[tuple[Message, int]] = []
        with self._lock:
            left = dict(plan)
            for m in self._messages:
                n = min(left.get(m.adapter, 0), len(m.pending)) if self._open(m) and not m.suspect else 0
                if n:
                    out += [(m, idx) for idx in m.pending[:n]]
                    m.pending, m.taken, left[m.adapter] = m.pending[n:], m.taken + n, left[m.adapter] - n
        return out

    def references(self) -> dict[str, list[int]]:
        """{job_id: idxs} of every message held (whole messages: their Redis copies are unacknowledged
        until done), for the worker's held report (store.inflight)."""
        out: dict[str, list[int]] = {}
        with self._lock:
            for m in self._messages:
                out.setdefault(m.job_id, []).extend(m.idxs)
        return out

    def take_message(self, message: Message) -> list[tuple[Message, int]]:
        """All pending references of one message (suspects run as their message's group)."""
        with self._lock:
            out = [(message, idx) for idx in message.pending]
            message.taken += len(message.pending)
            message.pending = []
        return out

    def settle(self, taken: list[tuple[Message, int]]) -> None:
        """These references were claimed (or found unclaimable): their messages may be acknowledged."""
        with self._lock:
            for m, _ in taken:
                m.taken -= 1
            self._finish_done()

    def untake(self, taken: list[tuple[Message, int]]) -> None:
        """These references were taken but not claimed (the claim gave up on shutdown): pending again."""
        with self._lock:
            for m, idx in taken:
                m.taken -= 1
                m.pending.append(idx)
            self._lock.notify_all()

    def trim(self, message: Message, keep_at_most: int) -> list[int]:
        """Take back the references of `message` beyond what the feed should hold (`keep_at_most`
        pending references in all): returns them, for the caller to send back to the queue. The
        message keeps at least MIN_KEPT, as an ordinary message would: cut to nothing, it was
        acknowledged at once and its references came straight back to this or another busy feed,
        round and round. The few Celery threads bound what the feed holds either way."""
        with self._lock:
            excess = min(len(message.pending) - MIN_KEPT,
                         sum(len(m.pending) for m in self._messages) - keep_at_most)
            if excess <= 0 or message.suspect:
                return []
            cut, message.pending = message.pending[-excess:], message.pending[:-excess]
            self._finish_done()
            return cut

    def hold_more(self, message: Message, idxs: list[int]) -> None:
        """Undo a trim whose references could not be sent back."""
        with self._lock:
            message.pending += idxs
            if message not in self._messages:
                self._messages.append(message)
                message.done.clear()
            self._lock.notify_all()

    def give_back(self, *, everything: bool = False) -> list[Message]:
        """Shutdown: nothing more is taken; returns the messages with pending references (`pending`
        lists them) for the caller to publish again, then `release`. With `everything` (the engine
        failed, maybe mid-claim): every message, all its references pending again (publishing a
        reference twice is harmless: one claim wins)."""
        with self._lock:
            self._closed = True  # a message arriving from now on is not held (Feed.hold says so)
            if everything:
                for m in self._messages:
                    m.pending, m.taken = list(m.idxs), 0
            out = [m for m in self._messages if m.pending]
            for m in out:
                m.closing = True
        return out

    def release(self, messages: list[Message], *, requeue: bool) -> None:
        """Their pending references were published again (or, with `requeue`, could not be: their Celery
        threads then reject the messages so that Redis gives them out again)."""
        with self._lock:
            for m in messages:
                m.requeue, m.pending = requeue, []
            self._finish_done()

    @staticmethod
    def _open(m: Message) -> bool:
        return bool(m.pending) and not m.closing

    def _finish_done(self) -> None:
        for m in [m for m in self._messages if not m.pending and m.taken == 0]:
            self._messages.remove(m)
            m.done.set()
