"""QK-norm + rotary + scale in one op: for q and k, RMSNorm over the head dim (weightless), rotary embedding
(half-split: pairs (i, i + D/2)), then multiply by `scale` (nanochat: 1.2 on both, so 1.44 on the logits).

q: (..., T, H, D), k: (..., T, Hkv, D), same leading dims, D even; cos, sin: (T, D/2) (the angle of each position
and frequency; a (N, H, D) input with (N, D/2) tables serves per-token positions at inference). Rotation
convention as nanochat: y1 = x1·cos + x2·sin, y2 = −x1·sin + x2·cos (a rotation by −θ). The weightless RMSNorm
commutes with the rotation (rotations keep the norm), so the order of the two does not change the result.
Statistics and rotation in fp32; outputs in the inputs' dtype.

The Triton path (`qk_norm_rope` on CUDA tensors, see kernels/_dispatch.py):
- dtypes: q and k fp32/fp16/bf16 (the same one); cos/sin any float dtype (read as fp32). Any H and Hkv (GQA
  needs no special case: every head row is normalised and rotated on its own), any even D (D/2 need not be a
  power of two: the column block is padded to one and masked).
- One launch per direction covers both q and k: the grid is (row blocks of q) + (row blocks of k), a row being
  one (token, head) vector of D elements; a row block is BLOCK_R such rows. Forward reads x once and writes y
  once; backward recomputes the row statistics from the saved inputs (no rstd tensor is stored) and reads x and
  dy, writes dx.
- Strided inputs need no copy: q/k (and the incoming gradients) are read through their (batch, T, head, D)
  strides, so slices of a fused qkv projection viewed as (B, T, H, D) work as they are. The one copy happens when
  the leading dims `...` cannot be flattened into one by a view (`reshape` then copies). Outputs and input
  gradients are new contiguous tensors. The saved q/k keep the storage they view alive until backward.
- Limits: at most 2**31 - 1 rows (tokens × heads) per tensor (row indices are int32; element offsets are int64).
"""

from __future__ import annotations

import torch

from kernels import _dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the twin; the kernels below are then never defined or launched
    triton = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rope_norm_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    d = xf.shape[-1] // 2
    x1, x2 = xf[..., :d], xf[..., d:]
    c = cos.float().unsqueeze(-2)  # (T, 1, D/2): broadcast over heads
    s = sin.float().unsqueeze(-2)
    y = torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)
    return (y * scale).to(x.dtype)


def qk_norm_rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch twin of `qk_norm_rope`."""
    return _rope_norm_ref(q, cos, sin, scale, eps), _rope_norm_ref(k, cos, sin, scale, eps)


if triton is not None:

    @triton.jit
    def _row_offsets(row0, num_rows, T, NH, s_b, s_t, s_h, BLOCK_R: tl.constexpr):
        # Row r of a (M, T, NH, D) tensor is (m, t, h) = (r // (T·NH), (r // NH) % T, r % NH): the flat index of a
        # contiguous layout, but the address comes from the strides, so strided views are read in place.
        rows = row0 + tl.arange(0, BLOCK_R)
        h = rows % NH
        t = (rows // NH) % T
        m = rows // (NH * T)
        # int64 before the multiply: batch stride × batch index overflows int32 on large fused-qkv views.
        offs = m.to(tl.int64) * s_b + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h
        return rows, t, offs, rows < num_rows

    @triton.jit
    def _load_half_pair(X, offs, s_d, cols, mask, HALF: tl.constexpr):
        # The two halves of each row as fp32 (the interpreter does bf16 arithmetic wrongly, so upcast at once).
        x1 = tl.load(X + offs[:, None] + cols[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs[:, None] + (cols[None, :] + HALF) * s_d, mask=mask, other=0.0).to(tl.float32)
        return x1, x2

    @triton.jit
    def _load_cos_sin(COS, SIN, t, sc_t, sc_d, ss_t, ss_d, cols, mask):
        # Tables are (T, D/2) and small (T·D/2 values): they stay in L2 across the heads of a token.
        c = tl.load(COS + t[:, None] * sc_t + cols[None, :] * sc_d, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + t[:, None] * ss_t + cols[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32)
        return c, s

    @triton.jit
    def _fwd_rows(X, Y, COS, SIN, row0, num_rows, T, NH, s_b, s_t, s_h, s_d, sc_t, sc_d, ss_t, ss_d, scale, eps,
                  HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
        rows, t, offs, row_ok = _row_offsets(row0, num_rows, T, NH, s_b, s_t, s_h, BLOCK_R)
        cols = tl.arange(0, BLOCK_HALF)
        mask = row_ok[:, None] & (cols[None, :] < HALF)
        x1, x2 = _load_half_pair(X, offs, s_d, cols, mask, HALF)
        c, s = _load_cos_sin(COS, SIN, t, sc_t, sc_d, ss_t, ss_d, cols, mask)
        # Masked columns load as 0, so the sums only see the D real values; divide by D, not the padded width.
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        n1 = x1 * rstd[:, None]
        n2 = x2 * rstd[:, None]
        y1 = (n1 * c + n2 * s) * scale
        y2 = (n2 * c - n1 * s) * scale
        out = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]  # Y is contiguous (M, T, NH, D)
        tl.store(Y + out, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + out + HALF, y2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_rows(X, DY, DX, COS, SIN, row0, num_rows, T, NH, s_b, s_t, s_h, s_d, g_b, g_t, g_h, g_d,
                  sc_t, sc_d, ss_t, ss_d, scale, eps,
                  HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
        rows, t, x_offs, row_ok = _row_offsets(row0, num_rows, T, NH, s_b, s_t, s_h, BLOCK_R)
        _, _, g_offs, _ = _row_offsets(row0, num_rows, T, NH, g_b, g_t, g_h, BLOCK_R)
        cols = tl.arange(0, BLOCK_HALF)
        mask = row_ok[:, None] & (cols[None, :] < HALF)
        x1, x2 = _load_half_pair(X, x_offs, s_d, cols, mask, HALF)
        g1, g2 = _load_half_pair(DY, g_offs, g_d, cols, mask, HALF)
        c, s = _load_cos_sin(COS, SIN, t, sc_t, sc_d, ss_t, ss_d, cols, mask)
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        n1 = x1 * rstd[:, None]
        n2 = x2 * rstd[:, None]
        # Through the scale and the transposed rotation (y1 = n1·c + n2·s, y2 = n2·c − n1·s):
        g1 = g1 * scale
        g2 = g2 * scale
        dn1 = g1 * c - g2 * s
        dn2 = g1 * s + g2 * c
        # Through the RMSNorm n = x·rstd: dx = rstd·(dn − n·mean(dn·n)).
        dot = (tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / (2 * HALF)
        dx1 = (dn1 - n1 * dot[:, None]) * rstd[:, None]
        dx2 = (dn2 - n2 * dot[:, None]) * rstd[:, None]
        out = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]  # DX is contiguous (M, T, NH, D)
        tl.store(DX + out, dx1.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + out + HALF, dx2.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_fwd_kernel(Q, K, YQ, YK, COS, SIN, num_q_rows, num_k_rows, T, H, HKV,
                                 sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sc_t, sc_d, ss_t, ss_d, scale, eps,
                                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # One grid over the row blocks of q, then those of k: one launch for both (and no idle tail per tensor).
        pid = tl.program_id(0)
        num_q_blocks = tl.cdiv(num_q_rows, BLOCK_R)
        if pid < num_q_blocks:
            _fwd_rows(Q, YQ, COS, SIN, pid * BLOCK_R, num_q_rows, T, H, sq_b, sq_t, sq_h, sq_d,
                      sc_t, sc_d, ss_t, ss_d, scale, eps, HALF, BLOCK_R, BLOCK_HALF)
        else:
            _fwd_rows(K, YK, COS, SIN, (pid - num_q_blocks) * BLOCK_R, num_k_rows, T, HKV, sk_b, sk_t, sk_h, sk_d,
                      sc_t, sc_d, ss_t, ss_d, scale, eps, HALF, BLOCK_R, BLOCK_HALF)

    @triton.jit
    def _qk_norm_rope_bwd_kernel(Q, K, DYQ, DYK, DQ, DK, COS, SIN, num_q_rows, num_k_rows, T, H, HKV,
                                 sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
                                 gq_b, gq_t, gq_h, gq_d, gk_b, gk_t, gk_h, gk_d,
                                 sc_t, sc_d, ss_t, ss_d, scale, eps,
                                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr):
        pid = tl.program_id(0)
        num_q_blocks = tl.cdiv(num_q_rows, BLOCK_R)
        if pid < num_q_blocks:
            _bwd_rows(Q, DYQ, DQ, COS, SIN, pid * BLOCK_R, num_q_rows, T, H, sq_b, sq_t, sq_h, sq_d,
                      gq_b, gq_t, gq_h, gq_d, sc_t, sc_d, ss_t, ss_d, scale, eps, HALF, BLOCK_R, BLOCK_HALF)
        else:
            _bwd_rows(K, DYK, DK, COS, SIN, (pid - num_q_blocks) * BLOCK_R, num_k_rows, T, HKV,
                      sk_b, sk_t, sk_h, sk_d, gk_b, gk_t, gk_h, gk_d,
                      sc_t, sc_d, ss_t, ss_d, scale, eps, HALF, BLOCK_R, BLOCK_HALF)


def _blocks(D: int) -> tuple[int, int]:
    # BLOCK_R rows × next_pow2(D/2) columns per half: 2048 elements per tile keeps the fwd/bwd live tiles
    # (x1, x2, dy1, dy2, cos, sin) in registers at 4 warps; for D = 128 that is 32 rows (8 KB of bf16 in per tensor).
    block_half = triton.next_power_of_2(D // 2)
    return max(1, min(64, 2048 // block_half)), block_half


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() < 3 or k.dim() != q.dim():
        raise ValueError(f"qk_norm_rope: q (..., T, H, D) and k (..., T, Hkv, D) need the same rank >= 3, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on (..., T) and D")
    T, D = q.shape[-3], q.shape[-1]
    if D % 2:
        raise ValueError(f"qk_norm_rope: head dim D must be even for the half-split rotary, got D={D}")
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"qk_norm_rope: cos and sin must be (T, D/2) = ({T}, {D // 2}), got cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise TypeError(f"qk_norm_rope: q and k must share one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise TypeError(f"qk_norm_rope: cos/sin must be floating point, got {cos.dtype}, {sin.dtype}")
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        devices = [str(t.device) for t in (q, k, cos, sin)]
        raise ValueError(f"qk_norm_rope: q, k, cos, sin must be on one device, got {devices}")
    for name, x in (("q", q), ("k", k)):
        if x.shape[:-1].numel() >= 2**31:
            raise ValueError(f"qk_norm_rope: {name} has {x.shape[:-1].numel()} rows (tokens × heads); the kernel "
                             f"indexes rows in int32, so at most 2**31 - 1")


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    # (..., T, NH, D) -> (M, T, NH, D); a view whenever the leading dims flatten without a copy.
    # M is spelled out, not -1, so empty tensors (T = 0) reshape too.
    return x.reshape(x.shape[:-3].numel(), *x.shape[-3:])


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, scale, eps):
        _check(q, k, cos, sin)
        q4, k4 = _as_4d(q), _as_4d(k)
        M, T, H, D = q4.shape
        HKV = k4.shape[2]
        yq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        yk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        num_q_rows, num_k_rows = M * T * H, M * T * HKV
        block_r, block_half = _blocks(D)
        grid = (triton.cdiv(num_q_rows, block_r) + triton.cdiv(num_k_rows, block_r),)
        if grid[0] > 0:
            _qk_norm_rope_fwd_kernel[grid](
                q4, k4, yq, yk, cos, sin, num_q_rows, num_k_rows, T, H, HKV,
                *q4.stride(), *k4.stride(), *cos.stride(), *sin.stride(), float(scale), float(eps),
                HALF=D // 2, BLOCK_R=block_r, BLOCK_HALF=block_half, num_warps=4,
            )
        ctx.save_for_backward(q4, k4, cos, sin)
        ctx.scale, ctx.eps = float(scale), float(eps)
        ctx.shapes = (q.shape, k.shape)
        return yq, yk

    @staticmethod
    def backward(ctx, dyq, dyk):
        # Autograd materialises a missing output gradient as zeros, so both are tensors here.
        q4, k4, cos, sin = ctx.saved_tensors
        M, T, H, D = q4.shape
        HKV = k4.shape[2]
        dyq4, dyk4 = _as_4d(dyq), _as_4d(dyk)  # may be strided (e.g. through a transpose); read in place
        dq = torch.empty(ctx.shapes[0], dtype=q4.dtype, device=q4.device)
        dk = torch.empty(ctx.shapes[1], dtype=k4.dtype, device=k4.device)
        num_q_rows, num_k_rows = M * T * H, M * T * HKV
        block_r, block_half = _blocks(D)
        grid = (triton.cdiv(num_q_rows, block_r) + triton.cdiv(num_k_rows, block_r),)
        if grid[0] > 0:
            _qk_norm_rope_bwd_kernel[grid](
                q4, k4, dyq4, dyk4, dq, dk, cos, sin, num_q_rows, num_k_rows, T, H, HKV,
                *q4.stride(), *k4.stride(), *dyq4.stride(), *dyk4.stride(), *cos.stride(), *sin.stride(),
                ctx.scale, ctx.eps, HALF=D // 2, BLOCK_R=block_r, BLOCK_HALF=block_half, num_warps=4,
            )
        return dq, dk, None, None, None, None


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised, rotated and scaled (q, k) (see module docstring); differentiable in q and k, not cos/sin."""
    if _dispatch.use_triton("qk_norm_rope", q, k, cos, sin):
        return _QKNormRope.apply(q, k, cos, sin, scale, eps)
    return qk_norm_rope_ref(q, k, cos, sin, scale, eps)
