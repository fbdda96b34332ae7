"""linear_cross_entropy: the chunked Triton op vs its twin (eager, (N, V) fp32 logits) vs torch.compile(twin).

Entries: "fwdbwd" (training: loss + grads of x and the lm_head) and "fwd" (evaluation under no_grad, where the
fused op skips the gradient matmuls). extra_info: `us_per_op`, `TFLOPs` (the matmuls only: 2·N·C·V per matmul,
1 forward, 3 forward+backward -- the softmax work is not counted), and `peak_MiB`, the most memory held during
one op beyond its inputs (torch.cuda.max_memory_allocated on a GPU; on CPU the profiler's allocation events, as
in tests/test_kernel_linear_cross_entropy.py). H100 target in bf16 at d20: fwdbwd >= 1.3x the compiled twin's
speed, with a far lower peak (the twin holds several (N, V) fp32 tensors: 4 GiB each at N=16384, V=65536).

- With CUDA: bf16, N = 16384 (8 × 2048 tokens), C = 1280 (d20), V = 65536 and 32768. Rounds of INNER ops, one
  sync per round.
- Without CUDA: fp32 at a tiny shape with the kernel under the Triton interpreter, so the entries never rot; those
  numbers are meaningless. torch.compile entries run on CPU only with FLASHCHAT_BENCH_COMPILE=1 (compiling takes
  minutes here); they always run on a GPU.

    ./run_speedrun.sh test bench/test_bench_linear_cross_entropy.py --benchmark-group-by=group
"""

import os

import pytest
import torch

import kernels as K
from tests.test_kernel_linear_cross_entropy import peak_cpu_bytes
from tests.tolerances import assert_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
INNER = 5 if ON_GPU else 1  # ops per timed round (an op is ~10+ ms on an H100, so few are needed)
ROUNDS = 10 if ON_GPU else 2  # CPU: the interpreter's timing means nothing; keep `pytest bench/` short
COMPILE = ON_GPU or os.environ.get("FLASHCHAT_BENCH_COMPILE") == "1"
IMPLS = ["triton", "ref", "compile"]
_compiled: dict = {}


def shapes() -> list[tuple[int, int, int]]:
    return [(16384, 1280, 65536), (16384, 1280, 32768)] if ON_GPU else [(64, 32, 500)]


def impl_fn(impl: str):
    if impl == "triton":

        def run(*args, **kw):
            with K.backend("triton"):
                return K.linear_cross_entropy(*args, **kw)

        return run
    if impl == "ref":
        return K.linear_cross_entropy_ref
    if not COMPILE:
        pytest.skip("torch.compile on CPU takes minutes; set FLASHCHAT_BENCH_COMPILE=1 to include it")
    if "twin" not in _compiled:
        _compiled["twin"] = torch.compile(K.linear_cross_entropy_ref)
    return _compiled["twin"]


def peak_mib(step) -> float:
    """Memory held at the peak of one step beyond what was allocated before it, in MiB."""
    if not ON_GPU:
        return round(peak_cpu_bytes(step) / 2**20, 3)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_bench_linear_cross_entropy(benchmark, shape, mode, impl):
    N, C, V = shape
    fn = impl_fn(impl)
    benchmark.group = f"linear_cross_entropy-{mode}-{N}x{C}x{V}"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, C, generator=g).to(DEVICE, DTYPE).requires_grad_(mode == "fwdbwd")
    w = (torch.randn(V, C, generator=g) / C**0.5).to(DEVICE, DTYPE).requires_grad_(mode == "fwdbwd")
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    t[::50] = -1
    with torch.no_grad():  # a wrong kernel has no speed
        assert_close(fn(x, w, t), K.linear_cross_entropy_ref(x, w, t), DTYPE)

    if mode == "fwd":
        num_matmuls = 1

        def step():
            with torch.no_grad():
                fn(x, w, t)
    else:
        num_matmuls = 3

        def step():
            torch.autograd.grad(fn(x, w, t), (x, w))

    step()  # compile / first launch outside the timing and the peak
    peak = peak_mib(step)

    def round_():
        for _ in range(INNER):
            step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    secs = benchmark.stats.stats.min / INNER
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (interpreter: numbers meaningless)",
        ops_per_round=INNER,
        us_per_op=round(secs * 1e6, 1),
        TFLOPs=round(num_matmuls * 2 * N * C * V / secs / 1e12, 2),
        peak_MiB=peak,
        logits_fp32_MiB=round(N * V * 4 / 2**20, 1),
    )
