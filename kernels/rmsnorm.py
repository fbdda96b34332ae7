"""RMSNorm over the last dimension, weightless or weighted: y = x / sqrt(mean(x^2) + eps) * w.

x: (..., C) fp32/fp16/bf16, any C >= 1; weight: (C,) fp32/fp16/bf16 or None. Statistics in fp32; output in x's
dtype; the gradient of weight in weight's dtype.

The Triton path views x as (N, C) rows. It needs a unit stride on the last dim and leading dims that flatten to one
row stride: a row-sliced tensor (x[:, :C] of a wider one) runs in place, but a transposed one (or a last dim with
stride != 1) is first copied with `.contiguous()`/`reshape`, costing one extra read and write of x. The same holds
for the incoming gradient in the backward (autograd's gradient of `y.sum()` is an expanded, stride-0 tensor, so it
is copied).

Kernels (plain pointer arithmetic and masks, no block pointers or tensor descriptors: runs on triton 3.6-3.9):
- forward: one program per tile of BLOCK_R rows x BLOCK_C columns. When C fits one block (C <= 8192) the row
  stays in registers between the sum of squares and the scaling; past that, the row is walked twice in blocks
  (once for the statistic, once to write y). It saves rstd = 1/sqrt(mean(x^2) + eps) (N,) fp32 for the backward.
- backward: with xh = x * rstd and g = dy * w, dx = rstd * (g - xh * mean(g * xh)), dw = sum over rows of dy * xh.
  Weightless: one program per row tile. Weighted: a capped number of programs (8 per SM) stride over the row
  tiles, each keeping its own fp32 partial of dw; torch sums the (programs, C) partials at the end (no atomics,
  deterministic).
Under the Triton interpreter (CPU tests) bf16 arithmetic is wrong, so every load is cast to fp32 first; casts
from fp32 to bf16 truncate there instead of rounding, so bf16 numbers are only meaningful on a GPU.
"""

from __future__ import annotations

import torch

from kernels import _dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # the twin still runs; _dispatch never picks the kernel without triton
    triton = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_C = 8192  # widest row kept whole in registers (fp32, 16 warps: 16 values per thread)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """The plain-torch twin of `rmsnorm` (same signature, fp32 statistics)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd_kernel(
        X, W, Y, RSTD, N, C, stride_x, stride_y, eps,
        HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < N
        rows64 = rows.to(tl.int64)  # N * C can pass 2^31 elements
        x_rows = X + rows64[:, None] * stride_x
        y_rows = Y + rows64[:, None] * stride_y
        cols = tl.arange(0, BLOCK_C)
        if ONE_BLOCK:
            mask = row_mask[:, None] & (cols < C)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
            y = x * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
            tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        else:
            # Accumulate squares elementwise and reduce once at the end: one tree reduction instead of one per block.
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                mask = row_mask[:, None] & (c < C)[None, :]
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += x * x
            rstd = tl.rsqrt(tl.sum(acc, axis=1) / C + eps)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                mask = row_mask[:, None] & (c < C)[None, :]
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                y = x * rstd[:, None]
                if HAS_WEIGHT:
                    y = y * tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
                tl.store(y_rows + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit
    def _rmsnorm_bwd_kernel(
        X, W, DY, DX, RSTD, DW_PARTIAL, N, C, stride_x, stride_dy, stride_dx,
        HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_progs = tl.num_programs(0)
        num_tiles = tl.cdiv(N, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        r = tl.arange(0, BLOCK_R)
        if ONE_BLOCK:
            col_mask = cols < C
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
                dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for tile in range(pid, num_tiles, num_progs):
                rows = tile * BLOCK_R + r
                row_mask = rows < N
                rows64 = rows.to(tl.int64)
                mask = row_mask[:, None] & col_mask[None, :]
                # Padded rows and columns load as 0 (rstd too), so they add nothing to the sums below.
                x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
                xh = x * rstd[:, None]
                if HAS_WEIGHT:
                    g = dy * w[None, :]
                    dw_acc += tl.sum(dy * xh, axis=0)
                else:
                    g = dy
                c1 = tl.sum(g * xh, axis=1) / C
                dx = (g - xh * c1[:, None]) * rstd[:, None]
                tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                tl.store(DW_PARTIAL + pid.to(tl.int64) * C + cols, dw_acc, mask=col_mask)
        else:
            for tile in range(pid, num_tiles, num_progs):
                rows = tile * BLOCK_R + r
                row_mask = rows < N
                rows64 = rows.to(tl.int64)
                rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
                acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):  # pass 1: sum(g * x) per row
                    c = c0 + cols
                    mask = row_mask[:, None] & (c < C)[None, :]
                    x = tl.load(X + rows64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + rows64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
                    if HAS_WEIGHT:
                        dy = dy * tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
                    acc += dy * x
                c1 = tl.sum(acc, axis=1) * rstd / C  # mean(g * xh), xh = x * rstd
                for c0 in range(0, C, BLOCK_C):  # pass 2: dx, and this program's dw partial
                    c = c0 + cols
                    cm = c < C
                    mask = row_mask[:, None] & cm[None, :]
                    x = tl.load(X + rows64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(DY + rows64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
                    xh = x * rstd[:, None]
                    if HAS_WEIGHT:
                        g = dy * tl.load(W + c, mask=cm, other=0.0).to(tl.float32)[None, :]
                    else:
                        g = dy
                    dx = (g - xh * c1[:, None]) * rstd[:, None]
                    tl.store(DX + rows64[:, None] * stride_dx + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                    if HAS_WEIGHT:
                        # The partial row is too wide for registers: read-modify-write this program's own slice
                        # (zeroed by the host); the barrier orders the write before the next tile's read.
                        p = DW_PARTIAL + pid.to(tl.int64) * C + c
                        tl.store(p, tl.load(p, mask=cm, other=0.0) + tl.sum(dy * xh, axis=0), mask=cm)
                        tl.debug_barrier()


def _blocks(C: int, interpreting: bool, block_c: int | None, block_r: int | None) -> tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_C, ONE_BLOCK, num_warps). On a GPU a tile holds ~2k elements (one row of a d20 model); the
    interpreter's cost grows with the number of programs, not their width, so there tiles are much taller."""
    if block_c is None:
        block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    if block_r is None:
        budget = 16384 if interpreting else 2048
        block_r = max(1, min(budget // block_c, 128 if interpreting else 16))
    num_warps = max(1, min(16, block_r * block_c // 256))
    return block_r, block_c, block_c >= C, num_warps


def _num_programs(num_tiles: int, has_weight: bool, device: torch.device) -> int:
    """Backward grid. Weightless: one program per tile, like the forward. Weighted: each program writes a (C,) fp32
    dw partial, so cap the grid at 8 programs per SM (enough 8-warp programs in flight to saturate HBM) and let
    each stride over several tiles; the partials (written, then read by the sum) then add under a tenth to the
    d20 backward's traffic."""
    if not has_weight:
        return num_tiles
    if device.type == "cuda":
        return min(num_tiles, 8 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(num_tiles, 4)


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """t as (N, C) rows with unit column stride; copies only when no such view exists (see module docstring)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, C)


def _check(x: torch.Tensor, weight: torch.Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rmsnorm: x must be (..., C) with C >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"rmsnorm: x must be fp32/fp16/bf16, got {x.dtype}")
    if weight is not None:
        if weight.shape != (x.shape[-1],):
            raise ValueError(f"rmsnorm: weight must be (C,) = ({x.shape[-1]},), got {tuple(weight.shape)}")
        if weight.dtype not in _DTYPES:
            raise TypeError(f"rmsnorm: weight must be fp32/fp16/bf16, got {weight.dtype}")
        if weight.device != x.device:
            raise ValueError(f"rmsnorm: x is on {x.device} but weight is on {weight.device}")


def _rmsnorm_fwd(x2d: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 block_c: int | None = None, block_r: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on x2d: (N, C) with unit column stride. Returns y (N, C) contiguous and rstd (N,) fp32."""
    N, C = x2d.shape
    y = torch.empty((N, C), dtype=x2d.dtype, device=x2d.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x2d.device)
    if N == 0:
        return y, rstd
    block_r, block_c, one_block, num_warps = _blocks(C, _dispatch.interpreting(), block_c, block_r)
    _rmsnorm_fwd_kernel[(triton.cdiv(N, block_r),)](
        x2d, weight, y, rstd, N, C, x2d.stride(0), y.stride(0), eps,
        HAS_WEIGHT=weight is not None, BLOCK_R=block_r, BLOCK_C=block_c, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    return y, rstd


def _rmsnorm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                 block_c: int | None = None, block_r: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward. Returns dx (N, C) in x's dtype and dw (C,) in weight's dtype (None when weightless)."""
    N, C = x2d.shape
    dx = torch.empty((N, C), dtype=x2d.dtype, device=x2d.device)
    if N == 0:
        return dx, None if weight is None else torch.zeros_like(weight)
    block_r, block_c, one_block, num_warps = _blocks(C, _dispatch.interpreting(), block_c, block_r)
    num_progs = _num_programs(triton.cdiv(N, block_r), weight is not None, x2d.device)
    partial = None
    if weight is not None:  # multi-block programs add into their slice, so it must start at zero
        alloc = torch.empty if one_block else torch.zeros
        partial = alloc((num_progs, C), dtype=torch.float32, device=x2d.device)
    _rmsnorm_bwd_kernel[(num_progs,)](
        x2d, weight, dy2d, dx, rstd, partial, N, C, x2d.stride(0), dy2d.stride(0), dx.stride(0),
        HAS_WEIGHT=weight is not None, BLOCK_R=block_r, BLOCK_C=block_c, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    dw = None if weight is None else partial.sum(0).to(weight.dtype)
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        C = x.shape[-1]
        x2d = _rows(x, C)
        w = None if weight is None else weight.contiguous()  # (C,): a copy here is negligible
        y, rstd = _rmsnorm_fwd(x2d, w, eps)
        ctx.save_for_backward(x2d, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, w, rstd = ctx.saved_tensors
        dx, dw = _rmsnorm_bwd(_rows(dy, x2d.shape[1]), x2d, w, rstd)
        return dx.view(ctx.x_shape), dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x (see module docstring for shapes, dtypes and when x is copied)."""
    tensors = (x,) if weight is None else (x, weight)
    if _dispatch.use_triton("rmsnorm", *tensors):
        _check(x, weight)
        return _RMSNorm.apply(x, weight, float(eps))
    return rmsnorm_ref(x, weight, eps)
