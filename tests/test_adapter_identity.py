"""One notion of an adapter's identity, checked when the weights load: AdapterManager.identity is the
sha256 of the bytes it loaded (schemas.identity's notion, which producers and workers use too)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
from lorabatch.schemas.identity import adapter_sha256
from lorabatch.worker.engine.adapters import AdapterManager

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WEIGHTS = "adapter_model.safetensors"


def load_model(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def logits(model, manager: AdapterManager, name: str) -> torch.Tensor:
    with torch.inference_mode(), manager.rows([name]):
        return model(torch.tensor([[5, 17, 300, 42, 9]])).logits


def test_identity_names_the_bytes_loaded_and_follows_a_file_replaced_in_place(demo_root, tmp_path, monkeypatch):
    """identity(name) is None until loaded, then the sha256 of the file's bytes; a file rewritten in place
    keeps the old identity until its next load, which loads and names the new bytes; a file replaced
    while the backend reads it is loaded again, so identity and the weights in use always agree."""
    donors = {name: demo_root / rel for name, rel in DEMO_ADAPTERS.items()}
    folder = tmp_path / "sft"
    shutil.copytree(donors["sft"], folder)
    base_dir = demo_root / DEMO_MODEL_DIR
    model = load_model(base_dir)
    manager = AdapterManager({"sft": folder}, base_model=str(base_dir))
    manager.bind(model)
    assert manager.identity("sft") is None

    manager.load("sft")
    old = adapter_sha256(folder)
    assert manager.identity("sft") == old
    (folder / WEIGHTS).write_bytes((donors["dpo"] / WEIGHTS).read_bytes())  # retrained in place
    new = adapter_sha256(folder)
    assert new != old and manager.identity("sft") == old, "still the weights in use"
    manager.load("sft")
    assert manager.identity("sft") == new

    reference = AdapterManager({"sft": donors["sft-ckpt39"]}, base_model=str(base_dir))
    other_model = load_model(base_dir)
    reference.bind(other_model)
    reference.load("sft")
    expected = logits(other_model, reference, "sft")

    (folder / WEIGHTS).write_bytes((donors["sft"] / WEIGHTS).read_bytes())
    backend_load, replaced = manager.backend.load, []

    def load_then_replace(spec):  # the file changes while (just after) the backend reads it
        backend_load(spec)
        if not replaced:
            replaced.append(True)
            (folder / WEIGHTS).write_bytes((donors["sft-ckpt39"] / WEIGHTS).read_bytes())

    monkeypatch.setattr(manager.backend, "load", load_then_replace)
    manager.load("sft")
    assert replaced and manager.identity("sft") == adapter_sha256(donors["sft-ckpt39"])
    assert torch.equal(logits(model, manager, "sft"), expected), "the weights in use are the bytes named"
