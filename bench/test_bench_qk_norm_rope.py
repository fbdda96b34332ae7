"""qk_norm_rope throughput: our Triton kernel vs its twin vs torch.compile of the twin, forward and forward+backward.

    ./run_speedrun.sh test bench/test_bench_qk_norm_rope.py
    FLASHCHAT_BENCH_COMPILE=1 ... # also the torch.compile entries on CPU (needs a C++ compiler; slow to compile)

extra_info["GB_per_s"] is effective bandwidth: the bytes the op must move at least (forward: read q, k and the
cos/sin tables, write y_q, y_k; backward: read q, k, dy and the tables, write dq, dk) over the measured time, the
same count for every implementation so they compare directly. H100 target for the kernel: >= 2.5 TB/s.

- CUDA: bf16 at the model's shapes, d20 (B·T = 8·2048 = 16384 tokens, H = Hkv = 10, D = 128) and d26 (H = 13). One
  benchmark round is REPEAT calls then one synchronize (a sync per call would add its latency to a ~60 µs op);
  the ms_per_call and GB_per_s in extra_info are per call.
- CPU: one tiny fp32 shape, the Triton path under the interpreter (TRITON_INTERPRET=1, set by the conftest) only so
  these entries never rot: CPU numbers mean nothing about the kernel.
"""

import os

import pytest
import torch

import kernels as K
from kernels.qk_norm_rope import qk_norm_rope_ref

HAS_CUDA = torch.cuda.is_available()
COMPILE_ON_CPU = os.environ.get("FLASHCHAT_BENCH_COMPILE") == "1"
REPEAT = 20 if HAS_CUDA else 1
SCALE = 1.2  # nanochat's QK scale

# name: (B, T, H, Hkv, D)
GPU_SHAPES = {"d20": (8, 2048, 10, 10, 128), "d26": (8, 2048, 13, 13, 128)}
CPU_SHAPES = {"tiny": (1, 16, 2, 1, 16)}
SHAPES = GPU_SHAPES if HAS_CUDA else CPU_SHAPES
_compiled = {}  # one torch.compile of the twin per session


def _kernel(*args):
    with K.backend("triton"):
        return K.qk_norm_rope(*args)


def _compiled_ref(*args):
    if "ref" not in _compiled:
        _compiled["ref"] = torch.compile(qk_norm_rope_ref)
    return _compiled["ref"](*args)


IMPLS = {"triton": _kernel, "ref": qk_norm_rope_ref, "compile": _compiled_ref}


def _inputs(shape):
    B, T, H, HKV, D = shape
    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA else ("cpu", torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(B, T, HKV, D, device=device, dtype=dtype, generator=gen, requires_grad=True)
    angle = torch.rand(T, D // 2, device=device, generator=gen) * 6.28
    return q, k, angle.cos().to(dtype), angle.sin().to(dtype)


def _min_bytes(q, k, cos, sin, with_backward: bool) -> int:
    qk = q.numel() * q.element_size() + k.numel() * k.element_size()
    tables = cos.numel() * cos.element_size() + sin.numel() * sin.element_size()
    fwd = 2 * qk + tables
    return fwd + (3 * qk + tables if with_backward else 0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_bench_qk_norm_rope(benchmark, shape_name, mode, impl):
    if impl == "compile" and not HAS_CUDA and not COMPILE_ON_CPU:
        pytest.skip("torch.compile on CPU runs only with FLASHCHAT_BENCH_COMPILE=1 (needs a C++ compiler; slow)")
    op = IMPLS[impl]
    q, k, cos, sin = _inputs(SHAPES[shape_name])
    with_backward = mode == "fwd_bwd"
    if with_backward:
        gq, gk = torch.randn_like(q), torch.randn_like(k)

    def one_call():
        if with_backward:
            yq, yk = op(q, k, cos, sin, SCALE)
            torch.autograd.grad((yq, yk), (q, k), (gq, gk))  # grad(), not backward(): no accumulation kernel
        else:
            with torch.no_grad():
                op(q, k, cos, sin, SCALE)

    def one_round():
        for _ in range(REPEAT):
            one_call()
        if HAS_CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"qk_norm_rope-{shape_name}-{mode}"
    one_round()  # compile / JIT outside the timed rounds
    rounds, warmup = (30, 3) if HAS_CUDA else (3, 1)
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
    secs = benchmark.stats.stats.min / REPEAT
    num_bytes = _min_bytes(q, k, cos, sin, with_backward)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu (Triton interpreter; numbers meaningless)",
        shape=dict(zip("B T H Hkv D".split(), SHAPES[shape_name], strict=True)),
        dtype=str(q.dtype),
        calls_per_round=REPEAT,
        ms_per_call=round(secs * 1e3, 4),
        GB_per_s=round(num_bytes / secs / 1e9, 2),
    )
