"""RMSNorm over the last dimension, weightless or weighted: y = x / sqrt(mean(x^2) + eps) * w.

x: (..., C) fp32/fp16/bf16, any C; weight: (C,) or None. Statistics in fp32; output in x's dtype.
"""

from __future__ import annotations

import torch

from kernels import _dispatch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """The plain-torch twin of `rmsnorm` (same signature, fp32 statistics)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x (see module docstring)."""
    tensors = (x,) if weight is None else (x, weight)
    if _dispatch.use_triton("rmsnorm", *tensors):
        raise NotImplementedError("rmsnorm: the Triton kernel is being written (issue 3)")
    return rmsnorm_ref(x, weight, eps)
