"""rmsnorm's Triton kernels against the twin `rmsnorm_ref`: forward, x.grad and weight.grad.

On CPU the kernels run under the Triton interpreter (tests/conftest.py) in fp32 and fp16 at small shapes: rows
1, 7, 123, 1000, odd C, non-contiguous and 3-D inputs, weightless and weighted, and the multi-block row loop
(forced with a small block, since real rows that need it are too slow to interpret). The GPU configurations are
also compiled to sm_90 code here (no GPU needed), since the interpreter accepts code the compiler may not. bf16 at
the d20/d26 shapes is a `gpu` test.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels as K
from tests.tolerances import TOL, assert_close

R = importlib.import_module("kernels.rmsnorm")  # the module (kernels.rmsnorm the attribute is the function)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent

_SM90_COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for module, name, sig, consts, num_warps in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(module), name)
    # Pointers and ints divisible by 16, as a real launch at d20 shapes specializes them (it vectorizes the loads).
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v[0] in "*i"}
    src = ASTSource(fn, sig, consts, attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
"""


def compile_for_sm90(specs) -> None:
    """Compile kernels to an H100 cubin (sm_90) in a subprocess without the interpreter. Needs no GPU, and catches
    code the interpreter runs but the compiler rejects. specs: [(module, kernel, signature, constexprs, num_warps)]."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _SM90_COMPILE, json.dumps(specs)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _weight(C, dtype, weighted):
    if not weighted:
        return None
    return (1.0 + 0.3 * torch.randn(C, device=DEVICE)).to(dtype).requires_grad_(True)


def _assert_dw_close(dw, dw_ref, N):
    # dw sums N rows of O(1) terms: its size and its fp32 rounding error grow like sqrt(N), so atol does too.
    atol, rtol = TOL[dw_ref.dtype]
    torch.testing.assert_close(dw, dw_ref, atol=atol * max(1, N) ** 0.5, rtol=rtol)


def _compare(x, weight, eps=1e-6):
    """Run kernel and twin on the same leaf tensors with the same upstream gradient; compare y, dx, dw."""
    dy = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    inputs = [x] if weight is None else [x, weight]
    with K.backend("triton"):
        y = K.rmsnorm(x, weight, eps)
    assert K.which("rmsnorm") == "triton"
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = K.rmsnorm_ref(x, weight, eps)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref)
    assert_close(grads[0], grads_ref[0])
    if weight is not None:
        assert grads[1].dtype == weight.dtype
        _assert_dw_close(grads[1], grads_ref[1], x.numel() // x.shape[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("N,C", [(1, 1), (1, 130), (7, 33), (7, 1000), (123, 130), (123, 1), (1000, 33)])
def test_rmsnorm_matches_twin(N, C, weighted, dtype):
    torch.manual_seed(N * 1000 + C)
    x = torch.randn(N, C, device=DEVICE, dtype=dtype, requires_grad=True)
    _compare(x, _weight(C, dtype, weighted))


@pytest.mark.parametrize("weighted", [False, True])
def test_rmsnorm_3d_and_eps(weighted):
    torch.manual_seed(0)
    x = (0.01 * torch.randn(2, 7, 130, device=DEVICE)).requires_grad_(True)  # small x: eps matters
    _compare(x, _weight(130, torch.float32, weighted), eps=1e-3)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_rmsnorm_mixed_dtypes(x_dtype, w_dtype):
    """An fp32 master weight with half activations (and the reverse): y and dx in x's dtype, dw in w's."""
    torch.manual_seed(5)
    x = torch.randn(7, 130, device=DEVICE, dtype=x_dtype, requires_grad=True)
    _compare(x, _weight(130, w_dtype, True))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "col_step", "transposed_3d"])
def test_rmsnorm_non_contiguous(layout, weighted):
    torch.manual_seed(1)
    C = 33
    if layout == "transposed":  # stride(-1) != 1: copied
        x = torch.randn(C, 123, device=DEVICE).t()
    elif layout == "row_slice":  # unit column stride, row stride 2C: runs in place
        x = torch.randn(123, 2 * C, device=DEVICE)[:, :C]
    elif layout == "col_step":  # stride(-1) == 2: copied
        x = torch.randn(123, 2 * C, device=DEVICE)[:, ::2]
    else:  # (T, B, C) view of a (B, T, C) tensor: leading dims do not flatten to one stride, copied
        x = torch.randn(3, 41, C, device=DEVICE).transpose(0, 1)
    assert not x.is_contiguous()
    x.requires_grad_(True)
    _compare(x, _weight(C, torch.float32, weighted))


def test_rmsnorm_row_slice_is_not_copied():
    base = torch.randn(7, 66, device=DEVICE)
    assert R._rows(base[:, :33], 33).data_ptr() == base.data_ptr()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("block_r", [1, 4])
@pytest.mark.parametrize("N,C", [(7, 130), (41, 33), (5, 1000)])
def test_rmsnorm_block_loop(N, C, block_r, weighted):
    """The multi-block path (rows wider than MAX_BLOCK_C on a GPU) and GPU-like row tiles, forced small here."""
    torch.manual_seed(2)
    x = torch.randn(N, C, device=DEVICE)
    w = (1.0 + 0.3 * torch.randn(C, device=DEVICE)) if weighted else None
    dy = torch.randn(N, C, device=DEVICE)
    block_c = 32 if C < 1000 else 256
    y, rstd = R._rmsnorm_fwd(x, w, 1e-6, block_c=block_c, block_r=block_r)
    dx, dw = R._rmsnorm_bwd(dy, x, w, rstd, block_c=block_c, block_r=block_r)
    xr = x.clone().requires_grad_(True)
    wr = None if w is None else w.clone().requires_grad_(True)
    y_ref = R.rmsnorm_ref(xr, wr)
    grads = torch.autograd.grad(y_ref, [xr] if wr is None else [xr, wr], dy)
    assert_close(y, y_ref)
    assert_close(rstd, torch.rsqrt(x.square().mean(-1) + 1e-6))
    assert_close(dx, grads[0])
    if weighted:
        _assert_dw_close(dw, grads[1], N)


def test_rmsnorm_bf16_interpreted_loosely():
    """bf16 in and out: loads are cast to fp32 before any math (the interpreter's bf16 arithmetic is wrong)."""
    torch.manual_seed(3)
    x = torch.randn(7, 130, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    _compare(x, _weight(130, torch.bfloat16, True))


def test_rmsnorm_empty_and_errors():
    with K.backend("triton"):
        x = torch.randn(0, 33, device=DEVICE, requires_grad=True)
        y = K.rmsnorm(x)
        y.sum().backward()
        assert y.shape == (0, 33) and x.grad.shape == (0, 33)
        with pytest.raises(ValueError, match="weight must be"):
            K.rmsnorm(torch.randn(4, 33, device=DEVICE), torch.ones(32, device=DEVICE))
        with pytest.raises(TypeError, match="fp32/fp16/bf16"):
            K.rmsnorm(torch.ones(4, 33, device=DEVICE, dtype=torch.float64))
        with pytest.raises(ValueError, match="C >= 1"):
            K.rmsnorm(torch.ones(4, 0, device=DEVICE))


def test_rmsnorm_dispatch_ref():
    x = torch.randn(3, 8)
    with K.backend("ref"):
        y = K.rmsnorm(x)
    assert K.which("rmsnorm") == "ref"
    assert torch.equal(y, K.rmsnorm_ref(x))


def test_rmsnorm_compiles_for_h100():
    """The GPU configs `_blocks` picks (d20 rows, head-dim rows, rows past MAX_BLOCK_C) lower to sm_90 code."""
    specs = []
    for C in (1280, 128, 16384 + 3):
        block_r, block_c, one_block, num_warps = R._blocks(C, interpreting=False, block_c=None, block_r=None)
        for has_weight in (False, True):
            consts = {"HAS_WEIGHT": has_weight, "BLOCK_R": block_r, "BLOCK_C": block_c, "ONE_BLOCK": one_block}
            w = "*bf16" if has_weight else "constexpr"
            if not has_weight:
                consts["W"] = None
            sig = {"X": "*bf16", "W": w, "Y": "*bf16", "RSTD": "*fp32", "N": "i32", "C": "i32", "stride_x": "i32",
                   "stride_y": "i32", "eps": "fp32"} | {k: "constexpr" for k in consts if k != "W"}
            specs.append(("kernels.rmsnorm", "_rmsnorm_fwd_kernel", sig, consts, num_warps))
            consts = dict(consts) | ({} if has_weight else {"DW_PARTIAL": None})
            sig = {"X": "*bf16", "W": w, "DY": "*bf16", "DX": "*bf16", "RSTD": "*fp32",
                   "DW_PARTIAL": "*fp32" if has_weight else "constexpr", "N": "i32", "C": "i32", "stride_x": "i32",
                   "stride_dy": "i32", "stride_dx": "i32"} | {k: "constexpr" for k in consts if k[0].isupper()}
            specs.append(("kernels.rmsnorm", "_rmsnorm_bwd_kernel", sig, consts, num_warps))
    compile_for_sm90(specs)


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("C", [1280, 1664, 128, 16384 + 3])
def test_rmsnorm_gpu_bf16(C, weighted):
    """Real shapes: d20 (C=1280) and d26 (C=1664) at B*T = 8*2048 rows; head dim 128; and a row past MAX_BLOCK_C."""
    torch.manual_seed(4)
    N = 8 * 2048 if C <= 1664 else 64
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _compare(x, _weight(C, torch.bfloat16, weighted))
    with K.backend("auto"):
        K.rmsnorm(x.detach())
    assert K.which("rmsnorm") == "triton"
