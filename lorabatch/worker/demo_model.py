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
import random
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_ADAPTERS: dict[str, str] = {
    "sft": "adapters/qwen_lora_adapter",
    "sft-ckpt39": "adapters/qwen_lora_sft/checkpoint-39",
    "dpo-ckpt3": "adapters/dpo_model/checkpoint-3",
    "dpo": "adapters/qwen_lora_dpo_adapter",
}
"""Adapter name -> folder relative to the demo root."""

DEMO_MODEL_DIR = "model"
"""Base model folder relative to the demo root."""

DEMO_BASE_MODEL_NAME = f"lorabatch-demo/{DEMO_MODEL_DIR}"
"""`base_model_name_or_path` written into each adapter_config.json.

A fixed name rather than the model's absolute path, so that the files do not depend on
where the demo was built (the build is byte-reproducible across roots). Its last part is
the model folder's name, which is what adapter_files.same_model compares."""

MARKER_NAME = ".demo-complete"
"""Written last: its presence means the whole build finished."""

MARKER_FORMAT = 1
"""Bump when the build changes what it writes, so old demos get rebuilt."""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2Tokenizer's split regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
# Copied so this module imports without transformers; a test checks they still agree.
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2-Instruct ChatML template (Qwen2.5's adds tool calls, which the demo does not need).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
LORA_TARGET_MODULES = ("q_proj", "v_proj")

LORA_B_GAIN = 0.5
"""Std of lora_B entries relative to 1/sqrt(r): large enough that every adapter changes
greedy outputs, unlike PEFT's default B = 0, which would be a no-op adapter."""

TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
"""Files a transformers Trainer leaves in a checkpoint folder beside the adapter."""

# Not a pickle on purpose: lorabatch must never unpickle trainer state, and if anything
# tries, it fails loudly instead of running code.
_TRAINER_PLACEHOLDER = b"lorabatch demo placeholder, not a real trainer state; never load this file\n"

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
        tokenizer = _wrap_tokenizer(_train_tokenizer(params.vocab_size))
        model = _random_base_model(params, tokenizer)
        model_dir = out / DEMO_MODEL_DIR
        model.to(getattr(torch, params.dtype)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        # Adapters are trained against an fp32 base in this picture, and PEFT keeps LoRA
        # weights in fp32 anyway (autocast_adapter_dtype), so build them on fp32.
        model.to(torch.float32)
        for spec in _ADAPTER_SPECS:
            model = _save_adapter(model, out / DEMO_ADAPTERS[spec.name], seed=params.seed * 1000 + spec.seed_offset)
            tokenizer.save_pretrained(out / DEMO_ADAPTERS[spec.name])  # as a trainer does
            if spec.checkpoint_step is not None:
                _write_trainer_files(out / DEMO_ADAPTERS[spec.name], step=spec.checkpoint_step)


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


# --- tokenizer -------------------------------------------------------------------------

_WORDS = (
    "the of and to in is was for on that with as by at from it be this are have not or "
    "an which but had they his her she he we you all their there been one has were more "
    "will would can if about when so what time year people way day man woman child world "
    "life hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye "
    "job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information "
    "back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education model adapter "
    "batch token prompt answer request queue worker server data table file result summary "
    "good new first last long great little own other old right big high different small large "
    "next early young important few public bad same able quickly slowly always never often "
    "say make go know take see come think look want give use find tell ask seem feel try leave "
    "call write read run keep begin help show hear play move live believe bring happen provide"
).split()
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zen", "qua", "bri", "dor", "fel", "gar", "hin", "jus")
_EXTRA_LINES = (
    "Café au lait, naïve façade, Zürich and São Paulo.",
    "Größe, Straße, Ærø, Øresund, Ångström, résumé, piñata.",
    "東京 大阪 北京 上海 你好 世界 こんにちは 안녕하세요",
    "Привет мир, γειά σου κόσμε, مرحبا بالعالم, שלום עולם",
    "Emoji: 😀 🚀 ✨ 👍 ❤️ and symbols © ® ™ € £ ¥ ° ± × ÷",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i * 2)\n",
    '{"id": 42, "name": "demo", "tags": ["a", "b"], "ok": true}',
    "SELECT id, status FROM jobs WHERE status = 'queued' ORDER BY id;",
    "Prices: $3.50, 12.5%, 1,000,000 and 2024-05-17 at 09:30.",
)


def _demo_corpus() -> list[str]:
    """English-ish lines from a fixed seed, plus digits, code and non-Latin scripts."""
    rng = random.Random(1234)  # fixed: the tokenizer must not depend on the model seed
    syllable_words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(4000)]
    vocabulary = list(_WORDS) + syllable_words
    lines = list(_EXTRA_LINES) * 20
    for _ in range(6000):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((".", ".", "?", "!", ",", ":", ";"))
        lines.append(sentence + rng.choice(("", "", "\n", "\n\n", "  ")))
    return lines


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train byte-level BPE with the exact pipeline Qwen2Tokenizer rebuilds on load.

    Qwen2Tokenizer replaces whatever normalizer and pre-tokenizer tokenizer.json holds
    with NFC + Qwen's split regex + ByteLevel(use_regex=False). A tokenizer trained with
    anything else gets different ids after a save/reload, so train with exactly that.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unk
        show_progress=False,
    )
    tokenizer.train_from_iterator(_demo_corpus(), trainer=trainer)
    return tokenizer


def _wrap_tokenizer(trained: Tokenizer) -> PreTrainedTokenizerBase:
    """A Qwen2Tokenizer over the trained vocab and merges, with Qwen's special tokens."""
    from transformers import Qwen2Tokenizer

    model = json.loads(trained.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


# --- base model ------------------------------------------------------------------------


def _random_base_model(params: DemoParams, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A Qwen2ForCausalLM (fp32) with seeded random weights and Qwen2.5-like settings."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    config = Qwen2Config(
        vocab_size=params.vocab_size,
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_kv_heads,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        dtype=params.dtype,
    )
    torch.manual_seed(params.seed)  # construction draws from the global RNG; we overwrite it all below
    model = Qwen2ForCausalLM(config)
    _init_weights_(model, seed=params.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    return model.eval()


def _init_weights_(model: PreTrainedModel, *, seed: int) -> None:
    """Overwrite every weight from one seeded generator, in sorted name order.

    transformers' init (std 0.02 everywhere) makes each layer's output tiny next to the
    residual stream; with tied embeddings the model then repeats the prompt's last token
    forever. Scaling projections by 1/sqrt(fan_in) lets attention and MLP dominate, so
    greedy outputs vary with the prompt and LoRA on q/v visibly changes them.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02, generator=generator)
            elif "embed_tokens" in name:
                param.normal_(0.0, 0.02, generator=generator)
            else:  # Linear weight: [out, in]
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)


# --- adapters --------------------------------------------------------------------------


def _save_adapter(base: PreTrainedModel, adapter_dir: Path, *, seed: int) -> PreTrainedModel:
    """Wrap base with a seeded random LoRA, save it as safetensors, and return base unwrapped."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
        base_model_name_or_path=DEMO_BASE_MODEL_NAME,
    )
    # get_peft_model overwrites base_model_name_or_path from the model's name_or_path.
    base.name_or_path = base.config._name_or_path = DEMO_BASE_MODEL_NAME
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:  # [r, in]: keeps A @ x at unit scale
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
            elif ".lora_B." in name:  # [out, r]
                param.normal_(0.0, LORA_B_GAIN * param.shape[1] ** -0.5, generator=generator)
    # save_embedding_layers=False: "auto" asks the Hub about base_model_name_or_path.
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    # unload() strips the LoRA layers without merging: the base weights are untouched.
    return peft_model.unload()


def _write_trainer_files(checkpoint_dir: Path, *, step: int) -> None:
    """What a transformers Trainer leaves beside the adapter in checkpoint-N."""
    for name in TRAINER_FILES:
        (checkpoint_dir / name).write_bytes(_TRAINER_PLACEHOLDER)
    log_history = [
        {"epoch": round(s / step, 4), "grad_norm": 1.0 / s, "learning_rate": 2e-4 * (1 - s / step),
         "loss": round(2.0 / (1 + s), 4), "step": s}
        for s in range(1, step + 1)
    ]
    state = {
        "best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
        "epoch": 1.0, "eval_steps": 500, "global_step": step, "is_hyper_param_search": False,
        "is_local_process_zero": True, "is_world_process_zero": True, "log_history": log_history,
        "logging_steps": 1, "max_steps": step, "num_input_tokens_seen": 0, "num_train_epochs": 1,
        "save_steps": step, "total_flos": 0.0, "train_batch_size": 4, "trial_name": None, "trial_params": None,
    }
    (checkpoint_dir / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """python -m lorabatch.worker.demo_model ROOT [options]: build the demo, print its root."""
    parser = argparse.ArgumentParser(prog="python -m lorabatch.worker.demo_model", description=__doc__.splitlines()[0])
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
