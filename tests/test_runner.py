"""The model runner over the paged pool against the dense forward (CPU; the paged kernels' twins run here)."""

import pytest
import torch

from infer.runner import (ModelRunner, RunItem, blocks_for_memory, bucket_for, decode_buckets, graph_memory_estimate,
                          pack, pad_decode)
from model.config import ModelConfig
from model.gpt import GPT
from tests.models import random_model


def tiny_model() -> GPT:
    cfg = ModelConfig.for_depth(2, model_dim=128, head_dim=32, vocab_size=256, sequence_len=64, n_kv_head=2)
    return random_model(cfg, 0.05)


def test_runner_prefill_chunks_then_decode_equal_dense():
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=32, block_size=8)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 20, 9, 17)]
    tables = [[3, 30], [0, 7, 12], [5, 9], [31, 2, 4]]  # non-contiguous, shuffled blocks
    cached = [0] * 4

    def feed(new: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        """Feed each sequence's new tokens (sequences with none sit this step out)."""
        live = [i for i, t in enumerate(new) if t]
        out = runner.run([RunItem(new[i], cached[i], tables[i]) for i in live])
        for i in live:
            cached[i] += len(new[i])
        return live, out

    def dense_last(toks: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([toks]))[0]

    # Chunked prefill of uneven lengths: 1 token each, then up to 10 more, then the rest.
    for chunk in (slice(0, 1), slice(1, 11), slice(11, None)):
        live, out = feed([s[chunk] for s in seqs])
        for row, i in enumerate(live):
            torch.testing.assert_close(out[row], dense_last(seqs[i][: cached[i]]), atol=1e-4, rtol=1e-4)
    # Decode steps: one greedy token per sequence (the decode kernel path).
    for _ in range(2):
        nxt = [int(dense_last(s).argmax()) for s in seqs]
        for s, t in zip(seqs, nxt):
            s.append(t)
        live, out = feed([[t] for t in nxt])
        assert live == [0, 1, 2, 3]
        for i in live:
            torch.testing.assert_close(out[i], dense_last(seqs[i]), atol=1e-4, rtol=1e-4)


def test_runner_rejects_short_tables_and_empty_items():
    runner = ModelRunner(tiny_model(), num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="needs 2 blocks of 4, its table has 1"):
        runner.run([RunItem([1, 2, 3, 4, 5], 0, [0])])
    with pytest.raises(ValueError, match="at least one token"):
        runner.run([RunItem([], 0, [0])])
    assert runner.capacity_tokens == 16


def test_blocks_for_memory():
    cfg = ModelConfig.for_depth(20)
    # d20: 20 layers × 2 × 10 heads × 128 × 2 bytes = 102,400 bytes per token; 16-token blocks = 1.6 MB each.
    assert blocks_for_memory(cfg, 16, 16 * 102_400 * 100 + 5, 2) == 100


# ---- CUDA-graph decode: buckets, padding and the static-buffer path (CPU), capture and replay (GPU) -------------

def test_decode_buckets_and_bucket_for():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert decode_buckets(1) == [1]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(16) == [1, 2, 4, 8, 16]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError, match="max_num_seqs must be a positive int, got 0"):
        decode_buckets(0)
    buckets = decode_buckets(20)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 8, 9, 17, 20, 21)] == [1, 2, 4, 8, 8, 16, 20, 20, None]


def test_pad_decode_rows_touch_only_the_scratch_block():
    packed = pack([RunItem([7], 9, [3, 5]), RunItem([8], 0, [2])], block_size=8)
    assert packed.is_decode and packed.block_tables == [[3, 5], [2, 0]]
    p = pad_decode(packed, batch_size=4, width=3, scratch_block=10, block_size=8)
    assert p.ids == [7, 8, 0, 0] and p.positions == [9, 0, 0, 0]
    assert p.slots == [5 * 8 + 1, 2 * 8, 80, 80]  # padded rows: the scratch block's first slot
    assert p.block_tables == [[3, 5, 10], [2, 0, 10], [10, 10, 10], [10, 10, 10]]
    assert p.seq_lens == [10, 1, 1, 1] and p.cu_seqlens == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="one new token per sequence, got 3 tokens for 2"):
        pad_decode(pack([RunItem([1, 2], 0, [0]), RunItem([3], 0, [1])], 8), 4, 3, 10, 8)
    with pytest.raises(ValueError, match="2 sequences with tables of 2 blocks does not fit the graph's 1 rows"):
        pad_decode(packed, 1, 3, 10, 8)


def test_cpu_runner_is_eager_and_reserves_a_scratch_block():
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=6, block_size=8)
    assert not runner.graphs and not runner.uses_graphs and runner.graph_error is None
    assert runner.kv.k[0].shape[0] == 7 and runner.scratch_block == 6 and runner.capacity_tokens == 48
    assert runner.max_blocks_per_seq == 8  # sequence_len 64 / 8


def prefill(runner, seqs, tables):
    out = runner.run([RunItem(s, 0, t) for s, t in zip(seqs, tables)])
    return [int(x) for x in out.argmax(-1)]


def test_static_buffer_decode_equals_eager_and_padding_leaves_real_blocks_alone():
    """The graph path without the capture: buffers loaded, rows padded to the bucket, logits sliced back."""
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=60, block_size=8, max_num_seqs=8)
    runner._build_decode_graphs(capture=False)
    assert sorted(runner.graphs) == [1, 2, 4, 8]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 1, 30, 9, 12, 24, 3, 8)]
    tables = [[6 * i + j for j in range(6)] for i in range(9)]  # 6 blocks = 48 tokens each, blocks 0..53
    nxt = prefill(runner, seqs, tables)  # 9 sequences: a prefill batch, eager
    scratch = runner.scratch_block
    for step, batch in enumerate([1, 3, 5, 8, 2, 9, 7]):  # 9 > the largest bucket: eager fallback
        items = [RunItem([nxt[i]], len(seqs[i]), tables[i]) for i in range(batch)]
        packed = pack(items, runner.block_size)
        eager = runner._run_eager(packed)  # writes the k/v the replay writes again (up to rounding: other M)
        before = [t.clone() for t in runner.kv.k + runner.kv.v]
        out = runner.run(items)
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
        written = torch.zeros((scratch + 1) * 8, dtype=torch.bool)
        written[packed.slots] = True
        written[scratch * 8:] = True  # the scratch block may change freely
        for old, new in zip(before, runner.kv.k + runner.kv.v):  # nothing else is touched, bit for bit
            old, new = old.flatten(0, 1), new.flatten(0, 1)
            torch.testing.assert_close(new[~written], old[~written], atol=0, rtol=0)
            slots = torch.tensor(packed.slots)
            torch.testing.assert_close(new[slots], old[slots], atol=1e-5, rtol=1e-5)
        if batch in (3, 5, 7):  # padded to 4, 8, 8: the padded rows wrote the scratch slot
            assert runner.kv.k[0][scratch, 0].abs().sum() > 0
        dense = model(torch.tensor([seqs[0] + [nxt[0]]]))[0]
        torch.testing.assert_close(out[0], dense, atol=1e-4, rtol=1e-4)
        for i in range(batch):
            seqs[i].append(nxt[i])
        nxt = [int(x) for x in out.argmax(-1)] + nxt[batch:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_over_batch_sizes(dtype):
    model = tiny_model().to("cuda")
    model.compute_dtype = dtype
    lines = []
    runner = ModelRunner(model, num_blocks=200, block_size=8, max_num_seqs=40, log=lines.append)
    assert runner.graph_error is None and runner.uses_graphs, lines
    assert sorted(runner.graphs) == decode_buckets(40) and "captured decode batch sizes" in lines[-1]
    g = torch.Generator().manual_seed(3)
    n = 41
    seqs = [torch.randint(0, 256, (int(torch.randint(1, 21, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    tables = [[4 * i + j for j in range(4)] for i in range(n)]
    nxt = prefill(runner, seqs, tables)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for batch in list(range(1, 42)) + [40, 17, 1]:
        items = [RunItem([nxt[i]], len(seqs[i]), tables[i]) for i in range(batch)]
        eager = runner._run_eager(pack(items, runner.block_size))
        out = runner.run(items)
        assert out.shape == eager.shape == (batch, 256)
        torch.testing.assert_close(out, eager, **tol)
        if batch <= 8:  # only the first sequences move on (≤ 20 + 11 tokens: tables hold 32)
            for i in range(batch):
                seqs[i].append(nxt[i])
            nxt = [int(x) for x in out.argmax(-1)] + nxt[batch:]


@pytest.mark.gpu
def test_graph_memory_estimate_is_positive_and_bounded():
    model = tiny_model().to("cuda")
    est = graph_memory_estimate(model, block_size=8, max_num_seqs=64)
    # 64 rows × (activations + logits) of a 2-layer, C = 128 model: well under 64 MiB, and something.
    assert 0 < est < 64 * 2**20
