"""The whole path with real parts: submit -> Redis -> a worker process -> SQL -> status and results."""

from __future__ import annotations

import json

import pytest

from lorabatch.producer.submit import submit_file
from tests.conftest import run_cli, wait_for_job
from tests.reference import reference_output

pytestmark = pytest.mark.slow

ADAPTERS = ["sft", "sft-ckpt39", "dpo-ckpt3", "dpo", "base"]
PROMPTS = ["The weather today is", "Once upon a time", "A list of fruits:", "def add(a, b):",
           "The capital of France", "In the morning I", "Numbers: 1, 2, 3,", "Dear friend,",
           "The best way to learn", "My favourite colour is", "Rain falls on", "At the market"]
MAX_NEW = 10


def workload() -> list[dict]:
    """60 requests: every prompt-or-chat line under every adapter and the base model."""
    lines = []
    for i, text in enumerate(PROMPTS):
        for adapter in ADAPTERS:
            cid = f"{adapter}-{i}"
            if i % 3 == 2:
                lines.append({"custom_id": cid, "adapter": adapter, "max_new_tokens": MAX_NEW,
                              "messages": [{"role": "user", "content": text}]})
            else:
                lines.append({"custom_id": cid, "adapter": adapter, "prompt": text, "max_new_tokens": MAX_NEW})
    return lines


@pytest.mark.parametrize("weights", ["auto", "merged", "separate"])
def test_results_equal_plain_peft_one_at_a_time(config_path, tmp_path, ctx, start_worker, demo_root, weights):
    """Every result of a 60-request job over 4 adapters and base equals plain PEFT run alone, token for token."""
    lines = workload()
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(l) + "\n" for l in lines))
    worker = start_worker("--weights", weights)
    r = run_cli(config_path, "submit", str(infile), "--json")
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["id"]
    summary = wait_for_job(ctx, job_id, workers=[worker])
    assert summary["state"] == "completed" and summary["counts"]["succeeded"] == len(lines), summary

    out = run_cli(config_path, "results", job_id)
    results = [json.loads(l) for l in out.stdout.splitlines()]
    assert [r["custom_id"] for r in results] == [l["custom_id"] for l in lines], "results keep the input's order"
    by_prompt: dict[int, set[str]] = {}
    for line, res in zip(lines, results):
        expected = reference_output(demo_root, adapter=line["adapter"], prompt=line.get("prompt"),
                                    messages=line.get("messages"), max_new_tokens=MAX_NEW)
        assert res["output"] == expected, (line, res)
        assert res["status"] == "succeeded" and res["error"] is None and res["adapter"] == line["adapter"]
        assert res["completion_tokens"] > 0 and res["prompt_tokens"] > 0
        # Provenance: which base, which adapter weights, which worker produced it.
        assert res["base_model"] == ctx.deployment.base and res["worker"]
        assert res["adapter_sha256"] == ctx.deployment.adapters.get(line["adapter"])
        by_prompt.setdefault(int(line["custom_id"].rsplit("-", 1)[1]), set()).add(expected)
    # The comparison can catch a mixed-up adapter only if adapters answer differently: they do.
    assert sum(len(outs) == len(ADAPTERS) for outs in by_prompt.values()) >= len(PROMPTS) // 2


def test_status_watch_and_formats(config_path, tmp_path, ctx, start_worker):
    """status --watch shows a bar and returns when the job ends, with the job's time; results --wait waits;
    results export in all three formats, openai bodies valid for the official SDK."""
    from lorabatch.producer.status import _clock

    lines = workload()[:15]
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(l) + "\n" for l in lines))
    job_id = json.loads(run_cli(config_path, "submit", str(infile), "--json").stdout)["id"]
    early = run_cli(config_path, "status", job_id[:12])
    assert "no live worker" in early.stdout, early.stdout
    start_worker()
    waited = run_cli(config_path, "results", job_id, "--wait", "-o", str(tmp_path / "waited.jsonl"), timeout=240)
    assert waited.returncode == 0, waited.stderr
    assert len((tmp_path / "waited.jsonl").read_text().splitlines()) == 15
    watched = run_cli(config_path, "status", job_id, "--watch", "--json", timeout=240)
    assert watched.returncode == 0, watched.stderr
    final = json.loads(watched.stdout)
    assert final["state"] == "completed" and final["counts"]["succeeded"] == 15
    assert final["completion_tokens"] > 0 and final["tokens_per_second"]
    assert "15/15" in watched.stderr  # the progress bar's last frame
    assert _clock(final["elapsed_seconds"]) in watched.stderr, "the bar ends on the job's time, not the watcher's"
    openai_sdk = pytest.importorskip("openai")
    out = run_cli(config_path, "results", job_id, "--format", "openai")
    openai = [json.loads(l) for l in out.stdout.splitlines()]
    assert openai[0]["response"]["status_code"] == 200 and len(openai) == 15
    for record, line in zip(openai, lines):
        model = openai_sdk.types.chat.ChatCompletion if "messages" in line else openai_sdk.types.Completion
        model.model_validate(record["response"]["body"])
    chat = next(o for o, l in zip(openai, lines) if "messages" in l)
    assert chat["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    csv_text = run_cli(config_path, "results", job_id, "--format", "csv").stdout
    assert csv_text.splitlines()[0].startswith("custom_id,adapter,status,output")
    assert len(csv_text.splitlines()) >= 16


def test_many_small_jobs_share_a_worker(config_path, tmp_path, ctx, start_worker):
    """Twenty 2-request jobs over different adapters all complete through one worker."""
    start_worker()
    ids = []
    for j in range(20):
        f = tmp_path / f"in{j}.jsonl"
        f.write_text("".join(json.dumps({"custom_id": f"{j}-{k}", "adapter": ADAPTERS[(j + k) % 5],
                                         "prompt": PROMPTS[(j + k) % len(PROMPTS)], "max_new_tokens": 6}) + "\n"
                             for k in range(2)))
        ids.append(submit_file(ctx, str(f)).job_id)  # in-process: 20 CLI start-ups would dominate the test
    for job_id in ids:
        assert wait_for_job(ctx, job_id)["counts"]["succeeded"] == 2


def test_adapters_command(config_path):
    """adapters lists the four demo adapters; --check reports rank and targets for each."""
    r = run_cli(config_path, "adapters")
    assert r.returncode == 0 and all(n in r.stdout for n in ADAPTERS[:4])
    r = run_cli(config_path, "adapters", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("r=16") == 4 and "q_proj" in r.stdout and "v_proj" in r.stdout


def test_demo_command_runs_the_main_job(tmp_path):
    """`lorabatch demo` from nothing: builds the model, runs a worker, completes a job over all adapters."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    env["LORABATCH_STATE_DIR"] = str(tmp_path / "state")
    r = subprocess.run([sys.executable, "-m", "lorabatch.cli", "demo", "--requests", "20",
                        "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "completed  20/20 done" in r.stdout and "succeeded 20" in r.stdout
        shown = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
        assert {s["adapter"] for s in shown} == set(ADAPTERS) and all(s["status"] == "succeeded" for s in shown)
        from lorabatch.cli.stop import embedded_redis_info

        assert "stopped the embedded Redis the demo started" in r.stderr, r.stderr[-2000:]
        assert embedded_redis_info(tmp_path / "state") is None, "the demo's Redis outlives it"
    finally:
        from lorabatch.store import broker

        broker.stop_embedded_redis(tmp_path / "state")


def test_worker_names_broken_adapters_at_start(config_path, tmp_path, start_worker):
    """An adapter whose folder is missing is named in the worker's log at start, with the reason."""
    text = config_path.read_text().replace("[adapters]\n", f'[adapters]\nghost = "{tmp_path / "no-such-adapter"}"\n', 1)
    config_path.write_text(text)
    w = start_worker()
    assert "adapter 'ghost' cannot be used" in w.read_log()
