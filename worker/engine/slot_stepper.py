"""Continuous batching on the native forward: the Stepper contract over a KV cache of fixed slots.

Admission, admit, cancel, abort, the token budget, the weights plan and adapter loading are Stepper's own
(this class inherits them, so both paths admit by the same rule). What differs is where rows live: batch row i
IS KV slot i (kv_slots.py). A prefilled row takes the lowest free slot; a finished row leaves a hole (a dead
row, as in Stepper) that the next row to join fills. Nothing copies the cache when rows join or leave; when
holes are a fair share of the batch (DROP_FRACTION), the highest rows move down into them (a copy of those
rows' own columns only) so that decode steps stop computing them.

Per decode step: tokens stay on the device (sampled into ``next_tokens``), positions, adapter indices and the
width read are built on the host (the lengths are known there) and copied in, one forward runs (graphs.py:
a CUDA graph replay, or the same function eagerly), and the one host transfer is the sampled tokens'
``.tolist()``.

Out of memory: as Stepper (a prefill is halved; a decode step preempts the youngest half). A decode step that
fails has written at most its own column of each row, which the retry writes again.

This module knows nothing about Celery, SQL, queues or threads; one caller drives one stepper, and one
stepper at a time uses an engine's slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from lorabatch.schemas.settings import BASE_ADAPTER
from lorabatch.worker.engine import decode
from lorabatch.worker.engine.model import free_device_memory, is_out_of_memory
from lorabatch.worker.engine.params import GenerationResult
from lorabatch.worker.engine.sampling import RowSampler, sample_next
from lorabatch.worker.engine.stepper import DROP_FRACTION, Slot, Stepper

if TYPE_CHECKING:
    from lorabatch.worker.engine.engine import Engine

_DEAD = RowSampler()

PREFILL_TOKENS = 8192
"""A prefill forward runs at most this many (padded) tokens: its activations are what the KV cache sizing
reserves (Engine warms up with one such forward), and a larger forward gains nothing on a GPU kept busy."""


class SlotStepper(Stepper):
    """One running batch on ``engine``'s native forward and KV slots; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.kv = engine.kv
        self.next_tokens = torch.zeros(self.kv.slots, dtype=torch.long, device=engine.device)

    def admission(self, waiting: Mapping[str, int]) -> dict[str, int]:
        """Stepper's admission; the engine's max_batch_size may not exceed the slots the cache was built with."""
        if self.engine.max_batch_size > self.kv.slots:
            raise ValueError(
                f"max_batch_size {self.engine.max_batch_size} is over the {self.kv.slots} KV slots this engine "
                "allocated; build the Engine with the larger max_batch_size instead of raising it afterwards."
            )
        return super().admission(waiting)

    # -- prefill and join ---------------------------------------------------------------------------------

    def _fitting(self, slots: list[Slot]) -> tuple[list[Slot], list[Slot]]:
        """Stepper's token-budget cut, then no more rows than free slots: the rest wait (suspects admitted as a
        group may outnumber the slots) and join as rows leave."""
        take, keep = super()._fitting(slots)
        if not take:  # every step comes here: no slot count when nothing joins
            return take, keep
        free = sum(not s.live for s in self.batch) + self.kv.slots - len(self.batch)
        return take[:free], take[free:] + keep

    def _free_slots(self, n: int) -> list[int]:
        holes = [i for i, s in enumerate(self.batch) if not s.live]
        return (holes + list(range(len(self.batch), self.kv.slots)))[:n]

    def _prefill(self, part: list[Slot]) -> tuple[torch.Tensor, Any, Any]:
        """part sorted by prompt length -> logits [b, V] of each prompt's last token, and the slots it took."""
        engine = self.engine
        slots = self._free_slots(len(part))
        if len(slots) < len(part):
            raise RuntimeError(f"{len(part)} rows to prefill and {len(slots)} free KV slots: admission overfilled")
        device = engine.device
        logits = []
        with self._weights([s.adapter for s in part]):
            for rows in _capped(decode.prefill_chunks([len(s.row.prompt) for s in part]), part):
                chunk = part[rows.start : rows.stop]
                width = max(len(s.row.prompt) for s in chunk)
                ids = torch.full((len(chunk), width), engine.pad_id, dtype=torch.long)
                for j, s in enumerate(chunk):
                    ids[j, : len(s.row.prompt)] = torch.tensor(s.row.prompt, dtype=torch.long)
                last = torch.tensor([len(s.row.prompt) - 1 for s in chunk], device=device)
                slot_ids = torch.tensor(slots[rows.start : rows.stop], device=device)
                lora = self._lora([s.adapter for s in chunk], width)
                logits.append(engine.native.prefill(ids.to(device), last, slot_ids, self.kv, lora))
        return torch.cat(logits), slots, None

    def _lora(self, names: list[str], width: int = 1) -> Any:
        """The forward's LoRA for rows running ``names`` (None when merged or no adapter is resident)."""
        if self.merged is not None or all(n == BASE_ADAPTER for n in names):
            return None  # base rows only: no LoRA op at all
        return self.engine.runner.lora([self._stack_index(n) for n in names], width)

    def _stack_index(self, name: str) -> int:
        return 0 if name == BASE_ADAPTER else self.engine.adapters.backend.stack.index(name)

    def _join(self, part: list[Slot], logits: torch.Tensor, slots: Any, _: Any) -> list[GenerationResult]:
        """Sample each prefilled row's first token; the unfinished ones take their slots in the batch."""
        tokens = sample_next(logits, [s.row.sampler for s in part])  # [b]
        results = [self._end(s) for s, t in zip(part, tokens.tolist()) if s.row.append(t)]
        index = torch.tensor(slots, device=tokens.device)
        self.next_tokens.index_copy_(0, index, tokens)
        for slot, row in zip(slots, part):
            if not row.live:
                continue
            while len(self.batch) <= slot:
                self.batch.append(_hole())
            self.batch[slot] = row
        return results

    # -- decode -------------------------------------------------------------------------------------------

    def _decode(self) -> list[GenerationResult]:
        """One token for every row in slots 0..B-1; holes ride along (their slots are free: writes there are lost)."""
        self._trim()
        batch = len(self.batch)
        positions = [_position(s) if s.live else 0 for s in self.batch]
        width = max(positions) + 1
        names = [s.adapter if s.live else BASE_ADAPTER for s in self.batch]
        plain = self.merged is not None or all(n == BASE_ADAPTER for n in names)  # no LoRA op in this step
        out_of_memory = False
        try:
            with self._weights(names):
                logits = self.engine.runner.decode(
                    self.next_tokens[:batch], positions, None if plain else [self._stack_index(n) for n in names], width
                )
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; anything else re-raises
            if not is_out_of_memory(e):
                raise
            out_of_memory = True
        if out_of_memory:
            free_device_memory(self.engine.device)
            return self._preempt_youngest_half()
        tokens = sample_next(logits, [s.row.sampler if s.live else _DEAD for s in self.batch])  # [B]
        self.next_tokens[:batch] = tokens
        results = [self._end(s) for s, t in zip(self.batch, tokens.tolist()) if s.live and s.row.append(t)]
        self._compact()
        return results

    # -- rows leaving -------------------------------------------------------------------------------------

    def _trim(self) -> None:
        while self.batch and not self.batch[-1].live:
            self.batch.pop()

    def _compact(self) -> None:
        """Drop trailing holes; when holes are a fair share of the batch, move the highest rows down into them."""
        self._trim()
        holes = [i for i, s in enumerate(self.batch) if not s.live]
        if not holes or len(holes) < max(1, DROP_FRACTION * len(self.batch)):
            return
        for hole in holes:
            self._trim()
            if hole >= len(self.batch) - 1:
                break
            source = len(self.batch) - 1
            row = self.batch[source]
            self.kv.move(source, hole, _position(row))  # its cache: every column before the token to feed
            self.next_tokens[hole] = self.next_tokens[source]
            self.batch[hole], self.batch[source] = row, self.batch[hole]
        self._trim()

    def _clear(self) -> None:
        self.batch, self.cache, self.mask = [], None, None


def _capped(chunks: list[range], part: list[Slot]) -> list[range]:
    """The chunks, each split so that rows x its longest prompt stays within PREFILL_TOKENS (one row at least)."""
    out = []
    for chunk in chunks:
        width = max(len(part[i].row.prompt) for i in chunk)
        step = max(1, PREFILL_TOKENS // width)
        out += [range(start, min(start + step, chunk.stop)) for start in range(chunk.start, chunk.stop, step)]
    return out


def _hole() -> Slot:
    return Slot(None, None, -1, live=False)  # type: ignore[arg-type]


def _position(slot: Slot) -> int:
    """The position of the token the row feeds next (its cache holds every earlier one)."""
    return len(slot.row.prompt) + len(slot.row.tokens) - 1
