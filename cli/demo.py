"""`lorabatch demo`: the main job on embedded defaults, from nothing.

Builds the demo model and its four adapters (once, under the state directory), writes a
config pointing at them, starts the embedded Redis and a worker process, submits a job over
every adapter and the base model in all input shapes, shows progress, and prints results; then
stops the worker, and the embedded Redis if the demo started it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from lorabatch.cli.init import render_config
from lorabatch.cli.stop import embedded_redis_info
from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR, ensure_demo
from lorabatch.producer.status import format_summary, watch
from lorabatch.producer.submit import submit_file
from lorabatch.schemas.errors import LorabatchError
from lorabatch.schemas.settings import BASE_ADAPTER, load_settings
from lorabatch.store import broker
from lorabatch.store.context import Context

WORKER_STOP_SECONDS = 30
TOPICS = ["the sea", "a small robot", "autumn leaves", "a busy market", "the night sky", "an old library",
          "mountain trails", "a quiet village", "fresh bread", "the first snow", "a lost key", "city lights"]


def demo_lines(n: int, adapters: list[str], *, max_new_tokens: int) -> list[dict]:
    """`n` requests spread over `adapters`, in the native prompt, native chat and OpenAI batch shapes."""
    lines = []
    for i in range(n):
        adapter, topic = adapters[i % len(adapters)], TOPICS[i % len(TOPICS)]
        shape = (i // len(adapters)) % 3
        if shape == 0:
            lines.append({"custom_id": f"demo-{i}", "adapter": adapter, "prompt": f"Write one line about {topic}.",
                          "max_new_tokens": max_new_tokens})
        elif shape == 1:
            lines.append({"custom_id": f"demo-{i}", "adapter": adapter, "max_new_tokens": max_new_tokens,
                          "messages": [{"role": "system", "content": "You are concise."},
                                       {"role": "user", "content": f"Describe {topic} in five words."}]})
        else:
            lines.append({"custom_id": f"demo-{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": adapter, "max_tokens": max_new_tokens, "temperature": 0,
                                   "messages": [{"role": "user", "content": f"What do you think of {topic}?"}]}})
    return lines


def run_demo(*, config: str | None, n_requests: int, max_new_tokens: int) -> None:

    started = time.monotonic()
    outer = load_settings(config)
    root = ensure_demo(outer.state_path / "demo", announce=lambda m: click.echo(m, err=True))
    cfg = root / "lorabatch.toml"
    cfg.write_text(render_config(base=DEMO_MODEL_DIR, adapters=DEMO_ADAPTERS)
                   + f'\n[service]\nstate_dir = "{outer.state_path}"\n'
                   + (f'broker_url = "{outer.broker_url}"\n' if outer.broker_url else "")
                   + (f'database_url = "{outer.database_url}"\n' if outer.database_url else ""))
    settings = load_settings(cfg)
    ctx = Context(settings)
    # The demo stops the embedded Redis when it ends if it started it (one already running serves others).
    ours = not settings.broker_url and embedded_redis_info(settings.state_path) is None
    url = broker.broker_url(settings)
    click.echo(f"broker: {'embedded Redis' if not settings.broker_url else 'Redis'}, "
               f"database: {'SQLite' if not settings.database_url else 'external'}, state in {settings.state_path}", err=True)

    input_path = root / "demo-input.jsonl"
    names = [*DEMO_ADAPTERS, BASE_ADAPTER]
    with input_path.open("w") as f:
        for line in demo_lines(n_requests, names, max_new_tokens=max_new_tokens):
            f.write(json.dumps(line) + "\n")

    log_path = settings.state_path / "demo-worker.log"
    env = {**os.environ, "LORABATCH_BROKER_URL": url}
    with log_path.open("ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "lorabatch.cli", "--config", str(cfg), "worker",
                                   "--loglevel", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        submitted = submit_file(ctx, str(input_path), name="demo")
        click.echo(f"submitted {submitted.job_id}: {submitted.total} requests over {', '.join(names)} "
                   f"(worker log: {log_path})", err=True)
        summary = _watch_while_alive(ctx, submitted.job_id, worker, log_path)
        click.echo(format_summary(summary))
        _print_samples(ctx, submitted.job_id)
        click.echo(f"\ndemo finished in {time.monotonic() - started:.0f}s. Try: lorabatch --config {cfg} "
                   f"results {submitted.job_id} --format csv", err=True)
    finally:
        _stop(worker)
        ctx.close()
        if ours and broker.stop_embedded_redis(settings.state_path):
            click.echo(f"stopped the embedded Redis the demo started (in {settings.state_path}); in a project, "
                       "`lorabatch stop` stops its own", err=True)


def _watch_while_alive(ctx: Context, job_id: str, worker: subprocess.Popen, log_path: Path) -> dict:
    summary = watch(ctx.sessions, job_id, alive=lambda: worker.poll() is None)
    if summary["state"] not in ("completed", "cancelled"):
        raise LorabatchError(f"the demo worker exited with code {worker.returncode}; see {log_path}")
    return summary


def _print_samples(ctx: Context, job_id: str, per_adapter: int = 1) -> None:
    from lorabatch.producer.export import iter_results, native_record

    seen: dict[str, int] = {}
    with ctx.sessions() as session:
        for row in iter_results(session, job_id):
            if seen.get(row.adapter, 0) < per_adapter:
                seen[row.adapter] = seen.get(row.adapter, 0) + 1
                click.echo(json.dumps(native_record(row), ensure_ascii=False))


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
