"""What a generation request asks for and what it gets back: the engine's public data types.

This module knows nothing about models, batching or how results are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; every row of a batch honours its own."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    seed: int | None = None
    """The same seed gives the same output whatever batch the request lands in; None: a random seed."""
    stop: tuple[str, ...] = ()
    """A stop string ends generation and is not part of the output."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens (benchmarks); eos tokens are then ordinary tokens."""


@dataclass
class GenerationRequest:
    """One prompt for one adapter. Exactly one of ``prompt``, ``messages`` and ``prompt_ids``."""

    key: Hashable
    """The caller's id, returned unchanged."""
    adapter: str
    """``"base"`` (no adapter) or a configured adapter name."""
    params: SamplingParams
    prompt: str | None = None
    """Tokenized as is, with the tokenizer's default special tokens."""
    messages: list[dict] | None = None
    """Rendered with the tokenizer's chat template, generation prompt added."""
    prompt_ids: list[int] | None = None
    """Token ids, used as they are (benchmarks against other engines on token-id workloads)."""


@dataclass
class GenerationResult:
    """What one request got: an output, or an error that concerns it alone."""

    key: Hashable
    output: str | None
    """Decoded without special tokens, cut before a matched stop string; None when ``error`` is set."""
    finish_reason: str | None
    """'stop' (eos or stop string), 'length', 'cancelled', or 'preempted' (out of memory beside other rows:
    output None, to be queued again); None when ``error`` is set."""
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens, the eos or the token completing a stop string included."""
    error: str | None = None

    @classmethod
    def failed(cls, request: GenerationRequest, error: str, *, prompt_tokens: int = 0) -> GenerationResult:
        """The result of a request that did not run (or could not finish): ``error`` says why."""
        return cls(request.key, None, None, prompt_tokens=prompt_tokens, completion_tokens=0, error=error)
