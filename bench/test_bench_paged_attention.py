"""Paged-KV inference kernels: decode attention vs its twin vs dense-cache SDPA decode, chunked prefill, kv_store.

Decode is bound by reading K and V, so each decode entry records extra_info `GBps` = the K/V bytes the step must
read (sum of seq_lens * Hkv * D * 2 tensors * bytes) / time per step, and `pct_hbm` = that over the card's HBM
bandwidth (H100 SXM 3.35e12 B/s, H200 4.8e12 B/s; from torch.cuda.get_device_name, absent for other cards).
Targets on an H100 (not yet measured): paged decode >= 70% of HBM at batch 64 / context 2048, and >= the dense SDPA
decode over the same sequences held in a dense (B, T, Hkv, D) cache (SDPA reads it through a (B, Hkv, T, D) view).

- With CUDA: bf16, D=128, H=10 (d20), block 16, Hkv 10 and 5. Batch 64 at context 2048 (every sequence full, so
  the dense cache holds no padding); batch 1 at context 32768 with the default split count and with num_splits=1,
  to show what split-K buys when B*Hkv programs cannot fill the GPU. Prefill: 4 sequences of 2048 new tokens
  (TFLOP/s, causal: 2*2*T^2/2*H*D per sequence) vs SDPA causal. kv_store: a decode step's 64 rows and a prefill
  chunk's 8192.
- Without CUDA: tiny fp32 shapes, the kernels under the Triton interpreter, so the entries never rot. Those numbers
  are meaningless (the interpreter is numpy, not a GPU).

    ./run_speedrun.sh test bench/test_bench_paged_attention.py --benchmark-group-by=group
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from bench.test_bench_rmsnorm import DEVICE, DTYPE, ON_GPU, time_ops
from kernels import _dispatch
from tests.tolerances import assert_close

PA = importlib.import_module("kernels.paged_attention")
KV = importlib.import_module("kernels.kv_cache")
BLOCK_SIZE = 16
D = 128 if ON_GPU else 32
H = 10 if ON_GPU else 4
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM parts; a PCIe/NVL name falls through to "unknown"


def hbm_peak() -> float | None:
    if not ON_GPU:
        return None
    name = torch.cuda.get_device_name()
    for key, peak in HBM_BYTES_PER_S.items():
        if key in name and "PCIe" not in name and "NVL" not in name:
            return peak
    return None


def decode_cases() -> list[tuple[int, int, int]]:
    """(batch, context, Hkv)."""
    if ON_GPU:
        return [(64, 2048, 10), (64, 2048, 5), (1, 32768, 10)]
    return [(2, 96, 2)]


def paged_and_dense(B: int, T: int, Hkv: int):
    """B full sequences of T tokens: a paged pool with shuffled blocks, its table, and the same K/V dense."""
    assert T % BLOCK_SIZE == 0, "full blocks only: the dense cache then holds exactly the paged tokens"
    torch.manual_seed(0)
    num_blocks = B * T // BLOCK_SIZE
    k_dense = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=DTYPE)
    v_dense = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=DTYPE)
    ids = torch.randperm(num_blocks, device=DEVICE)
    table = ids.view(B, T // BLOCK_SIZE).to(torch.int32)
    k_cache = torch.empty(num_blocks, BLOCK_SIZE, Hkv, D, device=DEVICE, dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    k_cache[ids] = k_dense.view(num_blocks, BLOCK_SIZE, Hkv, D)
    v_cache[ids] = v_dense.view(num_blocks, BLOCK_SIZE, Hkv, D)
    seq_lens = torch.full((B,), T, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, table, seq_lens, k_dense, v_dense


def record_bandwidth(benchmark, num_bytes: int) -> None:
    if benchmark.disabled:
        return
    secs = benchmark.stats.stats.min / benchmark.extra_info["ops_per_round"]
    peak = hbm_peak()
    benchmark.extra_info["KV_MB_per_step"] = round(num_bytes / 1e6, 1)
    if peak is not None:
        benchmark.extra_info["pct_hbm"] = round(100 * num_bytes / secs / peak, 1)


@pytest.mark.parametrize("impl", ["triton", "triton_no_split", "ref", "sdpa_dense"])
@pytest.mark.parametrize("case", decode_cases(), ids=lambda c: f"B{c[0]}-T{c[1]}-Hkv{c[2]}")
def test_bench_paged_decode(benchmark, case, impl):
    B, T, Hkv = case
    default_splits = PA.default_num_splits(B, Hkv, T, PA._num_sms(torch.device(DEVICE)))
    if impl == "triton_no_split" and default_splits == 1:
        pytest.skip("num_splits=1 is the default at this shape already")
    benchmark.group = f"paged-decode-B{B}-T{T}-H{H}-Hkv{Hkv}-D{D}"
    k_cache, v_cache, table, seq_lens, k_dense, v_dense = paged_and_dense(B, T, Hkv)
    q = torch.randn(B, H, D, device=DEVICE, dtype=DTYPE)
    if impl == "sdpa_dense":
        qs, ks, vs = q[:, :, None], k_dense.transpose(1, 2), v_dense.transpose(1, 2)

        def fn():
            return F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=H != Hkv)[:, :, 0]
    elif impl == "ref":

        def fn():
            return PA.paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens)
    else:
        num_splits = 1 if impl == "triton_no_split" else None

        def fn():
            with _dispatch.backend("triton"):
                return PA.paged_attention_decode(q, k_cache, v_cache, table, seq_lens, num_splits=num_splits)

    with torch.no_grad():  # a wrong kernel has no speed
        assert_close(fn(), PA.paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens))
    num_bytes = 2 * B * T * Hkv * D * k_cache.element_size()
    time_ops(benchmark, lambda i: fn(), num_bytes)
    record_bandwidth(benchmark, num_bytes)
    if impl.startswith("triton") and not benchmark.disabled:
        benchmark.extra_info["num_splits"] = 1 if impl == "triton_no_split" else default_splits


@pytest.mark.parametrize("impl", ["triton", "ref", "sdpa_dense"])
def test_bench_paged_prefill(benchmark, impl):
    B, T, Hkv = (4, 2048, 10) if ON_GPU else (2, 64, 2)
    benchmark.group = f"paged-prefill-B{B}-T{T}-H{H}-Hkv{Hkv}-D{D}"
    k_cache, v_cache, table, seq_lens, k_dense, v_dense = paged_and_dense(B, T, Hkv)
    q = torch.randn(B * T, H, D, device=DEVICE, dtype=DTYPE)
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=DEVICE)
    if impl == "sdpa_dense":
        qs, ks, vs = q.view(B, T, H, D).transpose(1, 2), k_dense.transpose(1, 2), v_dense.transpose(1, 2)

        def fn():
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=H != Hkv)
    elif impl == "ref":

        def fn():
            return PA.paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens)
    else:

        def fn():
            with _dispatch.backend("triton"):
                return PA.paged_attention_prefill(q, k_cache, v_cache, table, cu, seq_lens)

    if impl != "sdpa_dense":
        with torch.no_grad():
            assert_close(fn(), PA.paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens))
    time_ops(benchmark, lambda i: fn(), 2 * B * T * Hkv * D * k_cache.element_size())
    if not benchmark.disabled:
        flops = B * 2 * 2 * T * T / 2 * H * D  # QK^T and PV over the causal half
        benchmark.extra_info["TFLOPs"] = round(flops / (benchmark.stats.stats.min / benchmark.extra_info[
            "ops_per_round"]) / 1e12, 1)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("N", [64, 8192] if ON_GPU else [7])
def test_bench_kv_store(benchmark, N, impl):
    Hkv = 10 if ON_GPU else 2
    benchmark.group = f"kv-store-N{N}-Hkv{Hkv}-D{D}"
    torch.manual_seed(0)
    num_blocks = 4096 if ON_GPU else 8
    k, v = torch.randn(2, N, Hkv, D, device=DEVICE, dtype=DTYPE)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE)[:N]
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, Hkv, D, device=DEVICE, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    op = KV.kv_store_ref if impl == "ref" else KV.kv_store

    def step(i):
        with _dispatch.backend("triton" if impl == "triton" else "ref"):
            op(k, v, k_cache, v_cache, slots)

    time_ops(benchmark, step, 4 * N * Hkv * D * k.element_size())  # read k, v; write both


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [(64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3)],
                         ids=lambda c: f"N{c[0]}-w{c[1]}-s{c[2]}")
def test_bench_paged_decode_configs(benchmark, cfg):
    """Sweep of the decode tile (BLOCK_N keys, warps, pipeline stages) at batch 64 / context 2048 / Hkv 10, to pick
    `_decode_config`'s one config on a GPU (the default is a guess until this has run on an H100)."""
    block_n, num_warps, num_stages = cfg
    B, T, Hkv = 64, 2048, 10
    benchmark.group = f"paged-decode-configs-B{B}-T{T}-H{H}-Hkv{Hkv}-D{D}"
    k_cache, v_cache, table, seq_lens, _, _ = paged_and_dense(B, T, Hkv)
    q = torch.randn(B, H, D, device=DEVICE, dtype=DTYPE)

    def fn():
        return PA._paged_attention_decode_triton(q, k_cache, v_cache, table, seq_lens, D**-0.5, None, 1,
                                                 block_n=block_n, num_warps=num_warps, num_stages=num_stages)

    assert_close(fn(), PA.paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens))
    num_bytes = 2 * B * T * Hkv * D * k_cache.element_size()
    time_ops(benchmark, lambda i: fn(), num_bytes)
    record_bandwidth(benchmark, num_bytes)
