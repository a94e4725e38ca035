"""What plain PEFT gives for one prompt alone: the reference lorabatch's outputs must equal."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=2)
def reference_model(demo_root: Path):
    """The demo base model wrapped by PEFT with all four demo adapters loaded, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorabatch.demo.build import DEMO_ADAPTERS, DEMO_MODEL_DIR

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_root / DEMO_MODEL_DIR, dtype=torch.float32)
    names = list(DEMO_ADAPTERS)
    model = PeftModel.from_pretrained(base, demo_root / DEMO_ADAPTERS[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(demo_root / DEMO_ADAPTERS[name], adapter_name=name)
    model.eval()
    return model, AutoTokenizer.from_pretrained(demo_root / DEMO_MODEL_DIR)


def reference_output(demo_root: Path, *, adapter: str, prompt: str | None = None, messages: list | None = None,
                     max_new_tokens: int) -> str:
    """Greedy output of one prompt alone through plain PEFT `generate`."""
    import contextlib

    import torch

    model, tok = reference_model(demo_root)
    if messages is not None:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    if adapter == "base":
        ctx = model.disable_adapter()
    else:
        model.set_adapter(adapter)
        ctx = contextlib.nullcontext()
    with ctx, torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
