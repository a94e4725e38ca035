"""Choosing the next token for every row of a batch, each row with its own settings, with no device->host sync.

Rows with temperature 0 take the argmax. Sampled rows draw ONE uniform number per step from their own
CPU ``torch.Generator`` and pick the token by inverse CDF over their filtered distribution, so a seeded row
gives the same tokens whatever batch it is in and whatever its neighbours ask for, on any device, and
nothing of size vocab crosses to the CPU. Rows with neither top-k nor top-p walk the CDF in vocabulary order
(no sort at all); rows with top-k take ``torch.topk`` (k columns, sorted); only rows with top-p and no top-k
sort the whole vocabulary. A seed therefore gives the same tokens on every run and in every batch, but not
the tokens an always-sorting sampler (lorabatch before continuous batching) gave for that seed.

No step waits for the device: the samplers are host objects, so which rows are greedy, plain or filtered,
the widest top-k, the temperatures and the uniforms are all known on the host. They travel in ONE host
tensor (pinned on CUDA) by one non-blocking copy; rows are picked with index tensors, never with boolean
masks (a boolean index asks the device how many rows it selects). The caller's one transfer per step is
reading the tokens back.

This module knows nothing about models, tokenizers or stop strings.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
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
    values = sample_filtered(logits, temperature=[s.temperature for s in rows], top_k=[s.top_k for s in rows],
                             top_p=[s.top_p for s in rows], uniforms=[s.uniform() for s in rows], rows=sampled)
    return tokens.index_copy_(0, values[1], values[0])  # values: [2, R] tokens, their rows


def sample_filtered(
    logits: torch.Tensor, *, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
    uniforms: Sequence[float], rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Temperature, then top-k (0 = off), then top-p, then inverse-CDF sampling, for ``rows`` of logits.

    logits: [B, V]; the settings: one host value per row of ``rows`` (default: every row of logits, in order)
    -> [2, R] long on logits' device: the sampled tokens, then the logits row each one belongs to (rows are
    regrouped, plain ones first; ``sample_next`` scatters them back). ``tokens_of`` gives them in ``rows``' order.
    """
    rows = list(range(logits.shape[0])) if rows is None else list(rows)
    vocab = logits.shape[-1]
    # Plain rows (neither top-k nor top-p) walk the CDF in vocabulary order, no sort; they go first.
    plain, filtered = [], []
    for j in range(len(rows)):
        (plain if top_k[j] == 0 and top_p[j] >= 1 else filtered).append(j)
    order = plain + filtered
    k_host = [min(top_k[j], vocab) if top_k[j] > 0 else vocab for j in order]  # top-k off: the whole vocabulary
    n = len(plain)
    width = max(k_host[n:], default=0)
    # One host tensor, one copy: float64 holds float32 settings and row indices exactly.
    host = torch.tensor([
        [rows[j] for j in order],
        [temperature[j] for j in order],
        [top_p[j] for j in order],
        [uniforms[j] for j in order],
        k_host,
    ], dtype=torch.float64)  # [5, R]
    table = _to_device(host, logits.device)
    index = table[0].long()
    temperatures, top_ps, u = (table[i].to(torch.float32) for i in (1, 2, 3))
    ks = table[4].long()
    probs = (logits.index_select(0, index).float() / temperatures[:, None]).softmax(dim=-1)  # [R, V]
    parts = []
    if plain:
        parts.append(inverse_cdf(probs[:n], u[:n]))
    if filtered:
        parts.append(sample_top(probs[n:], ks[n:], top_ps[n:], u[n:], width=width))
    return torch.stack([torch.cat(parts), index])


def tokens_of(sampled: torch.Tensor, rows: Sequence[int]) -> list[int]:
    """The tokens of ``sample_filtered``'s answer in ``rows``' order (reads them back: tests and tools only)."""
    by_row = dict(zip(sampled[1].tolist(), sampled[0].tolist()))
    return [by_row[r] for r in rows]


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token where each row's CDF (in vocabulary order) passes its uniform. probs: [R, V] -> [R]"""
    cdf = probs.cumsum(dim=-1)  # [R, V]
    target = (uniforms * cdf[:, -1])[:, None]  # [R, 1]
    position = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)
    # A uniform at the very top could land on a trailing token of probability 0; step back onto a real one.
    last_real = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(position, last_real).squeeze(-1)


def sample_top(probs: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor, *,
               width: int) -> torch.Tensor:
    """Top-k, then top-p over the most likely tokens, by inverse CDF.

    probs: [R, V]; k: [R] in 1..V (V = top-k off); width: max(k), known on the host -> [R]
    """
    top_probs, top_ids = probs.topk(width, dim=-1)  # [R, K], most likely first
    rank = torch.arange(width, device=probs.device)[None, :]  # [1, K]
    keep = rank < k[:, None]
    # Top-p keeps the smallest prefix whose mass reaches p: a token stays if the mass BEFORE it is below p.
    mass_before = top_probs.cumsum(dim=-1) - top_probs
    keep &= mass_before < top_p[:, None]
    keep[:, 0] = True  # the most likely token always stays, even with top_p = 0
    cdf = (top_probs * keep).cumsum(dim=-1)  # [R, K]
    target = (uniforms * cdf[:, -1])[:, None]  # [R, 1]
    position = torch.searchsorted(cdf, target, right=True).clamp(max=width - 1)  # [R, 1]
    # A uniform at the very top could land past the last kept token; step back onto it.
    last_kept = keep.sum(dim=-1, keepdim=True) - 1
    return top_ids.gather(-1, torch.minimum(position, last_kept)).squeeze(-1)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait: pinned memory and a non-blocking copy on CUDA."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()  # the caching host allocator keeps it alive until the copy is done
    return host.to(device, non_blocking=True)
