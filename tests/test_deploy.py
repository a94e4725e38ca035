"""The Compose deployment: nothing published beyond 127.0.0.1, no secret in the files, images that fit their job."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
LORABATCH_SERVICES = ("worker", "beat", "metrics", "flower")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def published(service: dict) -> list[str]:
    return [str(p) if not isinstance(p, dict) else f"{p.get('host_ip', '')}:{p.get('published')}:{p.get('target')}"
            for p in service.get("ports", [])]


def stages(dockerfile: str) -> dict[str, tuple[str, str]]:
    """Stage name -> (the stage it starts FROM, its instructions)."""
    out: dict[str, tuple[str, str]] = {}
    for block in re.split(r"(?m)^(?=FROM )", dockerfile):
        m = re.match(r"FROM (\S+)(?: AS (\S+))?", block)
        if m:
            out[m.group(2) or m.group(1)] = (m.group(1), block)
    return out


def test_no_port_published_beyond_localhost(compose):
    """Every published port (Redis, PostgreSQL, worker metrics, job metrics, Flower) binds 127.0.0.1 only."""
    seen = set()
    for name, service in compose["services"].items():
        for port in published(service):
            seen.add(name)
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert seen >= {"worker", "metrics", "flower"}


def test_no_password_written_in_compose(compose):
    """Passwords come from the environment with no default: no literal password, no ${...:-default}."""
    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\$\{\w*PASSWORD\w*:?-", text), "a password variable has a default"
    for url_password in re.findall(r"://[^/\s@]*?:([^@\s]+)@", text):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", url_password), f"a URL carries a literal password {url_password!r}"
    pg = compose["services"]["postgres"]["environment"]
    assert pg["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    redis_cmd = compose["services"]["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    for name in LORABATCH_SERVICES:
        env = compose["services"][name]["environment"]
        assert "${REDIS_PASSWORD:?" in env["LORABATCH_BROKER_URL"], f"{name} connects to Redis without its password"
        assert "${POSTGRES_PASSWORD:?" in env["LORABATCH_DATABASE_URL"]
    flower = compose["services"]["flower"]["environment"]
    assert flower["FLOWER_BASIC_AUTH"].startswith("lorabatch:${FLOWER_PASSWORD:?"), "Flower without a login"


def test_secrets_live_in_a_gitignored_env_file():
    """Every variable the compose file reads is in .env.example (with no password filled in); .env is ignored."""
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), f"missing from .env.example: {used - set(example)}"
    assert all(not v for k, v in example.items() if "PASSWORD" in k)
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


def test_only_the_worker_uses_the_torch_image(compose):
    """beat, metrics and flower build the producer target; the worker the worker target, under another image name."""
    targets = {name: compose["services"][name]["build"]["target"] for name in LORABATCH_SERVICES}
    assert targets == {"worker": "worker", "beat": "producer", "metrics": "producer", "flower": "producer"}
    images = {name: compose["services"][name]["image"] for name in LORABATCH_SERVICES}
    assert images["worker"] not in {images["beat"], images["metrics"], images["flower"]}


def test_services_with_ports_have_health_checks(compose):
    """A service that publishes a port has a health check (or waits on one), so Compose knows when it is up."""
    services = compose["services"]
    for name, service in services.items():
        if not service.get("ports"):
            continue
        deps = service.get("depends_on") or {}
        waits = isinstance(deps, dict) and any(d.get("condition") == "service_healthy" and "healthcheck" in services[n]
                                               for n, d in deps.items())
        assert "healthcheck" in service or waits, f"{name} publishes a port without a health check"
    assert "healthcheck" in services["worker"] and "healthcheck" in services["metrics"]


def test_producer_image_has_no_torch_and_no_root():
    """The producer stage (and what it builds on) installs no torch or worker extra; both images run as a user."""
    all_stages = stages(DOCKERFILE.read_text())
    assert {"producer", "worker"} <= set(all_stages)

    def lineage(name: str) -> list[str]:
        chain = []
        while name in all_stages:
            chain.append(all_stages[name][1])
            name = all_stages[name][0]
        return chain

    producer = "\n".join(lineage("producer"))
    installs = re.findall(r"pip install[^\n]*", producer)
    assert installs and any("[postgres,annotate]" in line for line in installs)
    assert not re.search(r"torch|worker", "\n".join(installs)), installs
    assert re.search(r"\[worker,", "\n".join(re.findall(r"pip install[^\n]*", all_stages["worker"][1])))
    for name in ("producer", "worker"):
        users = re.findall(r"(?m)^USER\s+(\S+)", "\n".join(lineage(name)))
        assert users and users[0] not in ("root", "0"), f"the {name} image runs as root"


@pytest.mark.skipif(not (shutil.which("docker-compose") or shutil.which("docker")), reason="no docker compose here")
def test_compose_refuses_to_start_without_passwords(tmp_path):
    """`docker compose config` fails naming REDIS_PASSWORD without .env, and resolves once .env sets both passwords."""
    cmd = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker compose is not installed")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    r = subprocess.run([*cmd, "config"], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "PASSWORD in .env" in r.stderr, r.stderr
    env_text = (REPO / ".env.example").read_text()
    env_text = env_text.replace("REDIS_PASSWORD=\n", "REDIS_PASSWORD=r3dis\n").replace(
        "POSTGRES_PASSWORD=\n", "POSTGRES_PASSWORD=pgpw\n").replace("FLOWER_PASSWORD=\n", "FLOWER_PASSWORD=fl0wer\n")
    (tmp_path / ".env").write_text(env_text)
    r = subprocess.run([*cmd, "config"], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)["services"]
    assert resolved["worker"]["environment"]["LORABATCH_BROKER_URL"] == "redis://:r3dis@redis:6379/0"
    assert "pgpw@postgres" in resolved["beat"]["environment"]["LORABATCH_DATABASE_URL"]
    assert resolved["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "lorabatch:fl0wer"
