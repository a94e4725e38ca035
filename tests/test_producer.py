"""The producer commands against a real Redis and a real database, with no worker running."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from lorabatch.schemas.settings import Settings
from lorabatch.schemas.tables import Job, Request
from lorabatch.store import db
from tests.conftest import _redis_client, run_cli, tune_config

GOOD = [
    {"custom_id": "a", "adapter": "sft", "prompt": "Hello there"},
    {"custom_id": "b", "adapter": "dpo", "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 8},
    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "base", "messages": [{"role": "user", "content": "Yo"}], "max_tokens": 4}},
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def queued_messages(broker_url: str) -> int:
    client = _redis_client(broker_url)
    return sum(client.llen(k) for k in client.keys("lorabatch*") if client.type(k) == b"list")


def count_jobs(ctx) -> int:
    with ctx.sessions() as s:
        return s.scalar(select(func.count()).select_from(Job))


def test_submit_creates_job_and_enqueues_references(config_path, tmp_path, ctx, redis_flushed):
    """submit --json prints the id; the job, its requests and compact queue messages exist."""
    r = run_cli(config_path, "submit", str(write_jsonl(tmp_path / "in.jsonl", GOOD)), "--json", "--name", "t")
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["id"]
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.total, job.n_queued, job.name) == ("queued", 3, 3, "t")
        rows = s.execute(select(Request).where(Request.job_id == job_id).order_by(Request.idx)).scalars().all()
    assert [(r.custom_id, r.adapter) for r in rows] == [("a", "sft"), ("b", "dpo"), ("c", "base")]
    assert rows[1].messages == [{"role": "user", "content": "Hi"}] and rows[1].params["max_new_tokens"] == 8
    assert queued_messages(redis_flushed) == 3  # one message per adapter here
    client = _redis_client(redis_flushed)
    raw = b"".join(client.lrange(k, 0, -1)[0] for k in client.keys("lorabatch*") if client.type(k) == b"list")
    assert b"Hello there" not in raw, "Redis must carry references, not prompts"


def test_submit_from_stdin_with_default_adapter(config_path, ctx):
    """`submit -` reads standard input; --adapter fills lines that name none."""
    r = run_cli(config_path, "submit", "-", "--adapter", "dpo", "--json", input='{"prompt": "x"}\n{"prompt": "y"}\n')
    assert r.returncode == 0, r.stderr
    with ctx.sessions() as s:
        adapters = s.scalars(select(Request.adapter).where(Request.job_id == json.loads(r.stdout)["id"])).all()
    assert adapters == ["dpo", "dpo"]


def test_invalid_file_is_rejected_whole(config_path, tmp_path, ctx, redis_flushed):
    """One bad line rejects the file: exit 2, every bad line named, nothing created or enqueued."""
    lines = [GOOD[0], "{not json", GOOD[1], {"adapter": "missing", "prompt": "x"}, {"custom_id": "a", "adapter": "sft", "prompt": "dup"}]
    r = run_cli(config_path, "submit", str(write_jsonl(tmp_path / "bad.jsonl", lines)))
    assert r.returncode == 2
    assert "line 2:" in r.stderr and "line 4:" in r.stderr and "line 5:" in r.stderr and "repeats custom_id" in r.stderr
    assert "line 2: is not valid JSON (Expecting property name enclosed in double quotes at column 2)" in r.stderr
    assert "3 invalid lines;" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert count_jobs(ctx) == 0
    assert queued_messages(redis_flushed) == 0


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_file_is_rejected(config_path, tmp_path, content):
    """An empty file (or only blank lines) is bad input, in the one wording submit and run share; standard
    input is named as such, not by the temporary file it is spooled to."""
    from lorabatch.producer.inputs import no_requests_message

    p = tmp_path / "empty.jsonl"
    p.write_bytes(content)
    r = run_cli(config_path, "submit", str(p))
    assert r.returncode == 2 and r.stderr == f"error: {no_requests_message(str(p))}\n"
    r = run_cli(config_path, "submit", "-", input=content.decode())
    assert r.returncode == 2 and r.stderr == f"error: {no_requests_message('<stdin>')}\n"


def test_status_jobs_cancel_results_without_worker(config_path, tmp_path, ctx):
    """With no worker: status shows all queued, cancel cancels all, results list them as cancelled."""
    job_id = json.loads(run_cli(config_path, "submit", str(write_jsonl(tmp_path / "in.jsonl", GOOD)), "--json").stdout)["id"]
    st = json.loads(run_cli(config_path, "status", job_id, "--json").stdout)
    assert st["id"] == job_id and st["state"] == "queued"
    assert st["counts"] == {"queued": 3, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "total": 3}
    listed = json.loads(run_cli(config_path, "jobs", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]
    r = run_cli(config_path, "cancel", job_id)
    assert r.returncode == 0 and "cancelled" in r.stdout
    assert run_cli(config_path, "cancel", job_id).returncode == 0, "cancelling twice is harmless"
    st = json.loads(run_cli(config_path, "status", job_id, "--json").stdout)
    assert st["state"] == "cancelled" and st["counts"]["cancelled"] == 3
    out = [json.loads(l) for l in run_cli(config_path, "results", job_id).stdout.splitlines()]
    assert [(o["custom_id"], o["status"]) for o in out] == [("a", "cancelled"), ("b", "cancelled"), ("c", "cancelled")]
    assert json.loads(run_cli(config_path, "jobs", "--state", "queued", "--json").stdout) == []


def test_unknown_job_is_usage_error(config_path):
    """status, results and cancel of an unknown id exit 2 with one line."""
    for cmd in ("status", "results", "cancel"):
        r = run_cli(config_path, cmd, "job-nope")
        assert r.returncode == 2, (cmd, r.stderr)
        assert "no job with id 'job-nope'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_idempotency_key_creates_one_job(config_path, tmp_path, ctx, redis_flushed):
    """Submitting twice with the same key returns the first job and enqueues nothing more."""
    f = str(write_jsonl(tmp_path / "in.jsonl", GOOD))
    first = json.loads(run_cli(config_path, "submit", f, "--idempotency-key", "k1", "--json").stdout)
    second = json.loads(run_cli(config_path, "submit", f, "--idempotency-key", "k1", "--json").stdout)
    assert first["id"] == second["id"] and first["created"] and not second["created"]
    assert count_jobs(ctx) == 1
    assert queued_messages(redis_flushed) == 3


def test_results_formats_to_file(config_path, tmp_path):
    """results on an unfinished job: exit 1 naming how many are not done; with --partial, -o writes jsonl,
    openai (not-done requests in the error file) and csv in input order."""
    job_id = json.loads(run_cli(config_path, "submit", str(write_jsonl(tmp_path / "in.jsonl", GOOD)), "--json").stdout)["id"]
    r = run_cli(config_path, "results", job_id, "-o", str(tmp_path / "early.jsonl"))
    assert r.returncode == 1 and "3 of 3 requests are not done" in r.stderr and "--partial" in r.stderr
    assert not (tmp_path / "early.jsonl").exists()
    for fmt in ("jsonl", "openai", "csv"):
        out = tmp_path / f"out.{fmt}"
        r = run_cli(config_path, "results", job_id, "--format", fmt, "-o", str(out), "--partial")
        assert r.returncode == 0, r.stderr
        assert "3 of 3 requests are not done yet" in r.stderr
        text = out.read_text()
        if fmt == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            assert [r["custom_id"] for r in rows] == ["a", "b", "c"] and rows[0]["status"] == "queued"
        elif fmt == "openai":
            assert text == ""
            errors = (tmp_path / "out.openai.errors.jsonl").read_text().splitlines()
            assert [json.loads(l)["error"]["code"] for l in errors] == ["not_finished"] * 3
        else:
            assert [json.loads(l)["custom_id"] for l in text.splitlines()] == ["a", "b", "c"]


def test_unreachable_services_are_named_without_password(config_path, tmp_path):
    """Unreachable Redis or database: exit 2, the URL named with its password hidden."""
    f = str(write_jsonl(tmp_path / "in.jsonl", GOOD))
    cfg = tmp_path / "bad-redis.toml"
    cfg.write_text(config_path.read_text())
    tune_config(cfg, "service", broker_url="redis://u:s3cret@127.0.0.1:1/0")
    r = run_cli(cfg, "submit", f)
    assert r.returncode == 2 and "cannot reach Redis at redis://u:***@127.0.0.1:1/0" in r.stderr and "s3cret" not in r.stderr
    cfg.write_text(config_path.read_text())
    tune_config(cfg, "service", database_url="postgresql+psycopg://u:s3cret@127.0.0.1:1/x")
    r = run_cli(cfg, "status", "job-x")
    assert r.returncode == 2 and "cannot reach the database at postgresql+psycopg://u:***@127.0.0.1:1/x" in r.stderr
    assert "s3cret" not in r.stderr + r.stdout


def test_init_writes_config(tmp_path):
    """init writes a commented config that loads; a second init refuses to overwrite."""
    from lorabatch.schemas.settings import load_settings

    r = run_cli(tmp_path / "unused.toml", "init", str(tmp_path / "proj"))
    assert r.returncode == 0, r.stderr
    s = load_settings(tmp_path / "proj" / "lorabatch.toml", environ={})
    assert set(s.adapters) == {"sft", "sft-ckpt39", "dpo-ckpt3", "dpo"} and s.worker.weights == "auto"
    assert (tmp_path / "proj" / "adapters").is_dir(), "the README copies adapters into adapters/"
    assert run_cli(tmp_path / "unused.toml", "init", str(tmp_path / "proj")).returncode == 2


def test_prompt_longer_than_context_is_rejected(config_path, tmp_path, ctx):
    """A prompt that cannot fit the model's context (2048 for the demo) is bad input, found at submit."""
    long_prompt = " ".join(f"word{i}" for i in range(3000))
    lines = [GOOD[0], {"custom_id": "long", "adapter": "sft", "prompt": long_prompt, "max_new_tokens": 16},
             {"custom_id": "fits", "adapter": "sft", "prompt": "short", "max_new_tokens": 2000}]
    r = run_cli(config_path, "submit", str(write_jsonl(tmp_path / "long.jsonl", lines)))
    assert r.returncode == 2, r.stderr
    assert "line 2:" in r.stderr and "exceeds the model's context of 2048 tokens" in r.stderr
    assert "line 3" not in r.stderr
    assert "Token indices sequence length" not in r.stderr, "transformers' warning must not leak into submit"
    assert count_jobs(ctx) == 0


@pytest.mark.parametrize("limit, value, expect", [("max_file_bytes", 100, "over the limit of 100"),
                                                  ("max_lines", 2, "more than 2 requests")])
def test_file_over_configured_limits_is_rejected(config_path, tmp_path, ctx, limit, value, expect):
    """A file over [limits] max_file_bytes or max_lines is bad input; nothing is created."""
    tune_config(config_path, "limits", **{limit: value})
    r = run_cli(config_path, "submit", str(write_jsonl(tmp_path / "in.jsonl", GOOD)))
    assert r.returncode == 2 and expect in r.stderr, r.stderr
    assert count_jobs(ctx) == 0


def test_reconcile_command_refills_an_emptied_redis(config_path, tmp_path, redis_flushed):
    """After Redis loses its messages, `reconcile` re-enqueues every queued request from SQL."""
    r = run_cli(config_path, "submit", str(write_jsonl(tmp_path / "in.jsonl", GOOD)), "--json")
    assert r.returncode == 0, r.stderr
    _redis_client(redis_flushed).flushdb()
    assert queued_messages(redis_flushed) == 0
    r = run_cli(config_path, "reconcile")
    assert r.returncode == 0 and "published 3 messages for every queued request" in r.stdout, r.stdout + r.stderr
    assert queued_messages(redis_flushed) == 3


def _make_engine_at(url: str, start: float) -> str:
    """In a child process: wait for `start`, then create the schema as a starting worker does."""
    time.sleep(max(0.0, start - time.time()))
    try:
        db.make_engine(Settings(database_url=url)).dispose()
        return "ok"
    except Exception as e:  # noqa: BLE001  (the parent reports what each child saw)
        return f"{type(e).__name__}: {e}"


def test_processes_creating_the_schema_at_once(database_url):
    """Workers starting together on an empty database all come up (PostgreSQL's catalog would
    otherwise refuse the second CREATE TABLE with a UniqueViolation)."""
    start = time.time() + 3  # past the children's imports, so their CREATE TABLEs meet
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        seen = pool.starmap(_make_engine_at, [(database_url, start)] * 6)
    assert seen == ["ok"] * 6, seen
    engine = create_engine(database_url)
    assert {"lb_jobs", "lb_requests", "lb_schedules"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_user_who_may_not_create_tables_is_told_so(config_path, tmp_path, database_url):
    """A database user without CREATE rights on an empty database: exit 2, one line naming the rights,
    not an unreachable database."""
    if not database_url.startswith("postgresql"):
        pytest.skip("needs PostgreSQL (set LORABATCH_TEST_DATABASE_URL); a SQLite file has no users")
    from sqlalchemy.engine import make_url

    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # PostgreSQL 15+: a user who does not own schema public may not create in it
        if not conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = 'lb_no_create'")):
            conn.execute(text("CREATE ROLE lb_no_create LOGIN"))
        conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC, lb_no_create"))
    admin.dispose()
    tune_config(config_path, "service", database_url=make_url(database_url).set(username="lb_no_create")
                .render_as_string(hide_password=False))
    r = run_cli(config_path, "status", "job-x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot create lorabatch's tables" in r.stderr and "InsufficientPrivilege" in r.stderr, r.stderr
    assert "check that the user may create tables there" in r.stderr
