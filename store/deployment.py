"""What a worker serves and what a job runs on: one base model, and per adapter the sha256 of its weights.

Routing depends only on the base model and on the adapters a job names:
- each base model has one queue, `lorabatch.<base key>`, which every worker of that base model
  consumes, whatever adapters it lists; a job whose base model the producer could not tell waits in
  the common queue `lorabatch` (consumed by every worker) and is pinned by the first worker that
  claims one of its requests (lifecycle.claim_requests), its other messages then move to its queue;
- a job pins each adapter it names to the sha256 of its weights (schemas.identity): at submit when
  the producer can know it (from the adapter's files, or without them from what live workers of that
  base model report in SQL, if they agree), else at the first claim of a request naming it. A claim
  checks per request that the worker serves the adapter with the pinned weights; a request it cannot
  run waits, parked, for a worker that can (or for `lorabatch retarget`);
- adapters a job does not name never affect it: adding or removing one changes no queue and no pin.

The base model's identity: a local directory by the sha256 of its config.json and the names and sizes
of its weight files; a hub id by the id as written. A producer without the model's folder (another
machine) takes it from a live worker whose base model has the same folder name, else leaves the job
unpinned (the first claim pins it).

Failure windows (what happens if a process dies between two steps):
- submit: the pins are written in the transaction that opens the job and owes its messages; dying
  before the publish leaves the outbox row, which a worker's reconcile round publishes;
- a claim that parks requests commits the park with the claim, then the message is acknowledged;
  dying in between redelivers the message, and its claim parks them again (nothing is lost);
- a worker that can run parked requests (Upkeep.unpark), and `retarget`, clear the park and owe the
  messages in one transaction, then publish; dying in between leaves the outbox row, published later;
- a worker's record of what it serves lags its files by up to one heartbeat: a claim made on the old
  view runs on what the engine then loads, and a result whose sha256 is not the job's pin is refused
  (lifecycle.record_outcomes: back to the queue, its adapter parked), never recorded as if it were;
- references of another base model's job (from the common queue) are owed to its own queue in the
  claim's transaction and published by a reconcile round after [worker] publish_grace_seconds.

Files only, no SQL: the callers pass what they read from the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorabatch.schemas.identity import adapter_sha256
from lorabatch.schemas.settings import Settings


@dataclass(frozen=True)
class Deployment:
    """What a worker serves: its base model and the adapters it lists, as their files are now."""

    id: str
    """The base model's key (base_key): names the queue and is written on jobs and worker rows."""
    base: str
    """The base model's identity (see the module docstring)."""
    adapters: dict[str, str | None] = field(default_factory=dict)
    """Adapter name -> sha256 of its weights (None when its files are missing here)."""

    @property
    def queue(self) -> str:
        """The Redis queue of this base model's work."""
        return f"lorabatch.{self.id}"


def deployment_of(settings: Settings) -> Deployment:
    """What these settings serve (hashes adapter weights once per file version; about 30 ms per 10 MB)."""
    base = base_identity(settings)
    return Deployment(id=base_key(base), base=base, adapters=served_adapters(settings))


def served_adapters(settings: Settings) -> dict[str, str | None]:
    """Adapter name -> sha256 of its weights as the files are now (None: missing). Cheap when unchanged."""
    return {name: adapter_sha256(settings.adapter_dir(name)) for name in sorted(settings.adapters)}


def base_key(identity: str) -> str:
    """16 hex digits naming a base model's queue: a digest of its identity."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def base_identity(settings: Settings) -> str:
    """The base model's identity: from its local folder's files, else its id as written."""
    local = Path(settings.base_model)
    config = local / "config.json"
    if not config.is_file():
        return settings.model.base
    h = hashlib.sha256(config.read_bytes())
    for weights in sorted(local.glob("*.safetensors")):
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{local.name}@{h.hexdigest()[:16]}"


def has_local_base(settings: Settings) -> bool:
    return (Path(settings.base_model) / "config.json").is_file()


@dataclass(frozen=True)
class Served:
    """One live worker's record, as its heartbeat wrote it (schemas.tables.Worker)."""

    key: str | None
    base: str | None
    adapters: Mapping[str, str | None]


def job_base_key(settings: Settings, workers: Iterable[Served]) -> str | None:
    """The base key a job submitted with these settings runs on: from the model's files when this
    machine has them; else that of the live workers whose base model is the configured one (the id as
    written, or a folder of the same name), when they name exactly one; else None (the first claim pins)."""
    identity = base_identity(settings)
    if has_local_base(settings):
        return base_key(identity)
    name = Path(settings.model.base.rstrip("/")).name
    keys = {w.key for w in workers if w.key and w.base and (w.base == identity or w.base.split("@")[0] == name)}
    return keys.pop() if len(keys) == 1 else None


def pins_at_submit(settings: Settings, names: Iterable[str], *, key: str | None,
                   workers: Iterable[Served]) -> dict[str, str | None]:
    """The sha256 each named adapter is pinned to when a job is submitted: its files' here; without
    them, what the live workers of base `key` serve under that name, if they all agree; else None (the
    first claim pins it). A producer never needs the weights to submit."""
    workers = [w for w in workers if key is not None and w.key == key]
    pins: dict[str, str | None] = {}
    for name in sorted(set(names)):
        sha = adapter_sha256(settings.adapter_dir(name)) if name in settings.adapters else None
        if sha is None:
            reported = {w.adapters.get(name) for w in workers if w.adapters.get(name)}
            sha = reported.pop() if len(reported) == 1 else None
        pins[name] = sha
    return pins
