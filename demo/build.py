"""Build a tiny Qwen2 base model and four PEFT LoRA adapters, offline and deterministically.

The reference deployment is Qwen2.5-1.5B-Instruct with LoRA adapters (r=16, alpha=32,
q_proj and v_proj). Nothing can be downloaded here, so tests and the demo use a model of
the same architecture with random weights, a byte-level BPE tokenizer trained on the spot,
and real PEFT adapters laid out like the trainer runs that produced the reference ones.

What it does NOT give: a model that says anything meaningful. The weights are random,
scaled so that greedy generation varies with the prompt and each adapter visibly changes
it; that is all the project's tests need.

Layout under the demo root::

    model/                                   base model, tokenizer, chat template
    adapters/qwen_lora_adapter/              "sft"
    adapters/qwen_lora_sft/checkpoint-39/    "sft-ckpt39", with trainer files beside it
    adapters/dpo_model/checkpoint-3/         "dpo-ckpt3", with trainer files beside it
    adapters/qwen_lora_dpo_adapter/          "dpo"
    .demo-complete                           build parameters, written last
    .demo-lock                               held while building

Only `build_demo` imports torch, transformers and peft, and only when it has to build:
`demo_is_built` and an up-to-date `build_demo` stay cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lorabatch.demo.tokenizer import train_tokenizer, wrap_tokenizer
from lorabatch.demo.weights import (
    random_base_model,
    save_adapter,
    write_trainer_files,
)

if TYPE_CHECKING:
    pass

DEMO_ADAPTERS: dict[str, str] = {
    "sft": "adapters/qwen_lora_adapter",
    "sft-ckpt39": "adapters/qwen_lora_sft/checkpoint-39",
    "dpo-ckpt3": "adapters/dpo_model/checkpoint-3",
    "dpo": "adapters/qwen_lora_dpo_adapter",
}
"""Adapter name -> folder relative to the demo root."""

DEMO_MODEL_DIR = "model"
"""Base model folder relative to the demo root."""


MARKER_NAME = ".demo-complete"
"""Written last: its presence means the whole build finished."""

MARKER_FORMAT = 1
"""Bump when the build changes what it writes, so old demos get rebuilt."""



_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class _AdapterSpec:
    name: str
    seed_offset: int
    checkpoint_step: int | None  # set for a trainer checkpoint folder


_ADAPTER_SPECS = (
    _AdapterSpec("sft", 1, None),
    _AdapterSpec("sft-ckpt39", 2, 39),
    _AdapterSpec("dpo-ckpt3", 3, 3),
    _AdapterSpec("dpo", 4, None),
)


@dataclass(frozen=True)
class DemoParams:
    """Resolved build parameters; equal params mean an identical build."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    seed: int

    def as_marker(self) -> dict[str, Any]:
        return {"format": MARKER_FORMAT, "params": asdict(self)}


def resolve_params(
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    vocab_size: int = 4096,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> DemoParams:
    """Fill in the defaults (head_dim 64, 2 KV heads like Qwen2.5) and check the shape is valid."""
    heads = num_heads or max(1, hidden_size // 64)
    kv_heads = num_kv_heads or (2 if heads % 2 == 0 else 1)
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {heads}")
    if heads % kv_heads:
        raise ValueError(f"num_heads {heads} is not divisible by num_kv_heads {kv_heads}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if vocab_size < 512:
        raise ValueError("vocab_size must be at least 512 (256 byte tokens plus merges)")
    return DemoParams(
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        dtype=dtype,
        seed=seed,
    )


def build_demo(
    root: str | Path,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    vocab_size: int = 4096,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build the demo base model at root/model and the four adapters under root/adapters.

    Skips the build (without importing torch) when root's marker records the same
    parameters, unless `force`. The marker is written last, so a crashed build is redone.
    Defaults: intermediate_size 4 * hidden_size, head_dim 64, 2 KV heads. The tokenizer
    reaches vocab_size tokens up to about 6800 (its corpus is small); beyond that the
    embedding keeps vocab_size rows and the top ids are unused, as in Qwen's own models.
    Returns root.
    """
    root = Path(root)
    params = resolve_params(
        hidden_size=hidden_size, num_layers=num_layers, vocab_size=vocab_size,
        intermediate_size=intermediate_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
        dtype=dtype, seed=seed,
    )
    if not force and _read_marker(root) == params.as_marker():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        # Another process may have finished the same build while we waited for the lock.
        if not force and _read_marker(root) == params.as_marker():
            return root
        _build_locked(root, params)
    return root


def ensure_demo(root: Path, *, announce=print) -> Path:
    """Build the demo model and adapters under `root` unless a complete build is already there."""
    if not demo_is_built(root):
        announce(f"building the demo model and four adapters in {root} ...")
        build_demo(root)
    return root


def demo_is_built(root: str | Path) -> bool:
    """True when root holds a finished demo build (any parameters)."""
    marker = _read_marker(Path(root))
    return marker is not None and marker.get("format") == MARKER_FORMAT


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """An exclusive flock on root/.demo-lock, so concurrent builders don't interleave."""
    import fcntl

    fd = os.open(root / ".demo-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _build_locked(root: Path, params: DemoParams) -> None:
    """Build into a staging folder, swap it into place, then write the marker."""
    (root / MARKER_NAME).unlink(missing_ok=True)
    for stale in root.glob(".demo-build-*"):  # left by a crashed build
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root))
    try:
        _build_into(staging, params)
        for part in (DEMO_MODEL_DIR, "adapters"):
            shutil.rmtree(root / part, ignore_errors=True)
            os.replace(staging / part, root / part)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_json_atomic(root / MARKER_NAME, params.as_marker())


def _build_into(out: Path, params: DemoParams) -> None:
    import torch

    # Two threads at most: the build is small, and tests run it beside other work.
    with _torch_threads(torch, 2), _quiet_build():
        tokenizer = wrap_tokenizer(train_tokenizer(params.vocab_size))
        model = random_base_model(params, tokenizer)
        model_dir = out / DEMO_MODEL_DIR
        model.to(getattr(torch, params.dtype)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        # Adapters are trained against an fp32 base in this picture, and PEFT keeps LoRA
        # weights in fp32 anyway (autocast_adapter_dtype), so build them on fp32.
        model.to(torch.float32)
        for spec in _ADAPTER_SPECS:
            model = save_adapter(model, out / DEMO_ADAPTERS[spec.name], seed=params.seed * 1000 + spec.seed_offset)
            tokenizer.save_pretrained(out / DEMO_ADAPTERS[spec.name])  # as a trainer does
            if spec.checkpoint_step is not None:
                write_trainer_files(out / DEMO_ADAPTERS[spec.name], step=spec.checkpoint_step)


@contextlib.contextmanager
def _quiet_build() -> Iterator[None]:
    """Hide the save progress bar and the library deprecation chatter the build triggers.

    None of it is actionable for a user who asked for a demo model.
    """
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
            yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_threads(torch: Any, n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """python -m lorabatch.demo.build ROOT [options]: build the demo, print its root."""
    parser = argparse.ArgumentParser(prog="python -m lorabatch.demo.build", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, dest="num_layers")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None, dest="num_heads")
    parser.add_argument("--kv-heads", type=int, default=None, dest="num_kv_heads")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build is present")
    args = vars(parser.parse_args(argv))
    print(build_demo(args.pop("root"), **args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
