"""The model runner: one engine step's model call over the paged KV pool.

    runner = ModelRunner(model, num_blocks=..., block_size=16)
    logits = runner.run([RunItem(new_tokens=[...], num_cached=0, block_table=[3, 7]), ...])   # (B, V) fp32

Each item is one sequence's share of the step: the tokens whose k/v are not in the pool yet (a prefill chunk, the
recompute of a preempted sequence, or the single token of a decode), how many of its tokens are cached already
(positions continue from there), and its block table. The runner packs every item's new tokens into one row,
computes the pool slot of each (block_table[pos // block_size] · block_size + pos % block_size), builds the
paged attention metadata (`model.attention.paged_meta`) and calls the model once; it returns the fp32
softcapped logits of each item's last new token, which is all sampling needs.

Limits: eager execution (CUDA graphs for decode batches are not captured yet); the pool is sized by the caller
(`blocks_for_memory` turns a memory budget into a block count). The block manager (not this file) decides which
blocks a sequence owns; the runner trusts the tables it is given and checks only their shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attention import paged_meta
from model.config import ModelConfig
from model.gpt import GPT


@dataclass(frozen=True)
class RunItem:
    new_tokens: list[int]  # tokens to feed this step (≥ 1)
    num_cached: int  # tokens of this sequence already in the pool: the first new token's position
    block_table: list[int]  # pool blocks of this sequence, in order; must cover num_cached + len(new_tokens)


def blocks_for_memory(cfg: ModelConfig, block_size: int, budget_bytes: float, bytes_per_element: int) -> int:
    """How many blocks of `block_size` tokens fit in `budget_bytes` of KV pool (all layers, k and v)."""
    per_block = cfg.kv_bytes_per_token(bytes_per_element) * block_size
    return max(int(budget_bytes // per_block), 0)


class ModelRunner:
    def __init__(self, model: GPT, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"the KV pool needs num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = model.allocate_kv_cache(num_blocks, block_size, dtype)
        self.device = model.cos.device

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @torch.no_grad()
    def run(self, items: list[RunItem]) -> torch.Tensor:
        """Feed every item's new tokens; returns (len(items), V) fp32 logits of each item's last new token."""
        if not items:
            raise ValueError("run() needs at least one item")
        bs = self.block_size
        ids, positions, slots, cu = [], [], [], [0]
        for it in items:
            n = len(it.new_tokens)
            end = it.num_cached + n
            if n == 0:
                raise ValueError("every item must feed at least one token")
            if len(it.block_table) * bs < end:
                raise ValueError(f"a sequence of {end} tokens needs {-(-end // bs)} blocks of {bs}, its table has "
                                 f"{len(it.block_table)}")
            ids.extend(it.new_tokens)
            for p in range(it.num_cached, end):
                positions.append(p)
                slots.append(it.block_table[p // bs] * bs + p % bs)
            cu.append(cu[-1] + n)
        width = max(len(it.block_table) for it in items)
        tables = [it.block_table + [0] * (width - len(it.block_table)) for it in items]
        dev = self.device
        meta = paged_meta(
            self.kv,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([it.num_cached + len(it.new_tokens) for it in items], dtype=torch.int32,
                                  device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
        )
        last = torch.tensor(cu[1:], device=dev) - 1
        idx = torch.tensor([ids], dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return self.model(idx, positions=pos, attn_meta=meta, logits_positions=last)[0]
