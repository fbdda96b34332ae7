"""qk_norm_rope: the Triton kernel (under the interpreter on CPU) against its twin, forward and backward.

CPU tests use fp32/fp16 at small shapes (the interpreter runs one Python program per row block, so shapes keep the
program count low); bf16 and the model's real shapes are `gpu` tests.
"""

import pytest
import torch

import kernels as K
from kernels.qk_norm_rope import qk_norm_rope_ref
from tests.tolerances import assert_close


def rope_tables(T: int, D: int, dtype=torch.float32, device="cpu", base: float = 100_000.0, offset: int = 0):
    # nanochat's tables: angle[t, i] = t / base**(2i / D), (T, D/2).
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    angle = torch.outer(torch.arange(offset, offset + T, dtype=torch.float32, device=device), inv_freq)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def run_both(q, k, cos, sin, scale, gq=None, gk=None):
    """(outputs, grads) of the kernel and of the twin on the same leaves, with the same upstream gradients."""
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    with K.backend("triton"):
        yq, yk = K.qk_norm_rope(q, k, cos, sin, scale)
    assert K.which("qk_norm_rope") == "triton"
    rq, rk = qk_norm_rope_ref(q, k, cos, sin, scale)
    gq = torch.randn_like(rq) if gq is None else gq
    gk = torch.randn_like(rk) if gk is None else gk
    got = torch.autograd.grad((yq, yk), (q, k), (gq, gk))
    want = torch.autograd.grad((rq, rk), (q, k), (gq, gk))
    return (yq, yk, *got), (rq, rk, *want)


def check(got, want, dtype):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, dtype)


# (batch dims, T, H, Hkv, D): odd T, GQA ratios 1/2/4, no/one/two batch dims, D/2 not a power of two (D = 20).
SHAPES = [
    ((2,), 1, 4, 4, 16),
    ((2,), 7, 4, 2, 64),
    ((1,), 123, 4, 1, 16),
    ((), 1000, 2, 1, 16),
    ((2, 3), 7, 2, 2, 20),
    ((1,), 7, 2, 1, 128),
]


def _shape_id(s) -> str:
    return "B" + "x".join(map(str, s[0])) + f"-T{s[1]}-H{s[2]}-Hkv{s[3]}-D{s[4]}"


@pytest.mark.parametrize("scale", [1.0, 1.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_twin(shape, dtype, scale):
    torch.manual_seed(0)
    lead, T, H, HKV, D = shape
    q = torch.randn(*lead, T, H, D, dtype=dtype) * 3
    k = torch.randn(*lead, T, HKV, D, dtype=dtype)
    cos, sin = rope_tables(T, D, dtype)
    check(*run_both(q, k, cos, sin, scale), dtype)


def test_fused_qkv_views_and_strided_everything():
    # q and k as slices of one fused projection output viewed as (B, T, H, D) (row stride (H + 2·Hkv)·D), cos/sin
    # as column slices of a wider table, and upstream gradients read through a transpose.
    torch.manual_seed(1)
    B, T, H, HKV, D = 2, 7, 4, 2, 16
    qkv = torch.randn(B, T, (H + 2 * HKV) * D)
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D : (H + HKV) * D].view(B, T, HKV, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos_wide, sin_wide = (torch.cat([t, t], dim=-1) for t in rope_tables(T, D))
    cos, sin = cos_wide[:, : D // 2], sin_wide[:, D // 2 :]
    gq = torch.randn(B, H, T, D).transpose(1, 2)
    gk = torch.randn(B, HKV, T, D).transpose(1, 2)
    check(*run_both(q, k, cos, sin, 1.2, gq, gk), torch.float32)


def test_head_dim_stride_and_unflattenable_batch_dims():
    # Every other element along D (stride 2), and batch dims (2, 3) that a view cannot flatten (the one copy).
    torch.manual_seed(2)
    T, H, D = 7, 2, 16
    q = torch.randn(2, T, H, 2 * D)[..., ::2]
    k = torch.randn(3, 2, T, H, D).transpose(0, 1)
    q = q.unsqueeze(1).expand(2, 3, T, H, D)  # stride 0 on a batch dim too
    cos, sin = rope_tables(T, D)
    check(*run_both(q, k, cos, sin, 1.0), torch.float32)


@pytest.mark.parametrize("scale", [1.2, -0.5])
def test_rms_of_each_head_is_abs_scale(scale):
    # RMSNorm gives RMS 1, the rotation keeps the norm, so each output head vector has RMS |scale|.
    torch.manual_seed(3)
    T, H, HKV, D = 123, 2, 1, 64
    q, k = torch.randn(2, T, H, D) * 5, torch.randn(2, T, HKV, D) + 2
    cos, sin = rope_tables(T, D)
    with K.backend("triton"):
        yq, yk = K.qk_norm_rope(q, k, cos, sin, scale)
    for y in (yq, yk):
        rms = y.square().mean(dim=-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, abs(scale)), atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_relative_position():
    # The point of rotary: <q_t, k_s> after the op depends on t - s, so shifting both positions changes nothing.
    torch.manual_seed(4)
    T, D = 7, 32
    q, k = torch.randn(1, T, 1, D), torch.randn(1, T, 1, D)
    with K.backend("triton"):
        a = K.qk_norm_rope(q, k, *rope_tables(T, D))
        b = K.qk_norm_rope(q, k, *rope_tables(T, D, offset=500))
    scores = [yq[0, :, 0] @ yk[0, :, 0].T for yq, yk in (a, b)]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)


def test_only_q_used_gives_zero_dk():
    torch.manual_seed(5)
    T, D = 7, 16
    q = torch.randn(2, T, 2, D, requires_grad=True)
    k = torch.randn(2, T, 1, D, requires_grad=True)
    cos, sin = rope_tables(T, D)
    with K.backend("triton"):
        yq, _ = K.qk_norm_rope(q, k, cos, sin, 1.2)
    yq.square().sum().backward()
    dq_kernel, dk_kernel = q.grad, k.grad
    q.grad = None
    qk_norm_rope_ref(q, k, cos, sin, 1.2)[0].square().sum().backward()
    assert_close(dq_kernel, q.grad)
    assert torch.equal(dk_kernel, torch.zeros_like(k))


def test_empty_sequence():
    q, k = torch.randn(2, 0, 2, 16), torch.randn(2, 0, 1, 16)
    cos, sin = rope_tables(0, 16)
    with K.backend("triton"):
        yq, yk = K.qk_norm_rope(q, k, cos, sin)
    assert yq.shape == q.shape and yk.shape == k.shape


def test_ref_backend_runs_the_twin():
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    cos, sin = rope_tables(3, 8)
    with K.backend("ref"):
        yq, yk = K.qk_norm_rope(q, k, cos, sin, 1.2)
    assert K.which("qk_norm_rope") == "ref"
    rq, rk = qk_norm_rope_ref(q, k, cos, sin, 1.2)
    assert torch.equal(yq, rq) and torch.equal(yk, rk)


@pytest.mark.parametrize(
    "q_shape, k_shape, table, dtype_k, error, match",
    [
        ((1, 3, 2, 15), (1, 3, 2, 15), (3, 7), None, ValueError, "must be even"),
        ((1, 3, 2, 16), (1, 3, 2, 16), (4, 8), None, ValueError, r"cos and sin must be \(T, D/2\)"),
        ((1, 3, 2, 16), (1, 3, 2, 8), (3, 8), None, ValueError, "must agree"),
        ((1, 3, 2, 16), (1, 4, 2, 16), (3, 8), None, ValueError, "must agree"),
        ((3, 2, 16), (1, 3, 2, 16), (3, 8), None, ValueError, "same rank"),
        ((1, 3, 2, 16), (1, 3, 2, 16), (3, 8), torch.float16, TypeError, "share one dtype"),
    ],
)
def test_bad_inputs_fail_loudly(q_shape, k_shape, table, dtype_k, error, match):
    q = torch.randn(q_shape)
    k = torch.randn(k_shape, dtype=dtype_k or torch.float32)
    cos, sin = torch.randn(table), torch.randn(table)
    with K.backend("triton"), pytest.raises(error, match=match):
        K.qk_norm_rope(q, k, cos, sin)


# ---- GPU: bf16 at the model's shapes (d20: H = 10, D = 128; GQA with Hkv = 5), fused-qkv views. ----


@pytest.mark.gpu
@pytest.mark.parametrize("HKV", [10, 5])
def test_gpu_bf16_real_shapes(HKV):
    torch.manual_seed(0)
    B, T, H, D = 8, 2048, 10, 128
    qkv = torch.randn(B, T, (H + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D : (H + HKV) * D].view(B, T, HKV, D)
    cos, sin = rope_tables(T, D, torch.bfloat16, "cuda")
    got, want = run_both(q, k, cos, sin, 1.2)
    check(got, want, torch.bfloat16)
    # And against the fp32 twin on the same bf16 inputs: the kernel's error is one bf16 rounding of the output.
    q32, k32 = q.float().requires_grad_(), k.float().requires_grad_()
    rq, rk = qk_norm_rope_ref(q32, k32, cos, sin, 1.2)
    for a, b in zip(got[:2], (rq, rk), strict=True):
        assert_close(a.float(), b.detach(), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_rms_is_scale_bf16():
    T, H, D = 2048, 10, 128
    q = torch.randn(8, T, H, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_tables(T, D, torch.bfloat16, "cuda")
    yq, yk = K.qk_norm_rope(q, q, cos, sin, 1.2)  # auto backend: the kernel on CUDA
    assert K.which("qk_norm_rope") == "triton"
    rms = yq.float().square().mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 1.2), atol=2e-2, rtol=2e-2)
