"""The demo's weights: a Qwen2 base model with seeded random weights, PEFT adapters with non-zero B
matrices, and the placeholder files a trainer leaves beside a checkpoint. Imports torch, transformers
and peft only inside its functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lorabatch.demo.tokenizer import ENDOFTEXT, IM_END

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lorabatch.demo.build import DemoParams

DEMO_BASE_MODEL_NAME = "lorabatch-demo/model"
"""`base_model_name_or_path` written into each adapter_config.json.

A fixed name rather than the model's absolute path, so that the files do not depend on
where the demo was built (the build is byte-reproducible across roots). Its last part is
the model folder's name, which is what adapter_files.same_model compares."""

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



def random_base_model(params: DemoParams, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
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
    init_weights_(model, seed=params.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    return model.eval()


def init_weights_(model: PreTrainedModel, *, seed: int) -> None:
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


def save_adapter(base: PreTrainedModel, adapter_dir: Path, *, seed: int) -> PreTrainedModel:
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


def write_trainer_files(checkpoint_dir: Path, *, step: int) -> None:
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
