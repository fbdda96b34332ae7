"""relu2's Triton kernels against the twin `relu2_ref`: forward and x.grad.

On CPU under the Triton interpreter (tests/conftest.py) in fp32 and fp16: sizes that are not multiples of the
block (1, 7, 123, 1000 rows of odd widths), non-contiguous inputs, exact zeros (relu's kink). bf16 at the MLP
shapes of d20/d26 (B*T = 8*2048 rows, 4*C columns) is a `gpu` test; the kernels are also compiled to sm_90 code here.
"""

import importlib

import pytest
import torch

import kernels as K
from tests.test_kernel_rmsnorm import compile_for_sm90
from tests.tolerances import assert_close

R = importlib.import_module("kernels.relu2")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _compare(x):
    dy = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    with K.backend("triton"):
        y = K.relu2(x)
    assert K.which("relu2") == "triton"
    (dx,) = torch.autograd.grad(y, x, dy)
    y_ref = K.relu2_ref(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert y.shape == x.shape and y.dtype == x.dtype and dx.dtype == x.dtype
    assert_close(y, y_ref)
    assert_close(dx, dx_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (7, 33), (123, 130), (1000, 33), (2, 7, 1000)])
def test_relu2_matches_twin(shape, dtype):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    x.view(-1)[::5] = 0.0  # relu's kink: the gradient there is 0 on both sides
    _compare(x.requires_grad_(True))


@pytest.mark.parametrize("layout", ["transposed", "col_step", "transposed_3d"])
def test_relu2_non_contiguous(layout):
    torch.manual_seed(1)
    if layout == "transposed":
        x = torch.randn(33, 123, device=DEVICE).t()
    elif layout == "col_step":
        x = torch.randn(123, 66, device=DEVICE)[:, ::2]
    else:
        x = torch.randn(3, 41, 33, device=DEVICE).transpose(0, 1)
    assert not x.is_contiguous()
    _compare(x.requires_grad_(True))


def test_relu2_sum_backward():
    """`y.sum().backward()` hands the backward an expanded (stride-0) gradient."""
    x = torch.randn(7, 33, device=DEVICE, requires_grad=True)
    with K.backend("triton"):
        K.relu2(x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.relu(x.detach()))


def test_relu2_bf16_interpreted_loosely():
    x = torch.randn(7, 130, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    _compare(x)


def test_relu2_empty_and_errors():
    with K.backend("triton"):
        x = torch.randn(0, 33, device=DEVICE, requires_grad=True)
        K.relu2(x).sum().backward()
        assert x.grad.shape == (0, 33)
        with pytest.raises(TypeError, match="fp32/fp16/bf16"):
            K.relu2(torch.ones(4, device=DEVICE, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("C", [1280, 1664])
def test_relu2_gpu_bf16(C):
    torch.manual_seed(2)
    x = torch.randn(8 * 2048, 4 * C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _compare(x)
    with K.backend("auto"):
        K.relu2(x.detach())
    assert K.which("relu2") == "triton"


def test_relu2_compiles_for_h100():
    sig = {"X": "*bf16", "Y": "*bf16", "numel": "i32", "BLOCK": "constexpr"}
    bwd = {"X": "*bf16", "DY": "*bf16", "DX": "*bf16", "numel": "i32", "BLOCK": "constexpr"}
    consts = {"BLOCK": R.BLOCK}
    compile_for_sm90([("kernels.relu2", "_relu2_fwd_kernel", sig, consts, 4),
                      ("kernels.relu2", "_relu2_bwd_kernel", bwd, consts, 4)])
