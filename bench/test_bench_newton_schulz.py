"""Newton-Schulz / Polar Express throughput: the Triton kernel (symmetric tiles on and off) vs the twin and
torch.compile(twin), on stacks of d20 Muon matrices (width 1280, MLP 5120: square, tall and wide).

    ./run_speedrun.sh test bench/test_bench_newton_schulz.py                 # on a GPU: bf16, K = 4, 10, 20

On CUDA the iterations are bf16 (as Muon runs them) and every entry's extra_info has TFLOP/s, counted as the dense
4m²n + 2m³ FLOPs per matrix and step (m ≤ n) for every entry, so the symmetric kernel's number is "dense-equivalent"
and entries compare as times; triton entries also carry `x_vs_compiled`, their speed-up over torch.compile(twin)
(the H100 target is ≥ 1.2). This bench decides newton_schulz.USE_SYMMETRY.
Without a GPU the kernel runs under the Triton interpreter on tiny fp32 shapes: those numbers only prove that the
bench runs, they say nothing about speed. torch.compile entries run on CPU only with FLASHCHAT_BENCH_COMPILE=1.
"""

import importlib
import os

import pytest
import torch

from kernels.newton_schulz import newton_schulz_ref

ns = importlib.import_module("kernels.newton_schulz")  # the module: `kernels.newton_schulz` is also the op's name

STEPS = 5
# name -> (rows, cols) of one matrix: d20's attention/square, MLP up (tall as stored: out × in) and MLP down.
D20 = {"square": (1280, 1280), "tall": (5120, 1280), "wide": (1280, 5120)}
# One 32-wide tile under the interpreter: a call costs ~0.7 s there, against ~3 s at 48 or 80 (two tiles).
CPU_SHAPES = {"square": (32, 32), "tall": (32, 16), "wide": (16, 32)}
IMPLS = ["twin", "twin-compiled", "triton", "triton-nosym"]  # compiled first: the triton entries divide by it
SECONDS: dict[tuple, float] = {}


def _case(name: str, num_matrices: int, on_gpu: bool):
    """(G, compute_dtype) for one bench case: d20 bf16 stacks on the GPU, one tiny fp32 pair on the CPU."""
    if on_gpu:
        G = torch.randn(num_matrices, *D20[name], device="cuda", dtype=torch.bfloat16)
        return G, torch.bfloat16
    return torch.randn(2, *CPU_SHAPES[name]), torch.float32


def _flops(G: torch.Tensor) -> float:
    m, n = sorted(G.shape[-2:])
    return STEPS * G.shape[0] * (4 * m * m * n + 2 * m**3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_matrices", [4, 10, 20])
@pytest.mark.parametrize("name", list(D20))
def test_newton_schulz(benchmark, name, num_matrices, impl):
    on_gpu = torch.cuda.is_available()
    if not on_gpu and num_matrices != 4:
        pytest.skip("on CPU one tiny case per shape (interpreter)")
    if impl == "twin-compiled" and not on_gpu and os.environ.get("FLASHCHAT_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile on CPU only with FLASHCHAT_BENCH_COMPILE=1")
    G, dtype = _case(name, num_matrices, on_gpu)
    if impl == "twin":
        op = newton_schulz_ref
    elif impl == "twin-compiled":
        # A fresh compile per case: 9 shapes would pass dynamo's recompile limit and silently run eager.
        torch._dynamo.reset()
        op = torch.compile(newton_schulz_ref, dynamic=False)
    else:
        use_symmetry = impl == "triton"

        def op(G, steps, coeffs, eps, compute_dtype):
            return ns._newton_schulz_triton(G, steps, coeffs, eps, compute_dtype, use_symmetry)

    def run():
        X = op(G, STEPS, "polar_express", 1e-7, dtype)
        if on_gpu:
            torch.cuda.synchronize()
        return X

    if on_gpu:
        run()  # compile / JIT outside the timing (the interpreter compiles nothing)
        benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(run, rounds=1)  # the interpreter takes a second per call; its timing means nothing
    secs = benchmark.stats.stats.min
    SECONDS[(name, num_matrices, impl)] = secs
    benchmark.extra_info["shape"] = list(G.shape)
    benchmark.extra_info["dtype"] = str(dtype)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)"
    benchmark.extra_info["TFLOP_s"] = round(_flops(G) / secs / 1e12, 3)
    compiled = SECONDS.get((name, num_matrices, "twin-compiled"))
    if impl.startswith("triton") and compiled:
        benchmark.extra_info["x_vs_compiled"] = round(compiled / secs, 3)
