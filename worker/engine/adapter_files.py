"""Finding and validating a LoRA adapter on disk, before any weight is loaded.

An adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors) or a trainer
``checkpoint-N`` folder holding one (optimizer, scheduler and rng files beside it are ignored). A trainer
run folder stands for its checkpoint only when it holds exactly one.

This module knows nothing about PEFT objects, models in memory or the LRU of loaded adapters: it reads
JSON and file sizes, and checks them against a list of the base model's module names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lorabatch.schemas.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter folder says about itself, once validated."""

    name: str
    path: Path
    rank: int
    alpha: float
    targets: tuple[str, ...] | str
    size_bytes: int
    base_model: str | None


def resolve_adapter_dir(name: str, configured: Path) -> Path:
    """The folder that holds ``adapter_config.json`` for the configured path, or AdapterError."""
    if not configured.exists():
        raise AdapterError(f"adapter {name!r}: {configured} does not exist; fix its path under [adapters].")
    if not configured.is_dir():
        raise AdapterError(f"adapter {name!r}: {configured} is not a folder; point it at the adapter's folder.")
    if (configured / CONFIG_FILE).is_file():
        return configured
    checkpoints = sorted(
        (p for p in configured.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name) and (p / CONFIG_FILE).is_file()),
        key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)),
    )
    if len(checkpoints) == 1:
        return checkpoints[0]
    if checkpoints:
        listed = ", ".join(p.name for p in checkpoints)
        raise AdapterError(
            f"adapter {name!r}: {configured} is a trainer run folder with several checkpoints ({listed}); "
            f"point the adapter at one of them, e.g. {checkpoints[-1]}."
        )
    raise AdapterError(
        f"adapter {name!r}: {configured} has no {CONFIG_FILE} and no checkpoint-N folder holding one; "
        "point it at a PEFT adapter folder."
    )


def read_adapter(name: str, configured: Path) -> AdapterSpec:
    """Resolve and read an adapter folder; AdapterError names the path and the fix."""
    path = resolve_adapter_dir(name, configured)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS_FILE).is_file():
            raise AdapterError(
                f"adapter {name!r}: {path} holds only {PICKLE_WEIGHTS_FILE}, a pickle file, which lorabatch does not "
                f"load (unpickling can run code); convert it to safetensors ({WEIGHTS_FILE}), e.g. with "
                "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True) on a trusted machine."
            )
        raise AdapterError(f"adapter {name!r}: {path} has no {WEIGHTS_FILE}; save the adapter with PEFT's save_pretrained.")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {path / CONFIG_FILE} cannot be read ({e}); fix or re-save it.") from e
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"adapter {name!r}: {path} is a {config.get('peft_type')!r} adapter; only LoRA is supported.")
    ranks = [int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    targets = config.get("target_modules")
    if not targets:
        raise AdapterError(f"adapter {name!r}: {path / CONFIG_FILE} names no target_modules; re-save the adapter.")
    return AdapterSpec(
        name=name,
        path=path,
        rank=max(ranks),
        alpha=float(config.get("lora_alpha", 8)),
        targets=targets if isinstance(targets, str) else tuple(sorted(targets)),
        size_bytes=weights.stat().st_size,
        base_model=config.get("base_model_name_or_path"),
    )


def validate_against_base(
    spec: AdapterSpec, *, module_names: Iterable[str], base_model: str | None, max_rank: int
) -> str | None:
    """Refuse an adapter the base model cannot take (AdapterError). Returns a warning to log when the adapter
    names another base model: that alone is no reason to refuse it (local copies, renamed hub ids)."""
    if spec.rank > max_rank:
        raise AdapterError(
            f"adapter {spec.name!r}: {spec.path} has rank {spec.rank}, above the limit {max_rank}; "
            "raise [worker] max_adapter_rank or use a lower-rank adapter."
        )
    names = list(module_names)
    missing = missing_targets(spec.targets, names)
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})[:12]
        raise AdapterError(
            f"adapter {spec.name!r}: {spec.path} targets {', '.join(missing)}, which the base model does not have "
            f"(it has e.g. {', '.join(leaves)}); it was trained for another architecture."
        )
    if spec.base_model and base_model and not same_model(spec.base_model, base_model):
        return (
            f"adapter {spec.name!r} at {spec.path} was trained on {spec.base_model} but the base model is "
            f"{base_model}; using it anyway"
        )
    return None


def missing_targets(targets: tuple[str, ...] | str, module_names: list[str]) -> list[str]:
    """Target entries that match no module (PEFT's rules: exact name or dotted suffix; a string is a regex)."""
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, n) for n in module_names):
            return []
        return [targets]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in module_names)]


def same_model(a: str, b: str) -> bool:
    """Hub id vs local folder of the same model count as the same (``Qwen/X`` and ``/models/X``)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or Path(a).name == Path(b).name
