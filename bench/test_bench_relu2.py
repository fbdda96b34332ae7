"""relu2 throughput: our Triton kernels vs the twin `relu2_ref` (eager) vs torch.compile of the twin.

Forward and forward+backward on the MLP's hidden activation (B*T rows, 4*C columns). extra_info records
`us_per_op` and `GBps`, the effective bandwidth: fwd reads x and writes y; bwd reads x and dy and writes dx.
Same harness as bench/test_bench_rmsnorm.py: bf16 at d20/d26 shapes (16384 x 5120, 16384 x 6656) with CUDA;
without CUDA, fp32 at a tiny shape under the Triton interpreter just to keep the entries alive (numbers
meaningless), and torch.compile only with FLASHCHAT_BENCH_COMPILE=1.
"""

import pytest
import torch

import kernels as K
from bench.test_bench_rmsnorm import DEVICE, DTYPE, IMPLS, NUM_COPIES, impl_fn, shapes, time_ops
from tests.tolerances import assert_close


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", [(N, 4 * C) for N, C in shapes()], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_relu2(benchmark, shape, mode, impl):
    fn = impl_fn(impl, K.relu2, K.relu2_ref)
    benchmark.group = f"relu2-{mode}-{shape[0]}x{shape[1]}"
    torch.manual_seed(0)
    xs = [torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=mode == "fwdbwd") for _ in range(NUM_COPIES)]
    dys = [torch.randn(shape, device=DEVICE, dtype=DTYPE) for _ in range(NUM_COPIES)]
    with torch.no_grad():  # a wrong kernel has no speed
        assert_close(fn(xs[0]), K.relu2_ref(xs[0]))

    size = xs[0].numel() * xs[0].element_size()
    if mode == "fwd":
        num_bytes = 2 * size

        def step(i):
            with torch.no_grad():
                fn(xs[i])
    else:
        num_bytes = 5 * size  # fwd: x, y; bwd: x, dy, dx

        def step(i):
            torch.autograd.grad(fn(xs[i]), xs[i], dys[i])

    time_ops(benchmark, step, num_bytes)
