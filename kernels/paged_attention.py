"""Attention over a paged KV cache (vLLM-style block pool): decode (one new token per sequence) and chunked prefill.

    out = paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale=None, window=None,
                                 num_splits=None)
    out = paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None,
                                  window=None)

k_cache, v_cache: (num_blocks, block_size, Hkv, D), fp32/fp16/bf16, same shape, dtype and strides, unit stride on D
(the pools kv_store writes). Token t of sequence b lives in block block_tables[b, t // block_size] at offset
t % block_size. block_tables: (B, max_blocks) int32 (entries past a sequence's last block are never read);
seq_lens: (B,) int32, tokens in the cache per sequence, *including* the new ones (their k/v are stored first).
q in the caches' dtype; H a multiple of Hkv (GQA: query head h reads KV head h // (H/Hkv)); D <= 256.
Output in q's dtype, contiguous. Softmax in fp32 (exp2 with log2(e) folded into the scale); scale defaults to
1/sqrt(D). Window as model/attention.py (FlashAttention's window_size=(w, 0)): a query at position i sees keys
i-w .. i; None = the whole causal prefix. No autograd (inference only). Values (seq_lens, block ids) are not
checked on the device: that would need a host sync every step, which also breaks CUDA graphs.

- decode: q (B, H, D), the token at position seq_lens[b] - 1 of each sequence. A sequence with seq_lens = 0 (a
  padded row) gives zeros. One program per (sequence, KV head, split). The program holds the G = H/Hkv query heads
  of its KV head as the rows of one (BLOCK_G >= 16) tile, so each K/V row is read from HBM once per KV head, not once
  per query head, and both products are tensor-core tl.dot: QK^T (BLOCK_G x D)(D x BLOCK_N) and PV. With G < 16 the
  padded rows waste MMA work, but decode is bound by reading K/V (1 FMA per 2 bytes per query head; the tensor
  cores have >100x that to spare), and the alternative, tl.sum dot products on CUDA cores, costs cross-lane
  reductions per key and does not get cheaper per byte as G grows.
  Split-K (flash-decoding): when B*Hkv programs would not fill the GPU (batch 1, long context), the key range of
  each sequence is cut into num_splits chunks; pass 1 writes each chunk's normalised partial output (fp32) and its
  log-sum-exp, pass 2 merges them with weights exp(lse_s - max lse). num_splits=None picks it from the SM count
  and the block table's width (an upper bound on the context; no host sync); 1 skips pass 2 entirely.
- prefill: q (Nq, H, D), the new tokens of B sequences packed, cu_seqlens_q (B+1,) int32 (sequence b owns rows
  cu[b] .. cu[b+1]-1). Its new tokens are at positions seq_lens[b] - n_b .. seq_lens[b] - 1 (n_b = cu[b+1]-cu[b]),
  after a cached prefix of seq_lens[b] - n_b tokens (0: prefill from nothing), and attend causally to every cached
  position up to their own. One program per (tile of BLOCK_M query tokens of one sequence, query head); the tiles
  are numbered per sequence with a few tiny torch ops (cumsum/searchsorted over B, no host sync), over a grid
  sized by the upper bound cdiv(Nq, BLOCK_M) + B; the spare programs exit at once. The causal/window mask is
  applied on every key tile (a split into masked and unmasked loops would be the next optimisation).

Both gather K/V rows through the block table inside the loop: the BLOCK_N tokens of a key tile may span several
blocks (block_size 16 < BLOCK_N), so each row's address is block_tables[b, t // block_size] * stride + offset,
one cached int32 load per token. Plain pointer arithmetic and masks (no block pointers or tensor descriptors: runs
on triton 3.6-3.9), one config per shape (no autotune). Under the Triton interpreter (CPU tests) tiles are cast
to fp32 before tl.dot (it computes bf16 dots wrongly); on the GPU bf16/fp16 tiles go to the tensor cores as they
are, and fp32 caches use IEEE fp32 dots (not TF32) to match the twins. The twins gather each sequence's blocks
into a dense (B, T, Hkv, D) tensor and run explicit fp32 softmax attention, all decodes at once (the CPU engine
runs them); the prefill twin loops over sequences with more than one new token.
"""

from __future__ import annotations

import math

import torch

from kernels import _dispatch

if _dispatch.HAS_TRITON:  # a CPU-only install without triton still has the twins
    import triton
    import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# A 4-warp decode program alone cannot keep an SM's share of HBM busy (one gather in flight per loop step): aim for
# several per SM. A guess until bench/test_bench_paged_attention.py sweeps num_splits on an H100.
PROGRAMS_PER_SM = 4
MIN_SPLIT_TOKENS = 256  # a split shorter than this spends more on its partial write + merge than it saves


# ----------------------------------------------------------------------------------------------------- twins


def _gather_ref(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, T: int) -> torch.Tensor:
    """The first T token rows of every sequence as one dense (B, T, Hkv, D) tensor (rows past a sequence's own
    length are junk, for the caller to mask). Block-table entries past a sequence's last block are never read: they
    are replaced by block 0 before the gather, whatever they hold. (index_select: a few times faster on CPU than
    indexing with a 2-D table.)"""
    B, block_size = block_tables.shape[0], cache.shape[1]
    num_blocks = -(-T // block_size)
    table = block_tables[:, :num_blocks].long()
    used = torch.arange(num_blocks, device=table.device)[None, :] * block_size < seq_lens[:, None]
    rows = cache.index_select(0, table.where(used, 0).flatten())
    return rows.view(B, num_blocks * block_size, *cache.shape[2:])[:, :T]


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float,
                window: int | None) -> torch.Tensor:
    """Explicit fp32 softmax attention of one sequence. q (M, H, D) at positions q_pos (M,); k, v (T, Hkv, D).
    Returns (M, H, D) fp32; a query with no visible key (only T = 0) gives zeros."""
    G = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(G, dim=1)
    v = v.float().repeat_interleave(G, dim=1)
    s = torch.einsum("mhd,thd->hmt", q.float(), k) * scale
    t = torch.arange(k.shape[0], device=q.device)
    visible = t[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= t[None, :] >= q_pos[:, None] - window
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hmt,thd->mhd", p, v)


def paged_attention_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale=None, window=None,
                               num_splits=None) -> torch.Tensor:
    """The twin of `paged_attention_decode` (num_splits is accepted and ignored: there is nothing to split). Every
    sequence at once, padded to the longest, with no loop over sequences: on CPU the engine's decode step runs
    this, and a host loop cost it ~85% of a 64-sequence step. One query per sequence, so the products are
    broadcast multiply-sums, (B, T, Hkv, G, D) at most (faster here than batched 1-row matmuls)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    lens = seq_lens.long()
    T = int(lens.max()) if B else 0
    if T == 0:
        return torch.zeros_like(q)
    k = _gather_ref(k_cache, block_tables, lens, T).float()[:, :, :, None]  # (B, T, Hkv, 1, D)
    v = _gather_ref(v_cache, block_tables, lens, T).float()[:, :, :, None]
    s = (k * q.float().view(B, 1, Hkv, H // Hkv, D)).sum(-1) * scale  # (B, T, Hkv, G)
    t = torch.arange(T, device=q.device)[None, :]
    visible = t < lens[:, None]  # the query is the last token of its sequence
    if window is not None:
        visible &= t >= lens[:, None] - 1 - window
    p = torch.softmax(s.masked_fill(~visible[:, :, None, None], float("-inf")), dim=1).nan_to_num(0.0)
    v.masked_fill_(~visible[:, :, None, None, None], 0.0)  # a fresh gather; padding may hold anything (0 * NaN)
    return (p[..., None] * v).sum(1).reshape(B, H, D).to(q.dtype)


def paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None,
                                window=None) -> torch.Tensor:
    """The twin of `paged_attention_prefill`. Sequences with one new token (the decodes of a mixed step) go through
    the decode twin together; each longer one is attended on its own (padding them together could cost
    B x max_new x max_len scores)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    single = [b for b in range(len(cu) - 1) if cu[b + 1] - cu[b] == 1]
    if single:
        idx = torch.tensor(single, device=q.device)
        rows = cu_seqlens_q[idx].long()
        out[rows] = paged_attention_decode_ref(q[rows], k_cache, v_cache, block_tables[idx], seq_lens[idx], scale,
                                               window)
    for b, T in enumerate(seq_lens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi - lo <= 1:  # done above (one new token) or nothing to do
            continue
        k = _gather_ref(k_cache, block_tables[b : b + 1], seq_lens[b : b + 1].long(), T)[0]
        v = _gather_ref(v_cache, block_tables[b : b + 1], seq_lens[b : b + 1].long(), T)[0]
        pos = torch.arange(T - (hi - lo), T, device=q.device)
        out[lo:hi] = _attend_ref(q[lo:hi], k, v, pos, scale, window).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------------- kernels

if _dispatch.HAS_TRITON:

    @triton.jit
    def _load_kv_tile(table, K_CACHE, V_CACHE, n, n_mask, d, d_mask, kvh, stride_kb, stride_kt, stride_kh,
                      BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr):
        """The k and v rows of token positions n (BLOCK_N,) of one KV head, each looked up through the sequence's
        block table (a key tile may span several pool blocks). k and v pools share their strides."""
        blk = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        row = blk * stride_kb + (n % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_CACHE + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return k, v

    @triton.jit
    def _paged_decode_kernel(
        Q, K_CACHE, V_CACHE, BLOCK_TABLES, SEQ_LENS, OUT, O_PART, LSE_PART,
        scale_log2, window, num_heads,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_ob, stride_oh,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        T = tl.load(SEQ_LENS + b)
        lo = 0
        if HAS_WINDOW:  # the query sits at T - 1 and sees keys T-1-window .. T-1: every key in range is visible
            lo = tl.maximum(T - 1 - window, 0)
        # Equal chunks per sequence, rounded to whole key tiles; trailing splits of a short sequence are empty.
        chunk = tl.cdiv(tl.cdiv(T - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start_n = lo + split * chunk
        end_n = tl.minimum(T, start_n + chunk)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kvh * G + g
        g_mask = g < G
        d_mask = d < D
        q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        table = BLOCK_TABLES + b.to(tl.int64) * stride_bt
        for n0 in range(start_n, end_n, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end_n
            k, v = _load_kv_tile(table, K_CACHE, V_CACHE, n, n_mask, d, d_mask, kvh, stride_kb, stride_kt, stride_kh,
                                 BLOCK_SIZE, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # Every tile has a visible key (n0 < end_n), so m_new is finite and no row produces NaN.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0: empty sequence or empty split, out = 0
        mask = g_mask[:, None] & d_mask[None, :]
        if NUM_SPLITS == 1:
            dst = OUT + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
            tl.store(dst, out.to(OUT.dtype.element_ty), mask=mask)
        else:
            # Partials (B, H, NUM_SPLITS, D) and lse (B, H, NUM_SPLITS), fp32, contiguous; lse in log2 units.
            part = (b.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
            tl.store(O_PART + part[:, None] * D + d[None, :], out, mask=mask)
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(LSE_PART + part, lse, mask=g_mask)

    @triton.jit
    def _paged_decode_reduce_kernel(
        O_PART, LSE_PART, OUT, num_heads, stride_ob, stride_oh,
        D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_mask = s < NUM_SPLITS
        part = (b.to(tl.int64) * num_heads + h) * NUM_SPLITS + s
        lse = tl.load(LSE_PART + part, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_lens = 0): weights 0, out 0
        w = tl.exp2(lse - m)
        o = tl.load(O_PART + part[:, None] * D + d[None, :], mask=s_mask[:, None] & (d < D)[None, :], other=0.0)
        den = tl.sum(w, axis=0)
        out = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < D)

    @triton.jit
    def _paged_prefill_kernel(
        Q, K_CACHE, V_CACHE, BLOCK_TABLES, SEQ_LENS, CU_SEQLENS_Q, TILE_SEQ, CU_TILES, OUT,
        scale_log2, window, num_seqs,
        stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_bt, stride_on, stride_oh,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // G
        seq = tl.load(TILE_SEQ + tile)
        is_tile = seq < num_seqs  # the grid is an upper bound on the tile count; the spare programs do nothing
        seq = tl.minimum(seq, num_seqs - 1)
        q_lo = tl.load(CU_SEQLENS_Q + seq)
        q_hi = tl.load(CU_SEQLENS_Q + seq + 1)
        T = tl.load(SEQ_LENS + seq)
        first = q_lo + (tile - tl.load(CU_TILES + seq)) * BLOCK_M  # this tile's first row of q
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = (rows < q_hi) & is_tile
        prefix = T - (q_hi - q_lo)  # cached tokens before the new ones
        pos = prefix + rows - q_lo  # position of each query in its sequence
        end_n = tl.where(is_tile, prefix + tl.minimum(first + BLOCK_M, q_hi) - q_lo, 0)  # last query pos + 1
        start_n = 0
        if HAS_WINDOW:
            start_n = tl.maximum(prefix + first - q_lo - window, 0)

        d = tl.arange(0, BLOCK_D)
        d_mask = d < D
        rows64 = rows.to(tl.int64)
        q = tl.load(Q + rows64[:, None] * stride_qn + h * stride_qh + d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
        for n0 in range(start_n, end_n, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < end_n
            k, v = _load_kv_tile(table, K_CACHE, V_CACHE, n, n_mask, d, d_mask, kvh, stride_kb, stride_kt, stride_kh,
                                 BLOCK_SIZE, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale_log2
            visible = n_mask[None, :] & (n[None, :] <= pos[:, None])
            if HAS_WINDOW:
                visible &= n[None, :] >= pos[:, None] - window
            s = tl.where(visible, s, float("-inf"))
            # A row may see nothing in this tile (a window that starts later, a padded row): keep it NaN-free.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + rows64[:, None] * stride_on + h * stride_oh + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])


# ------------------------------------------------------------------------------------------------- launchers


def _check(op: str, q, k_cache, v_cache, block_tables, seq_lens, q_dims: int) -> None:
    if q.dim() != q_dims:
        raise ValueError(f"{op}: q must be {'(B, H, D)' if q_dims == 3 else '(Nq, H, D)'}, got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op}: k_cache and v_cache must both be (num_blocks, block_size, Hkv, D) with the same "
                         f"strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1:
        raise ValueError(f"{op}: the caches need a unit stride on D, got strides {k_cache.stride()}")
    Hkv, D = k_cache.shape[2:]
    if q.shape[-1] != D or q.shape[1] % Hkv != 0:
        raise ValueError(f"{op}: q (.., H, D) = {tuple(q.shape)} needs D = {D} and H a multiple of Hkv = {Hkv}")
    if D > 256:
        raise ValueError(f"{op}: head dim D = {D} > 256 is not supported (registers)")
    if q.dtype not in _DTYPES or q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError(f"{op}: q and the caches must share one of fp32/fp16/bf16, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    B = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ValueError(f"{op}: seq_lens must be (B,) int32, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype != torch.int32:
        raise ValueError(f"{op}: block_tables must be (B, max_blocks) = ({B}, ..) int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if block_tables.stride(-1) != 1:
        raise ValueError(f"{op}: block_tables needs a unit stride on its last dim")
    if len({t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}) != 1:
        raise ValueError(f"{op}: all tensors must be on one device")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit tiles


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int | None) -> int:
    """Splits of the key range for decode: enough (sequence, KV head, split) programs for PROGRAMS_PER_SM per SM,
    with each split at least MIN_SPLIT_TOKENS long (max_context: the block table's capacity, an upper bound known
    without a host sync). Off the GPU (num_sms None: the interpreter runs programs one after another) splitting
    only adds work: 1. The partials cost B*H*splits*D*8 bytes (write + read), under 2% of the K/V bytes."""
    if num_sms is None:
        return 1
    want = -(-PROGRAMS_PER_SM * num_sms // (batch * num_kv_heads))
    return max(1, min(want, -(-max_context // MIN_SPLIT_TOKENS), MAX_SPLITS))


def _num_sms(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _decode_config(G: int, D: int) -> dict:
    # One config (no autotune: the interpreter would time every candidate). 64 keys x D=128 bf16 = 16 KB of K and
    # of V per step, 4 warps, 2 stages: a guess at the H100 sweet spot for a gather-bound loop, to be tuned by
    # bench/test_bench_paged_attention.py on a GPU.
    return dict(BLOCK_N=64, BLOCK_G=max(16, triton.next_power_of_2(G)), num_warps=4,
                num_stages=1 if _dispatch.interpreting() else 2)


def _paged_attention_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, window, num_splits,
                                   block_n: int | None = None, num_warps: int | None = None,
                                   num_stages: int | None = None) -> torch.Tensor:
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()  # (B, H, D): small
    G = H // Hkv
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, block_tables.shape[1] * block_size, _num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"paged_attention_decode: num_splits must be >= 1, got {num_splits}")
    cfg = _decode_config(G, D)
    cfg["BLOCK_N"] = block_n or cfg["BLOCK_N"]
    cfg["num_warps"] = num_warps or cfg["num_warps"]
    cfg["num_stages"] = num_stages or cfg["num_stages"]
    if num_splits > 1:
        o_part = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # never touched with NUM_SPLITS == 1
    block_d = max(16, triton.next_power_of_2(D))
    _paged_decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, o_part, lse_part,
        scale * LOG2E, -1 if window is None else window, H,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=G, D=D, BLOCK_D=block_d, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, HAS_WINDOW=window is not None,
        UPCAST=_dispatch.interpreting(), INPUT_PRECISION=_precision(q.dtype), **cfg,
    )
    if num_splits > 1:
        _paged_decode_reduce_kernel[(B, H)](
            o_part, lse_part, out, H, out.stride(0), out.stride(1),
            D=D, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4,
        )
    return out


def _prefill_config(D: int) -> dict:
    if _dispatch.interpreting():  # fewer, wider programs: the interpreter pays per program
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
    # FA2-style forward tile for D <= 128 on an H100; D = 256 halves the key tile to stay in registers.
    return dict(BLOCK_M=64, BLOCK_N=64 if D <= 128 else 32, num_warps=4, num_stages=2)


def _paged_attention_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, window,
                                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    Nq, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    B = seq_lens.shape[0]
    out = torch.empty((Nq, H, D), dtype=q.dtype, device=q.device)
    if Nq == 0 or B == 0 or H == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    cfg = _prefill_config(D)
    cfg["BLOCK_M"] = block_m or cfg["BLOCK_M"]
    cfg["BLOCK_N"] = block_n or cfg["BLOCK_N"]
    # Number the query tiles per sequence on the device (no host sync): tile t belongs to the sequence s with
    # cu_tiles[s] <= t < cu_tiles[s + 1]. A sequence adds at most one partial tile, so cdiv(Nq, BLOCK_M) + B tiles
    # bound the grid; programs past the real count read s = B and exit.
    n_new = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    cu_tiles = torch.zeros(B + 1, dtype=torch.int64, device=q.device)
    torch.cumsum((n_new + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"], 0, out=cu_tiles[1:])
    num_tiles = triton.cdiv(Nq, cfg["BLOCK_M"]) + B
    tile_seq = torch.searchsorted(cu_tiles[1:], torch.arange(num_tiles, device=q.device), right=True)
    _paged_prefill_kernel[(num_tiles, H)](
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, tile_seq.to(torch.int32),
        cu_tiles.to(torch.int32), out, scale * LOG2E, -1 if window is None else window, B,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=H // Hkv, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_SIZE=block_size,
        HAS_WINDOW=window is not None, UPCAST=_dispatch.interpreting(), INPUT_PRECISION=_precision(q.dtype), **cfg,
    )
    return out


# ------------------------------------------------------------------------------------------------ public ops


def _scale_window(op: str, D: int, scale: float | None, window: int | None) -> tuple[float, int | None]:
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"{op}: window must be a non-negative int or None, got {window!r}")
    return (1.0 / math.sqrt(D) if scale is None else float(scale)), window


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float | None = None, window: int | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """One decode step: q (B, H, D) -> (B, H, D) over each sequence's cached keys (module docstring)."""
    if _dispatch.use_triton("paged_attention_decode", q, k_cache, v_cache, block_tables, seq_lens):
        _check("paged_attention_decode", q, k_cache, v_cache, block_tables, seq_lens, 3)
        scale, window = _scale_window("paged_attention_decode", q.shape[-1], scale, window)
        return _paged_attention_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, window, num_splits)
    return paged_attention_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, window, num_splits)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
                            window: int | None = None) -> torch.Tensor:
    """Chunked prefill: packed new tokens q (Nq, H, D) -> (Nq, H, D), causal over prefix + new (module docstring)."""
    if _dispatch.use_triton("paged_attention_prefill", q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens):
        _check("paged_attention_prefill", q, k_cache, v_cache, block_tables, seq_lens, 3)
        B = seq_lens.shape[0]
        if cu_seqlens_q.shape != (B + 1,) or cu_seqlens_q.dtype != torch.int32:
            raise ValueError(f"paged_attention_prefill: cu_seqlens_q must be (B+1,) = ({B + 1},) int32, got "
                             f"{tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}")
        scale, window = _scale_window("paged_attention_prefill", q.shape[-1], scale, window)
        return _paged_attention_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                               window)
    return paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, window)
