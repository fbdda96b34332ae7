"""attention's backends against the twin `attention_ref`: output and dq, dk, dv under a random upstream gradient.

On CPU our Triton kernels run under the interpreter (tests/conftest.py) in fp32 and fp16 at small shapes: T 1, 7,
123 and 1000, GQA ratios 1/2/4, head dims 16-128 (24: a padded head dim), windows shorter and longer than T, causal
and not, a non-default scale, slices of a fused qkv and a copied layout, documents packed with cu_seqlens vs each
document alone, and forced small tiles (mismatched query/key blocks) that reach every edge of the tile-skipping
ranges. SDPA (the CPU backend of "auto") vs the twin; dispatch; the flash_attn argument mapping against a fake
module; the GPU configs compiled to sm_90 code. bf16 at d20 shapes (vs the twin and flash_attn) is a `gpu` test.
"""

import importlib

import pytest
import torch

import kernels._dispatch as _dispatch
from kernels.attention import attention, attention_ref
from tests.test_kernel_rmsnorm import compile_for_sm90
from tests.tolerances import assert_close

A = importlib.import_module("kernels.attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(fwd_m=16, fwd_n=32, dkdv_m=32, dkdv_n=16, dq_m=16, dq_n=16)  # forced tiles: many edge cases


# The backward's delta = rowsum(dO·O) uses O as stored (rounded to fp16), the twin's autograd the fp32 O; dP − delta
# cancels, so half-precision gradients differ from the twin's by a few of their ulps, not one.
_GRAD_TOL = {torch.float32: 1, torch.float16: 4, torch.bfloat16: 4}


def _qkv(B, T, H, Hkv, D, dtype, device=DEVICE):
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _run(fn, q, k, v, do, **kw):
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _triton(blocks=None):
    def fn(q, k, v, causal=True, window=None, scale=None, cu_seqlens=None, max_seqlen=None):
        with _dispatch.backend("triton"):
            if blocks is None:
                out = attention(q, k, v, causal, window, scale, cu_seqlens, max_seqlen)
            else:  # the launcher's block override, to reach tile edges at interpretable sizes
                _dispatch.use_triton("attention", q, k, v)
                out = A._FlashAttention.apply(q, k, v, causal, window, scale, cu_seqlens, max_seqlen, blocks)
        assert _dispatch.which("attention") == "triton"
        return out

    return fn


def _compare(q, k, v, fn=None, **kw):
    """fn (default: our kernel) vs the twin on the same leaves and upstream gradient: o, dq, dk, dv."""
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    got = _run(fn or _triton(), q, k, v, do, **kw)
    want = _run(attention_ref, q, k, v, do, **kw)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, scale=1 if name == "o" else _GRAD_TOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H,Hkv,D,causal,window", [
    (1, 2, 1, 16, True, None),
    (7, 4, 2, 32, True, None),
    (7, 2, 2, 16, False, None),
    (123, 4, 1, 32, True, None),   # GQA 4
    (123, 2, 1, 16, True, 10),     # window shorter than T
    (123, 2, 2, 64, True, 500),    # window longer than T: plain causal
    (123, 4, 2, 24, False, None),  # head dim padded to 32
    (5, 2, 1, 128, True, 2),       # the model's head dim
])
def test_matches_twin(T, H, Hkv, D, causal, window, dtype):
    torch.manual_seed(T * 100 + D)
    _compare(*_qkv(1, T, H, Hkv, D, dtype), causal=causal, window=window)


@pytest.mark.parametrize("window", [None, 100])
def test_long_sequence(window):
    """T = 1000: 16 query blocks of 64 under the interpreter (~2 s each)."""
    torch.manual_seed(1000)
    _compare(*_qkv(1, 1000, 1, 1, 16, torch.float32), window=window)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 0), (True, 21), (True, 40), (False, None)])
def test_small_tiles(causal, window):
    """Tiles of 16 and 32, query and key blocks of different sizes: masked edges, unmasked interiors, skipped
    tiles and a partial last tile, for every window position relative to the blocks."""
    torch.manual_seed(7)
    _compare(*_qkv(2, 75, 2, 1, 16, torch.float32), fn=_triton(SMALL), causal=causal, window=window)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # exp2 of masked scores next to NaN rows
def test_hidden_tiles_are_never_read():
    """Causal and window tile skipping: NaN in tiles no query of a block may see must not reach that block (a
    masked tile that was loaded would turn NaN·0 into NaN)."""
    torch.manual_seed(11)
    tiles = dict(fwd_m=16, fwd_n=16, dkdv_m=16, dkdv_n=16, dq_m=16, dq_n=16)
    q, k, v = (t.detach() for t in _qkv(1, 64, 2, 1, 16, torch.float32))
    do = torch.randn(q.shape)
    # Keys 0..15 are outside every window (5) of queries 32..63; keys 32..63 are in the future of queries 0..31.
    for hidden, rows in ((slice(0, 16), slice(32, 64)), (slice(32, 64), slice(0, 32))):
        kp, vp = k.clone(), v.clone()
        kp[:, hidden] = vp[:, hidden] = float("nan")
        qp, kp, vp = q.clone().requires_grad_(), kp.requires_grad_(), vp.requires_grad_()
        o, dq, _, _ = _run(_triton(tiles), qp, kp, vp, do, window=5)
        assert o[:, rows].isfinite().all() and dq[:, rows].isfinite().all()
    # Queries 48..63 are past the window of keys 0..15; queries 0..31 precede keys 32..63.
    for hidden, rows in ((slice(48, 64), slice(0, 16)), (slice(0, 32), slice(32, 64))):
        qp, dop = q.clone(), do.clone()
        qp[:, hidden] = dop[:, hidden] = float("nan")
        qp, kp, vp = qp.requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()
        _, _, dk, dv = _run(_triton(tiles), qp, kp, vp, dop, window=5)
        assert dk[:, rows].isfinite().all() and dv[:, rows].isfinite().all()


def test_scale_and_batch():
    torch.manual_seed(3)
    _compare(*_qkv(3, 37, 4, 2, 32, torch.float16), scale=0.37)


@pytest.mark.parametrize("layout", ["fused_qkv", "transposed"])
def test_non_contiguous(layout):
    torch.manual_seed(4)
    B, T, H, Hkv, D = 2, 45, 4, 2, 32
    if layout == "fused_qkv":  # the model's c_attn output viewed as heads: unit D stride, runs in place
        qkv = torch.randn(B, T, H + 2 * Hkv, D, device=DEVICE)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    else:  # head dim not unit-stride: copied
        q = torch.randn(B, T, H, D, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
        k = torch.randn(B, T, Hkv, D, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
        v = torch.randn(B, T, Hkv, D, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    _compare(q, k, v, window=9)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 7])
def test_varlen_matches_each_document(window, dtype):
    """Packed documents (B = 1) give what each document gives alone, and the twin's cu_seqlens mask agrees."""
    torch.manual_seed(5)
    lens = [5, 70, 1, 47]
    cu = _cu(lens)
    q, k, v = _qkv(1, sum(lens), 4, 2, 32, dtype)
    do = torch.randn(q.shape, dtype=dtype, device=DEVICE)
    got = _run(_triton(), q, k, v, do, window=window, cu_seqlens=cu, max_seqlen=max(lens))
    o = torch.cat([attention_ref(q[:, a:b], k[:, a:b], v[:, a:b], window=window)
                   for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    want = (o, *torch.autograd.grad(o, (q, k, v), do))
    for a, b, tol in zip(got, want, (1, _GRAD_TOL[dtype], _GRAD_TOL[dtype], _GRAD_TOL[dtype])):
        assert_close(a, b, scale=tol)
    assert_close(attention_ref(q, k, v, window=window, cu_seqlens=cu), o)


def test_varlen_small_tiles_and_max_seqlen_from_cu():
    torch.manual_seed(6)
    cu = _cu([33, 16, 17, 1])
    _compare(*_qkv(1, 67, 2, 1, 16, torch.float32), fn=_triton(SMALL), window=20, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,window,varlen,scale", [
    (True, None, False, None), (False, None, False, 0.5), (True, 3, False, None), (True, None, True, None),
    (False, None, True, None), (True, 100, False, None),
])
def test_sdpa_matches_twin(causal, window, varlen, scale, dtype):
    """On the CPU, where "auto" runs it: the masks and arguments SDPA gets mean what the twin means."""
    torch.manual_seed(8)
    q, k, v = _qkv(1, 40, 4, 2, 16, dtype, device="cpu")
    cu = _cu([13, 27]).cpu() if varlen else None
    with _dispatch.backend("auto"):
        _compare(q, k, v, fn=attention, causal=causal, window=window, scale=scale, cu_seqlens=cu)
        assert _dispatch.which("attention") == "sdpa"


def test_dispatch():
    q, k, v = _qkv(1, 8, 2, 1, 16, torch.float32)
    with _dispatch.backend("ref"):
        y = attention(q, k, v)
    assert _dispatch.which("attention") == "ref"
    assert torch.equal(y, attention_ref(q, k, v))
    if DEVICE == "cpu":
        with _dispatch.backend("auto"):
            attention(q, k, v)
        assert _dispatch.which("attention") == "sdpa"
        with _dispatch.backend("triton"):
            attention(q, k, v)
        assert _dispatch.which("attention") == "triton"


class _FakeFlashAttn:
    """Records what `_attention_flash_attn` passes; returns zeros of the right shape (FA3-style tuples)."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, **kw):
        self.calls.append(("dense", q.shape, kw))
        return torch.zeros_like(q), None

    def flash_attn_varlen_func(self, q, k, v, *args, **kw):
        self.calls.append(("varlen", q.shape, args, kw))
        return torch.zeros_like(q)


@pytest.mark.parametrize("name", ["fa2", "fa3", "fa4"])
def test_flash_attn_argument_mapping(name):
    q, k, v = (t.detach() for t in _qkv(1, 10, 4, 2, 16, torch.float16))
    fa = _FakeFlashAttn()
    unlimited = (None, None) if name == "fa4" else (-1, -1)
    assert A._attention_flash_attn(name, fa, q, k, v, True, None, None, None, None).shape == q.shape
    assert fa.calls[-1][2] == dict(softmax_scale=0.25, causal=True, window_size=unlimited)
    A._attention_flash_attn(name, fa, q, k, v, True, 5, 0.1, None, None)
    assert fa.calls[-1][2] == dict(softmax_scale=0.1, causal=True, window_size=(5, 0))
    if name != "fa4":  # attention() sends FA4 varlen calls to our kernel
        out = A._attention_flash_attn(name, fa, q, k, v, True, None, None, _cu([4, 6]), None)
        assert out.shape == q.shape and fa.calls[-1][0] == "varlen" and fa.calls[-1][1] == q.shape[1:]
        assert fa.calls[-1][2][2:] == (6, 6)  # max_seqlen_q, max_seqlen_k from cu_seqlens


def test_flash_attn_probe_is_lazy_and_cached():
    A._flash_attn.cache_clear()
    first = A._flash_attn()
    assert A._flash_attn() is first and A._flash_attn.cache_info().hits >= 1


def test_empty_and_errors():
    q, k, v = _qkv(2, 0, 2, 1, 16, torch.float32)
    with _dispatch.backend("triton"):
        y = attention(q, k, v)
        y.sum().backward()
    assert y.shape == q.shape and k.grad.shape == k.shape
    q, k, v = (t.detach() for t in _qkv(1, 8, 4, 2, 16, torch.float32))
    with pytest.raises(ValueError, match="causal=True"):
        attention(q, k, v, causal=False, window=3)
    with pytest.raises(ValueError, match="H % Hkv"):
        attention(q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1].expand(1, 8, 3, 16))
    with pytest.raises(TypeError, match="share one of"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="B = 1"):
        attention(q.expand(2, 8, 4, 16), k.expand(2, 8, 2, 16), v.expand(2, 8, 2, 16), cu_seqlens=_cu([8]))
    with pytest.raises(ValueError, match="int32"):
        attention(q, k, v, cu_seqlens=_cu([8]).long())
    with pytest.raises(ValueError, match=">= 0"):
        attention(q, k, v, window=-1)


def test_compiles_for_h100():
    """The GPU configs `_config` picks (D = 128; D = 64 windowed; varlen) lower to sm_90 code."""
    specs = []

    def s3(p):
        return {f"stride_{p}b": "i32", f"stride_{p}t": "i32", f"stride_{p}h": "i32"}

    for D, varlen, window in ((128, False, False), (128, True, True), (64, False, True)):
        cfg = A._config(D, interpreting=False, blocks=None)
        consts = dict(GROUP=2, CAUSAL=True, HAS_WINDOW=window, VARLEN=varlen, UPCAST=False, HEAD_DIM=D,
                      BLOCK_D=cfg["block_d"], PRECISION="tf32")
        cu = "*i32" if varlen else "constexpr"
        none = {} if varlen else {"CU": None}
        scalars = {"T": "i32", "H": "i32"}
        for kernel, ptrs, strides, more, m, n in (
            ("_attn_fwd_kernel", "Q K V O LSE", "qkvo", {"qk_scale": "fp32", "WINDOW": "i32"}, "fwd_m", "fwd_n"),
            ("_attn_bwd_dkdv_kernel", "Q K V DO LSE DELTA DK DV", ["q", "k", "v", "do", "dk", "dv"],
             {"HKV": "i32", "qk_scale": "fp32", "sm_scale": "fp32", "WINDOW": "i32"}, "dkdv_m", "dkdv_n"),
            ("_attn_bwd_dq_kernel", "Q K V DO LSE DELTA DQ", ["q", "k", "v", "do", "dq"],
             {"qk_scale": "fp32", "sm_scale": "fp32", "WINDOW": "i32"}, "dq_m", "dq_n"),
        ):
            c = consts | dict(BLOCK_M=cfg[m], BLOCK_N=cfg[n])
            sig = {p: "*fp32" if p in ("LSE", "DELTA") else "*bf16" for p in ptrs.split()} | {"CU": cu}
            for p in strides:
                sig |= s3(p)
            sig |= scalars | more | {key: "constexpr" for key in c}
            specs.append(("kernels.attention", kernel, sig, c | none, cfg["warps"]))
    c = dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_D=128)
    sig = {"O": "*bf16", "DO": "*bf16", "DELTA": "*fp32"} | s3("o") | s3("d") | {"T": "i32", "H": "i32"}
    specs.append(("kernels.attention", "_attn_bwd_preprocess_kernel", sig | {key: "constexpr" for key in c}, c, 4))
    compile_for_sm90(specs)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 512])
def test_gpu_bf16_d20(window):
    """d20 shapes in bf16: our kernel (and flash_attn when installed) vs the fp32 twin; errors relative to the
    tensor's norm, with the bf16 SDPA's own error as the yardstick."""
    torch.manual_seed(9)
    B, T, H, D = 4, 2048, 10, 128
    q, k, v = _qkv(B, T, H, H, D, torch.bfloat16, "cuda")
    do = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    want = _run(attention_ref, q, k, v, do, window=window)
    sdpa = _run(lambda *a, **kw: A._attention_sdpa(*a, kw["causal"], kw["window"], None, None), q, k, v, do,
                causal=True, window=window)
    backends = {"triton": _triton()}
    if A._flash_attn() is not None:
        backends["flash_attn"] = attention  # auto on CUDA bf16 picks flash_attn first
    for name, fn in backends.items():
        with _dispatch.backend("auto"):
            got = _run(fn, q, k, v, do, window=window)
        for what, a, b, s in zip(("o", "dq", "dk", "dv"), got, want, sdpa):
            assert _rel_err(a, b) <= max(2 * _rel_err(s, b), 1e-2), (name, what, _rel_err(a, b), _rel_err(s, b))
    with _dispatch.backend("auto"):
        attention(q, k, v)
    assert _dispatch.which("attention") == (A._flash_attn()[0] if A._flash_attn() else "triton")


@pytest.mark.gpu
def test_gpu_bf16_gqa_varlen():
    torch.manual_seed(10)
    cu = torch.tensor([0, 1000, 1100, 3000, 4096], dtype=torch.int32, device="cuda")
    q, k, v = _qkv(1, 4096, 8, 2, 128, torch.bfloat16, "cuda")
    do = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    got = _run(_triton(), q, k, v, do, window=300, cu_seqlens=cu)
    want = _run(attention_ref, q, k, v, do, window=300, cu_seqlens=cu)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 2e-2
