"""The Python client as a user drives it: a real worker process, real Redis, the demo model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorabatch import Client
from lorabatch.client import JobTimeout, NotFinished
from lorabatch.schemas.errors import InvalidInput, NotFound
from tests.conftest import run_cli
from tests.reference import reference_output

MAX_NEW = 6
LINES = [
    {"custom_id": "a", "adapter": "sft", "prompt": "Once upon a time", "max_new_tokens": MAX_NEW},
    {"custom_id": "b", "adapter": "dpo", "messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": MAX_NEW},
    {"custom_id": "c", "method": "POST", "url": "/v1/completions",
     "body": {"model": "base", "prompt": "Dear friend,", "max_tokens": MAX_NEW}},
]


@pytest.mark.slow
def test_submit_wait_results_with_a_real_worker(config_path, start_worker, demo_root):
    """submit(dicts) -> wait(on_progress) -> results() in input order, equal to plain PEFT; status() is
    the `status --json` shape; jobs() lists the job."""
    with Client(config_path) as client:
        job = client.submit(LINES, name="from-code")
        assert job.submitted.created and job.submitted.total == 3
        with pytest.raises(NotFinished, match="3 of 3 requests are not done"):
            next(job.results())
        with pytest.raises(JobTimeout):
            job.wait(timeout=0.1)
        start_worker()
        seen: list[int] = []
        final = job.wait(timeout=240, on_progress=lambda s: seen.append(s["done"]))
        assert final["state"] == "completed" and final["counts"]["succeeded"] == 3 and seen[-1] == 3
        assert seen == sorted(seen)
        results = list(job.results())
        assert [r["custom_id"] for r in results] == ["a", "b", "c"]
        assert [r["output"] for r in results] == [
            reference_output(demo_root, adapter="sft", prompt="Once upon a time", max_new_tokens=MAX_NEW),
            reference_output(demo_root, adapter="dpo", messages=[{"role": "user", "content": "Hello"}],
                             max_new_tokens=MAX_NEW),
            reference_output(demo_root, adapter="base", prompt="Dear friend,", max_new_tokens=MAX_NEW),
        ]
        cli = json.loads(run_cli(config_path, "status", job.id, "--json").stdout)
        mine = job.status()
        assert set(cli) == set(mine) and cli["counts"] == mine["counts"]
        assert mine["workers"]["live"] == 1
        assert client.job("from-code").id == job.id
        assert job.id in [j["id"] for j in client.jobs(state="completed")]
        workers = client.workers()
        assert len(workers) == 1 and workers[0]["pid"] and workers[0]["last_heartbeat"]


def test_errors_are_the_cli_errors(config_path, tmp_path):
    """Bad requests raise InvalidInput naming the item (never the temporary file they pass through), every
    problem of an item at once; no items is one line; an unknown job raises NotFound."""
    with Client(config_path) as client:
        with pytest.raises(InvalidInput) as e:
            client.submit([LINES[0], {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                                      "body": {"model": "sft", "messages": [{"role": "user", "content": "x"}], "n": 2,
                                               "response_format": {"type": "json_object"}}}])
        message = str(e.value)
        assert message.startswith("the requests: 1 invalid item;") and "requests.jsonl" not in message, message
        assert "\n  item 1: has body.n=2 and body.response_format, which lorabatch does not serve" in message
        assert e.value.problems == [(1, e.value.problems[0][1])]
        with pytest.raises(InvalidInput, match="^the requests are empty"):
            client.submit([])
        with pytest.raises(NotFound):
            client.job("job-nothing")


def test_cancel_and_idempotency(config_path, tmp_path):
    """cancel() cancels what has not run; the same idempotency key returns the same job."""
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(l) + "\n" for l in LINES))
    with Client(config_path) as client:
        job = client.submit(f, idempotency_key="nightly-1")
        again = client.submit(str(f), idempotency_key="nightly-1")
        assert again.id == job.id and not again.submitted.created
        after = job.cancel()
        assert after["state"] == "cancelled" and after["counts"]["cancelled"] == 3
        assert [r["status"] for r in job.results()] == ["cancelled"] * 3


def test_client_imports_no_torch(config_path):
    """A producer-only install can use the client: importing and using it loads no torch."""
    code = ("import sys; from lorabatch import Client; c = Client(sys.argv[1]); c.jobs(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code, str(config_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_annotate_without_waiting(config_path, tmp_path):
    """client.annotate(wait=False) submits one job for the distinct rows and returns its id."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "b", "a")))
    with Client(config_path) as client:
        run = client.annotate(str(data), template="Say {text}", adapter="sft", wait=False, max_new_tokens=4)
        assert run["outputs"] is None and client.job(run["job"]).status()["counts"]["total"] == 2
