"""lorabatch: offline LLM batch jobs over one base model and many LoRA adapters.

`from lorabatch import Client` gives the Python client (lorabatch/client.py). It is imported on
first use, so `import lorabatch.schemas` (or the worker) does not pay for the client's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorabatch.client import Client, Job

__all__ = ["Client", "Job"]


def __getattr__(name: str):
    if name in __all__:
        from lorabatch import client

        return getattr(client, name)
    raise AttributeError(f"module 'lorabatch' has no attribute {name!r}")
