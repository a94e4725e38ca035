"""The commands around jobs, with no worker: lookup by prefix or name, status without workers, retry,
deleting old jobs, config, help texts, and the one-line errors of issue #12."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import click
from sqlalchemy import func, select, update

from lorabatch.schemas.tables import Job, Request, utcnow
from tests.conftest import _redis_client
from tests.test_annotate import cli_in_process
from tests.test_producer import GOOD, write_jsonl


def submit(capsys, config_path: Path, tmp_path: Path, *args: str) -> str:
    code, out, err = cli_in_process(capsys, config_path, "submit", str(write_jsonl(tmp_path / "in.jsonl", GOOD)),
                                    "--json", *args)
    assert code == 0, err
    return json.loads(out)["id"]


def finish(ctx, job_id: str, *, failed: int = 0, days_ago: float = 0) -> None:
    """Pretend a worker ran the job: the first `failed` requests failed, the rest succeeded."""
    with ctx.sessions.begin() as s:
        s.execute(update(Request).where(Request.job_id == job_id).values(state="succeeded", output="ok"))
        s.execute(update(Request).where(Request.job_id == job_id, Request.idx < failed)
                  .values(state="failed", error="adapter broke"))
        job = s.get(Job, job_id)
        job.n_queued, job.n_succeeded, job.n_failed = 0, job.total - failed, failed
        job.state, job.finished_at = "completed", utcnow() - timedelta(days=days_ago)


def test_job_named_by_prefix_or_name(capsys, config_path, tmp_path, ctx):
    """A unique id prefix or a job's name finds it; an ambiguous prefix exits 2 listing the candidates."""
    first = submit(capsys, config_path, tmp_path, "--name", "nightly")
    second = submit(capsys, config_path, tmp_path)
    code, out, _ = cli_in_process(capsys, config_path, "status", first[:10], "--json")
    assert code == 0 and json.loads(out)["id"] == first
    code, out, _ = cli_in_process(capsys, config_path, "status", first[4:12], "--json")  # without "job-"
    assert code == 0 and json.loads(out)["id"] == first
    code, out, _ = cli_in_process(capsys, config_path, "status", "nightly", "--json")
    assert code == 0 and json.loads(out)["id"] == first
    code, _, err = cli_in_process(capsys, config_path, "cancel", "job-")
    assert code == 2 and first in err and second in err and "give more of the id" in err
    assert len(err.strip().splitlines()) == 1


def test_status_says_no_worker_is_alive(capsys, config_path, tmp_path, ctx):
    """With no worker, status says so (text and JSON) and `workers` lists none."""
    job = submit(capsys, config_path, tmp_path)
    code, out, _ = cli_in_process(capsys, config_path, "status", job)
    assert code == 0 and "no live worker" in out and "lorabatch worker" in out
    code, out, _ = cli_in_process(capsys, config_path, "status", job, "--json")
    workers = json.loads(out)["workers"]
    assert workers["live"] == 0 and workers["last_heartbeat"] is None
    code, out, err = cli_in_process(capsys, config_path, "workers", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, err = cli_in_process(capsys, config_path, "workers")
    assert code == 0 and "no live worker" in err


def test_retry_requeues_only_failed_requests(capsys, config_path, tmp_path, ctx, redis_flushed):
    """retry on a completed job puts back exactly its failed requests; on an open job it is refused."""
    job = submit(capsys, config_path, tmp_path)
    code, _, err = cli_in_process(capsys, config_path, "retry", job)
    assert code == 2 and "only a completed job" in err
    finish(ctx, job, failed=2)
    _redis_client(redis_flushed).flushdb()
    code, _, err = cli_in_process(capsys, config_path, "retry", job)
    assert code == 0 and "2 failed requests queued again" in err
    with ctx.sessions() as s:
        states = dict(s.execute(select(Request.custom_id, Request.state).where(Request.job_id == job)).all())
        j = s.get(Job, job)
        assert states == {"a": "queued", "b": "queued", "c": "succeeded"}
        assert (j.state, j.n_queued, j.n_failed, j.n_succeeded, j.finished_at) == ("running", 2, 0, 1, None)
    client = _redis_client(redis_flushed)
    assert sum(client.llen(k) for k in client.keys("lorabatch*") if client.type(k) == b"list") >= 1
    code, out, _ = cli_in_process(capsys, config_path, "results", job)
    assert code == 1


def test_jobs_older_than_delete(capsys, config_path, tmp_path, ctx):
    """--older-than 30d --delete removes ended jobs older than that with their requests, nothing else."""
    old, recent, running = (submit(capsys, config_path, tmp_path) for _ in range(3))
    finish(ctx, old, days_ago=40)
    finish(ctx, recent, days_ago=1)
    code, out, _ = cli_in_process(capsys, config_path, "jobs", "--older-than", "30d", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [old]
    code, _, err = cli_in_process(capsys, config_path, "jobs", "--older-than", "30d", "--delete")
    assert code == 0 and "deleted 1 job " in err
    with ctx.sessions() as s:
        assert set(s.scalars(select(Job.id))) == {recent, running}
        assert s.scalar(select(func.count()).select_from(Request).where(Request.job_id == old)) == 0
    assert cli_in_process(capsys, config_path, "jobs", "--delete")[0] == 2
    assert cli_in_process(capsys, config_path, "jobs", "--older-than", "soon")[0] == 2


def test_submit_directory_and_plural(capsys, config_path, tmp_path, ctx):
    """A directory is named as one; one request reads '1 request'."""
    code, _, err = cli_in_process(capsys, config_path, "submit", str(tmp_path))
    assert code == 2 and "is a directory" in err
    code, _, err = cli_in_process(capsys, config_path, "submit", str(write_jsonl(tmp_path / "one.jsonl", GOOD[:1])))
    assert code == 0 and "1 request submitted" in err


def test_submit_without_config_says_so_once(tmp_path, config_path, redis_flushed, database_url):
    """Outside a project folder, submit says no lorabatch.toml was found: one line, not one per line."""
    lines = [{"custom_id": f"r{i}", "adapter": "sft", "prompt": "x"} for i in range(40)]
    infile = write_jsonl(tmp_path / "in.jsonl", lines)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    env.update(LORABATCH_BROKER_URL=redis_flushed, LORABATCH_DATABASE_URL=database_url,
               LORABATCH_STATE_DIR=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-m", "lorabatch.cli", "submit", str(infile)], capture_output=True, text=True,
                       env=env, cwd=empty, timeout=120)
    assert r.returncode == 2 and "no lorabatch.toml found" in r.stderr and "lorabatch init" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_config_is_formatted_with_passwords_hidden(capsys, config_path):
    from tests.conftest import tune_config

    tune_config(config_path, "service", database_url="postgresql+psycopg://u:s3cret@db/x")
    code, out, _ = cli_in_process(capsys, config_path, "config")
    assert code == 0 and "[model]\n" in out and "[worker]\n" in out and "s3cret" not in out and "u:***@db" in out
    code, out, _ = cli_in_process(capsys, config_path, "config", "--json")
    assert json.loads(out)["worker"]["weights"] and "\n  " in out


def test_help_texts():
    """Every --json option has help text; the command list shows whole first lines, never cut with '...'."""
    from click.testing import CliRunner

    from lorabatch.cli.main import cli

    def commands(group):
        for cmd in group.commands.values():
            yield cmd
            if isinstance(cmd, click.Group):
                yield from commands(cmd)

    for cmd in commands(cli):
        for p in cmd.params:
            if isinstance(p, click.Option) and "--json" in p.opts:
                assert p.help, f"{cmd.name} --json has no help text"
    out = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
    commands_part = out.split("Commands:")[1]
    assert "..." not in commands_part and "generate in this process" in commands_part


def test_status_names_a_base_model_no_worker_serves(capsys, config_path, tmp_path, ctx):
    """A live worker of another base model does not count: status says no live worker serves this job's;
    `workers` still lists it."""
    from lorabatch.schemas.tables import Worker

    job = submit(capsys, config_path, tmp_path)
    with ctx.sessions.begin() as s:
        s.add(Worker(id="w-other", hostname="elsewhere", pid=4242, deployment="other-deployment",
                     heartbeat_at=utcnow(), tokens_per_second=12.5))
    code, out, _ = cli_in_process(capsys, config_path, "status", job)
    assert code == 0 and "no live worker serves this job's base model (1 live worker serves another)" in out, out
    code, out, _ = cli_in_process(capsys, config_path, "workers", "--json")
    (w,) = json.loads(out)
    assert (w["host"], w["pid"], w["deployment"], w["tokens_per_second"]) == ("elsewhere", 4242, "other-deployment", 12.5)
    code, out, _ = cli_in_process(capsys, config_path, "workers")
    assert "elsewhere" in out and "12.5" in out
