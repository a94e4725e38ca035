"""Adapter resolution, validation, the LRU of loaded adapters, and exact restore of merged base weights."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR
from lorabatch.schemas.errors import AdapterError
from lorabatch.worker.engine.adapters import AdapterManager

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_dirs(demo_root: Path) -> dict[str, Path]:
    return {name: demo_root / rel for name, rel in DEMO_ADAPTERS.items()}


@pytest.fixture(scope="module")
def base_dir(demo_root: Path) -> Path:
    return demo_root / DEMO_MODEL_DIR


def load_model(base_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_checkpoint_folder_resolves_to_itself(demo_dirs, base_dir):
    """A trainer checkpoint-N folder is an adapter; the trainer files beside it are ignored."""
    manager = AdapterManager(demo_dirs, base_model=str(base_dir))
    spec = manager.spec("sft-ckpt39")
    assert spec.path == demo_dirs["sft-ckpt39"]
    assert (spec.rank, spec.alpha, spec.targets) == (16, 32.0, ("q_proj", "v_proj"))


def test_run_folder_with_one_checkpoint_resolves(demo_dirs, base_dir):
    """A trainer run folder stands for its checkpoint when it holds exactly one."""
    run = demo_dirs["dpo-ckpt3"].parent
    manager = AdapterManager({"dpo-run": run}, base_model=str(base_dir))
    assert manager.spec("dpo-run").path == run / "checkpoint-3"


def test_run_folder_with_several_checkpoints_is_refused(demo_dirs, base_dir, tmp_path):
    """An ambiguous run folder fails with the list of its checkpoints."""
    run = tmp_path / "run"
    copy_adapter(demo_dirs["sft-ckpt39"], run / "checkpoint-39")
    copy_adapter(demo_dirs["sft-ckpt39"], run / "checkpoint-78")
    manager = AdapterManager({"run": run}, base_model=str(base_dir))
    with pytest.raises(AdapterError, match=r"several checkpoints \(checkpoint-39, checkpoint-78\)"):
        manager.spec("run")


def test_bin_only_adapter_is_refused(demo_dirs, base_dir, tmp_path):
    """Pickle weights are never loaded: the error says to convert them to safetensors."""
    folder = copy_adapter(demo_dirs["sft"], tmp_path / "binonly")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    manager = AdapterManager({"binonly": folder}, base_model=str(base_dir))
    with pytest.raises(AdapterError, match=r"pickle.*convert it to safetensors"):
        manager.spec("binonly")
    assert "pickle" in manager.check("binonly")["problem"]


def test_missing_target_module_is_refused(demo_dirs, base_dir, tmp_path):
    """An adapter for modules the base model lacks fails, naming the missing module."""
    folder = copy_adapter(demo_dirs["sft"], tmp_path / "other_arch")
    edit_config(folder, target_modules=["q_proj", "c_attn"])
    manager = AdapterManager({"other": folder}, base_model=str(base_dir))
    with pytest.raises(AdapterError, match=r"targets c_attn, which the base model does not have"):
        manager.spec("other")


def test_rank_above_limit_is_refused(demo_dirs, base_dir):
    """Rank over max_rank fails with the rank and the limit."""
    manager = AdapterManager(demo_dirs, base_model=str(base_dir), max_rank=8)
    with pytest.raises(AdapterError, match=r"rank 16, above the limit 8"):
        manager.spec("sft")


def test_unknown_adapter_lists_configured_ones(demo_dirs, base_dir):
    """An unconfigured name fails and the error lists what is configured."""
    manager = AdapterManager(demo_dirs, base_model=str(base_dir))
    with pytest.raises(AdapterError, match=r"'nope' is not configured \(configured: dpo, dpo-ckpt3, sft, sft-ckpt39\)"):
        manager.spec("nope")


def test_base_model_mismatch_only_warns_once(demo_dirs, base_dir, tmp_path, caplog):
    """An adapter trained on a differently named base is used, with one warning; a local copy of it is no mismatch."""
    folder = copy_adapter(demo_dirs["sft"], tmp_path / "elsewhere")
    edit_config(folder, base_model_name_or_path="SomeOrg/another-model")
    manager = AdapterManager({"elsewhere": folder}, base_model=str(base_dir))
    with caplog.at_level(logging.WARNING, logger="lorabatch.worker.engine.adapters"):
        manager.spec("elsewhere")
        manager.spec("elsewhere")
    assert len([r for r in caplog.records if "trained on SomeOrg/another-model" in r.getMessage()]) == 1
    caplog.clear()
    other = AdapterManager({"elsewhere": folder}, base_model=str(base_dir))
    other._module_names = manager._module_names
    other.base_model = "/models/another-model"
    with caplog.at_level(logging.WARNING, logger="lorabatch.worker.engine.adapters"):
        other.spec("elsewhere")
    assert not caplog.records


def test_check_reports_every_field(demo_dirs, base_dir):
    """check() gives rank, alpha, targets, size and resolved path, or the problem."""
    manager = AdapterManager(demo_dirs, base_model=str(base_dir))
    report = manager.check("dpo")
    assert report["problem"] is None
    assert report["rank"] == 16 and report["alpha"] == 32.0 and report["targets"] == ["q_proj", "v_proj"]
    assert report["size_bytes"] == (demo_dirs["dpo"] / "adapter_model.safetensors").stat().st_size > 0
    assert report["path"] == str(demo_dirs["dpo"])
    assert "not configured" in manager.check("missing")["problem"]


def test_adapter_added_to_configuration_later_is_usable(demo_dirs, base_dir):
    """The name -> folder provider is asked on each lookup, so new adapters need no restart."""
    configured = {"sft": demo_dirs["sft"]}
    manager = AdapterManager(lambda: configured, base_model=str(base_dir))
    with pytest.raises(AdapterError):
        manager.spec("dpo")
    configured["dpo"] = demo_dirs["dpo"]
    assert manager.spec("dpo").path == demo_dirs["dpo"]


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_lru_eviction_unloads_and_reload_works(demo_dirs, base_dir):
    """Past max_resident the least recently used adapter is unloaded; loading it again gives the same outputs."""
    model = load_model(base_dir)
    manager = AdapterManager(demo_dirs, base_model=str(base_dir), max_resident=2)
    manager.bind(model)
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    manager.load("sft")
    with manager.rows(["sft"]):
        before = logits(model, ids)
    manager.load("dpo")
    manager.load("sft")  # sft is now the most recently used
    manager.load("sft-ckpt39")
    assert manager.resident == ["sft", "sft-ckpt39"]
    assert "dpo" not in manager._peft.peft_config
    assert not any("dpo" in name for name, _ in model.named_parameters())
    manager.load("dpo")
    assert manager.resident == ["sft-ckpt39", "dpo"]
    manager.load("sft")
    with manager.rows(["sft"]):
        assert torch.equal(logits(model, ids), before)


def test_evicting_the_merged_adapter_restores_base(demo_dirs, base_dir):
    """Unloading a merged adapter first puts the exact base weights back."""
    model = load_model(base_dir)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    manager = AdapterManager(demo_dirs, base_model=str(base_dir), max_resident=1)
    manager.bind(model)
    manager.load("sft")
    manager.merge("sft")
    manager.load("dpo")  # evicts the merged sft
    assert manager.merged is None
    base_now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_now[k], v) for k, v in pristine.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_base_weights_bit_identical_after_1000_switches(demo_dirs, base_dir, dtype):
    """Merging and switching adapters 1000 times leaves the base weights bit-identical (restore by copy)."""
    model = load_model(base_dir, dtype)
    manager = AdapterManager(demo_dirs, base_model=str(base_dir))
    manager.bind(model)
    names = list(demo_dirs)
    for name in names:
        manager.load(name)
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer.weight
    pristine = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for i in range(1000):
        manager.merge(names[i % len(names)])
        if i < len(names):
            assert not torch.equal(q_proj, pristine["model.layers.0.self_attn.q_proj.base_layer.weight"])
        if i % 7 == 0:
            manager.restore_base_weights()
    manager.restore_base_weights()
    changed = [n for n, p in model.named_parameters() if "lora_" not in n and not torch.equal(p, pristine[n])]
    assert changed == []
    assert all(not layer.merged for layer in manager._layers if hasattr(layer, "merged"))


def test_error_inside_peft_leaves_no_hooks_behind(demo_dirs, base_dir):
    """A PEFT error during a mixed-adapter forward leaves no hooks that would change later batches."""
    model = load_model(base_dir)
    manager = AdapterManager(demo_dirs, base_model=str(base_dir))
    manager.bind(model)
    manager.load("sft")
    manager.load("dpo")
    ids = torch.tensor([[5, 17, 300], [8, 9, 10]])
    with manager.rows(["sft", "base"]):
        before = logits(model, ids)
    with pytest.raises(ValueError, match="adapter_names"):
        with manager.rows(["sft", "dpo", "base"]):  # three names for two rows: PEFT raises inside forward
            logits(model, ids)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in manager._layers)
    with manager.rows(["sft", "base"]):
        assert torch.equal(logits(model, ids), before)


def test_failed_first_load_leaves_the_base_model_clean(demo_dirs, base_dir, tmp_path):
    """An adapter PEFT fails to inject halfway leaves no LoRA layer behind; a good adapter loads after it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    folder = copy_adapter(demo_dirs["sft"], tmp_path / "unsupported")
    edit_config(folder, target_modules=["v_proj", "mlp"])  # v_proj gets injected, then the MLP block is refused
    model = load_model(base_dir)
    ids = torch.tensor([[5, 17, 300, 42]])
    before = logits(model, ids)
    manager = AdapterManager({"bad": folder, "sft": demo_dirs["sft"]}, base_model=str(base_dir))
    manager.bind(model)
    with pytest.raises(AdapterError, match=r"loading .*unsupported failed"):
        manager.load("bad")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert torch.equal(logits(model, ids), before)
    manager.load("sft")
    with pytest.raises(AdapterError):
        manager.load("bad")  # a failed later load, too, leaves no half-made adapter
    assert not any("bad" in getattr(m, "lora_A", {}) for m in model.modules())
    with manager.rows(["base"]):
        assert torch.equal(logits(model, ids), before)
