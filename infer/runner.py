"""The model runner: one engine step's model call over the paged KV pool, with CUDA graphs for decode batches.

    runner = ModelRunner(model, num_blocks=..., block_size=16, max_num_seqs=64)   # captures graphs on CUDA
    logits = runner.run([RunItem(new_tokens=[...], num_cached=0, block_table=[3, 7]), ...])   # (B, V) fp32

Each item is one sequence's share of the step: the tokens whose k/v are not in the pool yet (a prefill chunk, the
recompute of a preempted sequence, or the single token of a decode), how many of its tokens are cached already
(positions continue from there), and its block table. The runner packs every item's new tokens into one row,
computes the pool slot of each (block_table[pos // block_size] · block_size + pos % block_size), builds the
paged attention metadata (`model.attention.paged_meta`) and calls the model once; it returns the fp32
softcapped logits of each item's last new token, which is all sampling needs.

CUDA graphs (decode only; nano-vllm / vLLM style). A decode step of a small model is a few hundred tiny kernel
launches, so on a GPU the launch overhead, not the math, sets the step time. At start the runner captures one
graph per batch-size bucket (`decode_buckets`: 1, 2, 4, 8, 16, 24, ... max_num_seqs), largest first, all in one
graph memory pool (each capture's temporaries are dead when the next one starts, so the pool is about the
largest bucket's activations). Each graph reads static buffers: token ids, positions, slot mapping, seq lens and
block tables padded to the most blocks a sequence can own (cdiv(sequence_len, block_size)); cu_seqlens and the
logit positions are constant (one token per row). A replay copies the real batch into the buffers, pads the
rows up to the bucket and slices the logits back. Padded rows feed token 0 at position 0 into the *scratch
block*: one extra pool block past the `num_blocks` the block manager hands out, which no sequence ever owns, so a
padded row can never touch a real sequence's k/v. Weights may change between replays (GRPO's
`Engine.load_weights` copies into the same tensors in place); the graph reads them at replay time.
Eager (the plain call) when the batch has any prefill token, is larger than the largest bucket, a block table is
wider than the padded width, on CPU, or with `enforce_eager=True`.

Memory: the KV pool is sized by the caller from free memory (`blocks_for_memory`); `graph_memory_estimate`
measures what the graphs will need before that (one eager decode forward at the largest bucket on a one-block
pool), so the caller can leave it out of the pool's budget. The capture log line says what the graphs really took.

Limits: graphs need the whole decode forward free of host syncs (`GPT._rotary` skips its host-side range check
while a capture runs); a forward that still syncs fails its capture, and the runner then logs the error and runs
decode eagerly (`graph_error` holds the reason; the gpu tests assert it is None). The block manager (not this
file) decides which blocks a sequence owns; the runner trusts the tables it is given and checks only their sizes.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import torch

from model.attention import paged_meta
from model.config import ModelConfig
from model.gpt import GPT

DEFAULT_MAX_NUM_SEQS = 64
GRAPH_MEMORY_MARGIN = 2.0  # × the measured decode peak: pool fragmentation and allocator rounding over ~35 captures
WARMUP_RUNS = 2  # eager runs before a capture: Triton compiles, cuBLAS picks and caches its kernels


@dataclass(frozen=True)
class RunItem:
    new_tokens: list[int]  # tokens to feed this step (≥ 1)
    num_cached: int  # tokens of this sequence already in the pool: the first new token's position
    block_table: list[int]  # pool blocks of this sequence, in order; must cover num_cached + len(new_tokens)


@dataclass
class Packed:
    """One step's model inputs as host lists (the layout `paged_meta` wants), before they go to the device."""

    ids: list[int]  # (N,) new tokens of every sequence, back to back
    positions: list[int]  # (N,)
    slots: list[int]  # (N,) pool slot of each new token
    block_tables: list[list[int]]  # (B, width)
    seq_lens: list[int]  # (B,) cached + new
    cu_seqlens: list[int]  # (B + 1,)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        return len(self.ids) == self.num_seqs

    @property
    def width(self) -> int:
        return len(self.block_tables[0]) if self.block_tables else 0


def blocks_for_memory(cfg: ModelConfig, block_size: int, budget_bytes: float, bytes_per_element: int) -> int:
    """How many blocks of `block_size` tokens fit in `budget_bytes` of KV pool (all layers, k and v)."""
    per_block = cfg.kv_bytes_per_token(bytes_per_element) * block_size
    return max(int(budget_bytes // per_block), 0)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8 below max_num_seqs, and
    max_num_seqs itself (so every decode batch the scheduler can form has a bucket). Ascending."""
    if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be a positive int, got {max_num_seqs!r}")
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def bucket_for(batch_size: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `batch_size` rows (buckets ascending), or None when none does."""
    i = bisect.bisect_left(buckets, batch_size)
    return buckets[i] if i < len(buckets) else None


def pack(items: list[RunItem], block_size: int) -> Packed:
    """Flatten the items into one row of new tokens; tables padded with block 0 to the widest (never read)."""
    if not items:
        raise ValueError("run() needs at least one item")
    ids, positions, slots, cu = [], [], [], [0]
    for it in items:
        n = len(it.new_tokens)
        end = it.num_cached + n
        if n == 0:
            raise ValueError("every item must feed at least one token")
        if len(it.block_table) * block_size < end:
            raise ValueError(f"a sequence of {end} tokens needs {-(-end // block_size)} blocks of {block_size}, "
                             f"its table has {len(it.block_table)}")
        ids.extend(it.new_tokens)
        for p in range(it.num_cached, end):
            positions.append(p)
            slots.append(it.block_table[p // block_size] * block_size + p % block_size)
        cu.append(cu[-1] + n)
    width = max(len(it.block_table) for it in items)
    tables = [it.block_table + [0] * (width - len(it.block_table)) for it in items]
    seq_lens = [it.num_cached + len(it.new_tokens) for it in items]
    return Packed(ids, positions, slots, tables, seq_lens, cu)


def pad_decode(packed: Packed, batch_size: int, width: int, scratch_block: int, block_size: int) -> Packed:
    """A decode batch padded to `batch_size` rows and every table to `width` entries (the graph's static shapes).
    Padded rows: token 0 at position 0, written to and read from the scratch block's first slot only (seq_len 1:
    a real, if meaningless, attention row; no empty-sequence edge case in the kernel). Table padding points at the
    scratch block too, so even a read past a sequence's end stays inside the pool."""
    B = packed.num_seqs
    if not packed.is_decode:
        raise ValueError(f"pad_decode wants one new token per sequence, got {len(packed.ids)} tokens for {B}")
    if B > batch_size or packed.width > width:
        raise ValueError(f"a decode batch of {B} sequences with tables of {packed.width} blocks does not fit the "
                         f"graph's {batch_size} rows × {width} blocks")
    pad = batch_size - B
    tables = [t[: packed.width] + [scratch_block] * (width - packed.width) for t in packed.block_tables]
    return Packed(ids=packed.ids + [0] * pad, positions=packed.positions + [0] * pad,
                  slots=packed.slots + [scratch_block * block_size] * pad,
                  block_tables=tables + [[scratch_block] * width] * pad, seq_lens=packed.seq_lens + [1] * pad,
                  cu_seqlens=list(range(batch_size + 1)))


class _DecodeGraph:
    """The static buffers of one decode bucket and, once captured, the CUDA graph that reads them. Without a
    capture (`graph` None) `replay` runs the same buffers eagerly: that is how the CPU tests check this logic."""

    def __init__(self, runner: ModelRunner, batch_size: int, out: torch.Tensor):
        B, W, dev = batch_size, runner.max_blocks_per_seq, runner.device
        self.runner, self.batch_size = runner, B
        self.out = out  # (≥ B, V) fp32, shared by every bucket: the graph copies its logits in
        # Two staging buffers, so a step costs two host→device copies: int64 (ids, positions, slots) and int32
        # (seq_lens, then the (B, W) block tables), in the dtypes paged_meta and the kernels take.
        self.i64 = torch.zeros(3, B, dtype=torch.int64, device=dev)
        self.i32 = torch.zeros(B + B * W, dtype=torch.int32, device=dev)
        self.last = torch.arange(B, device=dev)  # logit row of each sequence: one token each
        self.meta = paged_meta(runner.kv, slot_mapping=self.i64[2], block_tables=self.i32[B:].view(B, W),
                               seq_lens=self.i32[:B], cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=dev))
        self.load(Packed([], [], [], [], [], [0]))  # every row a padded row: safe contents for warm-up and capture
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, packed: Packed) -> None:
        r = self.runner
        B, W = self.batch_size, r.max_blocks_per_seq
        # Rows padded in Python; tables only to the batch's own width: the columns out to W are the scratch block
        # filled in as a tensor (W is the context's worth of blocks: B × W Python ints cost ~0.8 ms at 64 × 128).
        p = pad_decode(packed, B, packed.width, r.scratch_block, r.block_size)
        # From pageable host memory a non_blocking copy is staged synchronously, so the host tensors may die at once.
        self.i64.copy_(torch.tensor([p.ids, p.positions, p.slots], dtype=torch.int64), non_blocking=True)
        host = torch.full((B + B * W,), r.scratch_block, dtype=torch.int32)
        host[:B] = torch.tensor(p.seq_lens, dtype=torch.int32)
        host[B:].view(B, W)[:, : p.width] = torch.tensor(p.block_tables, dtype=torch.int32).view(B, p.width)
        self.i32.copy_(host, non_blocking=True)

    def forward(self) -> None:
        B = self.batch_size
        logits = self.runner.model(self.i64[0].view(1, B), positions=self.i64[1], attn_meta=self.meta,
                                   logits_positions=self.last)[0]
        self.out[:B].copy_(logits)  # logits itself is a pool temporary: only the shared buffer outlives a replay

    def capture(self, pool) -> None:
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graph's docs ask
            for _ in range(WARMUP_RUNS):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.forward()
        self.graph = graph

    def replay(self, packed: Packed) -> torch.Tensor:
        self.load(packed)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.forward()
        # A copy: the shared buffer is overwritten by the next replay, and callers may keep the logits longer.
        return self.out[: packed.num_seqs].clone()


class ModelRunner:
    def __init__(self, model: GPT, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, *,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, enforce_eager: bool = False, log=print):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"the KV pool needs num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One block more than the block manager hands out: the scratch block that padded graph rows write to.
        self.kv = model.allocate_kv_cache(num_blocks + 1, block_size, dtype)
        self.scratch_block = num_blocks
        self.max_blocks_per_seq = -(-model.config.sequence_len // block_size)
        self.device = model.cos.device
        self.buckets = decode_buckets(max_num_seqs)
        self.graphs: dict[int, _DecodeGraph] = {}
        self.graph_error: str | None = None  # why capture failed, when it did
        if self.device.type != "cuda":
            pass  # CPU: eager is the only way, nothing worth a log line
        elif enforce_eager:
            log("decode runs eagerly: enforce_eager=True")
        else:
            self._capture_graphs(log)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def uses_graphs(self) -> bool:
        return bool(self.graphs) and all(g.graph is not None for g in self.graphs.values())

    @torch.no_grad()
    def run(self, items: list[RunItem]) -> torch.Tensor:
        """Feed every item's new tokens; returns (len(items), V) fp32 logits of each item's last new token."""
        packed = pack(items, self.block_size)
        if self.graphs and packed.is_decode and packed.width <= self.max_blocks_per_seq:
            bucket = bucket_for(packed.num_seqs, self.buckets)
            if bucket is not None:
                return self.graphs[bucket].replay(packed)
        return self._run_eager(packed)

    def _run_eager(self, p: Packed) -> torch.Tensor:
        dev = self.device
        meta = paged_meta(
            self.kv,
            slot_mapping=torch.tensor(p.slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(p.block_tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(p.seq_lens, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(p.cu_seqlens, dtype=torch.int32, device=dev),
        )
        last = torch.tensor(p.cu_seqlens[1:], device=dev) - 1
        idx = torch.tensor([p.ids], dtype=torch.int64, device=dev)
        pos = torch.tensor(p.positions, dtype=torch.int64, device=dev)
        return self.model(idx, positions=pos, attn_meta=meta, logits_positions=last)[0]

    # ---- CUDA graphs -------------------------------------------------------------------------------------------
    def _build_decode_graphs(self, capture: bool) -> None:
        """Static buffers for every bucket, and their graphs when `capture` (largest first, one shared pool).
        capture=False keeps the buffers eager: the CPU tests drive the padding and copy logic through it."""
        out = torch.empty(self.buckets[-1], self.model.config.vocab_size, dtype=torch.float32, device=self.device)
        pool = torch.cuda.graph_pool_handle() if capture else None
        graphs = {}
        with torch.no_grad():
            for b in reversed(self.buckets):
                graphs[b] = _DecodeGraph(self, b, out)
                if capture:
                    graphs[b].capture(pool)
        self.graphs = graphs

    def _capture_graphs(self, log) -> None:
        dev = self.device
        torch.cuda.synchronize(dev)
        free_before = torch.cuda.mem_get_info(dev)[0]
        t0 = time.perf_counter()
        try:
            self._build_decode_graphs(capture=True)
        except Exception as e:  # a host sync or unsupported op on the decode path: say so, keep serving eagerly
            self.graphs = {}
            self.graph_error = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize(dev)
            log(f"CUDA graph capture failed, decode runs eagerly: {self.graph_error}")
            return
        torch.cuda.synchronize(dev)
        used = free_before - torch.cuda.mem_get_info(dev)[0]
        log(f"CUDA graphs: captured decode batch sizes {self.buckets} in {time.perf_counter() - t0:.1f} s "
            f"({used / 2**20:,.0f} MiB)")


@torch.no_grad()
def graph_memory_estimate(model: GPT, block_size: int, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> int:
    """Bytes to keep out of the KV pool's budget for the decode graphs (CUDA only): GRAPH_MEMORY_MARGIN × the peak
    memory of one eager decode forward at the largest bucket, run through the graph's own buffers on a one-block
    pool. The graphs share one pool captured largest first, so that bucket's temporaries bound it."""
    dev = model.cos.device
    if dev.type != "cuda":
        raise ValueError(f"graph_memory_estimate measures CUDA memory; the model is on {dev}")
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    probe = ModelRunner(model, 1, block_size, enforce_eager=True, max_num_seqs=max_num_seqs, log=lambda _: None)
    b = probe.buckets[-1]
    out = torch.empty(b, model.config.vocab_size, dtype=torch.float32, device=dev)
    _DecodeGraph(probe, b, out).forward()  # every row padded: reads and writes only the probe's scratch block
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del probe, out
    torch.cuda.empty_cache()
    return int(GRAPH_MEMORY_MARGIN * peak)
