"""How LoRA weights take part in a forward pass: merged into the base weights, or kept apart per row.

``MergedWeights`` merges one adapter at a time into the base weights in place and restores them by
COPYING pristine copies of the touched tensors back, never by subtracting: PEFT's unmerge subtracts and
drifts (4e-7 after 200 cycles in fp32, far more in fp16/bf16), a copy is exact after any number of switches.

``row_adapters`` feeds per-row adapter names to PEFT's LoRA layers (PEFT's mixed-batch path) through
forward pre-hooks that are always removed on exit, even when a forward raises: PEFT's own
``adapter_names=`` handling leaves its hooks behind after an error, which changes later batches.

This module knows nothing about adapter files, the LRU of loaded adapters, batching or requests.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


def lora_layers(model: Any) -> list[Any]:
    """The modules PEFT's mixed-batch path needs told the per-row adapter names (as PEFT itself picks them)."""
    from peft.tuners.lora import LoraLayer

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # older PEFT: no modules_to_save wrappers to tell
        kinds: tuple[type, ...] = (LoraLayer,)
    else:
        kinds = (LoraLayer, AuxiliaryTrainingWrapper)
    return [m for m in model.modules() if isinstance(m, kinds)]


class MergedWeights:
    """At most one adapter merged into the base weights; exact restore from pristine copies.

    Pristine copies are taken of a layer's base parameters the first time anything is merged into that layer,
    on the weights' own device (for q_proj and v_proj of a 1.5B model in bf16: about 150 MB).
    """

    def __init__(self) -> None:
        self.merged: str | None = None
        self._pristine: dict[Any, dict[str, torch.Tensor]] = {}
        self._touched: list[Any] = []

    @torch.no_grad()
    def merge(self, adapter: str, layers: list[Any]) -> None:
        """Merge ``adapter`` into every LoRA layer that has it; any other merged adapter is restored first."""
        if self.merged == adapter:
            return
        self.restore()
        try:
            for layer in layers:
                if adapter not in getattr(layer, "lora_A", {}) and adapter not in getattr(layer, "lora_embedding_A", {}):
                    continue
                base = layer.get_base_layer()
                if layer not in self._pristine:
                    self._pristine[layer] = {n: p.detach().clone() for n, p in base.named_parameters(recurse=False)}
                self._touched.append(layer)
                layer.merge(adapter_names=[adapter])
        except BaseException:
            # A half-merged model would silently change every later batch.
            self.restore()
            raise
        self.merged = adapter

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the pristine base weights back into every layer touched by the current merge."""
        for layer in self._touched:
            pristine = self._pristine[layer]
            for name, param in layer.get_base_layer().named_parameters(recurse=False):
                param.data.copy_(pristine[name])
            # PEFT's own bookkeeping: the layer must not believe anything is still merged.
            layer.merged_adapters.clear()
        self._touched = []
        self.merged = None


class RowAdapterNames:
    """The adapter of each row ("__base__" for none) of the forwards now running: a batch's rows, or the
    subset of them in a prefill chunk or left after finished rows were dropped."""

    def __init__(self, names: list[str]) -> None:
        self.batch = list(names)
        self.names = list(names)

    def use(self, rows: list[int]) -> None:
        """The next forwards run these rows of the batch, in this order."""
        self.names = [self.batch[i] for i in rows]

    def _inject(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # Read at call time, so dropping rows mid-generation needs no new hooks.
        kwargs["adapter_names"] = self.names
        return args, kwargs


@contextmanager
def row_adapters(layers: list[Any], names: list[str]) -> Iterator[RowAdapterNames]:
    """Run forwards with one adapter per row through PEFT's mixed-batch LoRA path; hooks removed on any exit."""
    rows = RowAdapterNames(names)
    handles = []
    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(rows._inject, with_kwargs=True))
        yield rows
    finally:
        for handle in handles:
            handle.remove()
