"""Schedules and `lorabatch beat`: cron slots, one firing per slot across beats, runs that become jobs and files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from lorabatch.producer import annotation as an
from lorabatch.producer import schedules
from lorabatch.producer.beat import DatabaseScheduler
from lorabatch.schemas.annotation_tables import AnnotationRun, Schedule
from lorabatch.schemas.settings import load_settings
from lorabatch.schemas.tables import Job, utcnow
from lorabatch.store.context import Context
from tests.conftest import run_cli
from tests.test_annotate import cli_in_process

DAILY = "0 2 * * *"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def add(config_path: Path, name: str, data: Path, *extra: str, cron: str = DAILY) -> subprocess.CompletedProcess:
    r = run_cli(config_path, "schedule", "add", name, str(data), "--cron", cron, "-t", "Continue: {text}",
                "--adapter", "sft", "--max-new-tokens", "4", *extra)
    assert r.returncode == 0, r.stderr
    return r


def runs(ctx: Context, name: str) -> list[AnnotationRun]:
    with an.annotation_sessions(ctx)() as s:
        return list(s.scalars(select(AnnotationRun).where(AnnotationRun.schedule == name)
                              .order_by(AnnotationRun.created_at)))


class Clock:
    """A settable `now` (naive UTC)."""

    def __init__(self, t: datetime):
        self.t = t

    def __call__(self) -> datetime:
        return self.t


# ---------------------------------------------------------------- cron slots (pure)


@pytest.mark.parametrize(
    "cron, tz, now, latest, following",
    [
        (DAILY, "UTC", "2030-01-02 02:00:00", "2030-01-02 02:00:00", "2030-01-03 02:00:00"),
        (DAILY, "UTC", "2030-01-02 01:59:59", "2030-01-01 02:00:00", "2030-01-02 02:00:00"),
        ("*/15 * * * *", "UTC", "2030-01-02 10:20:00", "2030-01-02 10:15:00", "2030-01-02 10:30:00"),
        (DAILY, "Europe/Paris", "2030-01-02 01:30:00", "2030-01-02 01:00:00", "2030-01-03 01:00:00"),
        ("@hourly", "UTC", "2030-01-02 10:00:01", "2030-01-02 10:00:00", "2030-01-02 11:00:00"),
    ],
)
def test_slots(cron, tz, now, latest, following):
    """The latest slot includes `now` itself; times are naive UTC, the cron read in its zone."""
    t = datetime.fromisoformat(now)
    assert schedules.latest_slot(cron, tz, t) == datetime.fromisoformat(latest)
    assert schedules.next_slot(cron, tz, t) == datetime.fromisoformat(following)


@pytest.mark.parametrize("cron", ["0 2 * *", "61 * * * *", "* * * * * *", "nightly"])
def test_bad_cron_is_usage_error(cron):
    with pytest.raises(schedules.UsageError, match="is not a cron expression"):
        schedules.check_cron(cron)


# ---------------------------------------------------------------- firing (no worker)


def test_schedule_commands(config_path, tmp_path, capsys):
    """add, list, disable, enable, remove; mistakes exit 2 with one line."""
    def cli(*args: str) -> tuple[int, str, str]:
        return cli_in_process(capsys, config_path, *args)

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    base = ("--cron", DAILY, "-t", "{text}", "--adapter", "sft")
    code, out, err = cli("schedule", "add", "nightly", str(data), *base)
    assert code == 0 and "schedule nightly saved; next run" in out, err
    listed = json.loads(cli("schedule", "list", "--json")[1])
    assert [(s["name"], s["cron"], s["datasets"], s["adapter"], s["last_run"]) for s in listed] == [
        ("nightly", DAILY, ["d.jsonl"], "sft", None)], "stored relative to the project folder"
    code, _, err = cli("schedule", "add", "nightly", str(data), *base)
    assert code == 2 and "already exists; pass --replace" in err
    code, _, err = cli("schedule", "add", "x", str(data), "--cron", "every night", "-t", "{text}", "--adapter", "sft")
    assert code == 2 and "is not a cron expression" in err and len(err.strip().splitlines()) == 1
    assert cli("schedule", "disable", "nightly")[0] == 0
    assert json.loads(cli("schedule", "list", "--json")[1])[0]["enabled"] is False
    assert cli("schedule", "enable", "nightly")[0] == 0
    assert cli("schedule", "remove", "nightly")[0] == 0
    assert json.loads(cli("schedule", "list", "--json")[1]) == []
    code, _, err = cli("schedule", "remove", "nightly")
    assert code == 2 and "no schedule named 'nightly'" in err


def test_each_slot_fires_once_across_beats(config_path, tmp_path, ctx):
    """Two beats ticking at the same moments fire each slot once; nothing before the slot or twice after it;
    a beat that was down fires the latest missed slot once."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    add(config_path, "nightly", data)
    other = Context(load_settings(config_path, environ={}))
    try:
        clock = Clock(schedules.next_slot(DAILY, "UTC", utcnow()) - timedelta(seconds=30))
        beats = [DatabaseScheduler(app=c.celery, context=c, now=clock) for c in (ctx, other)]
        for b in beats:
            b.tick()
        assert runs(ctx, "nightly") == [], "not before the slot"
        clock.t += timedelta(seconds=31)
        for b in beats:
            assert 0 < b.tick() <= b.max_interval
        [run] = runs(ctx, "nightly")
        with ctx.sessions() as s:
            job = s.get(Job, run.job_id)
        assert (job.schedule, job.total, job.name) == ("nightly", 2, "schedule nightly")
        assert run.slot == clock.t.replace(second=0)
        clock.t += timedelta(minutes=5)
        for b in beats:
            b.tick()
        assert len(runs(ctx, "nightly")) == 1, "a slot fires once"
        clock.t += timedelta(days=3)
        for b in beats:
            b.tick()
        assert len(runs(ctx, "nightly")) == 2, "missed slots fire once, not three times"
    finally:
        other.close()


def test_claim_is_conditional(ctx, tmp_path, config_path):
    """The conditional UPDATE lets exactly one claimer have a slot, and never an older slot."""
    add(config_path, "s", write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}]))
    slot = datetime(2030, 1, 1, 2)
    sessions = an.annotation_sessions(ctx)
    with sessions.begin() as s:
        assert schedules.claim_slot(s, "s", slot) is True
    with sessions.begin() as s:
        assert schedules.claim_slot(s, "s", slot) is False
        assert schedules.claim_slot(s, "s", slot - timedelta(days=1)) is False
        assert schedules.claim_slot(s, "s", slot + timedelta(days=1)) is True


def test_paused_or_replaced_schedule_does_not_fire_for_past_slots(ctx, tmp_path):
    """Slots that passed while a schedule was disabled, or before it was replaced, do not fire at once."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    spec = an.build_spec(ctx.settings, [str(data)], template="{text}", adapter="sft", overrides={"max_new_tokens": 4})
    t0 = datetime(2030, 1, 1, 12)
    schedules.add_schedule(ctx, "s", cron=DAILY, tz="UTC", spec=spec, now=t0)
    schedules.set_enabled(ctx, "s", enabled=False)
    assert schedules.fire_due(ctx, now=t0 + timedelta(days=3)) == [], "disabled"
    schedules.set_enabled(ctx, "s", enabled=True, now=t0 + timedelta(days=3))
    assert schedules.fire_due(ctx, now=t0 + timedelta(days=3, minutes=1)) == [], "missed while paused"
    schedules.add_schedule(ctx, "s", cron="0 10 * * *", tz="UTC", spec=spec, replace=True, now=t0 + timedelta(days=3, hours=1))
    assert schedules.fire_due(ctx, now=t0 + timedelta(days=3, hours=2)) == [], "10:00 passed before the replacement"
    assert len(schedules.fire_due(ctx, now=t0 + timedelta(days=3, hours=22))) == 1, "the next 10:00 fires"


def test_paths_are_stored_relative_to_the_project_and_resolved_where_the_beat_runs(config_path, tmp_path):
    """`schedule add 'data/*.jsonl'` stores the glob relative to the project folder; a beat whose project
    folder is elsewhere (a container mounting the project at another path) reads the datasets there."""
    write_jsonl((tmp_path / "data").mkdir() or tmp_path / "data" / "a.jsonl", [{"text": "here"}])
    r = add(config_path, "nightly", "data/*.jsonl", "-o", "data/out")
    assert "warning" not in r.stderr, r.stderr
    elsewhere = tmp_path / "mounted"
    (elsewhere / "data").mkdir(parents=True)
    write_jsonl(elsewhere / "data" / "b.jsonl", [{"text": "there"}, {"text": "and there"}])
    (elsewhere / "lorabatch.toml").write_text(config_path.read_text())  # the same database, another folder
    beat_ctx = Context(load_settings(elsewhere / "lorabatch.toml", environ={}))
    try:
        [listed] = schedules.list_schedules(beat_ctx)
        assert (listed["datasets"], listed["output"]) == (["data/*.jsonl"], "data/out")
        run_id, plan = schedules.run_now(beat_ctx, "nightly")
        assert sum(len(rows) for rows in plan.rendered.rows) == 2, "the beat's project folder, not the adder's"
        assert [f.file.input for f in plan.rendered.files] == [elsewhere / "data" / "b.jsonl"]
        assert plan.rendered.files[0].file.output.parent == elsewhere / "data" / "out"
    finally:
        beat_ctx.close()


def test_paths_outside_the_project_stay_absolute_with_a_warning(config_path, ctx, tmp_path_factory):
    """A dataset outside the project folder is stored absolute (with a warning); such schedules, and older
    ones stored with absolute paths, keep working."""
    outside = tmp_path_factory.mktemp("shared")
    data = write_jsonl(outside / "d.jsonl", [{"text": "a"}])
    r = add(config_path, "shared", data)
    assert "warning:" in r.stderr and "outside the project folder" in r.stderr and str(data) in r.stderr
    [listed] = schedules.list_schedules(ctx)
    assert listed["datasets"] == [str(data)]
    _, plan = schedules.run_now(ctx, "shared")
    assert [f.file.input for f in plan.rendered.files] == [data]


# ---------------------------------------------------------------- with a worker


@pytest.mark.slow
def test_fired_schedule_produces_job_and_file(config_path, tmp_path, ctx, start_worker):
    """A firing (fake clock) makes a job tagged with the schedule; the beat then writes the annotated file;
    the next firing, with two new rows, sends only those."""
    worker = start_worker()
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t in enumerate(["Hello", "Once upon", "Rain"])])
    add(config_path, "nightly", data, "--column", "label")
    clock = Clock(schedules.next_slot(DAILY, "UTC", utcnow()) + timedelta(seconds=1))
    beat = DatabaseScheduler(app=ctx.celery, context=ctx, now=clock)
    out = tmp_path / "d.annotated.jsonl"

    def tick_until_written(n_runs: int) -> list[dict]:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            beat.tick()
            written = [r for r in runs(ctx, "nightly") if r.written_at]
            if len(written) == n_runs:
                return [json.loads(l) for l in out.read_text().splitlines()]
            time.sleep(0.3)
        raise AssertionError(f"run not written: {runs(ctx, 'nightly')}\n{worker.read_log()[-2000:]}")

    rows = tick_until_written(1)
    assert [r["id"] for r in rows] == [0, 1, 2] and all(r["label_status"] == "succeeded" and r["label"] for r in rows)
    [run] = runs(ctx, "nightly")
    jobs = json.loads(run_cli(config_path, "jobs", "--json").stdout)
    assert [(j["id"], j["schedule"], j["state"]) for j in jobs] == [(run.job_id, "nightly", "completed")]
    status = json.loads(run_cli(config_path, "status", run.job_id, "--json").stdout)
    assert status["schedule"] == "nightly"

    write_jsonl(data, [{"id": i, "text": t} for i, t in enumerate(["Hello", "Once upon", "Rain", "Snow", "Wind"])])
    clock.t += timedelta(days=1)
    rows2 = tick_until_written(2)
    second = runs(ctx, "nightly")[1]
    with ctx.sessions() as s:
        assert s.get(Job, second.job_id).total == 2
    assert [r["label"] for r in rows2[:3]] == [r["label"] for r in rows]
    assert len(rows2) == 5 and all(r["label_status"] == "succeeded" for r in rows2)


@pytest.mark.slow
def test_beat_process_fires_and_writes(config_path, tmp_path, ctx, start_worker):
    """`lorabatch beat --interval 1` fires a due every-minute schedule from the database and writes its file;
    `schedule run-now --wait` runs one at once."""
    start_worker()
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "Hello"}, {"text": "Rain"}])
    add(config_path, "minutely", data, cron="* * * * *")
    with an.annotation_sessions(ctx).begin() as s:  # as if added two minutes ago: the last minute's slot is due
        s.execute(update(Schedule).values(counts_from=utcnow() - timedelta(minutes=2)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    log = (tmp_path / "beat.log").open("wb")
    beat = subprocess.Popen([sys.executable, "-m", "lorabatch.cli", "--config", str(config_path), "beat",
                             "--interval", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        out = tmp_path / "d.annotated.jsonl"
        deadline = time.monotonic() + 90
        while not out.exists() and time.monotonic() < deadline and beat.poll() is None:
            time.sleep(0.3)
        assert out.exists(), (tmp_path / "beat.log").read_text()[-3000:]
        rows = [json.loads(l) for l in out.read_text().splitlines()]
        assert [r["text"] for r in rows] == ["Hello", "Rain"] and all(r["annotation"] for r in rows)
        # A minute boundary may pass while the first run works (a slow machine): the next slot then fires as well,
        # as it should. Each slot fires once, and the first one carries the job.
        fired = runs(ctx, "minutely")
        assert 1 <= len(fired) <= 3 and len({r.slot for r in fired}) == len(fired), fired
        with ctx.sessions() as s:
            assert s.get(Job, fired[0].job_id).schedule == "minutely"
    finally:
        beat.terminate()
        beat.wait(30)
        log.close()
    out.unlink()
    r = run_cli(config_path, "schedule", "run-now", "minutely", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["job"] is None and res["outputs"] == [str(out)], "answered before: no job, file written at once"
    assert out.exists()
