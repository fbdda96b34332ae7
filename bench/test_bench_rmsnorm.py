"""rmsnorm throughput: our Triton kernel vs its twin `rmsnorm_ref` (eager) vs torch.compile of the twin.

Forward and forward+backward, weightless (the GPT's norm) and weighted. Each entry records extra_info:
`us_per_op` and `GBps`, the effective bandwidth = the bytes the op must move at least (read x, write y, read w;
plus read x and dy, write dx, write dw in the backward; rstd and copies not counted) / time per op. Target on an
H100 in bf16: >= 2500 GB/s for the kernel (both directions).

- With CUDA: bf16 at the d20/d26 shapes (B*T = 16384 rows, C = 1280 and 1664). Each timed round runs INNER ops
  then synchronises once (a sync per op would add its latency to a ~30 us op), rotating over several input
  copies so the ~40 MB activations do not sit in L2 between ops.
- Without CUDA: fp32 at a tiny shape, the kernel under the Triton interpreter, so the entries never rot. Those
  numbers are meaningless (the interpreter is numpy, not a GPU). torch.compile entries run on CPU only with
  FLASHCHAT_BENCH_COMPILE=1 (compiling adds ~30 s on 2 cores, and the compiled code's OpenMP threads slow down
  100x on a busy machine unless OMP_NUM_THREADS=1); they always run on a GPU.

    ./run_speedrun.sh test bench/test_bench_rmsnorm.py --benchmark-group-by=group
"""

import os

import pytest
import torch

import kernels as K
from tests.tolerances import assert_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
INNER = 20 if ON_GPU else 1  # ops per timed round
ROUNDS = 20 if ON_GPU else 3
NUM_COPIES = 4 if ON_GPU else 1  # input copies rotated through, to keep the inputs out of L2
COMPILE = ON_GPU or os.environ.get("FLASHCHAT_BENCH_COMPILE") == "1"
IMPLS = ["triton", "ref", "compile"]
_compiled: dict = {}  # twin -> torch.compile(twin), built once per session


def shapes() -> list[tuple[int, int]]:
    return [(16384, 1280), (16384, 1664)] if ON_GPU else [(64, 96)]


def impl_fn(impl: str, op, twin):
    """The callable an entry times: the kernel (forced), the eager twin, or the compiled twin."""
    if impl == "triton":

        def run(*args):
            with K.backend("triton"):
                return op(*args)

        return run
    if impl == "ref":
        return twin
    if not COMPILE:
        pytest.skip("torch.compile on CPU is slow to build; set FLASHCHAT_BENCH_COMPILE=1 to include it")
    if twin not in _compiled:
        # Every (shape, weighted, grad mode) is its own graph; past the default limit of 8 per function dynamo
        # would silently fall back to eager and the entry would time the twin.
        torch._dynamo.config.recompile_limit = 64
        _compiled[twin] = torch.compile(twin)
    return _compiled[twin]


def time_ops(benchmark, step, num_bytes: int) -> None:
    """Time `step(i)` (one op on input copy i) in rounds of INNER ops; record us/op and effective GB/s."""

    def round_():
        for i in range(INNER):
            step(i % NUM_COPIES)
        if ON_GPU:
            torch.cuda.synchronize()

    for i in range(NUM_COPIES):  # compile / autotune / first launch outside the timing
        step(i)
    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.disabled:  # --benchmark-disable: ran once as a plain test, no stats
        return
    secs = benchmark.stats.stats.min / INNER
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (interpreter: numbers meaningless)",
        ops_per_round=INNER,
        us_per_op=round(secs * 1e6, 2),
        GBps=float(f"{num_bytes / secs / 1e9:.4g}"),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("weighted", [False, True], ids=["nw", "w"])
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_rmsnorm(benchmark, shape, weighted, mode, impl):
    N, C = shape
    fn = impl_fn(impl, K.rmsnorm, K.rmsnorm_ref)
    benchmark.group = f"rmsnorm-{mode}-{N}x{C}-{'w' if weighted else 'nw'}"
    torch.manual_seed(0)
    xs = [torch.randn(N, C, device=DEVICE, dtype=DTYPE, requires_grad=mode == "fwdbwd") for _ in range(NUM_COPIES)]
    dys = [torch.randn(N, C, device=DEVICE, dtype=DTYPE) for _ in range(NUM_COPIES)]
    w = (1 + 0.1 * torch.randn(C, device=DEVICE)).to(DTYPE).requires_grad_(mode == "fwdbwd") if weighted else None
    with torch.no_grad():  # a wrong kernel has no speed
        assert_close(fn(xs[0], w), K.rmsnorm_ref(xs[0], w))

    es = xs[0].element_size()
    w_bytes = C * es if weighted else 0
    if mode == "fwd":
        num_bytes = 2 * N * C * es + w_bytes

        def step(i):
            with torch.no_grad():
                fn(xs[i], w)
    else:
        num_bytes = 5 * N * C * es + 3 * w_bytes  # fwd: x, y, w; bwd: x, dy, dx, w, dw
        inputs = [[x] if w is None else [x, w] for x in xs]

        def step(i):
            torch.autograd.grad(fn(xs[i], w), inputs[i], dys[i])

    time_ops(benchmark, step, num_bytes)
