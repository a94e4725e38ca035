"""LoRA adapters for the native forward: read from safetensors, stacked, applied to a mixed batch in one op.

Every resident adapter has a stack index (0: the base model, all zeros). Per projection the stack holds
``A [layers, in, n*r]`` and ``B [layers, n*r, out]`` (n stack slots, r the largest resident rank; smaller ranks
padded with zeros; the scaling folded into B). For a batch whose token t runs adapter a_t:

    delta = ((x @ A) * onehot(a_t, r)) @ B

two matmuls and one multiply per projection and layer, whatever the number of adapters in the batch (the mask
keeps each token's own block, the others add exact zeros). It computes n*r columns where one adapter needs r:
cheap while n*r is small next to the projection (8 adapters of rank 16: 128 columns against 1,536); a
gathered (BGMV-style) kernel would not, and is what to write when ranks are large.

Merged mode (one adapter for the whole batch): its B @ A * scale is added into the base weights of the
touched projections and restored by copying pristine copies back (bit-exact after any number of switches).

An adapter the native forward cannot run (DoRA, a bias, embedding or lm_head adapters, modules_to_save,
anything but the seven linear projections) is refused with an AdapterError naming the path and the fix.
Only safetensors files are read, never pickles.

This module knows nothing about the catalogue of configured adapters, their LRU (adapters.py) or requests.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, AbstractSet

import torch

from lorabatch.schemas.errors import AdapterError
from lorabatch.worker.engine.adapter_files import CONFIG_FILE, WEIGHTS_FILE, AdapterSpec

PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[^.]+)?\.weight$"
)
_FALLBACK = 'set [worker] forward = "transformers" for this deployment'


@dataclass
class NativeAdapter:
    """One adapter's weights per (layer, projection): A [r, in], B [out, r], and its scale."""

    name: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _, _ in self.weights.values()), default=1)

    @property
    def projections(self) -> set[str]:
        return {name for _, name in self.weights}


def _refuse(spec: AdapterSpec, what: str) -> AdapterError:
    return AdapterError(f"adapter {spec.name!r}: {spec.path} {what}, which the native forward cannot run; {_FALLBACK}.")


def _config(spec: AdapterSpec) -> dict:
    try:
        return json.loads((spec.path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {spec.name!r}: {spec.path / CONFIG_FILE} cannot be read ({e}); fix or re-save it.") from e


def check_native(spec: AdapterSpec) -> dict:
    """The adapter's config when the native forward can run it (tensor names read, no weights); else AdapterError."""
    from safetensors import safe_open

    config = _config(spec)
    if config.get("use_dora"):
        raise _refuse(spec, "is a DoRA adapter (use_dora)")
    if str(config.get("bias", "none")) != "none" or config.get("lora_bias"):
        raise _refuse(spec, f"trains biases (bias={config.get('bias')!r})")
    if config.get("modules_to_save"):
        raise _refuse(spec, f"saves whole modules ({config.get('modules_to_save')})")
    if config.get("fan_in_fan_out"):
        raise _refuse(spec, "is stored fan_in_fan_out (Conv1D layers)")
    try:
        with safe_open(str(spec.path / WEIGHTS_FILE), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - a damaged file in any way means the same to the user
        raise AdapterError(f"adapter {spec.name!r}: {spec.path / WEIGHTS_FILE} cannot be read ({e}); re-save the adapter.") from e
    for key in keys:
        match = _KEY.match(key)
        if match is None or match.group(3) not in PROJECTIONS or PROJECTIONS[match.group(3)] != match.group(2):
            raise _refuse(spec, f"holds {key}")
    return config


def read_native(spec: AdapterSpec, *, device: torch.device, dtype: torch.dtype, layers: int) -> NativeAdapter:
    """Read an adapter for the native forward (AdapterError when it cannot run there)."""
    from safetensors.torch import load_file

    config = check_native(spec)
    tensors = load_file(str(spec.path / WEIGHTS_FILE), device="cpu")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        layer, projection, side = int(match.group(1)), match.group(3), match.group(4)
        if layer >= layers:
            raise AdapterError(f"adapter {spec.name!r}: {spec.path} has layer {layer}, the base model {layers} layers; "
                               "it was trained for another model.")
        pairs.setdefault((layer, projection), {})[side] = tensor
    weights = {}
    for (layer, projection), sides in pairs.items():
        if set(sides) != {"A", "B"} or sides["A"].shape[0] != sides["B"].shape[1]:
            raise AdapterError(f"adapter {spec.name!r}: {spec.path} layer {layer} {projection} lacks lora_A or lora_B "
                               "of matching rank; re-save the adapter.")
        rank = sides["A"].shape[0]
        module = f"model.layers.{layer}.{PROJECTIONS[projection]}.{projection}"
        alpha = float(_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        a = sides["A"].to(device=device, dtype=dtype)
        b = sides["B"].to(device=device, dtype=dtype)
        weights[(layer, projection)] = (a, b, scale)
    return NativeAdapter(spec.name, weights)


def _pattern(patterns: dict | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraStack:
    """The resident adapters' weights stacked per projection (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        layer = model.model.layers[0]
        self.layers = len(model.model.layers)
        modules = {name: getattr(getattr(layer, part), name) for name, part in PROJECTIONS.items()}
        self.shapes = {name: (m.in_features, m.out_features) for name, m in modules.items()}
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.slots = 1  # index 0: the base model
        self.rank = 0
        self.a: dict[str, torch.Tensor] = {}  # projection -> [layers, in, slots * rank]
        self.b: dict[str, torch.Tensor] = {}  # projection -> [layers, slots * rank, out]
        self.names: dict[str, int] = {}  # adapter -> its stack index
        self.version = 0
        """Bumped whenever the stack tensors are reallocated (captured CUDA graphs read the old ones)."""

    def index(self, name: str | None) -> int:
        return 0 if name is None else self.names[name]

    def put(self, adapter: NativeAdapter) -> int:
        """Write ``adapter`` into a free stack index (growing the stack when it must) -> the index."""
        used = set(self.names.values())
        index = next((i for i in range(1, self.slots) if i not in used), self.slots)
        self._ensure(slots=max(self.slots, index + 1), rank=max(self.rank, adapter.rank),
                     projections=set(self.a) | adapter.projections)
        self._zero(index)
        r = self.rank
        for (layer, projection), (a, b, scale) in adapter.weights.items():
            rank = a.shape[0]
            self.a[projection][layer, :, index * r : index * r + rank] = a.T
            self.b[projection][layer, index * r : index * r + rank, :] = (b * scale).T
        self.names[adapter.name] = index
        return index

    def remove(self, name: str) -> None:
        index = self.names.pop(name, None)
        if index is not None:
            self._zero(index)

    def _zero(self, index: int) -> None:
        r = self.rank
        for projection in self.a:
            self.a[projection][:, :, index * r : (index + 1) * r] = 0
            self.b[projection][:, index * r : (index + 1) * r, :] = 0

    def _ensure(self, *, slots: int, rank: int, projections: AbstractSet[str]) -> None:
        """Reallocate (copying what is there) when more slots, a larger rank or new projections are needed."""
        if slots <= self.slots and rank <= self.rank and projections <= set(self.a):
            return
        old_a, old_b, old_slots, old_rank = self.a, self.b, self.slots, self.rank
        self.a, self.b = {}, {}
        for projection in sorted(projections):
            fan_in, fan_out = self.shapes[projection]
            a = torch.zeros((self.layers, fan_in, slots, rank), device=self.device, dtype=self.dtype)
            b = torch.zeros((self.layers, slots, rank, fan_out), device=self.device, dtype=self.dtype)
            if projection in old_a and old_rank:
                a[:, :, :old_slots, :old_rank] = old_a[projection].view(self.layers, fan_in, old_slots, old_rank)
                b[:, :old_slots, :old_rank] = old_b[projection].view(self.layers, old_slots, old_rank, fan_out)
            self.a[projection] = a.view(self.layers, fan_in, slots * rank)
            self.b[projection] = b.view(self.layers, slots * rank, fan_out)
        self.slots, self.rank = slots, rank
        self.version += 1

    def rows(self, adapter_ids: torch.Tensor) -> RowLora | None:
        """The LoRA of a forward whose token t runs stack index ``adapter_ids[t]`` (any shape: [B] or [b, S])."""
        if not self.a:
            return None
        return RowLora(self, adapter_ids)


class RowLora:
    """One forward's LoRA: the per-token mask is built once, then each projection is one batched op."""

    def __init__(self, stack: LoraStack, adapter_ids: torch.Tensor) -> None:
        self.stack = stack
        slots = torch.arange(stack.slots, device=adapter_ids.device)
        onehot = (adapter_ids.reshape(-1, 1) == slots[None, :]).to(stack.dtype)  # [T, n]
        tokens = onehot.shape[0]
        # expand + reshape, not repeat_interleave: no output size to compute (a host sync on CUDA).
        mask = onehot[:, :, None].expand(tokens, stack.slots, stack.rank).reshape(tokens, stack.slots * stack.rank)
        self.mask = mask.view(*adapter_ids.shape, stack.slots * stack.rank)

    def apply(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.stack.a.get(name)
        if a is None:
            return y
        h = torch.matmul(x, a[layer]) * self.mask  # [..., n*r]: each token keeps its own adapter's block
        return y + torch.matmul(h, self.stack.b[name][layer])


class NativeMerged:
    """At most one adapter merged into the model's linear weights; exact restore from pristine copies."""

    def __init__(self) -> None:
        self.merged: str | None = None
        self._pristine: dict[Any, torch.Tensor] = {}
        self._touched: list[Any] = []

    @torch.no_grad()
    def merge(self, adapter: NativeAdapter, model: Any) -> None:
        if self.merged == adapter.name:
            return
        self.restore()
        try:
            for (layer, projection), (a, b, scale) in adapter.weights.items():
                module = getattr(getattr(model.model.layers[layer], PROJECTIONS[projection]), projection)
                if module not in self._pristine:
                    self._pristine[module] = module.weight.detach().clone()
                self._touched.append(module)
                # PEFT's delta: (B @ A) * scaling, added to the weight.
                module.weight.data += (b @ a) * scale
        except BaseException:
            self.restore()  # a half-merged model would silently change every later batch
            raise
        self.merged = adapter.name

    @torch.no_grad()
    def restore(self) -> None:
        for module in self._touched:
            module.weight.data.copy_(self._pristine[module])
        self._touched = []
        self.merged = None


class NativeBackend:
    """The AdapterManager backend of the native forward: adapters in a LoraStack, merges into the weights."""

    kind = "native"

    def __init__(self) -> None:
        self.model: Any = None
        self.stack: LoraStack | None = None
        self.adapters: dict[str, NativeAdapter] = {}
        self._weights = NativeMerged()

    def bind(self, model: Any) -> None:
        self.model = model
        self.stack = LoraStack(model)

    def check(self, spec: AdapterSpec) -> None:
        check_native(spec)

    def load(self, spec: AdapterSpec) -> None:
        parameter = next(self.model.parameters())
        adapter = read_native(spec, device=parameter.device, dtype=parameter.dtype, layers=self.stack.layers)
        self.stack.put(adapter)
        self.adapters[spec.name] = adapter

    def unload(self, name: str) -> None:
        if self._weights.merged == name:
            self._weights.restore()
        self.stack.remove(name)
        self.adapters.pop(name, None)

    def discard(self, name: str) -> None:
        self.unload(name)

    def merge(self, name: str) -> None:
        self._weights.merge(self.adapters[name], self.model)

    def restore(self) -> None:
        self._weights.restore()

    @property
    def merged(self) -> str | None:
        return self._weights.merged

    def rows(self, names: list[str]) -> Any:
        self._weights.restore()
        return nullcontext(None)
