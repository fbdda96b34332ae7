"""Paged KV cache kernels against their twins: kv_store, paged_attention_decode, paged_attention_prefill.

On CPU the kernels run under the Triton interpreter (tests/conftest.py) in fp32 and fp16 at small shapes (Hkv <= 2,
D <= 32, a few sequences per call, so programs stay few): block sizes 16 and 32, lengths 1, 7, 33, 123 (not
multiples of the block) and a few hundred, GQA ratios 1/2/4, shuffled non-contiguous block ids, num_splits
1/2/3/4, windows shorter and longer than the sequence, empty and long prefixes, -1 slots. An end-to-end check
stores a sequence chunk by chunk and compares prefill and decode with dense causal SDPA. The GPU configurations are
compiled to sm_90 code here (no GPU needed). bf16 at real shapes (batch 64, context 2048, H=10, Hkv 10 and 5, D=128,
block 16) and CUDA-graph capture of decode are `gpu` tests.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels  # noqa: F401  (the package first: kernels.paged_attention imports kernels._dispatch)
from kernels import _dispatch
from tests.test_kernel_rmsnorm import compile_for_sm90
from tests.tolerances import assert_close

PA = importlib.import_module("kernels.paged_attention")
KV = importlib.import_module("kernels.kv_cache")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INVALID_BLOCK = 1 << 30  # table entries past a sequence's blocks: reading one would fault, so none is read


def cdiv(a, b):
    return -(-a // b)


def make_cache(lens, block_size, Hkv, D, dtype, device=DEVICE, spare_blocks=3):
    """Random pools with every sequence's blocks at shuffled, non-contiguous ids (plus spare unused blocks), and
    its block table (B, max_blocks + 1) int32 padded with INVALID_BLOCK."""
    need = [cdiv(L, block_size) for L in lens]
    num_blocks = sum(need) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    ids = torch.randperm(num_blocks, device=device).to(torch.int32)
    table = torch.full((len(lens), max(need, default=0) + 1), INVALID_BLOCK, dtype=torch.int32, device=device)
    i = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[i : i + n]
        i += n
    return k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32, device=device)


def run_triton(fn, *args, **kwargs):
    with _dispatch.backend("triton"):
        out = fn(*args, **kwargs)
    assert _dispatch.which(fn.__name__) == "triton"
    return out


def check_decode(lens, block_size, H, Hkv, D, dtype, window=None, num_splits=None, seed=0):
    torch.manual_seed(seed)
    k_cache, v_cache, table, seq_lens = make_cache(lens, block_size, Hkv, D, dtype)
    q = torch.randn(len(lens), H, D, device=DEVICE).to(dtype)
    out = run_triton(PA.paged_attention_decode, q, k_cache, v_cache, table, seq_lens, window=window,
                     num_splits=num_splits)
    ref = PA.paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens, window=window)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref)
    return out


def pack(prefixes, news, H, D, dtype, device=DEVICE):
    """Packed queries for sequences with cached prefixes and new token counts: q, cu_seqlens_q, total lengths."""
    cu = torch.tensor([0] + torch.tensor(news).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(int(sum(news)), H, D, device=device).to(dtype)
    return q, cu, [p + n for p, n in zip(prefixes, news, strict=True)]


def check_prefill(prefixes, news, block_size, H, Hkv, D, dtype, window=None, seed=0):
    torch.manual_seed(seed)
    q, cu, lens = pack(prefixes, news, H, D, dtype)
    k_cache, v_cache, table, seq_lens = make_cache(lens, block_size, Hkv, D, dtype)
    out = run_triton(PA.paged_attention_prefill, q, k_cache, v_cache, table, cu, seq_lens, window=window)
    ref = PA.paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens, window=window)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref)


# ---------------------------------------------------------------------------------------------------- kv_store


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("N", [1, 7, 123])
def test_kv_store_matches_twin(N, block_size, cache_dtype):
    torch.manual_seed(N)
    Hkv, D, num_blocks = 2, 24, 9
    # k and v as head slices of a fused (N, H + 2 Hkv, D) projection: token stride != Hkv * D.
    qkv = torch.randn(N, 4 + 2 * Hkv, D, device=DEVICE)
    k, v = qkv[:, 4 : 4 + Hkv], qkv[:, 4 + Hkv :]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:N]
    slots[::3] = -1  # padded rows: skipped
    caches = [torch.randn(num_blocks, block_size, Hkv, D, device=DEVICE).to(cache_dtype) for _ in range(2)]
    refs = [c.clone() for c in caches]
    with _dispatch.backend("triton"):
        KV.kv_store(k, v, *caches, slots)
    assert _dispatch.which("kv_store") == "triton"
    KV.kv_store_ref(k, v, *refs, slots)
    assert torch.equal(caches[0], refs[0]) and torch.equal(caches[1], refs[1])
    kept = slots[slots >= 0]
    assert torch.equal(caches[0].view(-1, Hkv, D)[kept], k[slots >= 0].to(cache_dtype))


def test_kv_store_errors_and_dispatch():
    k = torch.randn(4, 2, 8)
    pool = torch.zeros(3, 16, 2, 8)
    slots = torch.arange(4)
    with _dispatch.backend("triton"):
        with pytest.raises(ValueError, match="contiguous"):
            KV.kv_store(k, k, pool.transpose(0, 1), pool.transpose(0, 1), slots)
        with pytest.raises(ValueError, match="int64"):
            KV.kv_store(k, k, pool, pool.clone(), slots.int())
        with pytest.raises(ValueError, match="Hkv, D"):
            KV.kv_store(torch.randn(4, 1, 8), torch.randn(4, 1, 8), pool, pool.clone(), slots)
        KV.kv_store(k[:0], k[:0], pool, pool.clone(), slots[:0])  # nothing to write
    with _dispatch.backend("ref"):
        KV.kv_store(k, k, pool, pool.clone(), slots)
    assert _dispatch.which("kv_store") == "ref"
    assert torch.equal(pool.view(-1, 2, 8)[:4], k)


# ------------------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_decode_matches_twin(G, block_size, dtype):
    """Several sequences of different lengths (none a multiple of the block) in one call, shuffled blocks."""
    check_decode([1, 7, 33, 123], block_size, H=2 * G, Hkv=2, D=32, dtype=dtype, seed=G)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 4])
def test_decode_num_splits_agree(num_splits):
    """Split-K gives the twin's result for every split count, including splits left empty by short sequences."""
    out = check_decode([1, 7, 33, 123, 300], 16, H=4, Hkv=2, D=16, dtype=torch.float32, num_splits=num_splits)
    one = check_decode([1, 7, 33, 123, 300], 16, H=4, Hkv=2, D=16, dtype=torch.float32, num_splits=1)
    assert_close(out, one)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [0, 5, 40, 1000])
def test_decode_window(window, num_splits):
    check_decode([1, 7, 33, 123], 16, H=4, Hkv=2, D=16, dtype=torch.float32, window=window, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_long_context(dtype):
    """A few hundred tokens with small H/D, at block size 32, with and without splits."""
    for num_splits in (1, 4):
        check_decode([257, 511], 32, H=2, Hkv=1, D=16, dtype=dtype, num_splits=num_splits, seed=3)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_empty_sequence_gives_zeros(num_splits):
    """A padded row (seq_lens = 0, e.g. a CUDA-graph batch filled up to its captured size) gives 0, not NaN."""
    out = check_decode([0, 9], 16, H=2, Hkv=1, D=16, dtype=torch.float32, num_splits=num_splits)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_default_num_splits():
    # d20 decode on an H100 (132 SMs): 64 x 10 programs already cover the GPU; batch 1 splits, short contexts less.
    assert PA.default_num_splits(64, 10, 2048, 132) == 1
    assert PA.default_num_splits(64, 5, 2048, 132) == 2
    assert PA.default_num_splits(1, 10, 32768, 132) == 53
    assert PA.default_num_splits(1, 10, 300, 132) == 2
    assert PA.default_num_splits(1, 1, 10**6, 132) == PA.MAX_SPLITS
    assert PA.default_num_splits(1, 10, 32768, None) == 1


# ----------------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_prefill_matches_twin(G, block_size, dtype):
    """Five sequences in one call: prefill from nothing (1, 7 and 33 tokens), a prefix ending mid-block, a long
    prefix with one new token."""
    check_prefill([0, 0, 0, 5, 100], [1, 7, 33, 30, 1], block_size, H=G, Hkv=1, D=32, dtype=dtype, seed=G)


@pytest.mark.parametrize("window", [0, 5, 40, 1000])
def test_prefill_window(window):
    check_prefill([0, 20, 90], [45, 33, 33], 16, H=4, Hkv=2, D=16, dtype=torch.float32, window=window)


def test_prefill_long_prefix():
    check_prefill([300, 0], [40, 123], 32, H=2, Hkv=1, D=16, dtype=torch.float32)


def test_prefill_tile_numbering():
    """Sequences whose new tokens are not multiples of the query tile, with a sequence of 0 new tokens between."""
    check_prefill([3, 10, 0, 64], [31, 0, 33, 64], 16, H=2, Hkv=1, D=16, dtype=torch.float32)


def test_q_slice_of_fused_projection():
    """q as the head slice of a fused (N, H + 2 Hkv, D) qkv tensor (token stride != H * D) runs without a copy."""
    torch.manual_seed(11)
    H, Hkv, D = 4, 2, 16
    k_cache, v_cache, table, seq_lens = make_cache([9, 40], 16, Hkv, D, torch.float32)
    q = torch.randn(2, H + 2 * Hkv, D, device=DEVICE)[:, :H]
    out = run_triton(PA.paged_attention_decode, q, k_cache, v_cache, table, seq_lens, num_splits=2)
    assert_close(out, PA.paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens))
    cu = torch.tensor([0, 3, 20], dtype=torch.int32, device=DEVICE)
    q = torch.randn(20, H + 2 * Hkv, D, device=DEVICE)[:, :H]
    out = run_triton(PA.paged_attention_prefill, q, k_cache, v_cache, table, cu, seq_lens)
    assert_close(out, PA.paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens))


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("G", [1, 4])
def test_store_then_attend_equals_dense_causal(G, window):
    """kv_store a sequence's k/v chunk by chunk into shuffled blocks; prefill each chunk (the first from nothing)
    and decode the last tokens one at a time: every output equals dense causal SDPA over the whole sequence."""
    torch.manual_seed(7)
    T, chunks, Hkv, D, block_size = 75, [40, 30], 1, 16, 16
    H = G * Hkv
    q, k, v = (torch.randn(T, h, D, device=DEVICE) for h in (H, Hkv, Hkv))
    mask = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    if window is not None:
        mask &= ~torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril(-window - 1)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(G, 0),
                                           v.transpose(0, 1).repeat_interleave(G, 0), attn_mask=mask).transpose(0, 1)
    k_cache, v_cache, table, _ = make_cache([T], block_size, Hkv, D, torch.float32)
    slot_of = lambda t: table[0, t // block_size].long() * block_size + t % block_size  # noqa: E731
    done = 0
    with _dispatch.backend("triton"):
        for n in chunks + [1] * (T - sum(chunks)):
            pos = torch.arange(done, done + n, device=DEVICE)
            KV.kv_store(k[pos], v[pos], k_cache, v_cache, slot_of(pos))
            seq_lens = torch.tensor([done + n], dtype=torch.int32, device=DEVICE)
            if n == 1:
                out = PA.paged_attention_decode(q[pos], k_cache, v_cache, table, seq_lens, window=window,
                                                num_splits=2)
            else:
                cu = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
                out = PA.paged_attention_prefill(q[pos], k_cache, v_cache, table, cu, seq_lens, window=window)
            assert_close(out, dense[pos])
            done += n


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("G", [1, 3])
def test_twins_equal_dense_per_sequence(G, window):
    """The twins batch their work (every decode at once, padded to the longest sequence; a mixed prefill sends its
    one-token sequences through the decode twin): each sequence's rows still equal dense SDPA over that sequence
    alone, whatever the padding, the unused table entries (INVALID_BLOCK), unowned pool slots (NaN here) and an
    empty sequence hold."""
    torch.manual_seed(3)
    Hkv, D, block_size = 2, 8, 4
    H = G * Hkv
    news, prefixes = [1, 6, 1, 3, 1], [12, 0, 0, 9, 30]  # a mixed step: decodes beside prefill chunks
    lens = [p + n for p, n in zip(prefixes, news, strict=True)]
    k_cache, v_cache, table, seq_lens = make_cache(lens, block_size, Hkv, D, torch.float32)
    owned = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)  # pool slots holding a sequence's token
    for b, L in enumerate(lens):
        pos = torch.arange(L, device=DEVICE)
        owned[table[b, pos // block_size].long(), pos % block_size] = True
    k_cache[~owned] = float("nan")  # what padding reads (block tails, spare blocks) must not reach the output
    v_cache[~owned] = float("nan")
    q, cu, _ = pack(prefixes, news, H, D, torch.float32)

    def dense(b, rows):  # SDPA over sequence b's keys, for its queries `rows` at its last len(rows) positions
        T = lens[b]
        pos = torch.arange(T, device=DEVICE)
        k = k_cache[table[b, pos // block_size].long(), pos % block_size].repeat_interleave(G, 1)
        v = v_cache[table[b, pos // block_size].long(), pos % block_size].repeat_interleave(G, 1)
        qpos = pos[T - len(rows):]
        mask = pos[None, :] <= qpos[:, None]
        if window is not None:
            mask &= pos[None, :] >= qpos[:, None] - window
        return F.scaled_dot_product_attention(rows.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              attn_mask=mask).transpose(0, 1)

    out = PA.paged_attention_prefill_ref(q, k_cache, v_cache, table, cu, seq_lens, window=window)
    for b in range(len(lens)):
        assert_close(out[cu[b]:cu[b + 1]], dense(b, q[cu[b]:cu[b + 1]]))
    # decode: one query per sequence, plus an empty (padded) row that must give zeros
    qd = torch.randn(len(lens) + 1, H, D, device=DEVICE)
    table_d = torch.cat([table, torch.full_like(table[:1], INVALID_BLOCK)])
    lens_d = torch.cat([seq_lens, seq_lens.new_zeros(1)])
    out = PA.paged_attention_decode_ref(qd, k_cache, v_cache, table_d, lens_d, window=window)
    for b in range(len(lens)):
        assert_close(out[b:b + 1], dense(b, qd[b:b + 1]))
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


# --------------------------------------------------------------------------------------------- errors, dispatch


def test_errors_and_dispatch():
    k_cache, v_cache, table, seq_lens = make_cache([5, 9], 16, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16, device=DEVICE)
    with _dispatch.backend("triton"):
        with pytest.raises(ValueError, match="multiple of Hkv"):
            PA.paged_attention_decode(torch.randn(2, 3, 16, device=DEVICE), k_cache, v_cache, table, seq_lens)
        with pytest.raises(ValueError, match="int32"):
            PA.paged_attention_decode(q, k_cache, v_cache, table.long(), seq_lens)
        with pytest.raises(TypeError, match="share one of"):
            PA.paged_attention_decode(q.half(), k_cache, v_cache, table, seq_lens)
        with pytest.raises(ValueError, match="window"):
            PA.paged_attention_decode(q, k_cache, v_cache, table, seq_lens, window=-1)
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            PA.paged_attention_prefill(q, k_cache, v_cache, table, torch.tensor([0, 2], dtype=torch.int32), seq_lens)
    with _dispatch.backend("ref"):
        out = PA.paged_attention_decode(q, k_cache, v_cache, table, seq_lens)
    assert _dispatch.which("paged_attention_decode") == "ref"
    assert torch.equal(out, PA.paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens))


# -------------------------------------------------------------------------------------------------------- GPU


def test_paged_attention_compiles_for_h100():
    """The GPU configs of the three kernels (bf16, D=128, block 16, GQA 1/2/8, splits 1 and 8) lower to sm_90."""
    i32 = "i32"
    specs = []
    for G in (1, 2, 8):
        cfg = PA._decode_config(G, 128)
        num_warps = cfg.pop("num_warps")
        cfg.pop("num_stages")
        for splits in (1, 8):
            consts = dict(G=G, D=128, BLOCK_D=128, BLOCK_SIZE=16, NUM_SPLITS=splits, HAS_WINDOW=True, UPCAST=False,
                          INPUT_PRECISION="tf32", **cfg)
            sig = {"Q": "*bf16", "K_CACHE": "*bf16", "V_CACHE": "*bf16", "BLOCK_TABLES": "*i32", "SEQ_LENS": "*i32",
                   "OUT": "*bf16", "O_PART": "*fp32", "LSE_PART": "*fp32", "scale_log2": "fp32", "window": i32,
                   "num_heads": i32}
            sig |= {s: i32 for s in "stride_qb stride_qh stride_kb stride_kt stride_kh stride_bt stride_ob stride_oh"
                    .split()}
            specs.append(("kernels.paged_attention", "_paged_decode_kernel", sig | dict.fromkeys(consts, "constexpr"),
                          consts, num_warps))
        consts = dict(G=G, D=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_M=64, BLOCK_N=64, HAS_WINDOW=False, UPCAST=False,
                      INPUT_PRECISION="tf32")
        sig = {"Q": "*bf16", "K_CACHE": "*bf16", "V_CACHE": "*bf16", "BLOCK_TABLES": "*i32", "SEQ_LENS": "*i32",
               "CU_SEQLENS_Q": "*i32", "TILE_SEQ": "*i32", "CU_TILES": "*i32", "OUT": "*bf16", "scale_log2": "fp32",
               "window": i32, "num_seqs": i32}
        sig |= {s: i32 for s in "stride_qn stride_qh stride_kb stride_kt stride_kh stride_bt stride_on stride_oh"
                .split()}
        specs.append(("kernels.paged_attention", "_paged_prefill_kernel", sig | dict.fromkeys(consts, "constexpr"),
                      consts, 4))
    consts = dict(D=128, NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128)
    sig = {"O_PART": "*fp32", "LSE_PART": "*fp32", "OUT": "*bf16", "num_heads": i32, "stride_ob": i32, "stride_oh": i32}
    specs.append(("kernels.paged_attention", "_paged_decode_reduce_kernel", sig | dict.fromkeys(consts, "constexpr"),
                  consts, 4))
    consts = dict(D=128, HD=1280, BLOCK_R=2, BLOCK_C=2048)
    sig = {"K": "*bf16", "V": "*bf16", "K_CACHE": "*bf16", "V_CACHE": "*bf16", "SLOTS": "*i64", "N": i32,
           "stride_kn": i32, "stride_kh": i32, "stride_vn": i32, "stride_vh": i32}
    specs.append(("kernels.kv_cache", "_kv_store_kernel", sig | dict.fromkeys(consts, "constexpr"), consts, 8))
    compile_for_sm90(specs)


def _gpu_lens(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T  # one full-length sequence
    return lens.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("Hkv", [10, 5])
def test_decode_gpu_bf16(Hkv, num_splits):
    """d20 decode: batch 64, context up to 2048, H=10, D=128, block 16, bf16."""
    check_decode(_gpu_lens(64, 2048, Hkv), 16, H=10, Hkv=Hkv, D=128, dtype=torch.bfloat16, num_splits=num_splits)
    check_decode([2048] * 4, 16, H=10, Hkv=Hkv, D=128, dtype=torch.bfloat16, window=511, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("Hkv", [10, 5])
def test_prefill_gpu_bf16(Hkv):
    """Chunked prefill at d20 shapes: from nothing (2048), after prefixes (1000+1048, 2000+48), one-token chunks."""
    check_prefill([0, 1000, 2000, 511, 7], [2048, 1048, 48, 1, 1], 16, H=10, Hkv=Hkv, D=128, dtype=torch.bfloat16)
    check_prefill([0, 1500], [2048, 548], 16, H=10, Hkv=Hkv, D=128, dtype=torch.bfloat16, window=1023)


@pytest.mark.gpu
def test_kv_store_gpu_bf16():
    torch.manual_seed(0)
    N, Hkv, D, num_blocks = 64, 10, 128, 4096
    k, v = torch.randn(2, N, Hkv, D, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * 16, device="cuda")[:N]
    slots[-5:] = -1
    caches = [torch.zeros(num_blocks, 16, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    refs = [c.clone() for c in caches]
    with _dispatch.backend("auto"):
        KV.kv_store(k, v, *caches, slots)
    assert _dispatch.which("kv_store") == "triton"
    KV.kv_store_ref(k, v, *refs, slots)
    assert torch.equal(caches[0], refs[0]) and torch.equal(caches[1], refs[1])


@pytest.mark.gpu
def test_decode_cuda_graph():
    """Decode does no host sync (the split count comes from shapes), so a step can be captured in a CUDA graph."""
    torch.manual_seed(0)
    k_cache, v_cache, table, seq_lens = make_cache([100, 2048, 7, 0], 16, 5, 128, torch.bfloat16)
    q = torch.randn(4, 10, 128, device="cuda", dtype=torch.bfloat16)
    with _dispatch.backend("auto"):
        PA.paged_attention_decode(q, k_cache, v_cache, table, seq_lens)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = PA.paged_attention_decode(q, k_cache, v_cache, table, seq_lens)
    seq_lens.copy_(torch.tensor([101, 2000, 9, 0], dtype=torch.int32))  # within each one's blocks
    q.normal_()
    graph.replay()
    assert_close(out, PA.paged_attention_decode_ref(q, k_cache, v_cache, table, seq_lens))
