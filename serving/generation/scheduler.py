"""Iteration-level batching: one decoder step advances every active sequence, whatever request it came from.

Slots and rows. The scheduler owns per-row caches preallocated for `capacity` rows: the
self-attention K/V of every position a row has fed, the cross-attention K/V of its encoder
states (computed once, when it joins) and that row's cross mask. A sequence takes one row, or
one per beam. Active rows are always rows 0..B-1, so a step passes the first B rows of each
buffer to the engine as they lie in memory (the cross K/V, the largest tensors, are not copied).

Join and leave. `submit` puts a sequence in a bounded waiting queue (full: `QueueFull`, the
caller's 429). At the start of each `step`, cancelled sequences leave, then waiting ones join
in order while rows and the memory budget allow; a sequence that joins feeds its first token in
that very step. A sequence that finishes leaves at the end of the step; the last rows move
into the freed ones, so the next joiner reuses them.

Independence. Each row has its own position, self mask over its own cached positions and cross
mask over its own encoder states; the engine computes each row's logits from that row alone,
so a sequence's tokens do not depend on what it was batched with.

Memory. A sequence holds rows × (encoder positions + max_length) positions of K/V
(`DecoderShape.bytes_per_position`); the sum over active sequences stays within
`memory_budget_bytes` (at least one sequence always fits, or it is refused at submit).

Plain Python and NumPy: the Triton model (`serving/triton/python_models/generate.py`) is a thin
shell that feeds it requests and sends the events it returns.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.generation.engine import DecoderEngine
from serving.generation.search import DecodeResult, SequenceDecoder


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should answer 429 with Retry-After."""


class TooLarge(ValueError):
    """A sequence that could never fit (more rows or memory than the scheduler has)."""


@dataclass(eq=False)
class GenSequence:
    """One sequence to decode: its decoder, its encoder states' cross K/V and mask, and its caller's handle.

    Attributes:
        key: the caller's handle, returned with every event (e.g. a request and a question index).
        decoder: the sequence's decoding state (`search.decoder_for`).
        cross: [K_0, V_0, K_1, …] each (1, heads, S, head_dim), from the engine's `cross_kv`.
        cross_mask: (S,) 1 where the encoder state is real.
        is_cancelled: asked before every step; True makes the sequence leave (its caller went away).
    """

    key: Any
    decoder: SequenceDecoder
    cross: list[np.ndarray]
    cross_mask: np.ndarray
    is_cancelled: Callable[[], bool] | None = None
    rows: list[int] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)

    @property
    def cross_len(self) -> int:
        return int(self.cross_mask.shape[0])

    def positions(self) -> int:
        """Positions of K/V one row needs: its encoder states and its longest sequence."""
        return self.cross_len + self.decoder.r.max_length


@dataclass(frozen=True)
class Event:
    """What happened to a sequence in a step.

    kind: `token` (a new token: `token`), `done` (finished: `result`), `cancelled` (left: its caller went away).
    """

    kind: str
    seq: GenSequence
    token: int | None = None
    result: DecodeResult | None = None


@dataclass
class SchedulerStats:
    """Counters for the metrics endpoint."""

    steps: int = 0
    rows: int = 0  # rows advanced, summed over steps
    tokens: int = 0  # generated tokens (prompt tokens not counted)
    finished: int = 0
    cancelled: int = 0


class DecodeScheduler:
    """Slots, the waiting queue and the step loop over one decoder engine."""

    def __init__(
        self,
        engine: DecoderEngine,
        *,
        max_rows: int,
        max_positions: int,
        max_cross_len: int,
        memory_budget_bytes: int,
        max_waiting: int,
    ) -> None:
        shape = engine.shape
        self.engine = engine
        self.shape = shape
        self.bytes_per_position = shape.bytes_per_position()
        per_row = (max_positions + max_cross_len) * self.bytes_per_position
        self.capacity = max(1, min(int(max_rows), int(memory_budget_bytes) // per_row))
        self.memory_budget = int(memory_budget_bytes)
        self.max_positions = int(max_positions)
        self.max_cross_len = int(max_cross_len)
        self.max_waiting = int(max_waiting)
        cap, h, d = self.capacity, shape.heads, shape.head_dim
        # Zeroed, not empty: a step reads masked positions too (a shorter row's tail), and attention weighs
        # them by exactly 0, which is still NaN for garbage that happens to be NaN. Large np.zeros come from
        # calloc's untouched pages, so a large position table still costs memory only where rows write.
        self.self_kv = [np.zeros((cap, h, self.max_positions, d), np.float32) for _ in range(2 * shape.layers)]
        self.cross_kv = [np.zeros((cap, h, self.max_cross_len, d), np.float32) for _ in range(2 * shape.layers)]
        self.cross_mask = np.zeros((cap, self.max_cross_len), np.int64)
        self.lengths = np.zeros(cap, np.int64)
        self.active: list[GenSequence] = []
        self.rows_used = 0
        self.memory_used = 0
        self.waiting: deque[GenSequence] = deque()
        self.lock = threading.Lock()
        self.stats = SchedulerStats()
        self.last_step_rows = 0  # rows the last `step` advanced (0: it ran no decoder step)
        self.last_step_tokens = 0

    # -- called from any thread ----------------------------------------------------------

    def memory_of(self, seq: GenSequence) -> int:
        """Bytes of K/V a sequence holds while active."""
        return seq.decoder.rows * seq.positions() * self.bytes_per_position

    def submit(self, seq: GenSequence) -> None:
        """Queue a sequence; it joins at the next step with room.

        Raises:
            TooLarge: it needs more rows, positions or memory than the scheduler has at all.
            QueueFull: `max_waiting` sequences are already waiting.
        """
        self.submit_all([seq])

    def submit_all(self, seqs: list[GenSequence]) -> None:
        """Queue the sequences of one request together, or none of them (same errors as `submit`)."""
        for seq in seqs:
            self._check_size(seq)
        with self.lock:
            if len(self.waiting) + len(seqs) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} sequences waiting for a decoder slot (the bound is "
                                f"{self.max_waiting}): the queue is full, retry later")
            self.waiting.extend(seqs)

    def abort_all(self) -> list[GenSequence]:
        """Drop every active and waiting sequence (after an engine failure); returns them."""
        with self.lock:
            dropped = list(self.active) + list(self.waiting)
            self.waiting.clear()
        for seq in list(self.active):
            self._leave(seq)
        return dropped

    def _check_size(self, seq: GenSequence) -> None:
        if seq.decoder.rows > self.capacity:
            raise TooLarge(f"{seq.decoder.rows} beams need more rows than this decoder's {self.capacity}")
        if seq.cross_len > self.max_cross_len or seq.decoder.r.max_length > self.max_positions:
            raise TooLarge(
                f"{seq.cross_len} encoder positions / max_length {seq.decoder.r.max_length} exceed this decoder's "
                f"{self.max_cross_len} / {self.max_positions}"
            )
        if self.memory_of(seq) > self.memory_budget:
            raise TooLarge(f"the sequence needs {self.memory_of(seq)} bytes of K/V, over the budget of "
                           f"{self.memory_budget}")

    def waiting_count(self) -> int:
        with self.lock:
            return len(self.waiting)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.active or self.waiting)

    # -- the step loop (one thread) --------------------------------------------------------

    def step(self) -> list[Event]:
        """Leave (cancelled), join (waiting), one decoder step over every active row, then leave (finished)."""
        events: list[Event] = []
        self.last_step_rows = self.last_step_tokens = 0
        for seq in [s for s in self.active if s.is_cancelled is not None and s.is_cancelled()]:
            self._leave(seq)
            self.stats.cancelled += 1
            events.append(Event("cancelled", seq))
        with self.lock:
            for seq in [s for s in self.waiting if s.is_cancelled is not None and s.is_cancelled()]:
                self.waiting.remove(seq)
                self.stats.cancelled += 1
                events.append(Event("cancelled", seq))
            while self.waiting and self._fits(self.waiting[0]):
                self._join(self.waiting.popleft())
        if not self.active:
            return events
        b = self.rows_used
        ids = np.zeros((b, 1), np.int64)
        for seq in self.active:
            ids[seq.rows, 0] = seq.decoder.next_inputs()
        lengths = self.lengths[:b]
        p = int(lengths.max())
        s = max(seq.cross_len for seq in self.active)
        self_mask = np.zeros((b, p + 1), np.int64)
        self_mask[:, :p] = np.arange(p)[None, :] < lengths[:, None]
        self_mask[:, p] = 1
        past = [kv[:b, :, :p] for kv in self.self_kv]
        cross = [kv[:b, :, :s] for kv in self.cross_kv]
        logits, new = self.engine.step(ids, lengths[:, None].copy(), self_mask, self.cross_mask[:b, :s], past, cross)
        rows = np.arange(b)
        for buf, kv in zip(self.self_kv, new):
            buf[rows, :, lengths, :] = kv[:, :, 0, :]
        self.lengths[:b] += 1
        self.stats.steps += 1
        self.stats.rows += b
        self.last_step_rows = b
        finished = []
        for seq in self.active:
            out = seq.decoder.advance(logits[seq.rows])
            if out.token is not None:
                self.last_step_tokens += 1
                events.append(Event("token", seq, token=out.token))
            elif out.parents is not None:
                self.last_step_tokens += 1  # beam search: the sequence grew by one token
            if out.done:
                finished.append(seq)
            elif out.parents is not None:
                self._reorder(seq, out.parents)
        self.stats.tokens += self.last_step_tokens
        for seq in finished:
            self._leave(seq)
            self.stats.finished += 1
            events.append(Event("done", seq, result=seq.decoder.result()))
        return events

    def _fits(self, seq: GenSequence) -> bool:
        return (
            self.rows_used + seq.decoder.rows <= self.capacity
            and self.memory_used + self.memory_of(seq) <= self.memory_budget
        )

    def _join(self, seq: GenSequence) -> None:
        n = seq.decoder.rows
        seq.rows = list(range(self.rows_used, self.rows_used + n))
        s = seq.cross_len
        for buf, kv in zip(self.cross_kv, seq.cross):
            buf[seq.rows, :, :s, :] = kv[0][None]  # every beam row attends to the same encoder states
        self.cross_mask[seq.rows, :] = 0
        self.cross_mask[seq.rows, :s] = seq.cross_mask
        self.lengths[seq.rows] = 0
        self.rows_used += n
        self.memory_used += self.memory_of(seq)
        self.active.append(seq)

    def _reorder(self, seq: GenSequence, parents: np.ndarray) -> None:
        """Each beam row takes its parent beam's self-attention cache (as transformers' `reorder_cache`)."""
        if np.array_equal(parents, np.arange(len(parents))):
            return
        rows = np.asarray(seq.rows)
        src = rows[np.asarray(parents)]
        n = int(self.lengths[rows].max())
        for buf in self.self_kv:
            buf[rows, :, :n] = buf[src, :, :n]

    def _leave(self, seq: GenSequence) -> None:
        """Free a sequence's rows; the highest active rows move down into them."""
        self.active.remove(seq)
        self.memory_used -= self.memory_of(seq)
        freed = sorted(seq.rows)
        self.rows_used -= len(freed)
        owner = {r: s for s in self.active for r in s.rows}
        holes = [r for r in freed if r < self.rows_used]
        movers = [r for r in range(self.rows_used, self.rows_used + len(freed)) if r in owner]
        for dst, src in zip(holes, movers):
            other = owner[src]
            self._move_row(src, dst, other.cross_len)
            other.rows[other.rows.index(src)] = dst
        seq.rows = []

    def _move_row(self, src: int, dst: int, s: int) -> None:
        n = int(self.lengths[src])
        for buf in self.self_kv:
            buf[dst, :, :n] = buf[src, :, :n]
        for buf in self.cross_kv:
            buf[dst, :, :s] = buf[src, :, :s]
        self.cross_mask[dst] = self.cross_mask[src]
        self.lengths[dst] = self.lengths[src]
