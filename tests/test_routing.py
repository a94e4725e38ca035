"""Routing by base model and the adapters a job names, against a real Redis and a real database (no worker
process): adapter pins, parked requests, `retarget`, status advice, and idempotent claims.

Runs on SQLite and embedded Redis by default; on PostgreSQL and an external Redis with
LORABATCH_TEST_DATABASE_URL / LORABATCH_TEST_BROKER_URL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from lorabatch.schemas.identity import adapter_sha256
from lorabatch.schemas.settings import load_settings
from lorabatch.schemas.tables import Job, Outbox, Request, Worker, utcnow
from lorabatch.store import lifecycle
from lorabatch.store.context import Context
from lorabatch.store.db import make_sessionmaker, transaction
from lorabatch.store.deployment import deployment_of
from lorabatch.store.retry import with_db_retry
from tests.conftest import run_cli, tune_config


def lines(n: int, adapters=("sft", "dpo")) -> list[dict]:
    return [{"custom_id": f"r{i}", "adapter": adapters[i % len(adapters)], "prompt": f"item {i}",
             "max_new_tokens": 4} for i in range(n)]


def submit(config_path: Path, path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli(config_path, "submit", str(path), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["id"]


def own_adapters(config_path: Path, tmp_path: Path, names=("sft", "dpo")) -> dict[str, Path]:
    """Copies of demo adapters this test may change, configured under [adapters] in their place."""
    settings = load_settings(config_path, environ={})
    copies = {}
    for name in names:
        copies[name] = tmp_path / "adapters" / name
        shutil.copytree(settings.adapter_dir(name), copies[name])
    tune_config(config_path, "adapters", **{n: str(p) for n, p in copies.items()})
    return copies


def retrain(adapter_dir: Path, donor: Path) -> None:
    """New weights under the same name: another adapter's file written over this one's."""
    (adapter_dir / "adapter_model.safetensors").write_bytes((donor / "adapter_model.safetensors").read_bytes())


def live_worker(ctx: Context, worker_id: str, adapters: dict, *, base: str | None = None) -> None:
    with transaction(ctx.sessions) as s:
        lifecycle.heartbeat(s, worker_id=worker_id, hostname="elsewhere", pid=4242,
                            deployment=base or ctx.deployment.id, base=ctx.deployment.base, adapters=adapters)


def claim(ctx: Context, job_id: str, idxs, serves: dict, *, worker_id: str = "w1", claim_id: str | None = None):
    with transaction(ctx.sessions) as s:
        got = lifecycle.claim_requests(s, refs={job_id: list(idxs)}, worker_id=worker_id,
                                       deployment=ctx.deployment.id, max_attempts=3, serves=serves, claim_id=claim_id)
        return sorted(r.idx for r in got.requests)


def job_row(ctx: Context, job_id: str) -> Job:
    with ctx.sessions() as s:
        return s.get(Job, job_id)


def test_routing_ignores_adapters_a_job_does_not_name(config_path, tmp_path):
    """Adding or removing an unrelated adapter changes neither the queue nor a job's pins."""
    before = deployment_of(load_settings(config_path, environ={}))
    tune_config(config_path, "adapters", extra=str(load_settings(config_path, environ={}).adapter_dir("dpo")))
    after = deployment_of(load_settings(config_path, environ={}))
    assert before.id == after.id and before.queue == after.queue
    assert set(after.adapters) - set(before.adapters) == {"extra"}


def test_job_pins_the_adapters_it_names_from_their_files(config_path, tmp_path, ctx):
    """A submit pins exactly the adapters its lines name, to the sha256 of their weight files."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(4, adapters=("sft", "base")))
    job = job_row(ctx, job_id)
    assert job.deployment == ctx.deployment.id
    assert job.adapter_pins == {"sft": adapter_sha256(ctx.settings.adapter_dir("sft"))}


def test_producer_without_the_weights_pins_what_live_workers_serve(config_path, tmp_path, ctx):
    """A producer whose adapter folder is missing (another machine) takes the sha256 live workers report;
    with no worker to ask, the job is accepted unpinned and its first claim pins it."""
    tune_config(config_path, "adapters", sft=str(tmp_path / "not-here"))
    unpinned = submit(config_path, tmp_path / "a.jsonl", lines(2, adapters=("sft",)))
    assert job_row(ctx, unpinned).adapter_pins == {"sft": None}
    assert claim(ctx, unpinned, [0], {"sft": "a" * 64}) == [0]
    assert job_row(ctx, unpinned).adapter_pins == {"sft": "a" * 64}
    assert claim(ctx, unpinned, [1], {"sft": "b" * 64}, worker_id="w2") == [], "pinned now: other weights wait"

    live_worker(ctx, "w-remote", {"sft": "c" * 64})
    pinned = submit(config_path, tmp_path / "b.jsonl", lines(2, adapters=("sft",)))
    assert job_row(ctx, pinned).adapter_pins == {"sft": "c" * 64}


def test_changed_weights_park_until_retarget_moves_them(config_path, tmp_path, ctx, redis_flushed):
    """Requests of an adapter retrained since the job was pinned never run on the new weights: the claim
    parks them, status names the adapter and the command, `retarget` moves them (recorded on the job),
    and they run; results already recorded keep their sha256."""
    copies = own_adapters(config_path, tmp_path)
    ctx = Context(load_settings(config_path, environ={}))
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(4))  # 0, 2: sft; 1, 3: dpo
    old = job_row(ctx, job_id).adapter_pins["sft"]
    retrain(copies["sft"], ctx.settings.adapter_dir("dpo"))
    new = adapter_sha256(copies["sft"])
    assert new != old
    serves = {"sft": new, "dpo": adapter_sha256(copies["dpo"])}
    live_worker(ctx, "w1", serves)

    assert claim(ctx, job_id, range(4), serves) == [1, 3], "dpo runs, sft waits"
    assert job_row(ctx, job_id).parked == ["sft"]
    r = run_cli(config_path, "status", job_id)
    assert f"adapter 'sft' changed since this job was pinned to it (weights {old[:12]}" in r.stdout, r.stdout
    assert f"lorabatch retarget {job_id} --adapter sft" in r.stdout

    r = run_cli(config_path, "retarget", job_id, "--adapter", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "names no adapter 'nope'" in r.stderr, r.stderr
    r = run_cli(config_path, "retarget", job_id, "--adapter", "sft")
    assert r.returncode == 0 and "2 unfinished requests" in r.stderr, r.stderr
    job = job_row(ctx, job_id)
    assert job.adapter_pins["sft"] == new and job.parked == []
    (moved,) = job.retargets
    assert (moved["adapter"], moved["from"], moved["to"], moved["requests"]) == ("sft", old, new, 2) and moved["at"]
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Outbox)) == 0, "published after the commit"
    assert claim(ctx, job_id, [0, 2], serves) == [0, 2]
    r = run_cli(config_path, "retarget", job_id)
    assert r.returncode == 0 and "nothing to move" in r.stderr
    ctx.close()


def test_status_advice_fits_what_is_running(config_path, tmp_path, ctx):
    """No live worker, a worker of another base model, a worker that lacks an adapter: each gets its own
    advice; a job nobody can run is never reported as "N live workers"."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(2, adapters=("sft",)))
    assert "no live worker: the job waits until you start one" in run_cli(config_path, "status", job_id).stdout
    live_worker(ctx, "w-other", {"sft": "x" * 64}, base="another-base-key")
    out = run_cli(config_path, "status", job_id).stdout
    assert "no live worker serves this job's base model (1 live worker serves another)" in out, out
    live_worker(ctx, "w-lacks", {"dpo": "y" * 64})
    out = run_cli(config_path, "status", job_id).stdout
    assert "no live worker serves adapter 'sft' (1 live worker of this base model lack" in out, out
    assert "live worker," not in out
    live_worker(ctx, "w-good", {"sft": job_row(ctx, job_id).adapter_pins["sft"]})
    assert "2 live workers, last heartbeat" in run_cli(config_path, "status", job_id).stdout


def test_parked_work_is_published_when_a_worker_serves_it(config_path, tmp_path, ctx, redis_flushed):
    """A request parked by a worker without its adapter is published again, without a command, by the
    reconcile round of a worker that serves the pinned weights, and then claimed."""
    from lorabatch.worker.upkeep import Upkeep

    job_id = submit(config_path, tmp_path / "in.jsonl", lines(2, adapters=("sft",)))
    pin = job_row(ctx, job_id).adapter_pins["sft"]
    assert claim(ctx, job_id, [0, 1], {"dpo": "d" * 64}) == []
    assert job_row(ctx, job_id).parked == ["sft"]
    lacking = Upkeep(ctx.sessions, ctx.celery, ctx.settings.worker, worker_id="w1", deployment=ctx.deployment.id,
                     load=dict, serves=lambda: {"dpo": "d" * 64})
    from tests.test_queue import messages_for

    assert lacking.unpark() == 0
    before = messages_for(redis_flushed, job_id)  # the submit's, never consumed here
    able = Upkeep(ctx.sessions, ctx.celery, ctx.settings.worker, worker_id="w2", deployment=ctx.deployment.id,
                  load=dict, serves=lambda: {"sft": pin})
    assert able.unpark() == 1
    assert job_row(ctx, job_id).parked == []
    assert messages_for(redis_flushed, job_id) == before + 1
    assert claim(ctx, job_id, [0, 1], {"sft": pin}, worker_id="w2") == [0, 1]


def test_a_result_of_other_weights_is_refused_and_runs_again(config_path, tmp_path, ctx):
    """A worker whose adapter file was replaced between its claim and the load reports another sha256:
    the result is not recorded, the request goes back (attempt uncharged) and its adapter is parked."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(2, adapters=("sft",)))
    pin = job_row(ctx, job_id).adapter_pins["sft"]
    assert claim(ctx, job_id, [0, 1], {"sft": pin}) == [0, 1]
    outcomes = [lifecycle.Outcome(job_id, 0, "old weights", "stop", 3, 2, adapter_sha256=pin),
                lifecycle.Outcome(job_id, 1, "new weights", "stop", 3, 2, adapter_sha256="f" * 64)]
    with transaction(ctx.sessions) as s:
        assert lifecycle.record_outcomes(s, worker_id="w1", outcomes=outcomes) == 1
    with ctx.sessions() as s:
        r0, r1 = s.execute(select(Request).where(Request.job_id == job_id).order_by(Request.idx)).scalars()
        assert (r0.state, r0.adapter_sha256) == ("succeeded", pin)
        assert (r1.state, r1.output, r1.attempts, r1.worker_id) == ("queued", None, 0, None)
        job = s.get(Job, job_id)
        assert (job.n_succeeded, job.n_queued, job.n_running, job.parked) == (1, 1, 0, ["sft"])


def test_a_claim_retried_after_an_ambiguous_commit_sees_its_own_claim(config_path, tmp_path, ctx):
    """The COMMIT lands, then the connection breaks before the answer: with_db_retry runs the claim again,
    which returns the rows this claim took (not nothing, which would strand them running), while another
    claim of the same references gets none of them."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(4))
    sessions = make_sessionmaker(ctx.engine)
    broke = []

    @event.listens_for(sessions, "after_commit")
    def _break_once(session):  # the commit is in the database; the client never hears so
        if not broke:
            broke.append(True)
            raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection unexpectedly"))

    def claim_with(claim_id):
        return lambda s: sorted(r.idx for r in lifecycle.claim_requests(
            s, refs={job_id: [0, 1, 2]}, worker_id="w1", deployment=ctx.deployment.id, max_attempts=3,
            claim_id=claim_id).requests)

    assert with_db_retry(sessions, claim_with("claim-1"), what="claiming") == [0, 1, 2]
    assert broke, "the failure was injected after the commit"
    with ctx.sessions() as s:
        rows = s.execute(select(Request).where(Request.job_id == job_id, Request.idx < 3)).scalars().all()
        assert all((r.state, r.worker_id, r.attempts, r.claim_id) == ("running", "w1", 1, "claim-1") for r in rows)
        assert s.get(Job, job_id).n_running == 3, "counted once"
    assert with_db_retry(sessions, claim_with("claim-2"), what="claiming") == [], "a later claim takes nothing twice"
    event.remove(sessions, "after_commit", _break_once)


def test_a_claim_without_its_token_strands_what_it_took(config_path, tmp_path, ctx):
    """The failure the claim token fixes, reproduced: the same retry without a token returns nothing,
    though its first try committed."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(2))
    first = claim(ctx, job_id, [0, 1], {"sft": job_row(ctx, job_id).adapter_pins["sft"],
                                        "dpo": job_row(ctx, job_id).adapter_pins["dpo"]})
    assert first == [0, 1]
    assert claim(ctx, job_id, [0, 1], {}) == []
    with ctx.sessions() as s:
        assert s.get(Worker, "w1") is None  # no heartbeat: only the claim is under test
        assert s.execute(select(Request.state).where(Request.job_id == job_id)).scalars().all() == ["running"] * 2


def test_death_between_commit_and_publish_of_unpark_or_retarget_is_repaired(config_path, tmp_path, ctx,
                                                                             redis_flushed, monkeypatch):
    """Unparking and `retarget` owe their messages in the transaction that changes the job; a process that
    dies before publishing leaves the outbox rows, and a reconcile round publishes them."""
    import lorabatch.producer.retarget as retarget_module
    import lorabatch.worker.upkeep as upkeep_module
    from lorabatch.store.reconcile import reconcile
    from lorabatch.worker.upkeep import Upkeep
    from tests.test_queue import messages_for

    def die(*a, **k):
        raise SystemExit("killed between commit and publish")

    reconcile(ctx.sessions, ctx.celery, lease_seconds=30, max_attempts=3)  # a worker's first round marks Redis
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(4))
    pins = job_row(ctx, job_id).adapter_pins
    assert claim(ctx, job_id, range(4), {"sft": "9" * 64}) == []  # sft changed here, dpo not served: both park
    assert job_row(ctx, job_id).parked == ["dpo", "sft"]
    before = messages_for(redis_flushed, job_id)

    monkeypatch.setattr(upkeep_module, "publish_owed", die)
    able = Upkeep(ctx.sessions, ctx.celery, ctx.settings.worker, worker_id="w2", deployment=ctx.deployment.id,
                  load=dict, serves=lambda: {"dpo": pins["dpo"]})
    try:
        able.unpark()
    except SystemExit:
        pass
    monkeypatch.setattr(retarget_module, "publish_owed", die)
    live_worker(ctx, "w-new", {"sft": "9" * 64})
    try:
        retarget_module.retarget(ctx, job_id, adapter="sft")
    except SystemExit:
        pass
    job = job_row(ctx, job_id)
    assert (job.parked, job.adapter_pins["sft"]) == ([], "9" * 64), "both transactions committed"
    with ctx.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Outbox)) == 2
    assert messages_for(redis_flushed, job_id) == before
    report = reconcile(ctx.sessions, ctx.celery, lease_seconds=30, max_attempts=3, grace_seconds=0.001)
    assert report.published == 2 and messages_for(redis_flushed, job_id) == before + 2


def test_retry_after_an_unrelated_adapter_edit_runs_where_it_ran(config_path, tmp_path, ctx, redis_flushed):
    """A completed job's failed requests, retried after another adapter was added to [adapters], go to the
    same queue with the same pins: a worker of the new configuration claims them."""
    job_id = submit(config_path, tmp_path / "in.jsonl", lines(2))
    pins = job_row(ctx, job_id).adapter_pins
    assert claim(ctx, job_id, [0, 1], pins) == [0, 1]
    with transaction(ctx.sessions) as s:
        lifecycle.record_outcomes(s, worker_id="w1", outcomes=[
            lifecycle.Outcome(job_id, 0, None, None, 1, 0, error="boom", adapter_sha256=pins["sft"]),
            lifecycle.Outcome(job_id, 1, "ok", "stop", 1, 1, adapter_sha256=pins["dpo"])])
    tune_config(config_path, "adapters", extra=str(ctx.settings.adapter_dir("dpo")))
    edited = Context(load_settings(config_path, environ={}))
    r = run_cli(config_path, "retry", job_id)
    assert r.returncode == 0, r.stderr
    assert edited.deployment.id == job_row(ctx, job_id).deployment
    with transaction(edited.sessions) as s:
        got = lifecycle.claim_requests(s, refs={job_id: [0]}, worker_id="w2", deployment=edited.deployment.id,
                                       max_attempts=3, serves=edited.deployment.adapters, claim_id="c")
        assert [r.idx for r in got.requests] == [0]
    edited.close()
