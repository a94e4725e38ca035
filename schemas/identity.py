"""An adapter's identity: the sha256 of the bytes of its adapter_model.safetensors.

One notion for every side: a producer pins it on a job (store.deployment), a worker reports what it
serves with its heartbeat, and the engine records it for the exact bytes it loaded
(worker.engine.adapters.AdapterManager.identity), which the worker writes on each result.

hashlib and the file system only: producers, the store and the engine all import it, so it imports no
torch, no SQL and no Celery. It knows nothing about where adapters are configured or how they load.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

WEIGHTS_FILE = "adapter_model.safetensors"


def sha256_bytes(data: bytes) -> str:
    """The identity of weights already read into memory (what the engine loads from)."""
    return hashlib.sha256(data).hexdigest()


def file_stamp(path: Path) -> tuple[int, int, int]:
    """(mtime_ns, size, inode): changes when a file is rewritten or replaced, without reading it."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def adapter_weights_file(directory: Path) -> Path | None:
    """The adapter's safetensors file: in the folder, or in its only `checkpoint-N` subfolder (a trainer
    run folder, resolved as the worker resolves it); None when there is none."""
    direct = directory / WEIGHTS_FILE
    if direct.is_file():
        return direct
    found = sorted(directory.glob(f"checkpoint-*/{WEIGHTS_FILE}")) if directory.is_dir() else []
    return found[0] if len(found) == 1 else None


def adapter_sha256(directory: Path) -> str | None:
    """The identity of the adapter in `directory` as its files are now; None when its weights are missing.
    Hashed again only when the file changed (size, mtime, inode): cheap to ask at every heartbeat."""
    weights = adapter_weights_file(directory)
    if weights is None:
        return None
    try:
        stamp = file_stamp(weights)
    except OSError:  # replaced or removed between the lookup and now
        return None
    return _file_sha256(str(weights), stamp)


@lru_cache(maxsize=256)
def _file_sha256(path: str, stamp: tuple[int, int, int]) -> str:
    """Keyed on size, mtime and inode as well: a file rewritten or replaced in place is hashed again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
