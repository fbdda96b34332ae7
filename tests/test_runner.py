"""The model runner over the paged pool against the dense forward (CPU; the paged kernels' twins run here)."""

import pytest
import torch

from infer.runner import ModelRunner, RunItem, blocks_for_memory
from model.config import ModelConfig
from model.gpt import GPT


def tiny_model() -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig.for_depth(2, model_dim=128, head_dim=32, vocab_size=256, sequence_len=64, n_kv_head=2)
    model = GPT.build(cfg)
    with torch.no_grad():
        for p in model.parameters():  # init zeroes the output projections; random weights catch more mistakes
            p.add_(torch.randn_like(p) * 0.05)
    return model


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
