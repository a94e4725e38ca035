"""What one worker serves: its adapters' identities as their files are now, and as the engine loaded them.

The view (adapter name -> sha256 of its weights, schemas.identity) is what the worker's claims check
against each job's pins (lifecycle.claim_requests) and what its heartbeat records in SQL for producers
and `status`. It is read again at every heartbeat (a file is hashed again only when it changed), so an
adapter replaced in place shows there within one heartbeat. The sha256 written on a result is that of
the bytes the engine loaded (AdapterManager.identity), falling back to the view for an engine that does
not say (the instant engine).

Failure window: the view lives in memory; a claim made between a file's replacement and the next
heartbeat uses the old view, and the result it produces is refused if its weights are not the job's
pin (lifecycle.record_outcomes). A worker that dies leaves its last record, which ages out with its lease.

It knows nothing about queues, claims or SQL sessions.
"""

from __future__ import annotations

import logging
from typing import Any

from lorabatch.schemas.settings import Settings
from lorabatch.store.deployment import Deployment, served_adapters

log = logging.getLogger("lorabatch.worker")


class ServedAdapters:
    def __init__(self, settings: Settings, deployment: Deployment, engine: Any) -> None:
        self.settings = settings
        self.view: dict[str, str | None] = dict(deployment.adapters)
        """Adapter name -> sha256 of its weights as the files are now (None: unreadable here)."""
        self._manager = getattr(engine, "adapters", None)  # the AdapterManager; the instant engine has none

    def refresh(self) -> dict[str, str | None]:
        """Read the files again (cheap when unchanged); returns the new view."""
        try:
            self.view = served_adapters(self.settings)
        except OSError as e:  # a file vanishing mid-read: keep the last view, try at the next beat
            log.warning("could not read the adapters' files (%s)", e)
        return self.view

    def weights_of(self, adapter: str | None) -> str | None:
        """The sha256 of the weights that produced a result of `adapter` (None for the base model)."""
        if not adapter or adapter not in self.view:
            return None
        identity = getattr(self._manager, "identity", None)
        return (identity(adapter) if identity is not None else None) or self.view.get(adapter)
