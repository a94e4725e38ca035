"""What a deployment is: one base model and the exact adapter weights a configuration names.

A job is tied to the deployment it was submitted to, and only a worker serving the same one claims
its requests (lifecycle.claim_requests checks it; each deployment also has its own queue). Two
projects with different models, or the same adapter names over different weights, never run each
other's jobs: a job whose deployment no live worker serves waits, and `status` says so.

The identity is computed from files, cheaply and without torch, by producer and worker alike:
- the base model: a local directory by the sha256 of its config.json and the names and sizes of its
  weight files; a hub id by the id as written (a producer may not have it downloaded);
- each adapter: the sha256 of its adapter_model.safetensors (a trainer run folder with exactly one
  `checkpoint-N` resolves to it, as the worker does); an adapter whose files are missing counts as
  "missing:<path>", so a producer without the files never matches a worker that has them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from lorabatch.schemas.settings import Settings

WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class Deployment:
    id: str
    """16 hex digits: a digest of `base` and `adapters`."""
    base: str
    """The base model's identity (see the module docstring)."""
    adapters: dict[str, str | None] = field(default_factory=dict)
    """Adapter name -> sha256 of its weights (None when its files are missing here)."""

    @property
    def queue(self) -> str:
        """The Redis queue of this deployment's work."""
        return f"lorabatch.{self.id}"


def deployment_of(settings: Settings) -> Deployment:
    """The deployment these settings describe (hashes adapter weights; about 30 ms per 10 MB)."""
    base = base_identity(settings)
    identity = {name: adapter_digest(settings.adapter_dir(name)) for name in sorted(settings.adapters)}
    digest = hashlib.sha256(json.dumps({"base": base, "adapters": identity}, sort_keys=True).encode()).hexdigest()
    adapters = {name: None if d.startswith("missing:") else d for name, d in identity.items()}
    return Deployment(id=digest[:16], base=base, adapters=adapters)


def base_identity(settings: Settings) -> str:
    local = Path(settings.base_model)
    config = local / "config.json"
    if not config.is_file():
        return settings.model.base
    h = hashlib.sha256(config.read_bytes())
    for weights in sorted(local.glob("*.safetensors")):
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{local.name}@{h.hexdigest()[:16]}"


def adapter_digest(directory: Path) -> str:
    weights = weights_file(directory)
    if weights is None:
        return f"missing:{directory}"
    stat = weights.stat()
    return _sha256(str(weights), stat.st_size, stat.st_mtime_ns)


def weights_file(directory: Path) -> Path | None:
    """The adapter's safetensors file: in the folder, or in its only `checkpoint-N` subfolder."""
    direct = directory / WEIGHTS_FILE
    if direct.is_file():
        return direct
    found = sorted(directory.glob(f"checkpoint-*/{WEIGHTS_FILE}")) if directory.is_dir() else []
    return found[0] if len(found) == 1 else None


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Keyed on size and mtime as well: a file rewritten in place is hashed again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
