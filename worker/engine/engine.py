"""The generation engine: a pool of requests over one base model and many LoRA adapters -> one result each.

``Engine.generate`` tokenizes every request, refuses the ones that cannot run (bad parameters, prompt over
the context, unknown or invalid adapter) as results with ``error`` set, plans batches (batching.py),
applies each batch's adapters (adapters.py) and runs the decode loop (decode.py). An out-of-memory batch
is split in half and retried; a single request that still does not fit fails alone.

Weights modes: ``merged`` merges the batch's adapter into the base weights (restored bit-exactly between
adapters); ``separate`` keeps adapters apart and lets one batch mix several adapters and base rows;
``auto`` runs full single-adapter batches merged and pools the small leftovers of several adapters into
mixed batches. The rule, measured with ``python bench/engine_bench.py --measure-auto`` on a 2-core CPU
(fp32, 32 new tokens): tokens/s of one adapter merged in a batch of n rows, over tokens/s of one mixed batch
of 32 rows spanning the four demo adapters and base:

    n rows                                4     8     12    16    24    32
    demo shape (hidden 256), 2 threads    0.59  0.69  0.76  0.85  1.01  1.15
    0.5B shape cut to 4 layers, 2 threads 0.59  0.71  0.75  0.94  0.96  1.03
    0.5B shape cut to 4 layers, 1 thread  0.45  0.60  0.62  0.94  1.03  1.05

Switching the merged adapter (exact restore + merge) took 1.7-3 ms (demo) and 7-11 ms (0.5B shape), less
than one decode step, so it never decides. Hence: a batch's worth of one adapter runs merged (mixed costs
3-5% on the 0.5B shape, 15-25% on the tiny demo where PEFT's per-layer Python dominates), and a leftover
under 3/4 of max_batch_size (batching.AUTO_MERGED_FILL) goes faster pooled with other adapters' leftovers.
On a GPU a small batch is further still from full throughput, which favours pooling more.

This module knows nothing about Celery, SQL, job ids or where settings come from; it is not thread-safe,
and it does not care which thread calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from lorabatch.schemas.errors import AdapterError, RequestTooLarge
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine import decode
from lorabatch.worker.engine.batching import Batch, Item, plan_batches
from lorabatch.worker.engine.model import (
    context_length,
    eos_token_ids,
    free_device_memory,
    is_out_of_memory,
    load_base,
)
from lorabatch.worker.engine.params import (
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from lorabatch.worker.engine.sampling import RowSampler
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

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        adapters: AdapterManager,
        *,
        weights: Literal["auto", "merged", "separate"] = "auto",
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_context: int | None = None,
        min_merged_rows: int | None = None,
    ) -> None:
        """``max_context``: prompt + max_new_tokens limit (default: the model's max_position_embeddings);
        ``min_merged_rows``: auto mode's threshold (default: batching.AUTO_MERGED_FILL of max_batch_size)."""
        if weights not in ("auto", "merged", "separate"):
            raise ValueError(f"weights must be auto, merged or separate, not {weights!r}")
        self.model = model  # PEFT wraps it in place: the same module carries every loaded LoRA layer
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.weights = weights
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_context = max_context or context_length(model)
        self.min_merged_rows = min_merged_rows
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        adapters.bind(model)

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """Load the base model once and serve the configured adapters on it."""
        from lorabatch.worker.engine.adapters import AdapterManager

        model, tokenizer, _, _ = load_base(settings)
        return cls(
            model,
            tokenizer,
            AdapterManager.from_settings(settings),
            weights=settings.worker.weights,
            max_batch_size=settings.worker.max_batch_size,
            max_batch_tokens=settings.worker.max_batch_tokens,
            max_context=settings.model.max_context,
        )

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in the same order; a failed request has ``error`` set, the others run."""
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts: dict[int, list[int]] = {}
        items: list[Item] = []
        for i, request in enumerate(requests):
            try:
                prompts[i] = self.encode(request)
                items.append(Item(i, request.adapter, len(prompts[i]), request.params.max_new_tokens))
            except RequestRefused as e:
                results[i] = failed(request, str(e), prompt_tokens=e.prompt_tokens)
        for name in {item.adapter for item in items} - {BASE_ADAPTER}:
            try:
                self.adapters.spec(name)
            except AdapterError as e:
                for item in (it for it in items if it.adapter == name):
                    results[item.index] = failed(requests[item.index], str(e), prompt_tokens=item.prompt_len)
        items = [item for item in items if results[item.index] is None]
        plan = plan_batches(
            items,
            weights=self.weights,
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_adapters=self.adapters.max_resident,
            min_merged_rows=self.min_merged_rows,
        )
        for batch in plan:
            self._run_splitting_on_oom(batch, requests, prompts, results)
        return results  # type: ignore[return-value]  # every slot is filled by now

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids; RequestRefused when the request cannot run."""
        p = request.params
        if p.max_new_tokens < 1 or p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
            raise RequestRefused(
                f"invalid sampling parameters (max_new_tokens={p.max_new_tokens}, temperature={p.temperature}, "
                f"top_p={p.top_p}, top_k={p.top_k}): need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_k >= 0."
            )
        if (request.prompt is None) == (request.messages is None):
            raise RequestRefused("a request needs exactly one of prompt or messages.")
        if request.prompt is not None:
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

    def _run_splitting_on_oom(self, batch: Batch, requests: list, prompts: dict, results: list) -> None:
        pending = [list(batch.items)]
        while pending:
            part = pending.pop()
            out_of_memory = False
            try:
                self._run_batch(part, batch.weights, requests, prompts, results)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; anything else re-raises
                if not is_out_of_memory(e):
                    raise
                out_of_memory = True  # leave the except block first: its traceback holds the batch's tensors
            if not out_of_memory:
                continue
            free_device_memory(self.device)
            if len(part) == 1:
                item = part[0]
                message = str(RequestTooLarge(
                    f"out of memory even alone: prompt of {item.prompt_len} tokens + max_new_tokens "
                    f"{item.max_new_tokens}; shorten the prompt or lower max_new_tokens."
                ))
                results[item.index] = failed(requests[item.index], message, prompt_tokens=item.prompt_len)
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]  # first half runs first

    def _run_batch(self, items: list[Item], weights: str, requests: list, prompts: dict, results: list) -> None:
        adapters = sorted({item.adapter for item in items} - {BASE_ADAPTER})
        for name in adapters:
            try:
                self.adapters.load(name, keep=adapters)
            except AdapterError as e:
                for item in (it for it in items if it.adapter == name):
                    results[item.index] = failed(requests[item.index], str(e), prompt_tokens=item.prompt_len)
        items = [item for item in items if results[item.index] is None]
        if not items:
            return
        rows = [self._row(requests[item.index].params, prompts[item.index]) for item in items]
        names = [item.adapter for item in items]
        if weights == "merged" and len(set(names)) == 1 and names[0] != BASE_ADAPTER:
            self.adapters.merge(names[0])
            decode.generate_batch(self.model, rows, pad_id=self.pad_id, device=self.device)
        else:
            with self.adapters.rows(names) as row_names:
                on_rows = row_names.use if row_names is not None else None
                decode.generate_batch(self.model, rows, pad_id=self.pad_id, device=self.device, on_rows=on_rows)
        for item, row in zip(items, rows):
            results[item.index] = self._result(requests[item.index], row)

    def _row(self, params: SamplingParams, prompt: list[int]) -> decode.Row:
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

    def _result(self, request: GenerationRequest, row: decode.Row) -> GenerationResult:
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


def failed(request: GenerationRequest, error: str, *, prompt_tokens: int = 0) -> GenerationResult:
    return GenerationResult(request.key, None, None, prompt_tokens=prompt_tokens, completion_tokens=0, error=error)
