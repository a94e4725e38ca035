"""Choosing the next token for every row of a batch, each row with its own settings.

Rows with temperature 0 take the argmax. Sampled rows draw ONE uniform number per step from their own
CPU ``torch.Generator`` and pick the token by inverse CDF over their filtered distribution, so a seeded row
gives the same tokens whatever batch it is in and whatever its neighbours ask for, on any device, and
nothing of size vocab crosses to the CPU. Rows with neither top-k nor top-p walk the CDF in vocabulary order
(no sort at all); rows with top-k take ``torch.topk`` (k columns, sorted); only rows with top-p and no top-k
sort the whole vocabulary. A seed therefore gives the same tokens on every run and in every batch, but not
the tokens an always-sorting sampler (lorabatch before continuous batching) gave for that seed.

This module knows nothing about models, tokenizers or stop strings.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass
class RowSampler:
    """One row's sampling settings and its private random stream."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None

    @classmethod
    def create(cls, *, temperature: float, top_p: float, top_k: int, seed: int | None) -> RowSampler:
        if temperature <= 0:
            return cls()
        # Without a seed the row still needs its own stream: a neighbour must not shift it.
        generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        return cls(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def sample_next(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """The next token of every row. logits: [B, V] -> tokens: [B] (long, on logits' device)."""
    tokens = logits.argmax(dim=-1)  # [B]
    sampled = [i for i, s in enumerate(samplers) if not s.greedy]
    if not sampled:
        return tokens
    rows = [samplers[i] for i in sampled]
    device = logits.device
    index = torch.tensor(sampled, device=device)
    temperature = torch.tensor([s.temperature for s in rows], device=device, dtype=torch.float32)
    top_p = torch.tensor([s.top_p for s in rows], device=device, dtype=torch.float32)
    top_k = torch.tensor([s.top_k for s in rows], device=device, dtype=torch.long)
    uniforms = torch.tensor([s.uniform() for s in rows], device=device, dtype=torch.float32)
    tokens[index] = sample_filtered(logits[index].float(), temperature, top_k, top_p, uniforms)
    return tokens


def sample_filtered(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Temperature, then top-k (0 = off), then top-p, then inverse-CDF sampling.

    logits: [R, V] float32; temperature, top_p, uniforms: [R] float32; top_k: [R] long -> tokens: [R]
    """
    probs = (logits / temperature[:, None]).softmax(dim=-1)  # [R, V]
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    plain = (top_k == 0) & (top_p >= 1)
    if plain.any():
        tokens[plain] = inverse_cdf(probs[plain], uniforms[plain])
    filtered = ~plain
    if filtered.any():
        tokens[filtered] = sample_top(probs[filtered], top_k[filtered], top_p[filtered], uniforms[filtered])
    return tokens


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token where each row's CDF (in vocabulary order) passes its uniform. probs: [R, V] -> [R]"""
    cdf = probs.cumsum(dim=-1)  # [R, V]
    target = (uniforms * cdf[:, -1])[:, None]  # [R, 1]
    position = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    # A uniform at the very top could land on a trailing token of probability 0; step back onto a real one.
    last_real = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(position, last_real).squeeze(-1)


def sample_top(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p over the most likely tokens, by inverse CDF. probs: [R, V]; top_k: [R] (0 = off) -> [R]"""
    vocab = probs.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [R]
    top_probs, top_ids = probs.topk(int(k.max()), dim=-1)  # [R, K], most likely first
    rank = torch.arange(top_probs.shape[-1], device=probs.device)[None, :]  # [1, K]
    keep = rank < k[:, None]
    # Top-p keeps the smallest prefix whose mass reaches p: a token stays if the mass BEFORE it is below p.
    mass_before = top_probs.cumsum(dim=-1) - top_probs
    keep &= mass_before < top_p[:, None]
    keep[:, 0] = True  # the most likely token always stays, even with top_p = 0
    cdf = (top_probs * keep).cumsum(dim=-1)  # [R, K]
    target = (uniforms * cdf[:, -1])[:, None]  # [R, 1]
    position = torch.searchsorted(cdf, target, right=True).clamp(max=top_probs.shape[-1] - 1)  # [R, 1]
    # A uniform at the very top could land past the last kept token; step back onto it.
    last_kept = keep.sum(dim=-1, keepdim=True) - 1
    return top_ids.gather(-1, torch.minimum(position, last_kept)).squeeze(-1)
