"""Loading the base model and its tokenizer, once per worker process, and the device it runs on.

This module picks the device and dtype, gets a model ready for left-padded batched generation, and
recognises out-of-memory errors. It knows nothing about adapters, batching or requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lorabatch.schemas.errors import LorabatchError

if TYPE_CHECKING:
    from lorabatch.schemas.settings import Settings

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(LorabatchError):
    """The base model or its tokenizer cannot be loaded. Never retried."""


def pick_device(setting: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (bf16/fp16 matmuls are slow there); bf16 on GPU, fp16 where bf16 is unsupported."""
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def load_base(settings: Settings) -> tuple[Any, Any, torch.device, torch.dtype]:
    """Load ``settings.base_model`` (hub id or local folder): ``(model, tokenizer, device, dtype)``.

    Only safetensors weights, never remote code. The tokenizer pads on the left (generation appends on the
    right) and always has a pad token, falling back to eos.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = settings.base_model
    device = pick_device(settings.model.device)
    dtype = pick_dtype(settings.model.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except Exception as e:  # noqa: BLE001 - many libraries, one message for the user
        raise ModelLoadError(
            f"base model {source} cannot be loaded ({type(e).__name__}: {e}); set [model] base to a local folder "
            "with config.json, safetensors weights and tokenizer files, or to a reachable hub id."
        ) from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {source} has neither a pad nor an eos token; add one of them.")
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer, device, dtype


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end generation: generation_config's eos (an int or a list), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def context_length(model: Any) -> int | None:
    """The longest prompt + completion the model's position embeddings cover, when its config says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError older builds and CPU allocators raise instead."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def free_device_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error, so a smaller retry can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
