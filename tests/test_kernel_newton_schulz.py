"""newton_schulz: the Triton kernel against its twin, newton_schulz_ref.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py), whose cost grows with the number of
programs, so the matrices are small (≤ 96 on a side, K ≤ 2; 150 in the one-launch gram test) but still span
several 32-wide tiles, ragged edges and mirrored tiles of the symmetric path. bf16 on CPU is checked against fp32 (the kernel upcasts its tiles under
the interpreter); the d20 shapes in bf16 are `gpu` tests.
"""

import importlib

import pytest
import torch

import kernels as K
from kernels.newton_schulz import newton_schulz, newton_schulz_ref
from tests.tolerances import assert_close

ns = importlib.import_module("kernels.newton_schulz")  # the module: `kernels.newton_schulz` is also the op's name

COEFFS = ["quintic", "polar_express"]
# What the twin gives for a random Gaussian G after 5 steps (fp32, the shapes below): quintic leaves singular
# values in about [0.68, 1.20] (the classic coefficients trade exactness for speed), Polar Express in [0.86, 1.14].
SV_RANGE = {"quintic": (0.6, 1.25), "polar_express": (0.8, 1.2)}


def run_kernel(G, use_symmetry=ns.USE_SYMMETRY, **kw):
    """The Triton path with the symmetric-tile trick on or off (the public op uses ns.USE_SYMMETRY)."""
    args = dict(steps=5, coeffs="polar_express", eps=1e-7, compute_dtype=torch.float32) | kw
    return ns._newton_schulz_triton(G, args["steps"], args["coeffs"], args["eps"], args["compute_dtype"],
                                    use_symmetry)


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("coeffs", COEFFS)
@pytest.mark.parametrize("shape", [(40, 72), (72, 40), (33, 33), (17, 33), (1, 16), (16, 1), (2, 24, 40)])
def test_public_op_matches_twin_fp32(shape, coeffs):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with K.backend("triton"):
        X = newton_schulz(G, coeffs=coeffs)
    assert K.which("newton_schulz") == "triton"
    assert X.shape == G.shape and X.dtype == G.dtype
    assert_close(X, newton_schulz_ref(G, coeffs=coeffs), scale=4)


@pytest.mark.parametrize("use_symmetry", [False, True])
@pytest.mark.parametrize("shape, coeffs", [((33, 70), "quintic"), ((70, 33), "polar_express"),
                                           ((2, 17, 40), "polar_express")])
def test_symmetry_on_and_off(shape, coeffs, use_symmetry):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    X = run_kernel(G, use_symmetry, coeffs=coeffs)
    assert_close(X, newton_schulz_ref(G, coeffs=coeffs), scale=4)


@pytest.mark.parametrize("use_symmetry", [False, True])
def test_gram_and_square_kernels(use_symmetry):
    # One launch each, on a 5×5 grid of 32-tiles with a ragged last tile: the lower-triangle index map
    # t -> (i, j) and the transposed mirror store must cover every tile exactly once.
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(2, 150, 20, generator=gen)
    A = torch.full((2, 150, 150), float("nan"))
    ns._matmul(X, X.mT, A, is_symmetric=use_symmetry)
    assert_close(A, X @ X.mT, scale=10)
    B = torch.full_like(A, float("nan"))
    ns._matmul(A, A, B, R=A, alpha=0.5, beta=-2.0, is_symmetric=use_symmetry)
    assert_close(B, 0.5 * (A @ A) - 2.0 * A, scale=10)


def test_steps_and_layouts():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(80, 40, generator=gen)[::2].mT  # (40, 40) wide view with strides (1, 80): not contiguous
    for steps in (0, 2):
        assert_close(run_kernel(G, steps=steps, coeffs="quintic"), newton_schulz_ref(G, steps, "quintic"))
    Gt = torch.randn(2, 24, 56, generator=gen).mT  # tall batch, transposed strides
    assert_close(run_kernel(Gt), newton_schulz_ref(Gt), scale=4)


@pytest.mark.parametrize("coeffs", COEFFS)
def test_fp16(coeffs):
    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(4)).half()
    X = run_kernel(G, coeffs=coeffs, compute_dtype=torch.float16)
    assert X.dtype == torch.float16
    assert_close(X, newton_schulz_ref(G, coeffs=coeffs, compute_dtype=torch.float16), scale=4)


@pytest.mark.parametrize("coeffs", COEFFS)
def test_bf16_no_worse_than_twin(coeffs):
    # Elementwise bf16 comparisons are noise; instead both bf16 paths are measured against the fp32 twin.
    G = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))
    ref32 = newton_schulz_ref(G, coeffs=coeffs)
    X = run_kernel(G.bfloat16(), coeffs=coeffs, compute_dtype=torch.bfloat16)
    twin = newton_schulz_ref(G.bfloat16(), coeffs=coeffs, compute_dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16
    assert rel_err(X, ref32) <= 2 * rel_err(twin, ref32) + 0.01


@pytest.mark.parametrize("coeffs", COEFFS)
def test_singular_values_near_one(coeffs):
    G = torch.randn(40, 96, generator=torch.Generator().manual_seed(6))
    s = torch.linalg.svdvals(run_kernel(G, coeffs=coeffs))
    s_ref = torch.linalg.svdvals(newton_schulz_ref(G, coeffs=coeffs))
    lo, hi = SV_RANGE[coeffs]
    assert lo <= s.min() and s.max() <= hi
    assert_close(s, s_ref, scale=10)


def test_rejects_bad_input():
    with K.backend("triton"):
        with pytest.raises(ValueError, match="shape"):
            newton_schulz(torch.randn(2, 2, 3, 4))
        with pytest.raises(ValueError, match="coeffs"):
            newton_schulz(torch.randn(8, 16), coeffs="cubic")
        with pytest.raises(ValueError, match="polar_express"):
            newton_schulz(torch.randn(8, 16), steps=6)


# --- GPU: bf16 at the d20 stack shapes (width 1280, MLP 5120) ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("use_symmetry", [False, True])
@pytest.mark.parametrize("coeffs", COEFFS)
@pytest.mark.parametrize("shape", [(4, 1280, 1280), (4, 5120, 1280), (4, 1280, 5120)])
def test_gpu_bf16_d20(shape, coeffs, use_symmetry):
    G = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    ref32 = newton_schulz_ref(G, coeffs=coeffs)
    twin = newton_schulz_ref(G.bfloat16(), coeffs=coeffs, compute_dtype=torch.bfloat16)
    X = run_kernel(G.bfloat16(), use_symmetry, coeffs=coeffs, compute_dtype=torch.bfloat16)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    assert rel_err(X, ref32) <= 2 * rel_err(twin, ref32) + 0.01
    # A random square G has singular values near 0 that 5 steps cannot lift (the twin's neither), so the property
    # is checked on the bulk (median) and on the top, where bf16 iterates may overshoot the twin's a little.
    s, s_twin = torch.linalg.svdvals(X[0].float()), torch.linalg.svdvals(twin[0].float())
    lo, hi = SV_RANGE[coeffs]
    assert lo <= s.median() <= hi
    assert s.max() <= s_twin.max() + 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("use_symmetry", [False, True])
def test_gpu_fp32_and_public_op(use_symmetry):
    G = torch.randn(3, 640, 1280 + 7, device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    ref = newton_schulz_ref(G)
    assert_close(run_kernel(G, use_symmetry), ref, scale=20)  # IEEE fp32 dots vs cuBLAS: summation order only
    assert_close(newton_schulz(G.mT), newton_schulz_ref(G.mT), scale=20)
    assert K.which("newton_schulz") == "triton"
