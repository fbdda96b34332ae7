"""QK-norm + rotary + scale in one op: for q and k, RMSNorm over the head dim (weightless), rotary embedding
(half-split: pairs (i, i + D/2)), then multiply by `scale` (nanochat: 1.2 on both, so 1.44 on the logits).

q: (..., T, H, D), k: (..., T, Hkv, D), same leading dims, D even; cos, sin: (T, D/2) (the angle of each position
and frequency; a (N, H, D) input with (N, D/2) tables serves per-token positions at inference). Rotation
convention as nanochat: y1 = x1·cos + x2·sin, y2 = −x1·sin + x2·cos (a rotation by −θ). The weightless RMSNorm
commutes with the rotation (rotations keep the norm), so the order of the two does not change the result.
Statistics and rotation in fp32; outputs in the inputs' dtype.
"""

from __future__ import annotations

import torch

from kernels import _dispatch


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


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised, rotated and scaled (q, k) (see module docstring)."""
    if _dispatch.use_triton("qk_norm_rope", q, k, cos, sin):
        raise NotImplementedError("qk_norm_rope: the Triton kernel is being written (issue 3)")
    return qk_norm_rope_ref(q, k, cos, sin, scale, eps)
