"""The generation engine: requests over one base model and many LoRA adapters -> one result each.

``Engine`` owns the model, the tokenizer and the adapters, turns a request into prompt token ids (refusing
what cannot run: bad parameters, prompt over the context) and a finished row into a result.
``Engine.stepper()`` gives the continuous-batching loop (stepper.py): rows join and leave a running batch.
``Engine.generate`` is the one-shot form on top of it: admit what admission allows, step until all are done.

Weights modes (decided per admission, batching.py): ``merged`` merges one adapter into the base weights
(restored bit-exactly between adapters); ``separate`` keeps adapters apart and mixes adapters and base rows in
one batch; ``auto`` merges while one adapter fills the batch and mixes otherwise. The measurements behind the
rules are in the README's engine section.

Forward paths (``forward``): ``transformers`` runs transformers' eager forward with PEFT's LoRA layers
(stepper.py); ``native`` runs the project's own forward over the same parameter tensors (qwen2.py) with a KV
cache of fixed slots allocated once (kv_slots.py), every resident adapter stacked for one batched op per
projection (lora_stack.py) and the decode step under CUDA graphs on a GPU (graphs.py, slot_stepper.py).
``auto`` takes native where the model and every configured adapter can run there (and, on CPU, where it is
at least as fast: native_setup.NATIVE_ON_CPU; native_setup.py builds the path).

This module knows nothing about Celery, SQL, job ids or where settings come from; it is not thread-safe,
and it does not care which thread calls it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Mapping

from lorabatch.worker.engine import decode, native_setup
from lorabatch.worker.engine.model import context_length, eos_token_ids, load_base
from lorabatch.worker.engine.params import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from lorabatch.worker.engine.sampling import RowSampler
from lorabatch.worker.engine.stepper import Stepper
from lorabatch.worker.engine.stops import StopStrings, cut_at_stop

if TYPE_CHECKING:
    from lorabatch.schemas.settings import Settings
    from lorabatch.worker.engine.adapters import AdapterManager

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "SamplingParams"]


class RequestRefused(Exception):
    """A request that cannot run, whatever else is in the pool; its message becomes the result's error."""

    def __init__(self, message: str, *, prompt_tokens: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens


class Engine:
    """Batched generation over one base model and its adapters."""

    Refused = RequestRefused

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        adapters: AdapterManager,
        *,
        weights: Literal["auto", "merged", "separate"] = "auto",
        max_batch_size: int | Literal["auto"] = 32,
        max_batch_tokens: int | Literal["auto"] = 16384,
        max_context: int | None = None,
        min_merged_rows: int | None = None,
        forward: Literal["auto", "native", "transformers"] = "transformers",
        cuda_graphs: bool = True,
        gpu_memory_fraction: float = 0.9,
    ) -> None:
        """``max_context``: prompt + max_new_tokens limit (default: the model's max_position_embeddings);
        ``min_merged_rows``: auto mode's threshold (default: batching.AUTO_MERGED_FILL of max_batch_size);
        ``forward``: the forward path (module docstring); "auto" batch sizes are resolved here, once."""
        if weights not in ("auto", "merged", "separate"):
            raise ValueError(f"weights must be auto, merged or separate, not {weights!r}")
        self.model = model  # PEFT wraps it in place: the same module carries every loaded LoRA layer
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.weights = weights
        self.max_context = max_context or context_length(model)
        self.min_merged_rows = min_merged_rows
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(model, tokenizer)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.forward = native_setup.pick_forward(self, forward, max_batch_size, max_batch_tokens)
        self.native = self.kv = self.runner = None
        if self.forward == "native":
            native_setup.build_native(self, max_batch_size, max_batch_tokens, cuda_graphs=cuda_graphs,
                                      gpu_memory_fraction=gpu_memory_fraction)
        else:
            self.max_batch_size = 32 if max_batch_size == "auto" else int(max_batch_size)
            self.max_batch_tokens = 16384 if max_batch_tokens == "auto" else int(max_batch_tokens)
            adapters.bind(model)


    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """Load the base model once and serve the configured adapters on it."""
        from lorabatch.worker.engine.adapters import AdapterManager

        model, tokenizer, _, _ = load_base(settings)
        w = settings.worker
        engine = cls(
            model,
            tokenizer,
            AdapterManager.from_settings(settings),
            weights=w.weights,
            max_batch_size=w.max_batch_size,
            max_batch_tokens=w.max_batch_tokens,
            max_context=settings.model.max_context,
            forward=getattr(w, "forward", "transformers"),
            cuda_graphs=getattr(w, "cuda_graphs", True),
            gpu_memory_fraction=getattr(w, "gpu_memory_fraction", 0.9),
        )
        # "auto" sizes are resolved once, here: every later reader of these settings sees the engine's ints.
        w.max_batch_size, w.max_batch_tokens = engine.max_batch_size, engine.max_batch_tokens
        return engine

    def resolved(self, settings: Settings) -> Settings:
        """``settings`` with [worker] max_batch_size/max_batch_tokens replaced by what this engine runs with."""
        sizes = {"max_batch_size": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens}
        return settings.model_copy(update={"worker": settings.worker.model_copy(update=sizes)})

    def stepper(self) -> Stepper:
        """A new running batch on this engine's model; one thread drives it (see stepper.py, slot_stepper.py).
        On the native path one stepper at a time: they share the engine's KV slots."""
        if self.forward == "native":
            from lorabatch.worker.engine.slot_stepper import SlotStepper

            return SlotStepper(self)
        return Stepper(self)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in the same order; a failed request has ``error`` set, the others run.

        Requests wait in prompt-length order (neighbours in a prefill then pad little) and join the running
        batch whenever admission allows; preempted ones (out of memory) wait again at the front.
        """
        results: dict[int, GenerationResult] = {}
        by_length = []
        for i, request in enumerate(requests):
            try:
                by_length.append((len(self.encode(request)), i))
            except RequestRefused as e:
                results[i] = failed(request, str(e), prompt_tokens=e.prompt_tokens)
        # Internal keys: the caller's keys need not be unique.
        waiting = [replace(requests[i], key=i) for _, i in sorted(by_length)]
        stepper = self.stepper()
        while waiting or not stepper.idle:
            counts = stepper.admission(Counter(request.adapter for request in waiting))
            chosen, waiting = take_counts(waiting, counts)
            for result in stepper.admit(chosen) + stepper.step():
                if result.finish_reason == "preempted":
                    waiting.insert(0, replace(requests[result.key], key=result.key))
                else:
                    results[result.key] = replace(result, key=requests[result.key].key)
        return [results[i] for i in range(len(requests))]

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids; RequestRefused when the request cannot run."""
        p = request.params
        if p.max_new_tokens < 1 or p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
            raise RequestRefused(
                f"invalid sampling parameters (max_new_tokens={p.max_new_tokens}, temperature={p.temperature}, "
                f"top_p={p.top_p}, top_k={p.top_k}): need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0."
            )
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_ids)]
        if sum(given) != 1:
            raise RequestRefused("a request needs exactly one of prompt or messages.")
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise RequestRefused(f"prompt_ids must lie in [0, {self.vocab_size}).")
        elif request.prompt is not None:
            ids = list(self.tokenizer(request.prompt)["input_ids"])
        else:
            try:
                ids = list(self.tokenizer.apply_chat_template(
                    request.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                ))
            except Exception as e:  # noqa: BLE001 - jinja and tokenizer errors alike: these messages cannot run
                raise RequestRefused(f"the messages cannot be rendered with the chat template ({e}).") from e
        if not ids:
            raise RequestRefused("the prompt is empty after tokenization.")
        total = len(ids) + p.max_new_tokens
        if self.max_context is not None and total > self.max_context:
            raise RequestRefused(
                f"prompt of {len(ids)} tokens + max_new_tokens {p.max_new_tokens} = {total} tokens is over the "
                f"context of {self.max_context} tokens; shorten the prompt or lower max_new_tokens.",
                prompt_tokens=len(ids),
            )
        return ids

    def row(self, params: SamplingParams, prompt: list[int]) -> decode.Row:
        stops = StopStrings(params.stop, self._decode)
        return decode.Row(
            prompt=prompt,
            max_new_tokens=params.max_new_tokens,
            sampler=RowSampler.create(
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed
            ),
            eos=frozenset() if params.ignore_eos else self.eos,
            is_stopped=stops.matched if stops else None,
        )

    def result(self, request: GenerationRequest, row: decode.Row) -> GenerationResult:
        text, cut = cut_at_stop(self._decode(row.tokens), request.params.stop)
        return GenerationResult(
            key=request.key,
            output=text,
            finish_reason="stop" if cut else row.finish_reason,
            prompt_tokens=len(row.prompt),
            completion_tokens=len(row.tokens),
        )

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def take_counts(
    waiting: list[GenerationRequest], counts: Mapping[str, int]
) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
    """The first ``counts[adapter]`` waiting requests of each adapter, and the rest, both in order."""
    left = dict(counts)
    chosen, rest = [], []
    for request in waiting:
        if left.get(request.adapter, 0) > 0:
            left[request.adapter] -= 1
            chosen.append(request)
        else:
            rest.append(request)
    return chosen, rest


failed = GenerationResult.failed
