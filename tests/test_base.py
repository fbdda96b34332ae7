"""Tests for train/base.py, the pretraining loop, on CPU with a test-size model (d2, C=128, D=32, T=64).

Data: ~600 KB of Shakespeare from the offline corpus cut into documents, a 512-token bpe_rs trained on the
training part, shards written by train.shards (the last input file is the val split): ~0.5 s per module.
Every run is in-process through `main(argv)` with torch on one thread: the loop is small enough that two
threads only add contention (measured: 2 threads on a 2-core box shared with other jobs gave 50 ms–4 s steps).

- Resume: 8 steps with a checkpoint at 4; a fresh run resumed from that checkpoint redoes steps 5–8 bitwise
  (losses, val bpb and final weights compared with ==).
- 2 gloo ranks (train.fsdp.spawn, `--rank-data rows` so both see the 1-rank global batch) give the losses of
  1 rank within rtol 1e-5 (measured 8e-8; reduction order differs: 1 rank sums 8 rows' grads, 2 ranks 4 + 4 across processes,
  and Muon's orthogonalisation amplifies last-bit differences a little each step).
- Val bits-per-byte of a 250-step tiny model < 0.9 × the unigram baseline of the train shards.
- Bad input: a batch that does not divide, a missing shard dir, a checkpoint of another config/run.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import bpe_rs
from model.io import CheckpointError
from train import base
from train.corpus import iter_offline_documents
from train.fsdp import spawn
from train.shards import ShardError, iter_documents, open_split, tokenize_to_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("base_data")
    rng = random.Random(0)
    paragraphs = [p for doc in iter_offline_documents(["shakespeare"]) for p in doc.text.split("\n\n") if p.strip()]
    texts, i = [], 0
    while sum(map(len, texts)) < 600_000:
        n = rng.choice([1, 2, 3, 5])
        texts.append("\n\n".join(paragraphs[i: i + n]))
        i += n
    k = int(0.9 * len(texts))
    (root / "in").mkdir()
    for name, chunk in (("a.jsonl", texts[:k]), ("b.jsonl", texts[k:])):  # b.jsonl (last file) = val
        with open(root / "in" / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in chunk)
    bpe_rs.train_from_iterator(texts[:k], vocab_size=512).save(root / "tok")
    tokenize_to_shards(root / "tok", root / "shards", root / "in", shard_tokens=50_000, val="last-file",
                       log=lambda _: None)
    return root / "shards", root / "tok"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def argv(data, run_dir, *extra) -> list[str]:
    shards, tok = data
    return ["--depth", "2", "--model-dim", "128", "--head-dim", "32", "--max-seq-len", "64",
            "--device-batch-size", "8", "--total-batch-size", "512", "--eval-tokens", "2048",
            "--sample-every", "0", "--data", str(shards), "--tokenizer", str(tok), "--run-dir", str(run_dir),
            *extra]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def test_resume_is_bitwise(data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--num-iterations", "8", "--eval-every", "4", "--save-every", "4", "--sample-every", "8",
              "--sample-tokens", "4"]
    full = base.main(argv(data, a, *common))
    out = capsys.readouterr().out
    # The log: one plain line per step, no carriage returns (a log file reads like the terminal).
    assert "\r" not in out
    assert "step 00001/00008 | loss " in out and "| mfu - |" in out and "| eta " in out and "| sample |" in out
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 4, 8]

    # Interrupted run: only the step-4 checkpoint survives; a fresh run resumes from it.
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_000004", b / "checkpoints" / "step_000004")
    resumed = base.main(argv(data, b, *common, "--resume"))
    assert "resumed from" in capsys.readouterr().out
    assert resumed["losses"] == full["losses"][4:]
    assert resumed["bpb"][-1] == full["bpb"][-1]
    wa, wb = weights(a, 8), weights(b, 8)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _rank_worker(rank: int, world: int, args: list[str]) -> list[float]:
    torch.set_num_threads(1)
    return base.main(args)["losses"]


@pytest.mark.dist
def test_two_ranks_match_one(data, tmp_path):
    common = ["--num-iterations", "6", "--eval-every", "0", "--rank-data", "rows"]
    one = base.main(argv(data, tmp_path / "one", *common))["losses"]
    # 2 ranks × 4 rows: the same 8 rows per step as 1 rank × 8 rows (rows mode packs the global batch).
    two = spawn(_rank_worker, 2, argv(data, tmp_path / "two", *common, "--device-batch-size", "4"))
    assert two[0] == two[1]  # every rank logs the all-reduced loss
    np.testing.assert_allclose(two[0], one, rtol=1e-5)  # measured 7.6e-8
    assert (tmp_path / "two" / "checkpoints" / "step_000006" / "optim_rank001.safetensors").is_file()


def unigram_bpb(shards: Path, token_bytes: np.ndarray) -> float:
    """Bits per byte of the best context-free model of the train split: its token entropy (nats → bits) over
    the mean bytes per token, counting only tokens with bytes (as the bpb of the loop does)."""
    counts = np.zeros(len(token_bytes))
    for doc in iter_documents(open_split(shards, "train")):
        counts += np.bincount(doc, minlength=len(token_bytes))
    counts[token_bytes == 0] = 0
    p = counts / counts.sum()
    nz = p > 0
    return float(-(p[nz] * np.log(p[nz])).sum() / math.log(2) / (p * token_bytes).sum())


def test_val_bpb_beats_unigram_baseline(data, tmp_path):
    shards, tok = data
    baseline = unigram_bpb(shards, np.array(bpe_rs.Tokenizer.load(tok).token_byte_lengths()))
    assert 3.0 < baseline < 5.0  # ~3.85 on this slice with 512 tokens
    out = base.main(argv(data, tmp_path, "--num-iterations", "250", "--eval-every", "250",
                         "--device-batch-size", "16", "--total-batch-size", "1024", "--eval-tokens", "8192"))
    first, last = out["bpb"][0][1], out["bpb"][-1][1]
    assert first > baseline  # untrained: about log2(V) bits per token
    assert last < 0.9 * baseline, (last, baseline)  # measured ~0.8× at 250 steps


def test_batch_that_does_not_divide(data, tmp_path):
    with pytest.raises(ValueError, match=r"--total-batch-size 1000 .* = 512"):
        base.main(argv(data, tmp_path, "--total-batch-size", "1000", "--num-iterations", "1"))


def test_missing_data_dir(data, tmp_path):
    with pytest.raises(ShardError, match="nowhere"):
        base.main(argv(data, tmp_path, "--num-iterations", "1") + ["--data", str(tmp_path / "nowhere")])


def test_resume_refuses_another_config(data, tmp_path):
    common = ["--num-iterations", "2", "--eval-every", "0"]
    base.main(argv(data, tmp_path, *common))
    with pytest.raises(CheckpointError, match="model_dim: checkpoint 128, expected 64"):
        base.main(argv(data, tmp_path, *common, "--resume", "--model-dim", "64"))
    with pytest.raises(ValueError, match="batch_tokens: checkpoint 512, this run 1024"):
        base.main(argv(data, tmp_path, *common, "--resume", "--total-batch-size", "1024"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        base.main(argv(data, tmp_path / "empty", *common, "--resume"))


def test_depth_the_device_cannot_fit(data, tmp_path):
    args = argv(data, tmp_path / "r")
    i = args.index("--model-dim")
    del args[i : i + 2]
    args[args.index("--depth") + 1] = "96"  # 6144 wide, ~43B parameters: 174 GB of fp32 weights alone
    args[args.index("--head-dim") + 1] = "128"
    with pytest.raises(MemoryError, match=r"depth 96 \([\d,]+M params\) .* needs at least [\d.]+ GiB per rank .* "
                                          r"GiB free: use a smaller --depth"):
        base.main(args)
    # The estimate itself: a d20 run at nanochat's device batch 32 fits an 80 GB H100 on 8 ranks, not on 16 GB.
    from model.config import ModelConfig

    cfg = ModelConfig.for_depth(20, vocab_size=65536)
    parts = base.estimate_memory(cfg, 32, 2048, 8, torch.bfloat16)
    base.check_fits(parts, 80 * 2**30, cfg, 32, "cuda:0")
    with pytest.raises(MemoryError, match="depth 20"):
        base.check_fits(parts, 16 * 2**30, cfg, 32, "cuda:0")
