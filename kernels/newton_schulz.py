"""Orthogonalisation for Muon: X ≈ U Vᵀ of G = U S Vᵀ by quintic Newton-Schulz iterations, batched.

G: (m, n) or (K, m, n), any of fp32/fp16/bf16; returns the same shape in G's dtype (iterations in bf16 on GPU as
Muon does; the twin computes in `compute_dtype`). Each step is X ← aX + (bA + cA²)X with A = XXᵀ, on the wide
orientation (a tall G is transposed first, so A is the smaller Gram matrix). G is first scaled by its Frobenius
norm (×1.01, +eps) so its spectral norm is below 1.
coeffs: "quintic" -- the classic fixed (3.4445, -4.7750, 2.0315), 5 steps; "polar_express" -- the per-step
coefficients of Polar Express (arXiv 2505.16932) as nanochat uses them.
"""

from __future__ import annotations

import torch

from kernels import _dispatch

QUINTIC = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def coefficients(coeffs: str, steps: int) -> list[tuple[float, float, float]]:
    if coeffs == "quintic":
        return [QUINTIC] * steps
    if coeffs == "polar_express":
        if steps > len(POLAR_EXPRESS):
            raise ValueError(f"polar_express has {len(POLAR_EXPRESS)} steps' coefficients, asked for {steps}")
        return list(POLAR_EXPRESS[:steps])
    raise ValueError(f"coeffs must be 'quintic' or 'polar_express', got {coeffs!r}")


def newton_schulz_ref(
    G: torch.Tensor, steps: int = 5, coeffs: str = "polar_express", eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The plain-torch twin of `newton_schulz`."""
    if G.ndim not in (2, 3):
        raise ValueError(f"G must be (m, n) or (K, m, n), got shape {tuple(G.shape)}")
    X = G.to(compute_dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + eps)
    for a, b, c in coefficients(coeffs, steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def newton_schulz(
    G: torch.Tensor, steps: int = 5, coeffs: str = "polar_express", eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Batched orthogonalisation (see module docstring)."""
    if _dispatch.use_triton("newton_schulz", G):
        raise NotImplementedError("newton_schulz: the Triton kernel is being written (issue 3)")
    return newton_schulz_ref(G, steps, coeffs, eps, compute_dtype)
