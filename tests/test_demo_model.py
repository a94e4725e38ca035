"""Tests for the offline demo model and adapters (lorabatch.demo.build)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorabatch.demo import build as demo_model
from lorabatch.demo import tokenizer as demo_tokenizer
from lorabatch.demo import weights as demo_weights
from lorabatch.demo.build import (
    DEMO_ADAPTERS,
    DEMO_MODEL_DIR,
    build_demo,
    demo_is_built,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Raised inside PeftModel.from_pretrained by transformers 5; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ROUND_TRIP_STRINGS = [
    "Hello world!",
    "The worker reads the queue, then answers.",
    "naïve café in Zürich, Größe, São Paulo",
    "東京 你好 こんにちは 안녕하세요 Привет",
    "emoji 😀🚀 ❤️ and © ® € ±",
    "digits 1234567890 and 3.14159, 2024-05-17 09:30",
    "  leading and   inner   spaces  ",
    "line one\nline two\r\n\n\ttabbed\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "It's, they're, we'll, I'd, you've!",
    "",
]

PROMPTS = ["Tell me about the queue.", "What is 2+2?", "Write a poem about Zürich."]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tokenizer(demo_root: Path):
    return transformers.AutoTokenizer.from_pretrained(demo_root / DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def greedy_outputs(demo_root: Path, tokenizer) -> dict[str, list[tuple[int, ...]]]:
    """Greedy continuations of PROMPTS for the base model and each adapter, keyed by name."""
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        for p in PROMPTS
    ]

    def generate(model) -> list[tuple[int, ...]]:
        with torch.inference_mode():
            return [
                tuple(model.generate(**e, max_new_tokens=8, do_sample=False)[0, e["input_ids"].shape[1]:].tolist())
                for e in encoded
            ]

    base = transformers.Qwen2ForCausalLM.from_pretrained(demo_root / DEMO_MODEL_DIR).eval()
    outputs = {"__base__": generate(base)}
    for name, rel in DEMO_ADAPTERS.items():
        # A fresh base per adapter: PeftModel.from_pretrained wraps its base in place.
        base = transformers.Qwen2ForCausalLM.from_pretrained(demo_root / DEMO_MODEL_DIR)
        outputs[name] = generate(peft.PeftModel.from_pretrained(base, demo_root / rel).eval())
    return outputs


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_split_regex_matches_transformers() -> None:
    """The copied Qwen split regex is the one Qwen2Tokenizer rebuilds on load."""
    from transformers.models.qwen2 import tokenization_qwen2

    assert demo_tokenizer.QWEN_SPLIT_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX


@pytest.mark.parametrize("text", ROUND_TRIP_STRINGS)
def test_tokenizer_ids_survive_save_and_reload(tokenizer, text: str) -> None:
    """AutoTokenizer on the saved model gives the ids the freshly trained tokenizer gave."""
    trained = _trained_tokenizer()
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.encode(text) == trained.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text


def _trained_tokenizer():
    if not hasattr(_trained_tokenizer, "cached"):
        _trained_tokenizer.cached = demo_tokenizer.train_tokenizer(4096)
    return _trained_tokenizer.cached


def test_special_tokens_and_generation_config(demo_root: Path, tokenizer) -> None:
    """Special tokens are single ids, and generation stops at <|im_end|> and pads with <|endoftext|>."""
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert tokenizer.encode("<|im_start|>x<|im_end|>")[0] == ids[1]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    generation = transformers.GenerationConfig.from_pretrained(demo_root / DEMO_MODEL_DIR)
    assert generation.eos_token_id == [ids[2], ids[0]]
    assert generation.pad_token_id == ids[0]
    assert len(tokenizer) <= transformers.AutoConfig.from_pretrained(demo_root / DEMO_MODEL_DIR).vocab_size


def test_chat_template_renders_chatml(demo_root: Path, tokenizer) -> None:
    """apply_chat_template renders Qwen-style ChatML with a default system turn and a generation prompt."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (demo_root / DEMO_MODEL_DIR / "chat_template.jinja").is_file()


def test_build_is_byte_deterministic(demo_root: Path, tmp_path: Path) -> None:
    """Two builds into different roots give byte-identical files."""
    other = build_demo(tmp_path / "again")
    assert _file_hashes(other) == _file_hashes(demo_root)
    for config in (other / rel / "adapter_config.json" for rel in DEMO_ADAPTERS.values()):
        assert str(tmp_path) not in config.read_text()


def test_rebuild_skipped_without_importing_torch(demo_root: Path) -> None:
    """With the marker present and the same params, build_demo returns at once and never imports torch."""
    weights = demo_root / DEMO_MODEL_DIR / "model.safetensors"
    before = weights.stat().st_mtime_ns
    code = (
        "import sys; from lorabatch.demo.build import build_demo, demo_is_built; "
        f"build_demo({str(demo_root)!r}); assert demo_is_built({str(demo_root)!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert weights.stat().st_mtime_ns == before


def test_crashed_build_leaves_no_marker_and_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that dies midway leaves no marker nor staging folder, and the next call builds it fully."""
    real_build_into = demo_model._build_into

    def crash_after_building(out: Path, params) -> None:
        real_build_into(out, params)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(demo_model, "_build_into", crash_after_building)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_demo(tmp_path, vocab_size=1024)
    assert not demo_is_built(tmp_path)
    assert not list(tmp_path.glob(".demo-build-*"))

    monkeypatch.setattr(demo_model, "_build_into", real_build_into)
    build_demo(tmp_path, vocab_size=1024)
    assert demo_is_built(tmp_path)
    assert all((tmp_path / rel / "adapter_model.safetensors").is_file() for rel in DEMO_ADAPTERS.values())


def test_changed_params_rebuild(tmp_path: Path) -> None:
    """A marker recording other params does not count: the build is redone with the new ones."""
    root = build_demo(tmp_path, vocab_size=1024)
    build_demo(root, vocab_size=1024, num_layers=2)
    assert json.loads((root / DEMO_MODEL_DIR / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((root / demo_model.MARKER_NAME).read_text())["params"]["num_layers"] == 2


@pytest.mark.parametrize("name", ["__base__", *DEMO_ADAPTERS])
def test_greedy_output_differs_from_every_other_variant(greedy_outputs, name: str) -> None:
    """Each adapter (and the base) gives its own greedy continuation for every prompt."""
    for other, outputs in greedy_outputs.items():
        if other != name:
            for mine, theirs in zip(greedy_outputs[name], outputs):
                assert mine != theirs, f"{name} and {other} gave the same greedy tokens"


def test_base_output_varies_with_prompt(greedy_outputs) -> None:
    """Random weights are scaled so the base does not answer every prompt with one repeated token."""
    base = greedy_outputs["__base__"]
    assert len(set(base)) == len(PROMPTS)
    assert all(len(set(tokens)) > 1 for tokens in base)


@pytest.mark.parametrize("rel", [DEMO_ADAPTERS["sft-ckpt39"], DEMO_ADAPTERS["dpo-ckpt3"]])
def test_checkpoint_folders_hold_trainer_files_beside_adapter(demo_root: Path, rel: str) -> None:
    """Trainer checkpoint folders hold the adapter, the tokenizer and the trainer's state files."""
    names = {p.name for p in (demo_root / rel).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json"} <= names
    assert set(demo_weights.TRAINER_FILES) <= names
    step = int(rel.rsplit("-", 1)[1])
    assert json.loads((demo_root / rel / "trainer_state.json").read_text())["global_step"] == step
    # The run folder itself is not an adapter; callers must pick the checkpoint.
    assert not (demo_root / rel).parent.joinpath("adapter_config.json").exists()


def test_adapters_match_reference_lora_shape(demo_root: Path) -> None:
    """Every adapter is LoRA r=16, alpha=32, dropout 0.05 on q_proj and v_proj, with non-zero B."""
    from safetensors.torch import load_file

    for rel in DEMO_ADAPTERS.values():
        config = json.loads((demo_root / rel / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
        assert config["task_type"] == "CAUSAL_LM"
        assert config["base_model_name_or_path"] == demo_weights.DEMO_BASE_MODEL_NAME
        weights = load_file(demo_root / rel / "adapter_model.safetensors")
        lora_b = [t for k, t in weights.items() if "lora_B" in k]
        assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_no_pickled_weights(demo_root: Path) -> None:
    """The model and adapter weights are safetensors only: no .bin/.pt/.pth pickle in model/ or as adapter weights."""
    pickle_suffixes = {".bin", ".pt", ".pth", ".pkl"}
    assert not [p for p in (demo_root / DEMO_MODEL_DIR).rglob("*") if p.suffix in pickle_suffixes]
    assert (demo_root / DEMO_MODEL_DIR / "model.safetensors").is_file()
    for rel in DEMO_ADAPTERS.values():
        assert (demo_root / rel / "adapter_model.safetensors").is_file()
        assert not (demo_root / rel / "adapter_model.bin").exists()


@pytest.mark.parametrize(
    ("hidden", "heads", "kv_heads"),
    [(256, 4, 2), (896, 14, 2), (128, 2, 2), (64, 1, 1)],
)
def test_default_head_counts(hidden: int, heads: int, kv_heads: int) -> None:
    """Head counts default to head_dim 64 with 2 KV heads, which gives the Qwen2.5-0.5B shape at hidden 896."""
    params = demo_model.resolve_params(hidden_size=hidden)
    assert (params.num_heads, params.num_kv_heads) == (heads, kv_heads)


def test_invalid_shape_rejected() -> None:
    """A hidden size the heads do not divide is refused before anything is built."""
    with pytest.raises(ValueError, match="divisible"):
        demo_model.resolve_params(hidden_size=256, num_heads=3)


def test_cli_prints_root(demo_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line builds (here: finds already built) and prints the demo root."""
    assert demo_model.main([str(demo_root)]) == 0
    assert capsys.readouterr().out.strip() == str(demo_root)
