"""The native forward for Qwen2-architecture models (Llama-shaped: RMSNorm, rotary, GQA, SwiGLU), over the
parameter tensors of the already-loaded transformers model: no second copy of the weights.

Two entry points, both tensors in, logits of the rows' last positions out:
- ``prefill``: right-padded prompts [b, S] (positions 0..len-1, natural), causal attention over the chunk's own
  keys (SDPA with ``is_causal`` and no mask: padding sits after every real token, so no row sees it), keys and
  values written into the rows' slots (kv_slots.py);
- ``decode``: one token per slot 0..B-1 at its position, attention over the slot's first ``width`` columns
  with a length mask, by plain matmul and an fp32 softmax: no attention backend picks a plan per width (SDPA
  with a padding mask takes cuDNN on CUDA, which plans each new width: about 1.3 ms a call), and the same
  shapes replay under CUDA graphs (graphs.py). GQA by reshaping the queries ([B, kv_heads, group, D]), never
  by repeating keys.

The math is transformers' own, op for op where it matters (its RMSNorm and rotary modules are called, the
projections are F.linear on its tensors), so fp32 on CPU gives the tokens transformers gives.
LoRA deltas come from ``lora`` (lora_stack.RowLora): one batched op per projection whatever the adapters.

This module knows nothing about adapters' files, requests, which rows are alive or how slots are chosen.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from lorabatch.schemas.errors import LorabatchError

SUPPORTED = ("Qwen2ForCausalLM", "LlamaForCausalLM")


class NativeUnsupported(LorabatchError):
    """The model's architecture is not one the native forward computes exactly."""


class Lora(Protocol):
    def apply(self, layer: int, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def check_supported(model: Any) -> None:
    """NativeUnsupported (one line: what and the fix) unless the native forward computes this model exactly."""
    kind = type(model).__name__
    config = model.config
    fix = 'set [worker] forward = "transformers"'
    if kind not in SUPPORTED:
        raise NativeUnsupported(f"the native forward runs {', '.join(SUPPORTED)}, not {kind}; {fix}.")
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope not in ("default", "linear", "llama3", "yarn"):
        raise NativeUnsupported(f"the native forward does not run rope_type {rope!r} (positions change per step); {fix}.")
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise NativeUnsupported(f"the native forward does not run sliding-window attention; {fix}.")
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise NativeUnsupported(f"the native forward runs SwiGLU MLPs without bias only; {fix}.")
    if kind == "LlamaForCausalLM" and getattr(config, "attention_bias", False) is not False:
        raise NativeUnsupported(f"the native forward runs Llama without attention bias only; {fix}.")


class NativeModel:
    """Prefill and decode over ``model``'s own parameters (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        check_supported(model)
        config = model.config
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        parameter = next(model.parameters())
        # Attention scores in fp32 whatever the weights' dtype: bf16 scores (8 mantissa bits) flip greedy tokens
        # that SDPA's fp32 accumulators keep. On CUDA bmm writes fp32 from bf16 inputs directly (out_dtype).
        self.fp32_scores = parameter.dtype != torch.float32
        self.bmm_out_dtype = self.fp32_scores and parameter.is_cuda and _bmm_out_dtype_works(parameter.device)

    # -- entry points ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, last: torch.Tensor, slots: torch.Tensor, kv: Any, lora: Lora | None = None
    ) -> torch.Tensor:
        """input_ids [b, S] right-padded; last [b]: each row's last real index; slots [b]: where its keys go.
        -> logits [b, V] at each row's last real position."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device)[None, :].expand(b, s)
        hidden = self.embed(input_ids)  # [b, S, hidden]
        cos, sin = self.rotary(hidden, positions)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = kv.layer(i)
            keys[slots, :, :s] = k
            values[slots, :, :s] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.group > 1)

        hidden = self._layers(hidden, cos, sin, attend, lora)
        hidden = hidden[torch.arange(b, device=hidden.device), last]  # [b, hidden]: the last real token of each row
        return self.lm_head(self.norm(hidden))

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, kv: Any, width: int, lora: Lora | None = None
    ) -> torch.Tensor:
        """tokens, positions: [B] for slots 0..B-1; width: columns read (> every position). -> logits [B, V]"""
        batch = tokens.shape[0]
        rows = torch.arange(batch, device=tokens.device)
        hidden = self.embed(tokens[:, None])  # [B, 1, hidden]
        cos, sin = self.rotary(hidden, positions[:, None])
        # Column j of row r is real when j <= positions[r] (its own token is written before attending).
        hide = torch.arange(width, device=tokens.device)[None, :] > positions[:, None]  # [B, W]
        hide = hide[:, None, None, :]  # [B, 1, 1, W]: every kv head, every query of its group

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = kv.layer(i)
            keys[rows, :, positions] = k[:, :, 0]  # [B, kv_heads, D] into each row's column
            values[rows, :, positions] = v[:, :, 0]
            q = q.reshape(batch, self.kv_heads, self.group, self.head_dim)  # head h uses kv head h // group
            scores = self._scores(q, keys[:batch, :, :width]) * self.scaling  # [B, kvh, g, W], fp32
            scores = scores.masked_fill(hide, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, values[:batch, :, :width])  # [B, kvh, g, D]
            return out.reshape(batch, self.heads, 1, self.head_dim)

        hidden = self._layers(hidden, cos, sin, attend, lora)
        return self.lm_head(self.norm(hidden[:, 0]))

    def _scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q [B, kvh, g, D] against keys [B, kvh, W, D] (a view of the slots) -> [B, kvh, g, W] in fp32."""
        if not self.fp32_scores:
            return torch.matmul(q, keys.transpose(-1, -2))
        b, h, g, d = q.shape
        if self.bmm_out_dtype:
            flat = keys.reshape(b * h, keys.shape[2], d)  # batch dims collapse: a view, no copy
            return torch.bmm(q.reshape(b * h, g, d), flat.transpose(1, 2), out_dtype=torch.float32).view(b, h, g, -1)
        return torch.matmul(q.float(), keys.float().transpose(-1, -2))

    # -- the layers --------------------------------------------------------------------------------------

    def _layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Any, lora: Lora | None):
        b, s, _ = hidden.shape
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = self._linear(attn.q_proj, x, i, "q_proj", lora).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = self._linear(attn.k_proj, x, i, "k_proj", lora).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self._linear(attn.v_proj, x, i, "v_proj", lora).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotary(q, k, cos, sin)
            out = attend(i, q, k, v)  # [b, H, s, D]
            out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
            hidden = residual + self._linear(attn.o_proj, out, i, "o_proj", lora)
            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            gate = self._linear(mlp.gate_proj, x, i, "gate_proj", lora)
            up = self._linear(mlp.up_proj, x, i, "up_proj", lora)
            hidden = residual + self._linear(mlp.down_proj, mlp.act_fn(gate) * up, i, "down_proj", lora)
        return hidden

    @staticmethod
    def _linear(module: Any, x: torch.Tensor, layer: int, name: str, lora: Lora | None) -> torch.Tensor:
        y = F.linear(x, module.weight, module.bias)
        return y if lora is None else lora.apply(layer, name, x, y)


def _bmm_out_dtype_works(device: torch.device) -> bool:
    """torch.bmm(..., out_dtype=float32) from bf16/fp16 inputs: on CUDA since torch 2.8; else cast instead."""
    try:
        a = torch.ones((1, 1, 2), dtype=torch.bfloat16, device=device)
        return torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb: q, k [b, heads, s, D]; cos, sin [b, s, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
