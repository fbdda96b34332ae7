"""Orthogonalisation for Muon: X ≈ U Vᵀ of G = U S Vᵀ by quintic Newton-Schulz iterations, batched.

G: (m, n) or (K, m, n), any of fp32/fp16/bf16, any strides; returns the same shape in G's dtype. Each step is
X ← aX + (bA + cA²)X with A = XXᵀ, on the wide orientation (a tall G is transposed first, so A is the smaller
Gram matrix). G is first scaled by its Frobenius norm (×1.01, +eps) so its spectral norm is below 1.
coeffs: "quintic" -- the classic fixed (3.4445, -4.7750, 2.0315), 5 steps; "polar_express" -- the per-step
coefficients of Polar Express (arXiv 2505.16932) as nanochat uses them.
compute_dtype: the dtype of the iterates X, A, B between matmuls (Muon passes bf16 on GPU, as nanochat does);
the Triton kernel accumulates every tl.dot in fp32 and applies the epilogues in fp32 before rounding once.

The Triton path is three launches of one batched-matmul kernel per step, each with a fused epilogue
(wide X: (K, m, n), m ≤ n; A, B: (K, m, m)):
    A = X·Xᵀ              Xᵀ is a stride swap, never a copy
    B = c·(A·A) + b·A      the b·A term is read in the epilogue of A·A
    X' = B·X + a·X         the a·X term is read in the epilogue of B·X; the last step writes G's dtype and layout
A and B are symmetric, so their kernels may compute only the lower-triangular tiles (i ≥ j) and store each
off-diagonal tile twice, the second time transposed: 2m²n + 2m³ of the 4m²n + 2m³ FLOPs of a step become
m²n + m³ (+ a little for the diagonal tiles). `use_symmetry` switches it; its default, USE_SYMMETRY, is the one
bench/test_bench_newton_schulz.py measures best on the GPU -- it is True on FLOP count alone until an H100 run
says otherwise (fewer, uncoalesced-transposed stores and a smaller grid can lose on a small m).
Limits: any m, n ≥ 1 (edges masked); K ≤ 65535 (grid axis 1). Under the Triton interpreter (CPU tests) tiles are
upcast to fp32 before tl.dot, because the interpreter computes bf16 dots wrongly; on the GPU bf16/fp16 tiles go
to the tensor cores as they are, and an fp32 compute_dtype uses IEEE fp32 dots (not TF32) to match the twin.
No autograd: Muon does not differentiate through it.
"""

from __future__ import annotations

import torch

from kernels import _dispatch

if _dispatch.HAS_TRITON:  # a CPU-only install without triton still has the twin
    import triton
    import triton.language as tl

# The default of `use_symmetry` (see the module docstring); the GPU bench decides it.
USE_SYMMETRY = True

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


def _jit(fn):
    # Without triton the kernel is never launched (use_triton answers no), but the module must still import.
    return triton.jit(fn) if _dispatch.HAS_TRITON else fn


@_jit
def _newton_schulz_fwd_kernel(
    P, Q, R, C, M, N, KD, alpha, beta,
    stride_pb, stride_pm, stride_pk, stride_qb, stride_qk, stride_qn,
    stride_rb, stride_rm, stride_rn, stride_cb, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IS_SYMMETRIC: tl.constexpr, HAS_R: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One matmul of a Newton-Schulz step: C[b] = alpha·P[b]Q[b] (+ beta·R[b]); P (M, KD), Q (KD, N), R/C (M, N).

    Grid (tiles, batch). IS_SYMMETRIC: the caller promises C is symmetric (M == N, BLOCK_M == BLOCK_N, R
    symmetric), so program t computes the lower-triangular tile (i, j), i ≥ j, and stores it again, transposed,
    at (j, i).
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # int64: batch·stride passes 2³¹ once a stack holds 2³¹ elements
    if IS_SYMMETRIC:
        # t = i(i+1)/2 + j with 0 ≤ j ≤ i, row-major over the lower triangle (neighbours share P's row panel).
        # fp32 sqrt is exact enough for the few thousand tiles we launch; the two wheres absorb a rounding miss.
        i = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
        i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
        i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
        pid_m = i
        pid_n = pid - i * (i + 1) // 2
    else:
        # Grouped ordering: GROUP_M row panels are swept together so P's panels stay in L2 (Triton's matmul tutorial).
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_in_group = GROUP_M * num_pid_n
        first_m = (pid // num_in_group) * GROUP_M
        group_size = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % num_in_group) % group_size
        pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap around instead of being masked: the loads stay in bounds, the extra
    # results are dropped by the store mask, and the inner loop carries only the K mask (none when EVEN_K).
    p_ptrs = P + batch * stride_pb + (offs_m % M)[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = Q + batch * stride_qb + offs_k[:, None] * stride_qk + (offs_n % N)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KD, BLOCK_K):
        if EVEN_K:
            p = tl.load(p_ptrs)
            q = tl.load(q_ptrs)
        else:
            p = tl.load(p_ptrs, mask=offs_k[None, :] < KD - k0, other=0.0)
            q = tl.load(q_ptrs, mask=offs_k[:, None] < KD - k0, other=0.0)
        if UPCAST:  # interpreter only: it multiplies bf16 bit patterns as integers
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision=INPUT_PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    out = acc * alpha
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_R:
        r_ptrs = R + batch * stride_rb + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        out += beta * tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = out.to(C.dtype.element_ty)  # round once, before the transpose (half the shared memory for it)
    c_base = C + batch * stride_cb
    tl.store(c_base + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out, mask=mask)
    if IS_SYMMETRIC:
        if pid_m != pid_n:  # the mirror tile (j, i); a diagonal tile is already whole
            mirror = c_base + offs_n[:, None] * stride_cm + offs_m[None, :] * stride_cn
            tl.store(mirror, tl.trans(out), mask=(offs_n[:, None] < M) & (offs_m[None, :] < N))


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes and launch options: one config, no autotune (the interpreter would time every candidate)."""
    if _dispatch.interpreting():
        # Small tiles so that the tests' small matrices still span several tiles, edges and mirrored tiles.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    # H100: 128×128 tiles, 3-stage pipeline. fp32 tiles are twice the bytes, so K is halved to stay in shared memory.
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _matmul(
    P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, R: torch.Tensor | None = None,
    alpha: float = 1.0, beta: float = 0.0, is_symmetric: bool = False,
) -> None:
    """C = alpha·P@Q (+ beta·R), batched over dim 0, written into C; P (K, M, KD), Q (K, KD, N), R/C (K, M, N)."""
    num_batch, M, KD = P.shape
    N = Q.shape[2]
    cfg = _config(P.dtype)
    if is_symmetric:
        assert M == N and cfg["BLOCK_M"] == cfg["BLOCK_N"], "a symmetric product needs a square result and tiles"
        t = triton.cdiv(M, cfg["BLOCK_M"])
        num_tiles = t * (t + 1) // 2
    else:
        num_tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    Rt = C if R is None else R  # a valid pointer that HAS_R=False never reads
    _newton_schulz_fwd_kernel[(num_tiles, num_batch)](
        P, Q, Rt, C, M, N, KD, float(alpha), float(beta),
        *P.stride(), *Q.stride(), *Rt.stride(), *C.stride(),
        IS_SYMMETRIC=is_symmetric, HAS_R=R is not None, EVEN_K=KD % cfg["BLOCK_K"] == 0,
        UPCAST=_dispatch.interpreting(), INPUT_PRECISION="ieee" if P.dtype == torch.float32 else "tf32",
        **cfg,
    )


def _newton_schulz_triton(
    G: torch.Tensor, steps: int, coeffs: str, eps: float, compute_dtype: torch.dtype, use_symmetry: bool,
) -> torch.Tensor:
    """The Triton path of `newton_schulz`; `use_symmetry` picks the lower-triangle kernels for A and B."""
    if G.ndim not in (2, 3):
        raise ValueError(f"G must be (m, n) or (K, m, n), got shape {tuple(G.shape)}")
    if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"compute_dtype must be fp32, fp16 or bf16, got {compute_dtype}")
    if not G.dtype.is_floating_point:
        raise ValueError(f"G must be a floating-point tensor, got {G.dtype}")
    ab = coefficients(coeffs, steps)
    G3 = G if G.ndim == 3 else G.unsqueeze(0)
    tall = G3.shape[-2] > G3.shape[-1]
    Xw = G3.to(compute_dtype)
    if tall:
        Xw = Xw.mT  # a view: the wide orientation
    num_batch, m, n = Xw.shape
    out = torch.empty(G3.shape, dtype=G.dtype, device=G.device)
    if out.numel() == 0:
        return out.view(G.shape)
    # The normalisation is the twin's, in compute_dtype; dividing into a contiguous buffer also gives the
    # kernels row-major wide X whatever G's strides were (one pass, instead of a copy and then a division).
    X = torch.empty((num_batch, m, n), dtype=compute_dtype, device=G.device)
    torch.div(Xw, Xw.norm(dim=(-2, -1), keepdim=True) * 1.01 + eps, out=X)
    if not ab:
        out.copy_(X.mT if tall else X)
        return out.view(G.shape)
    X_next = torch.empty_like(X)
    A = torch.empty((num_batch, m, m), dtype=compute_dtype, device=G.device)
    B = torch.empty_like(A)
    out_wide = out.mT if tall else out  # the last step writes G's dtype and layout straight from fp32
    for step, (a, b, c) in enumerate(ab):
        _matmul(X, X.mT, A, is_symmetric=use_symmetry)
        _matmul(A, A, B, R=A, alpha=c, beta=b, is_symmetric=use_symmetry)
        dst = out_wide if step == len(ab) - 1 else X_next
        _matmul(B, X, dst, R=X, beta=a)
        X, X_next = X_next, X
    return out.view(G.shape)


def newton_schulz(
    G: torch.Tensor, steps: int = 5, coeffs: str = "polar_express", eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Batched orthogonalisation (see module docstring)."""
    if _dispatch.use_triton("newton_schulz", G):
        return _newton_schulz_triton(G, steps, coeffs, eps, compute_dtype, USE_SYMMETRY)
    return newton_schulz_ref(G, steps, coeffs, eps, compute_dtype)
