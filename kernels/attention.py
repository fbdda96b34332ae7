"""FlashAttention for training: `attention(q, k, v, causal, window, scale, cu_seqlens, max_seqlen)`, fwd + bwd.

Layout (the model's and FlashAttention's): q (B, T, H, D), k and v (B, T, Hkv, D), H a multiple of Hkv (GQA: query
head h reads kv head h // (H / Hkv)); returns (B, T, H, D) in q's dtype. fp32/fp16/bf16, q, k, v of one dtype.
- scale: softmax scale, default 1/sqrt(D).
- causal: query i sees keys j <= i. window (int >= 0, or None = unlimited): query i sees keys i - window .. i, as
  FlashAttention's window_size=(window, 0). A window is causal by definition here: window with causal=False raises.
- cu_seqlens: int32 (num_seqs + 1,) cumulative document lengths, cu_seqlens[0] = 0 and cu_seqlens[-1] = T, with
  B = 1: documents packed along T attend only within themselves (positions restart at each document for the
  causal/window masks). max_seqlen: the longest document; computed from cu_seqlens (a host sync) when None.
  cu_seqlens[-1] == T is not checked by the GPU paths (checking would sync).

Backends, chosen per call by `_dispatch.mode()`; `kernels.which("attention")` names the one that ran:
- "auto": on CUDA with fp16/bf16, the flash_attn package if importable (FA3 `flash_attn_interface`, then FA2
  `flash_attn`, then FA4 `flash_attn.cute`, dense only; probed once, at first use), else our Triton kernel
  ("triton"; also fp32, and head dims past 256); on
  CPU torch SDPA ("sdpa"; a window or cu_seqlens becomes an explicit (T, T) boolean mask there).
- "triton": always our kernel (on CPU under TRITON_INTERPRET=1). "ref": the twin `attention_ref`, explicit
  softmax(q kᵀ·scale + mask) v in fp32 (materialises (B, H, T, T): tests and small shapes only).

Our kernel (standard FA2 design, plain pointer arithmetic and masks: no block pointers or tensor descriptors, so
it runs on triton 3.6-3.9; untuned block sizes picked by head dim, no autotune):
- forward: one program per (query block, batch·head). Online softmax over key blocks in the log2 domain, fp32
  accumulators, log-sum-exp (log2) saved for the backward. Key blocks a causal/window mask hides entirely are
  never visited: each program computes its key range [lo, hi) and splits it into masked edge tiles and unmasked
  interior tiles (no mask arithmetic there).
- backward: preprocess delta = rowsum(dO·O) (fp32); dK/dV with one program per (key block, batch·kv head)
  looping over query blocks; dQ with one program per (query block, batch·head) looping over key blocks. GQA: the
  dK/dV program loops over the Hkv group's H/Hkv query heads itself and sums in registers — no (B, T, H, D) fp32
  buffer, no atomics, deterministic; it costs parallelism (B·Hkv·T/BLOCK_N programs), which is fine at d20 (H =
  Hkv) and at the model's GQA ratios with B·T >= 16k.
- inputs need a unit stride on D (slices of a fused qkv run in place; anything else is copied with
  .contiguous()); offsets within one sequence are int32 (T·stride_t < 2^31), batch offsets int64.
- Under the Triton interpreter (CPU tests) bf16 arithmetic is wrong: loads are cast to fp32 behind a constexpr
  (UPCAST) so the GPU keeps fp16/bf16 tensor-core dots. fp32 inputs use IEEE dots on a GPU (not TF32).
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from kernels import _dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # the twin and SDPA still run; _dispatch never picks the kernel without triton
    triton = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------- the twin


def _allowed(T: int, causal: bool, window: int | None, cu_seqlens: torch.Tensor | None,
             device: torch.device) -> torch.Tensor | None:
    """(T, T) bool, True = key j visible to query i; None when everything is visible."""
    if not causal and cu_seqlens is None:
        return None
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    ok = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j >= i - window
    if cu_seqlens is not None:  # same document: doc id = number of boundaries at or before the position
        doc = torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.long)[1:], torch.arange(T, device=device),
                                 right=True)
        ok &= doc[:, None] == doc[None, :]
    return ok


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
                  scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                  max_seqlen: int | None = None) -> torch.Tensor:
    """The plain-torch twin of `attention` (same signature): softmax(q kᵀ·scale + mask) v in fp32."""
    B, T, H, D = _check(q, k, v, causal, window, cu_seqlens)
    scale = D**-0.5 if scale is None else scale
    rep = H // k.shape[2]
    kf = k.float().repeat_interleave(rep, dim=2)
    vf = v.float().repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), kf) * scale
    ok = _allowed(T, causal, window, cu_seqlens, q.device)
    if ok is not None:
        scores = scores.masked_fill(~ok, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), vf).to(q.dtype)


def _check(q, k, v, causal, window, cu_seqlens) -> tuple[int, int, int, int]:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention wants q (B, T, H, D), k and v (B, T, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D or k.shape[2] == 0 or H % k.shape[2]:
        raise ValueError(f"attention: k/v shape {tuple(k.shape)} does not fit q {tuple(q.shape)} (H % Hkv must be 0)")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None:
        if window < 0:
            raise ValueError(f"attention: window must be >= 0 or None, got {window}")
        if not causal:
            raise ValueError("attention: a sliding window looks back only (window_size=(window, 0)); pass causal=True")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"attention: cu_seqlens packs documents along T and wants B = 1, got B = {B}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"attention: cu_seqlens must be int32 (num_seqs + 1,), got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
    return B, T, H, D


# ----------------------------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _key_range(start_m, L, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        """Keys a query block [start_m, start_m + BLOCK_M) may see, as [lo, hi) split into masked [lo, full_lo),
        unmasked [full_lo, full_hi) and masked [full_hi, hi) tiles. An unmasked tile lies inside the sequence, at or
        below the block's first query (causal) and at or after its last query's window start; lo, full_lo, full_hi
        are multiples of BLOCK_N and lo <= full_lo <= full_hi. Shared by the forward and the dQ kernels."""
        if CAUSAL:
            hi = tl.minimum(L, start_m + BLOCK_M)
            full_hi = (start_m + 1) // BLOCK_N * BLOCK_N
        else:
            hi = L
            full_hi = L
        full_hi = tl.minimum(full_hi, L // BLOCK_N * BLOCK_N)
        if HAS_WINDOW:
            lo = tl.maximum(start_m - WINDOW, 0) // BLOCK_N * BLOCK_N
            full_lo = (tl.maximum(start_m + BLOCK_M - 1 - WINDOW, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        else:
            lo = start_m * 0
            full_lo = start_m * 0
        full_hi = tl.maximum(full_hi, lo)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), full_hi)
        return lo, full_lo, full_hi, hi

    @triton.jit
    def _load_rows(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
        """A (rows, D) tile; row_ok/col_ok are broadcastable masks. Masks are built only when needed."""
        if ROW_MASK:
            x = tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
        elif EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=col_ok, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, L, lo, hi, qk_scale, WINDOW,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, EVEN_D: tl.constexpr,
                   UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < L
            kT = _load_rows(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], n_ok[None, :], d_ok[:, None],
                            MASKED, EVEN_D, UPCAST)  # (D, BLOCK_N)
            v = _load_rows(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], n_ok[:, None], d_ok[None, :],
                           MASKED, EVEN_D, UPCAST)
            s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale  # log2 domain
            if MASKED:
                ok = n_ok[None, :]
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
                if HAS_WINDOW:
                    ok = ok & (offs_n[None, :] >= offs_m[:, None] - WINDOW)
                s = tl.where(ok, s, float("-inf"))
            # m_i starts finite (-1e30), so a row whose keys in this tile are all masked gets p = 0, not NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _seq(CU, b, T, VARLEN: tl.constexpr):
        """(row offset of the sequence in T, its length, batch index into the tensors) for program index b."""
        if VARLEN:
            start = tl.load(CU + b)
            L = tl.load(CU + b + 1) - start
            bat = b * 0  # B = 1: every document lives in batch row 0
        else:
            start = b * 0
            L = T
            bat = b
        return start, L, bat

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, CU,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh, T, H, qk_scale, WINDOW,
        GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr,
        UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        start, L, bat = _seq(CU, b, T, VARLEN)
        if start_m >= L:  # varlen: the grid covers max_seqlen, shorter documents end early
            return
        bat = bat.to(tl.int64)
        start = start.to(tl.int64)
        hk = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < L
        d_ok = offs_d < HEAD_DIM
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
        q_base = Q + bat * stride_qb + start * stride_qt + h * stride_qh
        q = _load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], m_ok[:, None], d_ok[None, :],
                       True, EVEN_D, UPCAST)
        k_base = K + bat * stride_kb + start * stride_kt + hk * stride_kh
        v_base = V + bat * stride_vb + start * stride_vt + hk * stride_vh

        lo, full_lo, full_hi, hi = _key_range(start_m, L, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, L, lo, full_lo,
                                   qk_scale, WINDOW, True, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N,
                                   BLOCK_D, PRECISION)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, L, full_lo,
                                   full_hi, qk_scale, WINDOW, False, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST, HEAD_DIM,
                                   BLOCK_N, BLOCK_D, PRECISION)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, L, full_hi, hi,
                                   qk_scale, WINDOW, True, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N,
                                   BLOCK_D, PRECISION)
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # only rows past the sequence end have l = 0; keep them finite
        o = acc / l_i[:, None]
        o_base = O + bat * stride_ob + start * stride_ot + h * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + (bat * H + h) * T + start + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)

    @triton.jit
    def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh,
                                    T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """delta[b, h, t] = sum_d dO * O (fp32): the softmax backward's row term, shared by dK/dV and dQ."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = (tl.program_id(1) // H).to(tl.int64)
        h = tl.program_id(1) % H
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        tl.store(DELTA + (b * H + h) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)

    @triton.jit
    def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, L, lo, hi,
                    qk_scale, WINDOW, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        n_ok = offs_n < L
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < L
            qT = _load_rows(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], m_ok[None, :], d_ok[:, None],
                            MASKED, EVEN_D, UPCAST)  # (D, BLOCK_M)
            do = _load_rows(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], m_ok[:, None], d_ok[None, :],
                            MASKED, EVEN_D, UPCAST)  # (BLOCK_M, D)
            if MASKED:
                lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
            else:
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(delta_base + offs_m)
            pT = tl.math.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - lse[None, :])  # (BLOCK_N, M)
            if MASKED:
                ok = n_ok[:, None] & m_ok[None, :]
                if CAUSAL:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :])
                if HAS_WINDOW:
                    ok = ok & (offs_n[:, None] >= offs_m[None, :] - WINDOW)
                pT = tl.where(ok, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
        T, H, HKV, qk_scale, sm_scale, WINDOW,
        GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr,
        UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        b = tl.program_id(1) // HKV
        hk = tl.program_id(1) % HKV
        start, L, bat = _seq(CU, b, T, VARLEN)
        if start_n >= L:
            return
        bat = bat.to(tl.int64)
        start = start.to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < L
        d_ok = offs_d < HEAD_DIM
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
        k = _load_rows(K + bat * stride_kb + start * stride_kt + hk * stride_kh + offs_n[:, None] * stride_kt
                       + offs_d[None, :], n_ok[:, None], d_ok[None, :], True, EVEN_D, UPCAST)
        v = _load_rows(V + bat * stride_vb + start * stride_vt + hk * stride_vh + offs_n[:, None] * stride_vt
                       + offs_d[None, :], n_ok[:, None], d_ok[None, :], True, EVEN_D, UPCAST)

        # Query range [lo, hi) that sees this key block, split like the forward's key range (see there).
        if CAUSAL:
            lo = start_n // BLOCK_M * BLOCK_M
            full_lo = (start_n + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        else:
            lo = start_n * 0
            full_lo = start_n * 0
        if HAS_WINDOW:  # the last query that sees key j is j + WINDOW
            hi = tl.minimum(L, start_n + BLOCK_N + WINDOW)
            full_hi = (start_n + WINDOW + 1) // BLOCK_M * BLOCK_M
        else:
            hi = L
            full_hi = L
        full_hi = tl.minimum(full_hi, L // BLOCK_M * BLOCK_M)
        full_hi = tl.where(start_n + BLOCK_N <= L, full_hi, lo)  # a key block past the end is masked throughout
        full_hi = tl.maximum(full_hi, lo)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), full_hi)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(GROUP):  # the query heads that share kv head hk: their dK/dV sum here, in registers
            h = hk * GROUP + g
            q_base = Q + bat * stride_qb + start * stride_qt + h * stride_qh
            do_base = DO + bat * stride_dob + start * stride_dot + h * stride_doh
            lse_base = LSE + (bat * H + h) * T + start
            delta_base = DELTA + (bat * H + h) * T + start
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                 L, lo, full_lo, qk_scale, WINDOW, True, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                 L, full_lo, full_hi, qk_scale, WINDOW, False, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n,
                                 L, full_hi, hi, qk_scale, WINDOW, True, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST,
                                 HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
        mask = n_ok[:, None] & d_ok[None, :]
        tl.store(DK + bat * stride_dkb + start * stride_dkt + hk * stride_dkh + offs_n[:, None] * stride_dkt
                 + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + bat * stride_dvb + start * stride_dvt + hk * stride_dvh + offs_n[:, None] * stride_dvt
                 + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)

    @triton.jit
    def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, L, lo, hi, qk_scale, WINDOW,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, EVEN_D: tl.constexpr,
                  UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < L
            kT = _load_rows(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], n_ok[None, :], d_ok[:, None],
                            MASKED, EVEN_D, UPCAST)  # (D, BLOCK_N)
            vT = _load_rows(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], n_ok[None, :], d_ok[:, None],
                            MASKED, EVEN_D, UPCAST)
            p = tl.math.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
            if MASKED:
                ok = n_ok[None, :]
                if CAUSAL:
                    ok = ok & (offs_n[None, :] <= offs_m[:, None])
                if HAS_WINDOW:
                    ok = ok & (offs_n[None, :] >= offs_m[:, None] - WINDOW)
                p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
        T, H, qk_scale, sm_scale, WINDOW,
        GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr,
        UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        start, L, bat = _seq(CU, b, T, VARLEN)
        if start_m >= L:
            return
        bat = bat.to(tl.int64)
        start = start.to(tl.int64)
        hk = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < L
        d_ok = offs_d < HEAD_DIM
        EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
        q = _load_rows(Q + bat * stride_qb + start * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt
                       + offs_d[None, :], m_ok[:, None], d_ok[None, :], True, EVEN_D, UPCAST)
        do = _load_rows(DO + bat * stride_dob + start * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot
                        + offs_d[None, :], m_ok[:, None], d_ok[None, :], True, EVEN_D, UPCAST)
        row = (bat * H + h) * T + start + offs_m
        lse = tl.load(LSE + row, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
        k_base = K + bat * stride_kb + start * stride_kt + hk * stride_kh
        v_base = V + bat * stride_vb + start * stride_vt + hk * stride_vh

        lo, full_lo, full_hi, hi = _key_range(start_m, L, WINDOW, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, L, lo, full_lo, qk_scale,
                       WINDOW, True, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, L, full_lo, full_hi,
                       qk_scale, WINDOW, False, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D,
                       PRECISION)
        dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, L, full_hi, hi, qk_scale,
                       WINDOW, True, CAUSAL, HAS_WINDOW, EVEN_D, UPCAST, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        tl.store(DQ + bat * stride_dqb + start * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt
                 + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------- host launchers


def _config(D: int, interpreting: bool, blocks: dict | None) -> dict:
    """Block sizes and warps. GPU: untuned starting points from the Triton FA2 tutorial, smaller tiles for D=128
    (register pressure of the fp32 accumulators). Interpreter: its cost grows with the number of tile iterations,
    not their size, so big tiles. `blocks` overrides any entry (tests force small tiles to reach the edge cases)."""
    block_d = max(16, triton.next_power_of_2(D))
    if interpreting:
        cfg = dict(fwd_m=64, fwd_n=64, dkdv_m=64, dkdv_n=64, dq_m=64, dq_n=64, warps=4, stages=1)
    elif block_d <= 64:
        cfg = dict(fwd_m=128, fwd_n=64, dkdv_m=32, dkdv_n=64, dq_m=64, dq_n=64, warps=4, stages=3)
    else:
        cfg = dict(fwd_m=128, fwd_n=64, dkdv_m=32, dkdv_n=64, dq_m=64, dq_n=64, warps=8, stages=2)
    cfg["block_d"] = block_d
    return cfg | (blocks or {})


def _unit_d(t: torch.Tensor) -> torch.Tensor:
    # The kernels index D with stride 1; any other head-dim stride is copied (see module docstring).
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q, k, causal, window, scale, cu_seqlens, max_seqlen, blocks):
    B, T, H, D = q.shape
    window = None if window is not None and window >= T - 1 else window  # reaches back to key 0 anyway
    varlen = cu_seqlens is not None
    if varlen and max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync
    return dict(
        B=B, T=T, H=H, D=D, G=H // k.shape[2], num_seqs=cu_seqlens.numel() - 1 if varlen else B,
        max_len=max_seqlen if varlen else T, scale=D**-0.5 if scale is None else float(scale),
        causal=bool(causal), window=window, varlen=varlen, cfg=_config(D, _dispatch.interpreting(), blocks),
        upcast=_dispatch.interpreting(), precision="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _attention_fwd(q, k, v, cu_seqlens, a) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, T, H, D) in q's dtype, lse (B, H, T) fp32 in log2 units."""
    B, T, H, D, cfg = a["B"], a["T"], a["H"], a["D"], a["cfg"]
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if B * T * H == 0:
        return o, lse
    grid = (triton.cdiv(a["max_len"], cfg["fwd_m"]), a["num_seqs"] * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), T, H,
        a["scale"] * LOG2E, a["window"] or 0,
        GROUP=a["G"], CAUSAL=a["causal"], HAS_WINDOW=a["window"] is not None, VARLEN=a["varlen"],
        UPCAST=a["upcast"], HEAD_DIM=D, BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], BLOCK_D=cfg["block_d"],
        PRECISION=a["precision"], num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return o, lse


def _attention_bwd(do, q, k, v, o, lse, cu_seqlens, a):
    B, T, H, D, cfg = a["B"], a["T"], a["H"], a["D"], a["cfg"]
    Hkv = k.shape[2]
    dq = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, T, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, T, Hkv, D), dtype=v.dtype, device=v.device)
    if B * T * H == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, 64), B * H)](
        o, do, delta, *_strides3(o), *_strides3(do), T, H, HEAD_DIM=D, BLOCK_M=64, BLOCK_D=cfg["block_d"],
    )
    consts = dict(GROUP=a["G"], CAUSAL=a["causal"], HAS_WINDOW=a["window"] is not None, VARLEN=a["varlen"],
                  UPCAST=a["upcast"], HEAD_DIM=D, BLOCK_D=cfg["block_d"], PRECISION=a["precision"],
                  num_warps=cfg["warps"], num_stages=cfg["stages"])
    qk_scale, window = a["scale"] * LOG2E, a["window"] or 0
    _attn_bwd_dkdv_kernel[(triton.cdiv(a["max_len"], cfg["dkdv_n"]), a["num_seqs"] * Hkv)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do),
        *_strides3(dk), *_strides3(dv), T, H, Hkv, qk_scale, a["scale"], window,
        BLOCK_M=cfg["dkdv_m"], BLOCK_N=cfg["dkdv_n"], **consts,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(a["max_len"], cfg["dq_m"]), a["num_seqs"] * H)](
        q, k, v, do, lse, delta, dq, cu_seqlens, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do),
        *_strides3(dq), T, H, qk_scale, a["scale"], window, BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], **consts,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, cu_seqlens, max_seqlen, blocks):
        q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
        a = _common(q, k, causal, window, scale, cu_seqlens, max_seqlen, blocks)
        o, lse = _attention_fwd(q, k, v, cu_seqlens, a)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.a = a
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(_unit_d(do), q, k, v, o, lse, cu_seqlens, ctx.a)
        return dq, dk, dv, None, None, None, None, None, None


# --------------------------------------------------------------------------------------- the other backends


@functools.cache
def _flash_attn() -> tuple[str, object] | None:
    """The best importable flash_attn package, probed once at first use: ("fa3" | "fa2" | "fa4", module)."""
    for name, module in (("fa3", "flash_attn_interface"), ("fa2", "flash_attn"), ("fa4", "flash_attn.cute")):
        try:
            return name, importlib.import_module(module)
        except Exception:  # ImportError, or a wheel built for another torch/CUDA failing at load
            continue
    return None


def _attention_flash_attn(name, fa, q, k, v, causal, window, scale, cu_seqlens, max_seqlen):
    """Call flash_attn with our conventions. All three take (B, T, H, D) and GQA natively; window_size is
    (left, right) with -1 = unlimited in FA2/FA3 and None = unlimited in FA4. Varlen (FA2/FA3 only: FA4's varlen
    signature has moved between releases, so `attention` sends FA4 varlen calls to our kernel) takes
    (total, H, D) and positional cu_seqlens_q/k, max_seqlen_q/k."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    if name == "fa4":
        ws = (window, 0) if window is not None else (None, None)
    else:
        ws = (window, 0) if window is not None else (-1, -1)
    kw = dict(softmax_scale=scale, causal=causal, window_size=ws)
    if cu_seqlens is None:
        out = fa.flash_attn_func(q, k, v, **kw)
    else:
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out = fa.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
        return (out[0] if isinstance(out, tuple) else out).unsqueeze(0)
    return out[0] if isinstance(out, tuple) else out  # FA3 and FA4 return (out, lse) in some versions


def _attention_sdpa(q, k, v, causal, window, scale, cu_seqlens):
    """torch SDPA in (B, H, T, D) views. Plain causal uses is_causal; a window or documents need an explicit mask
    (SDPA then runs its math or memory-efficient kernel)."""
    T = q.shape[1]
    if window is not None and window >= T - 1:
        window = None
    mask = None
    if window is not None or cu_seqlens is not None:
        mask = _allowed(T, causal, window, cu_seqlens, q.device)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal and mask is None, scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int | None = None,
              scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention, q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D) (see module docstring)."""
    _check(q, k, v, causal, window, cu_seqlens)
    tensors = (q, k, v) if cu_seqlens is None else (q, k, v, cu_seqlens)
    mode = _dispatch.mode()
    if mode == "ref":
        _dispatch.record("attention", "ref")
        return attention_ref(q, k, v, causal, window, scale, cu_seqlens, max_seqlen)
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto" and on_cuda and q.dtype != torch.float32 and q.shape[-1] <= 256:
        fa = _flash_attn()
        if fa is not None and not (fa[0] == "fa4" and cu_seqlens is not None):
            _dispatch.record("attention", fa[0])
            return _attention_flash_attn(*fa, q, k, v, causal, window, scale, cu_seqlens, max_seqlen)
    if mode == "triton" or (on_cuda and _dispatch.HAS_TRITON):
        _dispatch.use_triton("attention", *tensors)  # "triton" mode: raises without triton / CUDA / interpreter
        return _FlashAttention.apply(q, k, v, causal, window, scale, cu_seqlens, max_seqlen, None)
    _dispatch.record("attention", "sdpa")
    return _attention_sdpa(q, k, v, causal, window, scale, cu_seqlens)
