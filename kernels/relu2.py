"""ReLU² (relu(x) squared), the MLP activation of nanochat's GPT. x: any shape, fp32/fp16/bf16; y in x's dtype.

The Triton path is two fused elementwise kernels over the flattened tensor: forward y = relu(x)^2, backward
dx = dy * 2 * relu(x) (one read of x and dy, one write of dx; autograd saves x, not y). Math in fp32: every load
is cast to fp32 first, which the Triton interpreter needs (its bf16 arithmetic is wrong; its fp32 -> bf16 casts
truncate instead of rounding, so bf16 is checked on a GPU only). A non-contiguous x (or incoming gradient) is
first copied with `.contiguous()`, one extra read and write. Plain pointer arithmetic: runs on triton 3.6-3.9.
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
BLOCK = 2048  # elements per program: 4 warps x 32 threads x 16 values (two 16-byte vectors of bf16 each)


def relu2_ref(x: torch.Tensor) -> torch.Tensor:
    """The plain-torch twin of `relu2`."""
    return torch.relu(x).square()


if triton is not None:

    @triton.jit
    def _relu2_fwd_kernel(X, Y, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel may pass 2^31
        mask = offs < numel
        x = tl.maximum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        tl.store(Y + offs, (x * x).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _relu2_bwd_kernel(X, DY, DX, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.maximum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, (2.0 * dy * x).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel, *tensors: torch.Tensor) -> None:
    numel = tensors[0].numel()
    if numel:
        kernel[(triton.cdiv(numel, BLOCK),)](*tensors, numel, BLOCK=BLOCK, num_warps=4)


class _ReLU2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        _launch(_relu2_fwd_kernel, x, y)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()  # autograd may hand an expanded (stride-0) gradient
        dx = torch.empty_like(x)
        _launch(_relu2_bwd_kernel, x, dy, dx)
        return dx


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 elementwise (see module docstring)."""
    if _dispatch.use_triton("relu2", x):
        if x.dtype not in _DTYPES:
            raise TypeError(f"relu2: x must be fp32/fp16/bf16, got {x.dtype}")
        return _ReLU2.apply(x)
    return relu2_ref(x)
