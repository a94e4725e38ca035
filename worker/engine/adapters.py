"""The adapters a worker can serve: configured names, validated folders, and an LRU of loaded ones.

Names map to folders through a provider that is asked again on every lookup, so an adapter added to the
configuration later is usable without a restart. An adapter is validated against the base model before its
weights load (adapter_files), loaded on first use by a backend, and kept among at most ``max_resident`` loaded
adapters; the least recently used one is unloaded to make room.

Two backends hold the weights, behind the same catalogue, LRU and events: ``PeftBackend`` (transformers'
forward: ``PeftModel.from_pretrained`` wraps the base model in place, the same module object then carries
every LoRA layer) and lora_stack.NativeBackend (the native forward: adapters stacked for one batched op).

This module knows nothing about batching, decoding, requests or where the configuration comes from.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Union

from lorabatch.schemas.errors import AdapterError
from lorabatch.schemas.identity import file_stamp, sha256_bytes
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine.adapter_files import (
    WEIGHTS_FILE,
    AdapterSpec,
    read_adapter,
    validate_against_base,
)
from lorabatch.worker.engine.weights import (
    MergedWeights,
    RowAdapterNames,
    lora_layers,
    row_adapters,
)

if TYPE_CHECKING:
    from lorabatch.schemas.settings import Settings

log = logging.getLogger(__name__)

PEFT_BASE = "__base__"
"""PEFT's name, in per-row adapter names, for "no adapter"."""

AdapterDirs = Union[Mapping[str, Union[str, Path]], Callable[[], Mapping[str, Union[str, Path]]]]


class AdapterManager:
    """Resolve, validate, load, evict and apply LoRA adapters on one base model."""

    def __init__(
        self, adapter_dirs: AdapterDirs, *, base_model: str | None = None, max_resident: int = 8, max_rank: int = 256,
        backend: Any = None,
    ) -> None:
        """``backend``: where loaded weights live (PeftBackend by default; lora_stack.NativeBackend)."""
        self._dirs = adapter_dirs
        self.base_model = base_model
        self.max_resident = max_resident
        self.max_rank = max_rank
        self.backend = backend if backend is not None else PeftBackend()
        self._model: Any = None
        self._module_names: list[str] | None = None
        self._resident: OrderedDict[str, tuple] = OrderedDict()  # name -> (file stamp..., sha256 loaded); LRU first
        self._warned: set[tuple[str, Path]] = set()  # base model mismatches already logged
        self.on_event: Callable[[str], None] | None = None
        """Told "load", "load_failed", "eviction" or "merge_switch" as they happen (the worker counts them)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterManager:
        # A callable, not a snapshot: whoever reloads settings.adapters is heard on the next lookup.
        return cls(
            lambda: {name: settings.adapter_dir(name) for name in settings.adapters},
            base_model=settings.base_model,
            max_resident=settings.worker.max_resident_adapters,
            max_rank=settings.worker.max_adapter_rank,
        )

    # -- configuration and validation ------------------------------------------------------------------

    def configured(self) -> dict[str, Path]:
        dirs = self._dirs() if callable(self._dirs) else self._dirs
        return {name: Path(path) for name, path in dirs.items()}

    def bind(self, model: Any) -> None:
        """Serve adapters on ``model`` (the plain base model, before any adapter is loaded)."""
        if self._model is not None and self._model is not model:
            raise ValueError("this AdapterManager already serves another model")
        self._model = model
        self._module_names = [name for name, _ in model.named_modules()]
        self.backend.bind(model)

    @property
    def _peft(self) -> Any:
        return getattr(self.backend, "peft", None)

    @property
    def _layers(self) -> list[Any]:
        return getattr(self.backend, "layers", [])

    def spec(self, name: str) -> AdapterSpec:
        """The validated adapter ``name``; AdapterError when it is unknown or unfit for the base model."""
        dirs = self.configured()
        if name not in dirs:
            known = ", ".join(sorted(dirs)) or "none"
            raise AdapterError(f"adapter {name!r} is not configured (configured: {known}); add it under [adapters].")
        spec = read_adapter(name, dirs[name])
        names = self._base_module_names()
        mismatch = validate_against_base(spec, module_names=names, base_model=self.base_model, max_rank=self.max_rank)
        if mismatch and (name, spec.path) not in self._warned:
            self._warned.add((name, spec.path))
            log.warning("%s", mismatch)
        return spec

    def check(self, name: str) -> dict:
        """What ``lorabatch adapters --check`` prints for one adapter; never raises for a bad adapter."""
        configured = self.configured().get(name)
        report = {"name": name, "path": str(configured) if configured else None, "rank": None, "alpha": None,
                  "targets": None, "size_bytes": None, "problem": None}
        try:
            spec = self.spec(name)
        except AdapterError as e:
            report["problem"] = str(e)
            return report
        targets = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
        report.update(path=str(spec.path), rank=spec.rank, alpha=spec.alpha, targets=targets, size_bytes=spec.size_bytes)
        return report

    def _base_module_names(self) -> list[str]:
        if self._module_names is None:
            if not self.base_model:
                raise AdapterError("no base model to validate adapters against; set [model] base.")
            self._module_names = _skeleton_module_names(self.base_model)
        return self._module_names

    # -- residency ---------------------------------------------------------------------------------------

    @property
    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._resident)

    def load(self, name: str, *, keep: Iterable[str] = ()) -> AdapterSpec:
        """Make ``name`` resident (loading it, evicting the LRU adapter not in ``keep``); AdapterError on failure."""
        if self._model is None:
            raise RuntimeError("bind(model) before loading adapters")
        spec = self.spec(name)
        identity = (spec.path, *file_stamp(spec.path / WEIGHTS_FILE))
        if self._resident.get(name, ())[:4] == identity:
            self._resident.move_to_end(name)
            return spec
        # PEFT's loader re-sets the active adapter, which unmerges (subtracts) a merged one: restore exactly first.
        self.backend.restore()
        if name in self._resident:  # the configured folder or its file changed since it was loaded
            self.evict(name)
        pinned = set(keep) | {name}
        while len(self._resident) >= self.max_resident:
            victim = next((n for n in self._resident if n not in pinned), None)
            if victim is None:
                break  # every resident adapter is needed by this batch; go one over rather than fail it
            self.evict(victim)
        sha = sha256_bytes((spec.path / WEIGHTS_FILE).read_bytes())  # what results of these weights name
        self._load_weights(spec)
        self._resident[name] = (*identity, sha)
        if file_stamp(spec.path / WEIGHTS_FILE) != identity[1:]:  # replaced while loading: the backend may
            return self.load(name, keep=keep)  # not have read the bytes hashed; load the new file
        return spec

    def identity(self, name: str) -> str | None:
        """sha256 of the weights file bytes loaded for ``name`` (None: not resident); follows reloads."""
        return self._resident[name][-1] if name in self._resident else None

    def evict(self, name: str) -> None:
        """Unload ``name``; the base weights are restored first if it is the merged one."""
        if name not in self._resident:
            return
        if self.backend.merged == name:
            self.backend.restore()
        self.backend.unload(name)
        del self._resident[name]
        self._tell("eviction")
        log.info("adapter %r unloaded", name)

    def _load_weights(self, spec: AdapterSpec) -> None:
        try:
            self.backend.load(spec)
        except Exception as e:  # noqa: BLE001 - safetensors, PEFT and torch raise many kinds; all mean "cannot load"
            self.backend.discard(spec.name)
            self._tell("load_failed")
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(
                f"adapter {spec.name!r}: loading {spec.path} failed ({type(e).__name__}: {e}); re-save the adapter."
            ) from e
        self._tell("load")
        log.info("adapter %r loaded from %s", spec.name, spec.path)

    # -- applying adapters to a batch --------------------------------------------------------------------

    def merge(self, name: str) -> None:
        """Merge resident adapter ``name`` into the base weights (restoring any other merged one exactly)."""
        if self.backend.merged == name:
            return
        self.backend.merge(name)
        self._tell("merge_switch")

    def _tell(self, event: str) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def restore_base_weights(self) -> None:
        """Put the pristine base weights back (a bit-exact copy, not a subtraction)."""
        self.backend.restore()

    @property
    def merged(self) -> str | None:
        return self.backend.merged

    def rows(self, names: list[str]) -> AbstractContextManager[RowAdapterNames | None]:
        """A context in which each batch row runs with its own adapter (``base`` for none), nothing merged."""
        return self.backend.rows(names)


class PeftBackend:
    """Adapters loaded into PEFT on the transformers model; merges through weights.MergedWeights."""

    kind = "peft"

    def __init__(self) -> None:
        self.model: Any = None
        self.peft: Any = None
        self.layers: list[Any] = []
        self._weights = MergedWeights()

    def bind(self, model: Any) -> None:
        self.model = model

    def load(self, spec: AdapterSpec) -> None:
        from peft import PeftModel
        from safetensors.torch import load_file

        # Parse the whole file first: PEFT injects the LoRA layers into the model before it reads the
        # weights, and a file that fails there would leave a half-made adapter behind.
        load_file(spec.path / WEIGHTS_FILE, device="cpu")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, spec.path, adapter_name=spec.name, is_trainable=False)
        else:
            self.peft.load_adapter(spec.path, adapter_name=spec.name, is_trainable=False)
        self.model.eval()
        self.layers = lora_layers(self.model)

    def unload(self, name: str) -> None:
        with warnings.catch_warnings():
            # PEFT warns that it activates another adapter; the active adapter is set before every use anyway.
            warnings.simplefilter("ignore")
            self.peft.delete_adapter(name)
        self.layers = lora_layers(self.model)

    def discard(self, name: str) -> None:
        """Undo a failed load: PEFT rolls back the adapter's config but not the layers it already injected."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.peft is not None and name in self.peft.peft_config:
                self.peft.delete_adapter(name)
            for module in self.model.modules():
                if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
                    module.delete_adapter(name)
        if self.peft is None:  # a failed first load: nothing holds the LoRA layers it put in; take them out
            for parent in list(self.model.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, BaseTunerLayer):
                        setattr(parent, child_name, child.get_base_layer())
        self.layers = lora_layers(self.model)

    def merge(self, name: str) -> None:
        # Restore before set_adapter: PEFT's set_adapter would unmerge (subtract) a merged adapter itself.
        self._weights.restore()
        self.peft.set_adapter(name, inference_mode=True)  # layers without this adapter then add nothing
        self._weights.merge(name, self.layers)

    def restore(self) -> None:
        self._weights.restore()

    @property
    def merged(self) -> str | None:
        return self._weights.merged

    def rows(self, names: list[str]) -> AbstractContextManager[RowAdapterNames | None]:
        self._weights.restore()
        if self.peft is None:  # no adapter was ever loaded: the model is the plain base model
            if any(n != BASE_ADAPTER for n in names):
                raise AdapterError("adapters requested before any was loaded")
            return nullcontext(None)
        distinct = set(names)
        if len(distinct) == 1 and BASE_ADAPTER not in distinct:
            # One adapter for the whole batch: PEFT's plain active-adapter path, exactly what
            # PeftModel.generate runs, and no per-row gather.
            self.peft.set_adapter(names[0], inference_mode=True)
            return nullcontext(None)
        return row_adapters(self.layers, [PEFT_BASE if n == BASE_ADAPTER else n for n in names])


def _skeleton_module_names(base_model: str) -> list[str]:
    """Module names of the base model built on the meta device: its config only, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise AdapterError(f"the base model {base_model} cannot be read to validate adapters ({e}).") from e
    return [name for name, _ in skeleton.named_modules()]
