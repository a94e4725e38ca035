"""The engine loop of a worker: continuous batching fed by queue messages, claims at admission.

One thread drives the engine's Stepper (a running batch that rows join and leave). Each turn:
1. stop rows whose job was cancelled (worker.cancels asks the database every 0.5 s);
2. when the stepper has room (it decides how many rows of which adapter it takes), take that many
   references from the feed (worker.feed: messages Celery threads hold), CLAIM them in the database
   at that moment, and admit the claimed requests;
3. one step of the batch; each row that ended goes to the recorder at once.
Nothing here waits for a pool of batches to finish: results flow as rows end.

Requests whose previous worker died while running them ("suspects") never share a batch with other
work: the batch drains, then one suspect message runs as a group, or alone on its last attempt, so a
request that kills its worker every time fails after max_attempts without taking neighbours with it.

Failure windows:
- killed between claim and admit, or mid-batch: the claimed requests are `running` under a dead
  worker; reconcile (any worker) puts them back once this one is found dead (same host: at once;
  elsewhere: after the lease), and their attempt counts;
- the engine raises (a Python exception out of the stepper other than out of memory, which the
  stepper handles: a request it cannot run, a bug, a CUDA error): any running request may be the
  cause, so their attempt counts and they go back as suspects (lifecycle.release_after_error: a
  group, then each alone; one that raises alone on its last attempt fails with the exception, its
  neighbours never do); held references go back uncharged; the worker exits non-zero for its
  supervisor to restart it (a CUDA error leaves the process unusable). So a request that makes the
  engine raise fails after max_attempts instead of coming back forever with its neighbours;
- SIGTERM: held references go back at once, the batch runs on for shutdown_grace_seconds, what is
  still running then goes back too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Hashable

from sqlalchemy.exc import SQLAlchemyError

from lorabatch.schemas.errors import LorabatchError
from lorabatch.schemas.settings import Settings
from lorabatch.store import broker, lifecycle, outbox
from lorabatch.store.context import Context
from lorabatch.store.deployment import Deployment
from lorabatch.store.reconcile import publish_owed
from lorabatch.store.retry import with_db_retry
from lorabatch.worker.engine.params import GenerationRequest, GenerationResult, SamplingParams
from lorabatch.worker.cancels import CancelPoll
from lorabatch.worker.feed import Feed, Message
from lorabatch.worker.rate import TokenRate
from lorabatch.worker.recorder import Recorder
from lorabatch.worker.serving import ServedAdapters
from lorabatch.worker.upkeep import Upkeep

log = logging.getLogger("lorabatch.worker")

CLOSE_SECONDS = 30.0
"""How long a stopping worker keeps trying to tell the database it leaves (then the lease takes over)."""


class EngineFailed(LorabatchError):
    """The engine broke: the work went back to the queue; restart the worker."""


class EngineRaised(Exception):
    """The engine raised while running requests (worker.service's failure windows)."""


class WorkerService:
    """Everything one worker process owns besides Celery: engine loop, feed, recorder, upkeep."""

    def __init__(self, settings: Settings, engine, *, context: Context | None = None,
                 deployment: Deployment | None = None, metrics=None) -> None:
        self.settings = settings
        self.context = context or Context(settings)
        self.sessions, self.app = self.context.sessions, self.context.celery
        self.deployment = deployment or self.context.deployment
        self.serving = ServedAdapters(settings, self.deployment, engine)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = metrics
        self.stepper = engine.stepper()
        self.feed = Feed()
        self.recorder = Recorder(self.sessions, self.app, worker_id=self.worker_id, on_recorded=self._recorded,
                                 on_retry=metrics.db_retry if metrics else None)
        self.upkeep = Upkeep(self.sessions, self.app, settings.worker, worker_id=self.worker_id,
                             deployment=self.deployment.id, load=self._load, serves=lambda: self.serving.view)
        self.upkeep.held = self.feed.references  # its messages count as in flight while it lives (store.inflight)
        self.failure: BaseException | None = None
        self._adapters: dict[Hashable, str] = {}
        self._stopping = threading.Event()
        self._isolating = False
        self.cancels = CancelPoll(self.sessions)
        self.rate = TokenRate()
        self._engine_thread = threading.Thread(target=self._engine_loop, name="lorabatch-engine", daemon=True)

    # ---- lifecycle

    def start(self) -> None:
        self.upkeep.start()
        self._engine_thread.start()

    def stop(self) -> None:
        """Warm shutdown: hand back what is held, let the batch run on briefly, then hand back the rest."""
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        self._engine_thread.join(self.settings.worker.shutdown_grace_seconds + 30)
        self.recorder.close(timeout=60)
        self.upkeep.stop()
        deadline = time.monotonic() + CLOSE_SECONDS
        try:
            with_db_retry(self.sessions, lambda s: lifecycle.forget_worker(s, self.worker_id), what="leaving",
                          give_up=lambda: time.monotonic() > deadline)
        except Exception as e:  # noqa: BLE001 - the lease and reconcile recover what it held
            log.warning("could not say goodbye to the database (%s); its lease runs out instead", e)
        finally:
            self.context.close()

    # ---- called from Celery threads

    def hold(self, job_id: str, adapter: str, idxs: list[int], suspect: int = 0, *, priority: int = 5) -> bool:
        """Hold one message until all its references are admitted (or unclaimable, or handed back).
        False: the message must go back to Redis as it is (reject it).

        A large message (big jobs get up to 256 references per message) is cut to what the worker
        should hold, about two batches; the rest goes back to the queue at once as a new message, for
        this or another worker. If this worker dies before acknowledging the original, both copies
        exist: harmless, one claim wins."""
        message = Message(job_id, adapter, list(idxs), suspect, pending=list(idxs))
        if self._stopping.is_set() or not self.feed.hold(message):
            return self._publish_again([message])
        keep = 2 * self.settings.worker.max_batch_size
        if len(idxs) > broker.CHUNK_SIZE and (excess := self.feed.trim(message, keep)):
            try:
                broker.enqueue(self.app, job_id, adapter, excess, priority=priority, deployment=self.deployment.id,
                               chunk_size=broker.MAX_CHUNK_SIZE)
            except Exception as e:  # noqa: BLE001 - keep them: the message is not acknowledged until they ran
                log.warning("could not send back part of a large message (%s); keeping it", e)
                self.feed.hold_more(message, excess)
        message.done.wait()
        return not message.requeue

    # ---- the engine loop

    def _engine_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._stop_cancelled_rows()
                admitted = self._admit()
                if self.stepper.idle:
                    if not admitted:
                        self.feed.wait_for_work(0.2)
                    continue
                started = time.perf_counter()
                rows = self.stepper.running
                self._finished(self._engine(self.stepper.step))
                if self.metrics:
                    self.metrics.record_step(rows, self.settings.worker.max_batch_size, time.perf_counter() - started)
            self._wind_down()
        except BaseException as e:  # noqa: BLE001 - the engine failed: hand everything back, exit non-zero
            log.exception("the engine failed; handing back all work (the requests it ran as suspects, their "
                          "attempt counted), the worker exits")
            self.failure = e.__cause__ if isinstance(e, EngineRaised) and e.__cause__ else e
            self._give_back_everything(raised=isinstance(e, EngineRaised))
            os.kill(os.getpid(), 15)  # Celery's warm shutdown; run_worker then raises EngineFailed

    @staticmethod
    def _engine(call):
        """A stepper call: what it raises is marked as raised by the engine while running requests."""
        try:
            return call()
        except Exception as e:
            raise EngineRaised(str(e)) from e

    def _admit(self) -> bool:
        suspect = self.feed.next_suspect()
        if suspect is not None or self._isolating:
            if not self.stepper.idle:
                return False  # drain first: suspects run apart from everything else
            if not self.recorder.idle():
                time.sleep(0.01)  # and their neighbours' results recorded (not a busy wait)
                return False
            if suspect is None:
                self._isolating = False
            else:
                self._isolating = True
                return self._claim_and_admit(self.feed.take_message(suspect), suspects=True)
        plan = self.stepper.admission(self.feed.waiting())  # also decides the weights mode the next admit applies
        return self._claim_and_admit(self.feed.take(plan) if plan else [])

    def _claim_and_admit(self, taken: list[tuple[Message, int]], *, suspects: bool = False) -> bool:
        if not taken:
            self.stepper.admit([])  # applies the weights mode admission() chose, even with nothing to admit
            return False
        refs: dict[str, list[int]] = defaultdict(list)
        for message, idx in taken:
            refs[message.job_id].append(idx)
        w = self.settings.worker
        claim_id = uuid.uuid4().hex  # a retry after an ambiguous COMMIT gets back what this claim took
        serves = dict(self.serving.view)
        try:
            claim = with_db_retry(self.sessions, lambda s: lifecycle.claim_requests(
                s, refs=refs, worker_id=self.worker_id, deployment=self.deployment.id, max_attempts=w.max_attempts,
                suspects=suspects, serves=serves, claim_id=claim_id),
                what="claiming requests", give_up=self._stopping.is_set)
        except SQLAlchemyError:
            if not self._stopping.is_set():
                raise
            # SIGTERM during a database outage: these references go back with the rest (the wind-down
            # publishes them again, or rejects their messages). If the claim did commit, its requests
            # run under a worker that leaves: forget_worker or, after the lease, reconcile puts them back.
            self.feed.untake(taken)
            return False
        self.feed.settle(taken)  # claimed or not, these references are done with: their messages may be acked
        if claim.gave_up:
            log.warning("%d request(s) failed after their worker died %d times", len(claim.gave_up), w.max_attempts)
        requests = []
        for r in claim.requests:
            key = (r.job_id, r.idx)
            self._adapters[key] = r.adapter
            requests.append(GenerationRequest(key=key, adapter=r.adapter, prompt=r.prompt, messages=r.messages,
                                              params=SamplingParams(**{**r.params, "stop": tuple(r.params.get("stop", ()))})))
        self._finished(self._engine(lambda: self.stepper.admit(requests, group=suspects)))  # suspects run as one group: none go back
        return bool(requests)

    def _finished(self, results: list[GenerationResult]) -> None:
        outcomes, preempted = [], []
        for res in results:
            adapter = self._adapters.pop(res.key, None)
            if res.finish_reason == "preempted":
                preempted.append(res.key)
                continue
            job_id, idx = res.key
            outcomes.append(lifecycle.Outcome(
                job_id, idx, res.output, res.finish_reason, res.prompt_tokens, res.completion_tokens, res.error,
                cancelled=res.finish_reason == "cancelled", base_model=self.deployment.base,
                adapter_sha256=self.serving.weights_of(adapter)))
            if res.error:
                log.warning("request %s of %s failed: %s", idx, job_id, res.error)
            if self.metrics:
                state = "cancelled" if res.finish_reason == "cancelled" else "failed" if res.error else "succeeded"
                self.metrics.record_finished(state, adapter or "?", res.prompt_tokens, res.completion_tokens)
        self.recorder.put(outcomes)
        self.recorder.hand_back(preempted)

    def _stop_cancelled_rows(self) -> None:
        keys = [] if self.stepper.idle else self.stepper.keys()
        if cancelled := self.cancels.cancelled(keys):
            self._finished(self.stepper.cancel([k for k in keys if k[0] in cancelled]))

    # ---- shutdown and failure

    def _wind_down(self) -> None:
        self._publish_again(self.feed.give_back())
        deadline = time.monotonic() + self.settings.worker.shutdown_grace_seconds
        while not self.stepper.idle and time.monotonic() < deadline:
            self._stop_cancelled_rows()
            self._finished(self.stepper.step())
        self._hand_back(self.stepper.abort())

    def _give_back_everything(self, *, raised: bool = False) -> None:
        try:
            keys = self.stepper.abort()
        except BaseException:  # noqa: BLE001 - the engine is broken; what it held is known here too
            keys = []
        keys = list(dict.fromkeys([*keys, *self._adapters]))  # claimed, even if admit raised halfway
        if raised:
            for key in keys:
                self._adapters.pop(key, None)
            cause = self.failure
            self.recorder.hand_back_after_error(keys, f"{type(cause).__name__}: {cause}",
                                                max_attempts=self.settings.worker.max_attempts)
        else:
            self._hand_back(keys)
        self._publish_again(self.feed.give_back(everything=True))

    def _hand_back(self, keys: list[Hashable]) -> None:
        for key in keys:
            self._adapters.pop(key, None)
        self.recorder.hand_back(list(keys))

    def _publish_again(self, messages: list[Message]) -> bool:
        """References this worker held but never claimed get new messages (they are queued in SQL), so
        that the held messages can be acknowledged now. If that fails, the held messages are rejected
        instead and Redis gives them out again. Returns whether it succeeded."""
        if not messages:
            return True

        def owe(session) -> list[int]:
            for m in messages:
                outbox.owe_messages(session, m.job_id, list(m.pending), suspect=m.suspect)
            return outbox.owed_ids(session)

        ok = True
        try:
            owed = with_db_retry(self.sessions, owe, what="handing back held messages", give_up=lambda: True)
            publish_owed(self.sessions, self.app, ids=owed)  # if this fails, the outbox rows remain
        except Exception as e:  # noqa: BLE001 - nothing written: reject, Redis redelivers them
            log.warning("could not hand back held messages (%s); they go back to Redis as they are", e)
            ok = False
        self.feed.release(messages, requeue=not ok)
        return ok

    # ---- reporting

    def _recorded(self, outcomes: list[lifecycle.Outcome]) -> None:
        self.rate.add(sum(o.completion_tokens or 0 for o in outcomes))

    def _load(self) -> dict:
        held = self.feed.held()
        if self.metrics:
            self.metrics.set_held(held)
        return {"running": self.stepper.running, "held": held, "base": self.deployment.base,
                "adapters": self.serving.refresh(),
                "tokens_per_second": self.rate.per_second()}
