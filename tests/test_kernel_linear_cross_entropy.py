"""linear_cross_entropy: the chunked Triton path against its plain-torch twin.

On CPU the kernel runs under the Triton interpreter (tests/conftest.py), fp32 and fp16 at small shapes; every
program is interpreted in Python, so row counts stay small and large N comes with a small V. bf16 and the real
d20 shapes (and the CUDA memory bound) are `gpu` tests.

Memory on CPU: torch's profiler with profile_memory=True records every CPU allocation and free made by torch
(`[memory]` events with signed byte counts); the running sum in time order is the bytes alive, its maximum the
peak. It sees exactly the tensors torch allocates (unlike tracemalloc, which sees none of them, or RSS, which
mixes in the allocator and the interpreter), and the interpreter's own scratch is numpy, invisible to it, which
is what we want: on a GPU that scratch does not exist.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kernels as K
from kernels.linear_cross_entropy import CHUNK_BYTES, linear_cross_entropy_fused, linear_cross_entropy_ref
from tests.tolerances import assert_close

SEED = 0


def make(N, C, V, dtype, device="cpu", ignore_every=5, x_noncontig=False):
    g = torch.Generator(device="cpu").manual_seed(SEED)
    if x_noncontig:  # a transposed view: stride (1, N)
        x = torch.randn(C, N, generator=g).to(device, dtype).t()
    else:
        x = torch.randn(N, C, generator=g).to(device, dtype)
    # Scale so the logits spread over a few units: the softcap (15) and the softmax both matter.
    w = (torch.randn(V, C, generator=g) * (3.0 / C**0.5)).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    if ignore_every:
        t[::ignore_every] = -1
    return x.requires_grad_(), w.requires_grad_(), t


def run(fn, x, w, t, reduction, grad_out=None, **kw):
    """(loss, x.grad, weight.grad) of fn with a fixed upstream gradient."""
    x.grad = w.grad = None
    loss = fn(x, w, t, reduction=reduction, **kw)
    if grad_out is None:
        grad_out = torch.full_like(loss, 1.3) if reduction != "none" else torch.linspace(-1, 2, loss.numel())
    loss.backward(grad_out.to(loss.device))
    return loss.detach(), x.grad, w.grad


def assert_rel_close(actual, expected, tol):
    """||actual - expected|| / ||expected|| < tol: meaningful even where every element is far below atol."""
    err = (actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-30)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def compare(x, w, t, reduction, dtype, softcap=15.0, chunk_rows=None, scale=1.0):
    got = run(linear_cross_entropy_fused, x, w, t, reduction, softcap=softcap, chunk_rows=chunk_rows)
    want = run(linear_cross_entropy_ref, x, w, t, reduction, softcap=softcap)
    assert got[0].dtype == torch.float32 and got[0].shape == want[0].shape
    assert_close(got[0], want[0], torch.float32 if dtype == torch.float32 else dtype, scale)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for a, b in zip(got[1:], want[1:]):
        # Gradients are sums over rows (grad_weight) or V (grad_x) of terms that cancel: an element can end near 0
        # with an error of a few ulps of the terms, so atol is taken relative to the tensor's largest element. In
        # fp16 the two sides' dlogits already differ by an ulp here and there (the fp32 softmax rounds to fp16
        # at slightly different points), which grad_weight sums over 1000 rows.
        assert_close(a, b, dtype, scale * max(1.0, b.abs().max().item()))
        if (t != -1).any():
            assert_rel_close(a, b, REL_TOL[dtype])


# (N, C, V, dtype, chunk_rows, softcap, reduction): odd N, V not a power of two, chunks that do not divide N.
CASES = [
    (1, 16, 517, torch.float32, None, 15.0, "mean"),
    (7, 16, 1000, torch.float32, 3, 15.0, "mean"),
    (7, 16, 517, torch.float16, 3, 15.0, "sum"),
    (7, 16, 517, torch.float32, 2, None, "none"),
    (123, 32, 1000, torch.float32, 50, None, "sum"),
    (123, 32, 517, torch.float16, 40, 15.0, "none"),
    (123, 32, 517, torch.float32, 64, 15.0, "mean"),
    (1000, 8, 64, torch.float32, 384, 15.0, "mean"),
    (1000, 8, 100, torch.float16, 300, None, "sum"),
]


@pytest.mark.parametrize("N,C,V,dtype,chunk_rows,softcap,reduction", CASES)
def test_matches_twin(N, C, V, dtype, chunk_rows, softcap, reduction):
    x, w, t = make(N, C, V, dtype)
    compare(x, w, t, reduction, dtype, softcap, chunk_rows)


def test_non_contiguous_x_and_dispatch():
    x, w, t = make(37, 16, 300, torch.float32, x_noncontig=True)
    assert not x.is_contiguous()
    with K.backend("triton"):
        got = run(K.linear_cross_entropy, x, w, t, "mean")
        assert K.which("linear_cross_entropy") == "triton"
    want = run(linear_cross_entropy_ref, x, w, t, "mean")
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    x, w, t = make(9, 8, 50, torch.float32, ignore_every=0)
    t[:] = -1
    loss, gx, gw = run(linear_cross_entropy_fused, x, w, t, reduction, chunk_rows=4)
    want = run(linear_cross_entropy_ref, x, w, t, reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    assert (gx == 0).all() and (gw == 0).all()
    for a, b in zip((loss, gx, gw), want):
        torch.testing.assert_close(a, b)


def test_other_ignore_index():
    # ignore_index inside [0, V): target 3 must not count, even though column 3 exists.
    x, w, t = make(20, 8, 40, torch.float32, ignore_every=0)
    t[::3] = 3
    got = run(linear_cross_entropy_fused, x, w, t, "mean", ignore_index=3, chunk_rows=6)
    want = run(linear_cross_entropy_ref, x, w, t, "mean", ignore_index=3)
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_bytes(reduction):
    V = 300
    x, w, t = make(50, 16, V, torch.float32)
    token_bytes = torch.randint(1, 6, (V,))
    token_bytes[::7] = 0  # special tokens: not counted in bits per byte
    t[1] = 7  # make sure some counted position has a zero-byte target
    loss, nats, nbytes = linear_cross_entropy_fused(x, w, t, reduction=reduction, token_bytes=token_bytes,
                                                    chunk_rows=16)
    rloss, rnats, rnbytes = linear_cross_entropy_ref(x, w, t, reduction=reduction, token_bytes=token_bytes)
    assert_close(loss.detach(), rloss.detach())
    assert_close(nats, rnats)
    assert not nats.requires_grad and nbytes.dtype == torch.int64
    assert nbytes.item() == rnbytes.item() > 0
    loss.sum().backward()  # the loss still trains through the kernel
    assert x.grad is not None and w.grad is not None


def test_no_grad_and_frozen_weight():
    x, w, t = make(30, 16, 200, torch.float32)
    with torch.no_grad():
        assert_close(linear_cross_entropy_fused(x, w, t, chunk_rows=7), linear_cross_entropy_ref(x, w, t))
    w.requires_grad_(False)
    loss = linear_cross_entropy_fused(x, w, t, chunk_rows=7)
    (gx,) = torch.autograd.grad(loss, (x,))
    (rgx,) = torch.autograd.grad(linear_cross_entropy_ref(x, w, t), (x,))
    assert_close(gx, rgx)


def test_second_backward_is_refused():
    x, w, t = make(5, 8, 20, torch.float32)
    loss = linear_cross_entropy_fused(x, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_bad_inputs():
    x, w, t = make(4, 8, 20, torch.float32)
    for fn in (linear_cross_entropy_fused, linear_cross_entropy_ref):
        with pytest.raises(ValueError, match="int64"):
            fn(x, w, t.int())
        with pytest.raises(ValueError, match="targets"):
            fn(x, w, t[:3])
        with pytest.raises(ValueError, match="C differs"):
            fn(x, w[:, :4], t)
        with pytest.raises(TypeError, match="dtype"):
            fn(x, w.half(), t)
        with pytest.raises(ValueError, match="reduction"):
            fn(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy_fused(x, w, torch.tensor([0, 1, 20, -1]))
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy_fused(x, w, t, chunk_rows=0)


def peak_cpu_bytes(fn) -> int:
    """Most bytes torch held at once (CPU) while fn ran, counted from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    alive = peak = 0
    for _, nbytes in events:
        alive += nbytes
        peak = max(peak, alive)
    return peak


def test_peak_memory_does_not_grow_with_n_times_v():
    C, V, chunk = 8, 1024, 16
    peaks = {}
    for N in (16, 128):
        x, w, t = make(N, C, V, torch.float32)
        for name, fn in (("fused", lambda: linear_cross_entropy_fused(x, w, t, chunk_rows=chunk)),
                         ("twin", lambda: linear_cross_entropy_ref(x, w, t))):
            peaks[name, N] = peak_cpu_bytes(lambda: fn().backward())
    grown_nv = (128 - 16) * V * 4  # the fp32 logits of the extra rows
    # The twin holds several (N, V) fp32 tensors at once (logits, softcapped logits, their grads).
    assert peaks["twin", 128] - peaks["twin", 16] >= grown_nv
    # The fused op grows only by O(N·C) (grad_x, per-row losses): far below the logits of the extra rows.
    assert peaks["fused", 128] - peaks["fused", 16] < grown_nv / 10
    # And its peak is about one chunk of logits plus grad_weight, not N·V.
    assert peaks["fused", 128] < 4 * (chunk * V * 4 + V * C * 4) < 128 * V * 4 * 4


@pytest.mark.gpu
@pytest.mark.parametrize("V", [32768, 65536])
def test_gpu_bf16_d20_shapes(V):
    N, C = 16384, 1280
    x, w, t = make(N, C, V, torch.bfloat16, device="cuda")
    want = run(linear_cross_entropy_ref, x, w, t, "mean")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = run(K.linear_cross_entropy, x, w, t, "mean")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert K.which("linear_cross_entropy") == "triton"
    # bf16 logits and dlogits round at the same places in both; grad_weight sums 16k rows (fp32 here, one bf16
    # GEMM in the twin). Elementwise tolerances are loose next to gradients of ~1e-5, so norms are checked too.
    assert_close(got[0], want[0], torch.bfloat16)
    for a, b in zip(got[1:], want[1:]):
        assert_close(a, b, torch.bfloat16, scale=2.0)
        assert_rel_close(a, b, REL_TOL[torch.bfloat16])
    # One logits chunk + grad_x + grad_weight (fp32 accumulator, its bf16 copy, maybe a bf16 product) + slack.
    bound = CHUNK_BYTES["cuda"] + V * C * (4 + 2 + 2) + N * C * 2 * 2 + 32 * 2**20
    assert bound < N * V * 4 / 2  # the bound means something: far below the fp32 logits alone
    mib = 2**20
    assert peak < bound, f"peak {peak / mib:.0f} MiB > {bound / mib:.0f} MiB (N·V·4 = {N * V * 4 / mib:.0f} MiB)"


@pytest.mark.gpu
def test_gpu_bf16_none_and_token_bytes():
    N, C, V = 4096, 1280, 65536
    x, w, t = make(N, C, V, torch.bfloat16, device="cuda")
    got = run(K.linear_cross_entropy, x, w, t, "none")
    want = run(linear_cross_entropy_ref, x, w, t, "none")
    assert_close(got[0], want[0], torch.bfloat16)
    for a, b in zip(got[1:], want[1:]):
        assert_close(a, b, torch.bfloat16, scale=2.0)
        assert_rel_close(a, b, REL_TOL[torch.bfloat16])
    token_bytes = torch.randint(0, 6, (V,), device="cuda")
    _, nats, nbytes = K.linear_cross_entropy(x, w, t, token_bytes=token_bytes)
    _, rnats, rnbytes = linear_cross_entropy_ref(x, w, t, token_bytes=token_bytes)
    assert_close(nats, rnats, torch.bfloat16)
    assert nbytes.item() == rnbytes.item()
