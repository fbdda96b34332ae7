"""One request's state as the engine core sees it: its tokens, where it is in its life, and which KV blocks it owns.

    seq = Sequence("req-1", prompt_token_ids=[...], sampling_params=params, max_tokens=256)
    seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens, seq.last_token, seq.is_finished

Life: WAITING (queued, no blocks) -> RUNNING (owns blocks, is scheduled) -> FINISHED (blocks freed). Preemption
(recompute) sends a RUNNING sequence back to the front of the waiting queue as PREEMPTED: its blocks are freed, its
generated tokens are kept, and when it runs again it prefills prompt + generated tokens (often mostly prefix-cache
hits, since its full blocks stay in the cache until evicted).

Counters (the names are the contract with the block manager, the scheduler and the runner):
- num_cached_tokens: tokens whose KV is in the pool for this sequence, prefix-cache hits included; the position of
  the next token to feed the model. 0 whenever the sequence owns no blocks (waiting, preempted, finished).
- num_prefix_hit_tokens: of those, how many the last allocation found in the prefix cache (OpenAI's
  usage.prompt_tokens_details.cached_tokens); kept after the sequence finishes, for reporting.
- num_computed_tokens: tokens the model has computed for this sequence over its life, recomputes after preemption
  included, prefix hits excluded (the work actually done; for metrics). Never reset.
- block_hashes: the chain hashes of the sequence's leading full blocks (computed lazily by the block manager). A full
  block's tokens never change (tokens are only appended), so the list stays valid for the sequence's whole life.

Tokens are append-only: `append_token` is called by the scheduler's postprocess with the sampled token, and may be
called by the engine between steps to force tokens in (tool output); forced tokens are prefilled at the next step.
The sequence holds no torch state; `sampling_params` is carried for the engine and never read here.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # in the waiting queue again, after its blocks were taken back
    FINISHED = "finished"


# finish_reason values (OpenAI's names; "abort" is ours, as vLLM's).
FINISH_STOP = "stop"  # a stop token or string, decided by the caller
FINISH_LENGTH = "length"  # max_tokens reached (caller), or the sequence outgrew the whole KV pool (scheduler)
FINISH_ABORT = "abort"  # cancelled by the client (disconnect, cancel message)

_seq_counter = itertools.count()  # tie-break for equal arrival times: creation order


class Sequence:
    def __init__(self, request_id: Any, prompt_token_ids: list[int], sampling_params: Any = None,
                 max_tokens: int | None = None, arrival_time: float | None = None):
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: the prompt is empty (at least one token is needed)")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"request {request_id!r}: max_tokens must be >= 0, got {max_tokens}")
        self.request_id = request_id
        self.seq_id = next(_seq_counter)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then generated (and forced) tokens
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        # Upper bound on generated tokens, used only to reject a request the KV pool can never hold; stopping at
        # max_tokens is the caller's decision (Scheduler.finish).
        self.max_tokens = max_tokens
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.num_cached_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        # Waiting for a tool call's result (the engine sets it): not scheduled, keeps its blocks; the result's forced
        # tokens are appended and prefilled before sampling resumes.
        self.on_hold = False

    # --------------------------------------------------------------------------------------------------- views

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncached_tokens(self) -> int:
        """Tokens still to feed the model before the next token can be sampled (1 for a decode)."""
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def arrival_key(self) -> tuple[float, int]:
        """Order of arrival: the scheduler preempts the largest key first."""
        return (self.arrival_time, self.seq_id)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # ------------------------------------------------------------------------------------------------- updates

    def append_token(self, token_id: int) -> None:
        if self.is_finished:
            raise RuntimeError(f"request {self.request_id!r} is finished ({self.finish_reason}); cannot append")
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens} "
                f"(prompt {self.num_prompt_tokens}), cached={self.num_cached_tokens}, blocks={self.block_table})")
