"""Tests for train/loader.py: BOS-aligned best-fit packing, rank slicing, epochs and exact resume.

Most tests pack a synthetic split in which every non-BOS token value is unique (document g holds BOS then the
consecutive ids first[g], first[g]+1, ...; uint32 shards), so a row can be traced back to the documents and
token positions it came from. One test packs real tokenized text from a tiny bpe_rs tokenizer.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

import bpe_rs
from train.corpus import iter_offline_documents
from train.loader import BestFitLoader
from train.shards import write_token_shards

BOS, T, B = 0, 64, 4


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(shard dir, doc lengths, first id -> document index): 400 documents of 2..200 tokens (some > T+1)."""
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(400) < 0.15, rng.integers(66, 200, 400), rng.integers(2, 50, 400))
    docs, first, next_id = [], {}, 1
    for g, n in enumerate(lengths):
        first[next_id] = g
        docs.append(np.concatenate([[BOS], np.arange(next_id, next_id + n - 1)]).astype(np.uint32))
        next_id += n - 1
    d = tmp_path_factory.mktemp("synthetic")
    # vocab above 65536: uint32 shards, so ids can be unique positions; ~1,500 tokens a shard: ~10 shards.
    write_token_shards(d, [("train", x) for x in docs] + [("val", docs[0])], vocab_size=1 << 24, bos_id=BOS,
                       shard_tokens=1500)
    return d, lengths, first


def _rows(inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    return torch.cat([inputs, targets[:, -1:]], dim=1).numpy()


def _segments(row: np.ndarray, lengths, first, untraceable: list | None = None) -> list[int]:
    """Document indices the row is made of, after checking each piece is a whole document or, last in the row,
    a prefix of one (the crop). A crop to the BOS alone names no document: it is counted into `untraceable`."""
    assert row[0] == BOS
    starts = np.flatnonzero(row == BOS).tolist() + [len(row)]
    out = []
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        seg = row[a:b]
        is_last = k == len(starts) - 2
        if len(seg) == 1:  # a crop that kept only the BOS: untraceable, allowed only at the row's end
            assert is_last
            if untraceable is not None:
                untraceable.append(row)
            continue
        g = first[int(seg[1])]
        assert np.array_equal(seg[1:], np.arange(seg[1], seg[1] + len(seg) - 1))
        assert len(seg) == lengths[g] or (is_last and len(seg) < lengths[g])
        out.append(g)
    return out


def test_shapes_bos_and_shift(synthetic):
    d, lengths, first = synthetic
    loader = BestFitLoader(d, "train", B, T, buffer_size=16)
    for _ in range(10):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.is_contiguous() and targets.is_contiguous()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # one row of T+1 tokens, shifted by one
        assert (inputs[:, 0] == BOS).all()
        for row in _rows(inputs, targets):
            _segments(row, lengths, first)
    assert 0 < loader.discard_fraction < 1


def test_no_token_twice_within_an_epoch(synthetic):
    d, lengths, first = synthetic
    loader = BestFitLoader(d, "train", B, T, buffer_size=16)
    seen: Counter = Counter()
    num_epoch0_batches = 0
    while loader.epoch < 3:
        inputs, targets = next(loader)
        rows = _rows(inputs, targets)
        seen.update(rows[rows != BOS].tolist())
        if loader.epoch == 0:  # every document in this batch was read in the first pass
            num_epoch0_batches += 1
            assert max(seen.values()) == 1, "a token was used twice within the first epoch"
        assert max(seen.values()) <= loader.epoch + 1
    assert num_epoch0_batches > 20
    assert loader.num_tokens == int(lengths.sum())


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_slices_that_cover_the_split(synthetic, world_size):
    d, lengths, first = synthetic
    slices = []
    for rank in range(world_size):
        loader = BestFitLoader(d, "train", B, T, rank=rank, world_size=world_size, buffer_size=16)
        seen: set[int] = set()
        bos_only: list = []
        while loader.epoch == 0:
            for row in _rows(*next(loader)):
                seen.update(_segments(row, lengths, first, bos_only))
        # Read once: each document was packed or is still waiting in the buffer.
        seen.update(g for g, _ in loader.state_dict()["buffer"])
        mine = set(range(rank, len(lengths), world_size))  # documents g with g % world_size == rank
        assert seen <= mine and len(mine - seen) <= len(bos_only)
        slices.append(mine - seen)
        slices.append(seen)
    assert set().union(*slices) == set(range(len(lengths)))
    assert sum(map(len, slices)) == len(lengths)  # pairwise disjoint


@pytest.mark.parametrize("rank,world_size", [(0, 1), (2, 3)])
@pytest.mark.parametrize("skip", [0, 1, 13, 75])  # 75 crosses an epoch boundary for every rank
def test_resume_is_exact(synthetic, rank, world_size, skip):
    d, _, _ = synthetic
    reference = BestFitLoader(d, "train", B, T, rank=rank, world_size=world_size, buffer_size=16)
    for _ in range(skip):
        next(reference)
    state = json.loads(json.dumps(reference.state_dict()))  # must survive a JSON checkpoint
    expected = [next(reference) for _ in range(30)]
    resumed = BestFitLoader(d, "train", B, T, rank=rank, world_size=world_size, buffer_size=16)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (next(resumed) for _ in range(30))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert resumed.state_dict() == reference.state_dict()
    if skip == 75:
        assert state["epoch"] >= 1


def test_rows_do_not_depend_on_batch_size(synthetic):
    d, _, _ = synthetic
    small = BestFitLoader(d, "train", 2, T, buffer_size=16)
    big = BestFitLoader(d, "train", 6, T, buffer_size=16)
    rows_small = np.concatenate([_rows(*next(small)) for _ in range(15)])
    rows_big = np.concatenate([_rows(*next(big)) for _ in range(5)])
    assert np.array_equal(rows_small, rows_big)


def test_epoch_rollover_repeats_the_same_documents(synthetic):
    d, lengths, first = synthetic
    loader = BestFitLoader(d, "train", B, T, buffer_size=1)  # buffer 1: rows follow the read order exactly
    order: list[int] = []
    while loader.epoch < 2:
        order += [g for row in _rows(*next(loader)) for g in _segments(row, lengths, first)]
    # Documents 0, 1, 2, ..., N-1, then again from 0: a step of 2 is a document cropped to its BOS alone.
    steps = np.diff(order)
    wraps = np.flatnonzero(steps < 0)
    assert len(wraps) == 2 and set(steps[steps > 0].tolist()) <= {1, 2}
    assert order[0] == 0 and order[wraps[0]] >= len(lengths) - 2 and order[wraps[0] + 1] <= 1
    assert loader.epoch == 2 and loader.state_dict()["epoch"] == 2


def test_state_mismatch_is_refused(synthetic, tmp_path):
    d, _, _ = synthetic
    state = BestFitLoader(d, "train", B, T, buffer_size=16).state_dict()
    with pytest.raises(ValueError, match="T=64"):
        BestFitLoader(d, "train", B, 32, buffer_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        BestFitLoader(d, "train", B, T, world_size=2, buffer_size=16).load_state_dict(state)
    other = tmp_path / "other"
    write_token_shards(other, [("train", np.array([BOS, 5, 6], dtype=np.uint32))], vocab_size=1 << 24, bos_id=BOS)
    with pytest.raises(ValueError, match="other shards"):
        BestFitLoader(other, "train", B, T, buffer_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="none for rank 1"):
        BestFitLoader(other, "train", B, T, rank=1, world_size=2)


def test_real_text(tmp_path):
    texts = [p for doc in iter_offline_documents(["shakespeare"]) for p in doc.text.split("\n\n")[:150]]
    tok = bpe_rs.train_from_iterator(texts, vocab_size=1000)
    docs = [np.array([tok.bos_id] + ids, dtype=np.uint16) for ids in tok.encode_batch(texts, disallowed_special=())]
    write_token_shards(tmp_path, [("train", x) for x in docs], vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                       shard_tokens=20_000)
    prefixes = {tuple(x[:k].tolist()) for x in docs for k in (2, 3)}
    loader = BestFitLoader(tmp_path, "train", 8, T)
    for _ in range(20):
        inputs, targets = next(loader)
        assert (inputs[:, 0] == tok.bos_id).all()
        assert int(inputs.max()) < tok.vocab_size
        for row in _rows(inputs, targets):
            starts = np.flatnonzero(row == tok.bos_id).tolist() + [len(row)]
            for a, b in zip(starts, starts[1:]):
                piece = tuple(row[a: min(b, a + 3)].tolist())
                assert len(piece) == 1 or piece in prefixes  # every BOS opens a real document
    assert 0 <= loader.discard_fraction < 1


def test_cli_main(synthetic, capsys):
    from train import loader as loader_mod

    d, _, _ = synthetic
    loader_mod.main(["--shards", str(d), "-B", "4", "-T", "64", "--buffer-size", "16", "--epochs", "2"])
    out = capsys.readouterr().out
    assert "epoch 1" in out and "discarded" in out


@pytest.mark.gpu
def test_cuda_matches_cpu(synthetic):
    d, _, _ = synthetic
    cpu = BestFitLoader(d, "train", B, T, buffer_size=16)
    gpu = BestFitLoader(d, "train", B, T, buffer_size=16, device="cuda")
    assert gpu._staging[0].is_pinned()
    batches = [next(gpu) for _ in range(50)]  # kept alive: later batches must not overwrite earlier ones
    torch.cuda.synchronize()
    for inputs, targets in batches:
        want_inputs, want_targets = next(cpu)
        assert inputs.device.type == "cuda" and inputs.dtype == torch.int64 and inputs.is_contiguous()
        assert torch.equal(inputs.cpu(), want_inputs) and torch.equal(targets.cpu(), want_targets)
