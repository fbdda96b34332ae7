"""attention throughput: our Triton FlashAttention vs torch SDPA vs flash_attn (when installed) vs the twin.

Causal forward and forward+backward. Each entry records extra_info `ms_per_op` and `TFLOPs`: causal FLOPs are
4·B·H·T²·D / 2 for the forward (two matmuls, half the score matrix) and 2.5× that for the backward (five matmuls),
so fwd+bwd counts 3.5×; a windowed entry counts the visible keys only. Targets on an H100 in bf16 (d20 shapes):
forward >= 400 TFLOP/s, backward >= 250 TFLOP/s for our kernel.

- With CUDA: bf16 at d20 shapes (B=8, T=2048, H=10, D=128), full causal and window 512. flash_attn entries skip
  when no flash_attn package imports; the twin materialises (B, H, T, T) fp32 scores (~1.3 GB at d20).
- Without CUDA: fp32 at a tiny shape, our kernel under the Triton interpreter, so the entries never rot. Those
  numbers are meaningless (the interpreter is numpy, not a GPU). torch.compile of the twin runs on CPU only with
  FLASHCHAT_BENCH_COMPILE=1; it always runs on a GPU.

    ./run_speedrun.sh test bench/test_bench_attention.py --benchmark-group-by=group
"""

import importlib
import os

import pytest
import torch

import kernels._dispatch as _dispatch
from kernels.attention import attention, attention_ref
from tests.tolerances import assert_close

A = importlib.import_module("kernels.attention")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
INNER = 5 if ON_GPU else 1  # ops per timed round (each is milliseconds on a GPU: one sync per round is enough)
ROUNDS = 10 if ON_GPU else 2  # CPU: the interpreter's timing means nothing; keep `pytest bench/` short
COMPILE = ON_GPU or os.environ.get("FLASHCHAT_BENCH_COMPILE") == "1"
IMPLS = ["triton", "sdpa", "flash_attn", "ref", "compile"]
_compiled: dict = {}


def shapes() -> list[tuple[int, int, int, int]]:
    return [(8, 2048, 10, 128)] if ON_GPU else [(1, 128, 2, 32)]


def impl_fn(impl: str):
    """The callable an entry times, each with attention's signature (q, k, v, causal, window)."""
    if impl == "triton":

        def run(q, k, v, causal, window):
            with _dispatch.backend("triton"):
                return attention(q, k, v, causal, window)

        return run
    if impl == "sdpa":
        return lambda q, k, v, causal, window: A._attention_sdpa(q, k, v, causal, window, None, None)
    if impl == "flash_attn":
        fa = A._flash_attn() if ON_GPU else None
        if fa is None:
            pytest.skip("no flash_attn package imports here (or no GPU)")
        return lambda q, k, v, causal, window: A._attention_flash_attn(*fa, q, k, v, causal, window, None, None, None)
    if impl == "ref":
        return attention_ref
    if not COMPILE:
        pytest.skip("torch.compile on CPU is slow to build; set FLASHCHAT_BENCH_COMPILE=1 to include it")
    if "ref" not in _compiled:
        torch._dynamo.config.recompile_limit = 64
        _compiled["ref"] = torch.compile(attention_ref)
    return _compiled["ref"]


def causal_flops(B: int, T: int, H: int, D: int, window: int | None) -> float:
    """Forward FLOPs of causal attention: 2 matmuls × 2·D per visible (query, key) pair."""
    if window is None or window >= T - 1:
        pairs = T * (T + 1) / 2
    else:  # query i sees min(i, window) + 1 keys
        pairs = (window + 1) * (window + 2) / 2 + (T - window - 1) * (window + 1)
    return 4 * B * H * D * pairs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("window", [None, 512], ids=["full", "window"])  # CPU: window T//4
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: "x".join(map(str, s)))
def test_bench_attention(benchmark, shape, window, mode, impl):
    B, T, H, D = shape
    if window is not None and not ON_GPU:
        window = T // 4  # keep a window shorter than the tiny CPU sequence
    fn = impl_fn(impl)
    benchmark.group = f"attention-{mode}-{'x'.join(map(str, shape))}-{'full' if window is None else f'w{window}'}"
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE, dtype=DTYPE, requires_grad=mode == "fwdbwd") for _ in "qkv")
    do = torch.randn_like(q)
    if not (ON_GPU and impl == "ref"):  # a wrong kernel has no speed (the twin checks itself only on the CPU)
        with torch.no_grad():
            want = attention_ref(q[:1], k[:1], v[:1], True, window).float()
            assert_close(fn(q[:1], k[:1], v[:1], True, window).float(), want, dtype=DTYPE, scale=2)

    flops = causal_flops(B, T, H, D, window) * (1 if mode == "fwd" else 3.5)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                fn(q, k, v, True, window)
    else:

        def step():
            torch.autograd.grad(fn(q, k, v, True, window), (q, k, v), do)

    def round_():
        for _ in range(INNER):
            step()
        if ON_GPU:
            torch.cuda.synchronize()

    step()  # compile / first launch outside the timing
    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.disabled:
        return
    secs = benchmark.stats.stats.min / INNER
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu (interpreter: numbers meaningless)",
        ops_per_round=INNER,
        ms_per_op=round(secs * 1e3, 3),
        TFLOPs=float(f"{flops / secs / 1e12:.4g}"),
    )
