"""Refusing, at submit time, prompts that cannot fit the model's context.

A byte-level BPE token covers at least one byte, so a prompt of B UTF-8 bytes has at most B
tokens. Only prompts whose bound could overflow the context are tokenized, and only when the
base model's tokenizer is at hand locally (transformers installed, model on disk or in the
cache). Otherwise the check is left to the worker, which fails just that request.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path

from lorabatch.schemas.lines import RequestSpec
from lorabatch.schemas.settings import Settings

log = logging.getLogger("lorabatch.producer")

CHAT_OVERHEAD_TOKENS_PER_MESSAGE = 16
"""A generous bound on what a chat template adds per message (role markers, separators)."""
CHAT_OVERHEAD_TOKENS = 32
"""...and once per conversation (system preamble, generation prompt)."""


class PromptLengthCheck:
    """Callable on a validated request: None when it fits (or cannot be checked here), else the problem."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def context(self) -> int | None:
        if self.settings.model.max_context:
            return self.settings.model.max_context
        config = Path(self.settings.base_model) / "config.json"
        if not config.is_file():
            try:  # a hub id: its config may be in the local cache (huggingface_hub comes with transformers)
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(self.settings.base_model, "config.json")
            except Exception:
                cached = None
            if not isinstance(cached, str):
                return None  # not installed or not cached: the worker checks instead
            config = Path(cached)
        return json.loads(config.read_text()).get("max_position_embeddings")

    @cached_property
    def tokenizer(self):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.settings.base_model, local_files_only=True, trust_remote_code=False)
        except Exception:
            log.info("no local tokenizer for %s: prompt lengths are checked by the worker", self.settings.base_model)
            return None
        # Counting a too-long prompt is the point here: without this, transformers warns "Token indices
        # sequence length is longer than the specified maximum" into submit's output.
        tok.model_max_length = 1 << 62
        return tok

    def __call__(self, spec: RequestSpec) -> str | None:
        context = self.context
        if not context:
            return None
        new = spec.params["max_new_tokens"]
        if spec.prompt is not None:
            bound = len(spec.prompt.encode("utf-8"))
        else:
            bound = sum(len(m["content"].encode("utf-8")) + CHAT_OVERHEAD_TOKENS_PER_MESSAGE for m in spec.messages)
            bound += CHAT_OVERHEAD_TOKENS
        if bound + new <= context or self.tokenizer is None:
            return None
        tokens = self._count(spec)
        if tokens + new > context:
            return (f"has a prompt of {tokens} tokens; with max_new_tokens={new} that exceeds the model's context of "
                    f"{context} tokens; shorten the prompt or lower max_new_tokens")
        return None

    def _count(self, spec: RequestSpec) -> int:
        tok = self.tokenizer
        if spec.prompt is not None:
            return len(tok(spec.prompt)["input_ids"])
        ids = tok.apply_chat_template(spec.messages, add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
