"""Continuous batching: which sequences run at each engine step, and how many of their tokens.

    sched = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=256, max_num_batched_tokens=8192)
    sched.add(Sequence(request_id, prompt_ids, params, max_tokens=...))   # QueueFullError when the queue is full
    batch = sched.schedule()                       # ScheduledBatch: items (seq, its new tokens), preempted, finished
    ... runner feeds each item's new_token_ids at positions num_cached_tokens.. and samples one token per item ...
    for seq in sched.postprocess(batch, sampled): # appends the sampled tokens; returns the sequences that got one
        if <stop condition>: sched.finish(seq, FINISH_STOP)
    sched.abort(request_id)                        # any time between steps; idempotent

One schedule() per step, in three passes under a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs, counting every RUNNING sequence, prefills included):
1. running decodes (one uncached token), in arrival order: each gets 1 token, first, so a long prompt arriving
   never stalls the streams already generating (chunked prefill, as vLLM and Sarathi-Serve);
2. running prefills (a prompt mid-chunk, a preempted sequence's recompute, forced tool-output tokens): a chunk each,
   as much as the remaining budget allows, in arrival order;
3. waiting sequences (FIFO; preempted ones at the front) are admitted while the budget, the sequence cap and the
   pool allow: admission allocates blocks for all their tokens at once (prefix hits reused), so a chunked prefill
   never runs out of blocks half way; the first chunk goes into this step. The head of the queue is never skipped
   (no starvation of long prompts by short ones), and nothing is admitted in a step that preempted (it would take
   back the blocks just freed and thrash).
max_num_batched_tokens >= max_num_seqs is required, so pass 1 always fits and every running sequence advances.

Preemption is by recompute (vLLM's default): when a running sequence needs a block and none is free, the most
recently arrived running sequence (possibly itself) gives back its blocks and returns to the front of the waiting
queue as PREEMPTED, keeping its generated tokens; its next prefill covers prompt + generated tokens, usually mostly
as prefix hits. A sequence that needs more blocks than the whole pool (it is alone and still short) cannot ever run:
it is finished with reason "length" and reported in batch.finished, as is a waiting one that could never fit.

Invariants (asserted by tests/test_scheduler.py at every step): tokens scheduled <= max_num_batched_tokens; running
sequences <= max_num_seqs; a scheduled sequence owns blocks for all its tokens, and every token it writes this step
lands in a private block; the block manager's invariants hold (refcounts >= 0, no block in two tables unless it is a
complete shared prefix block).

Limits: one batch in flight (schedule, run, postprocess, in that order; no overlapped CPU scheduling); no
priorities, no per-tenant fairness; the waiting-queue bound applies to add() only (a preempted sequence always
gets back in, so the queue may exceed max_waiting by the number of preempted sequences); abort and finish act
between steps, and a sequence aborted while its batch is in flight is skipped by postprocess.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import Any

from infer.block_manager import BlockManager
from infer.sequence import FINISH_ABORT, FINISH_LENGTH, Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting: servers answer "busy, retry" (HTTP 503 with Retry-After)."""


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: feed token_ids[num_cached_tokens : num_cached_tokens + num_new_tokens]."""

    seq: Sequence
    num_new_tokens: int
    num_cached_tokens: int  # seq.num_cached_tokens when scheduled: the first new token's position
    # Whether this chunk reaches the sequence's last token (as it was when scheduled), so the token sampled from it
    # is kept; fixed at schedule time because forced tokens may be appended before postprocess.
    samples_token: bool

    @property
    def seq_len(self) -> int:
        """Tokens in the cache once this step's are written (paged attention's seq_lens)."""
        return self.num_cached_tokens + self.num_new_tokens

    @property
    def new_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.num_cached_tokens:self.seq_len]

    @property
    def is_decode(self) -> bool:
        """One query token: the decode kernel's shape (a 1-token final prefill chunk is computed the same way)."""
        return self.num_new_tokens == 1


@dataclass
class ScheduledBatch:
    items: list[ScheduledSequence] = field(default_factory=list)  # decodes (1 token) first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the waiting queue this step
    finished: list[Sequence] = field(default_factory=list)  # finished by the scheduler (could never fit the pool)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)

    @property
    def num_decodes(self) -> int:
        return sum(1 for item in self.items if item.is_decode)

    @property
    def is_empty(self) -> bool:
        return not self.items


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_waiting: int = 1024):
        if max_num_seqs < 1 or max_waiting < 1:
            raise ValueError(f"max_num_seqs and max_waiting must be >= 1, got {max_num_seqs}, {max_waiting}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs}): every running sequence needs at least one token per step")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival_key: the last one is preempted first
        self.requests: dict[Any, Sequence] = {}  # every unfinished sequence, by request id
        self._in_flight: ScheduledBatch | None = None

    # ---------------------------------------------------------------------------------------------- queries

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def get(self, request_id: Any) -> Sequence | None:
        return self.requests.get(request_id)

    # ---------------------------------------------------------------------------------------- joining/leaving

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises QueueFullError when max_waiting are queued, ValueError when its id is in use
        or it can never fit the KV pool (prompt + max_tokens, when max_tokens is given)."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"request {seq.request_id!r} is {seq.status.value}: only new sequences can be added")
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        bm = self.block_manager
        capacity = bm.num_blocks * bm.block_size
        max_len = seq.num_tokens + (seq.max_tokens or 0)
        if max_len > capacity:
            raise ValueError(f"request {seq.request_id!r}: prompt ({seq.num_tokens} tokens) + max_tokens "
                             f"({seq.max_tokens or 0}) = {max_len} exceeds the KV cache ({capacity} tokens)")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests): busy, retry later")
        self.waiting.append(seq)
        self.requests[seq.request_id] = seq

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (the caller's stop decision: "stop", "length", ...) and free its blocks now. A finished
        sequence is left as it is."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:  # WAITING or PREEMPTED
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self.requests[seq.request_id]

    def abort(self, request_id: Any) -> bool:
        """Finish a request with reason "abort", freeing its blocks at once. Idempotent: unknown or finished ids are
        ignored. Returns whether a live request was aborted."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self.finish(seq, FINISH_ABORT)
        return True

    # ------------------------------------------------------------------------------------------------ a step

    def schedule(self) -> ScheduledBatch:
        if self._in_flight is not None:
            raise RuntimeError("schedule() called twice: postprocess the batch in flight first")
        bm = self.block_manager
        batch = ScheduledBatch()
        scheduled: dict[int, ScheduledSequence] = {}  # by seq_id, in scheduling order
        budget = self.max_num_batched_tokens

        def make_room(seq: Sequence) -> bool:
            """Blocks for all of seq's tokens, preempting the latest arrivals if needed; False if seq itself lost."""
            nonlocal budget
            while not bm.can_append(seq):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    # Alone and still short: the pool can never hold it.
                    self.finish(seq, FINISH_LENGTH)
                    batch.finished.append(seq)
                    return False
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    return False
                unscheduled = scheduled.pop(victim.seq_id, None)
                if unscheduled is not None:
                    budget += unscheduled.num_new_tokens
            bm.append_slot(seq)
            return True

        def put(seq: Sequence, num_new_tokens: int) -> None:
            nonlocal budget
            start = seq.num_cached_tokens
            scheduled[seq.seq_id] = ScheduledSequence(seq, num_new_tokens, start,
                                                      samples_token=start + num_new_tokens == seq.num_tokens)
            budget -= num_new_tokens

        # 1. Running decodes first: one token each.
        for seq in list(self.running):
            if seq.status is SequenceStatus.RUNNING and seq.num_uncached_tokens == 1 and budget > 0 and not seq.on_hold:
                if make_room(seq):
                    put(seq, 1)
        # 2. Running prefills: chunks of what is left.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING and seq.seq_id not in scheduled and not seq.on_hold:
                if make_room(seq):
                    put(seq, min(seq.num_uncached_tokens, budget))
        # 3. Admissions, FIFO, unless this step preempted.
        while self.waiting and not batch.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = next((s for s in self.waiting if not s.on_hold), None)  # a held sequence waits for its tool
            if seq is None:
                break
            if bm.num_blocks_needed(seq.num_tokens) > bm.num_blocks:  # it grew past the pool (no max_tokens given)
                self.finish(seq, FINISH_LENGTH)
                batch.finished.append(seq)
                continue
            if not bm.can_allocate(seq):
                break
            self.waiting.remove(seq)
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival_key)
            put(seq, min(seq.num_uncached_tokens, budget))

        # Decodes first for the runner (one packed row: the decode-shaped items, then the prefill chunks).
        batch.items = sorted(scheduled.values(), key=lambda item: not item.is_decode)
        if batch.items:
            self._in_flight = batch
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled_token_ids: SequenceOf[int | None]) -> list[Sequence]:
        """Record a step: advance each item's num_cached_tokens, register its completed blocks in the prefix cache,
        and append the token sampled for it when the chunk reached its last token (entries for other items are
        ignored and may be None). sampled_token_ids is aligned with batch.items. Returns the sequences that got a
        new token; the caller checks its stop conditions on them and calls finish()."""
        if batch.is_empty:
            return []
        if batch is not self._in_flight:
            raise RuntimeError("postprocess() got a batch that is not the one in flight")
        if len(sampled_token_ids) != len(batch.items):
            raise ValueError(f"{len(sampled_token_ids)} sampled tokens for a batch of {len(batch.items)} items")
        self._in_flight = None
        grown = []
        for item, token_id in zip(batch.items, sampled_token_ids):
            seq = item.seq
            if seq.is_finished:  # aborted or finished while the step ran
                continue
            assert seq.num_cached_tokens == item.num_cached_tokens, f"{seq} changed while its step ran"
            seq.num_cached_tokens += item.num_new_tokens
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            # A token forced in while the step ran (engine misuse) makes the sample stale: drop it; the forced
            # tokens are prefilled next step and sampling resumes after them.
            if item.samples_token and seq.num_tokens == item.seq_len:
                if token_id is None:
                    raise ValueError(f"request {seq.request_id!r} completed its chunk but got no sampled token")
                seq.append_token(token_id)
                grown.append(seq)
        return grown

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)  # first in line: it has waited longest among what is queued
