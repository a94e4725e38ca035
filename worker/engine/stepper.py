"""Continuous batching: one running batch that requests join (admit) and leave (step, cancel) at any step.

Per step: the rows admitted since the last step are prefilled (sorted by length, in chunks of similar length)
and joined below the running rows in the KV cache (left padding: the narrower cache is widened with masked
zeros); then one decode step runs every row. Finished rows stay in the cache as dead rows until they are a
fair share of it (or rows join, which copies the cache anyway), then they are cut out and the columns that
became padding in every row are trimmed. Position ids count real tokens only, so a row computes what it
would compute alone, whichever rows share its batch and whenever it joined.

Adapter weights: with ``merged`` set, every forward runs on base weights with that adapter merged in
(restored exactly when it changes); otherwise each row runs its own adapter through PEFT's mixed-batch path,
with the per-row names following the rows as they join and leave. The admission rule is batching.py's.

Out of memory: a prefill is halved until it fits (a row that fails alone fails with a RequestTooLarge
message); in a decode step the youngest half of the rows is preempted (finish_reason "preempted": the caller
queues them again). Any other exception propagates: the engine, not a request, is then broken.

This module knows nothing about Celery, SQL, queues, claims or threads: one caller drives one Stepper.
It runs over 300 lines because the batch's state (rows, cache, mask, weights) changes in one class only;
the tensor work lives in decode.py, the admission rule and the token budget in batching.py.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager, Hashable, Iterable, Mapping

import torch

from lorabatch.schemas.errors import AdapterError, RequestTooLarge
from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine import decode
from lorabatch.worker.engine.batching import Admission, TokenBudget, first_fit, plan_admission
from lorabatch.worker.engine.model import free_device_memory, is_out_of_memory
from lorabatch.worker.engine.params import GenerationRequest, GenerationResult
from lorabatch.worker.engine.sampling import RowSampler, sample_next

if TYPE_CHECKING:
    from lorabatch.worker.engine.engine import Engine

DROP_FRACTION = 0.125
"""Dead (finished) rows are cut out of the cache once they are this share of it: a cut copies the cache once,
about what one decode step appends anyway, so waiting for 1/8 wastes at most 1/8 of a step per step."""

_DEAD = RowSampler()  # dead rows take the argmax: their own random stream must not move


@dataclass
class Slot:
    """One request in the batch: the request, its decode state, and when it was admitted."""

    request: GenerationRequest
    row: decode.Row
    order: int
    """Admission counter: the youngest rows are preempted first."""
    live: bool = True

    @property
    def adapter(self) -> str:
        return self.request.adapter


class Stepper:
    """One running batch over ``engine``'s model; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pending: list[Slot] = []  # admitted, not prefilled yet
        self.batch: list[Slot] = []  # the KV cache's rows, in cache order; dead rows included until cut
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, W]
        self._mask_buffer: torch.Tensor | None = None  # [B, C >= W]: self.mask is its first W columns
        self.next_tokens: torch.Tensor | None = None  # [B]: sampled, not yet fed to the model
        self.merged: str | None = None  # the adapter merged for this batch's forwards; None: adapters apart
        self._planned: Admission | None = None
        self._admitted = 0
        self.budget = TokenBudget()  # max_batch_tokens in rows, learned from the rows admitted so far

    # -- what the caller sees ---------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.pending) + sum(s.live for s in self.batch)

    @property
    def idle(self) -> bool:
        return self.running == 0

    def keys(self) -> list[Hashable]:
        return [s.request.key for s in self._live()]

    def occupancy(self) -> int:
        """Rows in the KV cache that still generate (benchmarks and tests watch it)."""
        return sum(s.live for s in self.batch)

    def admission(self, waiting: Mapping[str, int]) -> dict[str, int]:
        """How many of each adapter's waiting requests to admit now: what fits max_batch_size and, by the mean
        row cost learned so far, max_batch_tokens (batching.plan_admission and TokenBudget.room decide)."""
        engine = self.engine
        self._planned = plan_admission(
            waiting,
            running=Counter(s.adapter for s in self._live()),
            merged=self.merged,
            weights=engine.weights,
            max_batch_size=engine.max_batch_size,
            max_adapters=engine.adapters.max_resident,
            min_merged_rows=engine.min_merged_rows,
            token_room=self.budget.room(max_batch_tokens=engine.max_batch_tokens, used=self._used_tokens(),
                                        idle=self.idle),
        )
        return dict(self._planned.counts)

    def admit(self, requests: list[GenerationRequest], *, group: bool = False) -> list[GenerationResult]:
        """Join ``requests`` (prefilled by the next step); at once, the results of those refused outright and,
        with finish_reason "preempted" (uncharged: the caller queues them again), of those that do not fit
        max_batch_tokens beside the rows already here (TokenBudget.accept). ``group``: the requests run as one
        group (suspects): those that do not fit wait here instead, and join as rows leave."""
        refused: list[GenerationResult] = []
        fresh: list[Slot] = []
        for request in requests:
            try:
                prompt = self.engine.encode(request)
                if request.adapter != BASE_ADAPTER:
                    self.engine.adapters.spec(request.adapter)
            except (self.engine.Refused, AdapterError) as e:
                refused.append(GenerationResult.failed(request, str(e), prompt_tokens=getattr(e, "prompt_tokens", 0)))
                continue
            fresh.append(Slot(request, self.engine.row(request.params, prompt), 0))
        fits = self.budget.accept([_cost(s) for s in fresh], max_batch_tokens=self.engine.max_batch_tokens,
                                  used=self._used_tokens(), idle=self.idle)
        for slot, fit in zip(fresh, fits):
            if fit or group:
                slot.order, self._admitted = self._admitted, self._admitted + 1
                self.pending.append(slot)
            else:
                refused.append(GenerationResult(slot.request.key, None, "preempted", len(slot.row.prompt), 0))
        self._apply_weights_plan()
        return refused

    def step(self) -> list[GenerationResult]:
        """Prefill and join what was admitted, then one decode step; the results of rows that ended."""
        with torch.inference_mode():
            results = self._prefill_pending()
            if any(s.live for s in self.batch):
                results += self._decode()
            if not any(s.live for s in self.batch):
                self._clear()
        return results

    def cancel(self, keys: Iterable[Hashable]) -> list[GenerationResult]:
        """Remove these rows now; each comes back with finish_reason "cancelled" and its text so far."""
        keys = set(keys)
        results = []
        for slot in [s for s in self._live() if s.request.key in keys]:
            slot.row.finish_reason = "cancelled"
            results.append(self._end(slot))
        self.pending = [s for s in self.pending if s.live]
        return results

    def abort(self) -> list[Hashable]:
        """Drop every row (shutdown); their keys, for the caller to hand back."""
        keys = self.keys()
        self.pending = []
        self._clear()
        return keys

    # -- weights ------------------------------------------------------------------------------------------

    def _apply_weights_plan(self) -> None:
        """Take the planned weights mode, unless the rows now in the batch cannot all run merged with it."""
        planned = self._planned.merged if self._planned is not None else self.merged
        self._planned = None
        adapters = {s.adapter for s in self._live()}
        if planned is not None and adapters <= {planned}:
            if self.merged != planned and any(s.live for s in self.batch):
                planned = None  # never apart -> merged under running rows: only merged -> apart is planned mid-batch
            self.merged = planned
        else:
            self.merged = None

    def _weights(self, names: list[str]) -> ContextManager[Any]:
        """The context for forwards over rows with adapters ``names``: the merged adapter, or rows apart."""
        if self.merged is not None:
            self.engine.adapters.merge(self.merged)
            return nullcontext(None)
        return self.engine.adapters.rows(names)  # restores the base weights first

    # -- prefill and join ---------------------------------------------------------------------------------

    def _prefill_pending(self) -> list[GenerationResult]:
        slots, self.pending = self._fitting(self.pending)
        results = self._load_adapters(slots)
        parts = [sorted((s for s in slots if s.live), key=lambda s: len(s.row.prompt))]
        while parts:
            part = parts.pop()
            if not part:
                continue
            out_of_memory = False
            try:
                logits, cache, mask = self._prefill(part)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; anything else re-raises
                if not is_out_of_memory(e):
                    raise
                out_of_memory = True  # leave the except block first: its traceback holds the tensors
            if out_of_memory:
                free_device_memory(self.engine.device)
                if len(part) == 1:
                    results.append(self._too_large(part[0], "prompt"))
                else:
                    parts += [part[len(part) // 2 :], part[: len(part) // 2]]  # the shorter half first
                continue
            results += self._join(part, logits, cache, mask)
        return results

    def _fitting(self, slots: list[Slot]) -> tuple[list[Slot], list[Slot]]:
        """The pending rows that fit max_batch_tokens beside the running ones (at least one), and the rest."""
        if not slots:  # every step comes here: nothing to sum over the batch when nothing waits
            return [], []
        left = self.engine.max_batch_tokens - sum(_cost(s) for s in self._in_cache())
        fits = first_fit([_cost(s) for s in slots], left=left, first_always=not any(s.live for s in self.batch))
        return [s for s, ok in zip(slots, fits) if ok], [s for s, ok in zip(slots, fits) if not ok]

    def _load_adapters(self, slots: list[Slot]) -> list[GenerationResult]:
        needed = sorted({s.adapter for s in slots} - {BASE_ADAPTER})
        keep = {s.adapter for s in self._live()} - {BASE_ADAPTER}
        results = []
        for name in needed:
            try:
                self.engine.adapters.load(name, keep=keep)
            except AdapterError as e:
                for slot in (s for s in slots if s.adapter == name):
                    slot.live = False
                    results.append(GenerationResult.failed(slot.request, str(e), prompt_tokens=len(slot.row.prompt)))
        return results

    def _prefill(self, part: list[Slot]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """part sorted by prompt length -> logits [b, V], its own cache, its attention_mask [b, s]."""
        names = [s.adapter for s in part]
        with self._weights(names) as row_names:
            on_chunk = None if row_names is None else (lambda rows: row_names.use(list(rows)))
            return decode.prefill_batch(
                self.engine.model, [s.row.prompt for s in part], pad_id=self.engine.pad_id,
                device=self.engine.device, on_chunk=on_chunk,
            )

    def _join(self, part: list[Slot], logits: torch.Tensor, cache: Any, mask: torch.Tensor) -> list[GenerationResult]:
        """Sample the first token of each prefilled row; the unfinished ones join the running batch."""
        tokens = sample_next(logits, [s.row.sampler for s in part])  # [b]
        results = [self._end(s) for s, t in zip(part, tokens.tolist()) if s.row.append(t)]
        staying = [j for j, s in enumerate(part) if s.live]
        if not staying:
            return results
        if len(staying) < len(part):
            index = torch.tensor(staying, device=mask.device)
            mask, tokens = decode.select_rows(cache, mask, index), tokens[index]
        self._compact()
        if self.cache is None:
            self.cache, self.mask, self.next_tokens = cache, mask, tokens
        else:
            self.cache, self.mask = decode.join([(self.cache, self.mask), (cache, mask)])
            self.next_tokens = torch.cat([self.next_tokens, tokens])
        self.batch += [part[j] for j in staying]
        return results

    # -- decode -------------------------------------------------------------------------------------------

    def _decode(self) -> list[GenerationResult]:
        """One token for every row in the cache; dead rows ride along until the next cut."""
        width = self.mask.shape[1]
        positions = self.mask.sum(-1, keepdim=True)  # [B, 1]: the next token's position in each row
        if self._mask_buffer is None or self._mask_buffer.data_ptr() != self.mask.data_ptr():
            self._mask_buffer = self.mask  # rows joined or left: the mask is a fresh tensor
        self._mask_buffer, mask = decode.grow_mask(self._mask_buffer, width)  # mask: [B, W + 1]
        names = [s.adapter if s.live else BASE_ADAPTER for s in self.batch]
        out_of_memory = False
        try:
            with self._weights(names):
                logits = decode.decode_step(self.engine.model, self.next_tokens[:, None], mask, positions, self.cache)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; anything else re-raises
            if not is_out_of_memory(e):
                raise
            out_of_memory = True
        if out_of_memory:
            decode.crop_to(self.cache, width)  # layers that ran before the failure appended a column
            free_device_memory(self.engine.device)
            return self._preempt_youngest_half()
        self.mask = mask
        self.next_tokens = sample_next(logits, [s.row.sampler if s.live else _DEAD for s in self.batch])  # [B]
        tokens = self.next_tokens.tolist()
        results = [self._end(s) for s, t in zip(self.batch, tokens) if s.live and s.row.append(t)]
        dead = sum(not s.live for s in self.batch)
        if dead and dead >= max(1, DROP_FRACTION * len(self.batch)) and dead < len(self.batch):
            self._compact()
        return results

    def _preempt_youngest_half(self) -> list[GenerationResult]:
        live = sorted(self._live(), key=lambda s: s.order)
        if len(live) == 1:
            return [self._too_large(live[0], "decode")]
        results = []
        for slot in live[len(live) // 2 :]:
            slot.live = False
            results.append(GenerationResult(slot.request.key, None, "preempted", len(slot.row.prompt), 0))
        self._compact()
        return results

    # -- rows leaving -------------------------------------------------------------------------------------

    def _compact(self) -> None:
        """Cut the dead rows out of the cache, then the columns that are padding in every remaining row."""
        if self.cache is None or all(s.live for s in self.batch):
            return
        kept = [j for j, s in enumerate(self.batch) if s.live]
        if not kept:
            self._clear()
            return
        index = torch.tensor(kept, device=self.mask.device)
        self.mask = decode.trim_left(self.cache, decode.select_rows(self.cache, self.mask, index))
        self.next_tokens = self.next_tokens[index]
        self.batch = [self.batch[j] for j in kept]

    def _clear(self) -> None:
        self.batch, self.cache, self.mask, self.next_tokens, self._mask_buffer = [], None, None, None, None

    def _end(self, slot: Slot) -> GenerationResult:
        slot.live = False
        return self.engine.result(slot.request, slot.row)

    def _too_large(self, slot: Slot, stage: str) -> GenerationResult:
        slot.live = False
        row = slot.row
        message = str(RequestTooLarge(
            f"out of memory even alone ({stage}): prompt of {len(row.prompt)} tokens + max_new_tokens "
            f"{row.max_new_tokens}; shorten the prompt or lower max_new_tokens."
        ))
        return GenerationResult.failed(slot.request, message, prompt_tokens=len(row.prompt))

    def _live(self) -> list[Slot]:
        return [s for s in self.batch if s.live] + [s for s in self.pending if s.live]

    def _in_cache(self) -> list[Slot]:
        return [s for s in self.batch if s.live]

    def _used_tokens(self) -> int:
        """The token budget the rows here hold (in the cache or about to be prefilled)."""
        return sum(_cost(s) for s in self._live())


def _cost(slot: Slot) -> int:
    """A row's share of max_batch_tokens: its prompt and every token it may still generate."""
    return len(slot.row.prompt) + slot.row.max_new_tokens
