"""Edges a new user hits: a worker with no lorabatch.toml, `config` output that loads back, stopping the embedded Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from lorabatch.cli.show_config import settings_toml
from lorabatch.cli.stop import embedded_redis_info
from lorabatch.schemas.settings import load_settings
from lorabatch.store import broker

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def lorabatch(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command in `cwd`, with no LORABATCH_* variable from the test environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORABATCH_")}
    return subprocess.run([sys.executable, "-m", "lorabatch.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def redis_servers_of(state: Path) -> list[int]:
    """Pids of redis-server processes listening on `state`'s socket (Redis shows it in its process title)."""
    marker = f"unixsocket:{state / 'redis.sock'}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


# ---------------------------------------------------------------- worker without a config


def test_worker_without_config_refuses(tmp_path):
    """`lorabatch worker` where no lorabatch.toml is: exit 2, one line naming the problem and the fix, no model load."""
    started = time.monotonic()
    r = lorabatch(tmp_path, "worker")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "no lorabatch.toml found" in r.stderr and "lorabatch init" in r.stderr and "--config" in r.stderr
    assert "Qwen" not in r.stderr and time.monotonic() - started < 60


# ---------------------------------------------------------------- config prints TOML that loads back


CONFIG = """
[model]
base = "models/tiny"
max_context = 4096

[adapters]
sft = "adapters/sft"
"v1.2" = "/abs/adapters/v1.2"

[worker]
weights = "separate"
max_batch_size = 8
shutdown_grace_seconds = 2.5

[limits]
max_new_tokens = 512

[service]
database_url = "sqlite:///jobs.db"
"""


def test_config_output_loads_back(tmp_path):
    """What `lorabatch config` prints is TOML that load_settings reads back into the same settings
    (no `null`, internal knobs left out, unset fields omitted)."""
    (tmp_path / "lorabatch.toml").write_text(CONFIG)
    r = lorabatch(tmp_path, "config")
    assert r.returncode == 0, r.stderr
    assert "null" not in r.stdout and "engine" not in r.stdout and "instant_step_seconds" not in r.stdout
    assert "gather_seconds" not in r.stdout and "config_path" not in r.stdout and "concurrency" not in r.stdout
    tomllib.loads(r.stdout)
    printed = tmp_path / "printed.toml"  # the same folder: relative paths resolve alike
    printed.write_text(r.stdout)
    original = load_settings(tmp_path / "lorabatch.toml", environ={})
    again = load_settings(printed, environ={})
    assert again.model_dump(exclude={"config_path"}) == original.model_dump(exclude={"config_path"})
    assert again.model.max_context == 4096 and again.adapters["v1.2"] == "/abs/adapters/v1.2"


def test_config_output_defaults_and_set_internal_knobs(tmp_path, monkeypatch):
    """With no file at all the defaults print and load back; an internal knob set away from its default is shown."""
    monkeypatch.chdir(tmp_path)  # where no lorabatch.toml is
    empty = load_settings(None, environ={"LORABATCH_STATE_DIR": str(tmp_path)})
    text = settings_toml(empty)
    assert "max_context" not in text and "metrics_port" not in text
    (tmp_path / "a.toml").write_text(text)
    assert load_settings(tmp_path / "a.toml", environ={}).model_dump(exclude={"config_path", "state_dir"}) == \
        empty.model_dump(exclude={"config_path", "state_dir"})
    (tmp_path / "b.toml").write_text('[worker]\nengine = "instant"\n')
    text = settings_toml(load_settings(tmp_path / "b.toml", environ={}))
    assert tomllib.loads(text)["worker"]["engine"] == "instant"


def test_config_output_hides_passwords(tmp_path):
    """URLs print with the password hidden, still as TOML strings."""
    (tmp_path / "lorabatch.toml").write_text(
        '[service]\nbroker_url = "redis://:s3cret@h:6379/0"\ndatabase_url = "postgresql+psycopg://u:pw@db/x"\n')
    text = settings_toml(load_settings(tmp_path / "lorabatch.toml", environ={}))
    assert "s3cret" not in text and ":pw@" not in text
    assert tomllib.loads(text)["service"]["database_url"] == "postgresql+psycopg://u:***@db/x"


# ---------------------------------------------------------------- stopping the embedded Redis


def test_stop_ends_the_embedded_redis(tmp_path):
    """A real command leaves the project's embedded Redis running; `lorabatch stop` refuses while another
    client is connected, then stops it (no redis-server of that state dir alive), and exits 0 when none runs."""
    (tmp_path / "lorabatch.toml").write_text("[adapters]\n")
    state = tmp_path / ".lorabatch"
    try:
        r = lorabatch(tmp_path, "reconcile")
        assert r.returncode == 0, r.stderr
        assert len(redis_servers_of(state)) == 1, "the command's embedded Redis outlives it"
        pid = embedded_redis_info(state)["process_id"]

        other = redis.Redis(unix_socket_path=str(state / "redis.sock"))
        other.ping()  # a connection that stays open, as a worker's would
        r = lorabatch(tmp_path, "stop")
        assert r.returncode == 2 and "client connection" in r.stderr and "--force" in r.stderr, r.stderr
        assert redis_servers_of(state) == [pid]
        other.close()

        r = lorabatch(tmp_path, "stop")
        assert r.returncode == 0 and f"stopped the embedded Redis of {state} (pid {pid})" in r.stdout, r.stderr
        assert redis_servers_of(state) == []
        r = lorabatch(tmp_path, "stop")
        assert r.returncode == 0 and "no embedded Redis runs" in r.stdout
    finally:
        broker.stop_embedded_redis(state)


def test_stop_with_an_external_broker_stops_nothing(tmp_path):
    """With a broker URL configured there is no embedded Redis: stop says so and exits 0."""
    (tmp_path / "lorabatch.toml").write_text('[service]\nbroker_url = "redis://:pw@127.0.0.1:1/0"\n')
    r = lorabatch(tmp_path, "stop")
    assert r.returncode == 0 and "not an embedded one" in r.stdout and "pw@" not in r.stdout
