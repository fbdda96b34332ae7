"""train/mid.py and train/sft.py on CPU with a tiny model (d2, C=64, D=32, T=128, a 512-token bpe_rs).

The module fixture runs the pipeline in-process: train.base (3 steps on shards of offline chat text) → train.mid
(4 steps, offline mixture) → train.sft (3 steps). Then: the outputs load with model.io.load_model, losses are
finite, the report records exist, the optimizer warm start is logged; mid resumed from its step-2 checkpoint redoes
steps 3-4 bitwise; a tiny model's loss falls on one repeated mid batch; a bare model dir gets a fresh optimizer.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import bpe_rs
from model.io import load_model, save_model
from train import base, mid, sft
from train.chat_data import PackedChatLoader, build_mixture, chitchat_conversations
from train.checkpoint import latest_checkpoint
from train.fsdp import FSDP
from train.loop import RunLog, Trainer
from train.optim import MuonAdamW
from train.report import load_stage
from train.shards import tokenize_to_shards

STAGE_ARGS = ["--mixture", "offline", "--synthetic-examples", "40", "--eval-tokens", "512", "--eval-every", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chat_run")
    texts = ["\n".join(m["content"] for m in c["messages"]) for c in list(chitchat_conversations("train"))[:3000]]
    (root / "in").mkdir()
    for name, chunk in (("a.jsonl", texts[:2700]), ("b.jsonl", texts[2700:])):  # b.jsonl (last file) = val
        with open(root / "in" / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in chunk)
    bpe_rs.train_from_iterator(texts[:2700], vocab_size=512).save(root / "tokenizer")
    tokenize_to_shards(root / "tokenizer", root / "shards", root / "in", shard_tokens=50_000, val="last-file",
                       log=lambda _: None)
    base.main(["--depth", "2", "--model-dim", "64", "--head-dim", "32", "--max-seq-len", "128",
               "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "3", "--eval-every", "0",
               "--sample-every", "0", "--data", str(root / "shards"), "--tokenizer", str(root / "tokenizer"),
               "--run-dir", str(root / "base")])
    mid_out = mid.main(["--run-dir", str(root / "mid"), "--num-iterations", "4", "--save-every", "2",
                        "--keep-last", "3", *STAGE_ARGS])
    sft_out = sft.main(["--run-dir", str(root / "sft"), "--num-iterations", "3", *STAGE_ARGS])
    return root, mid_out, sft_out


def test_base_mid_sft_pipeline(pipeline):
    root, mid_out, sft_out = pipeline
    for out, stage, n in ((mid_out, "mid", 4), (sft_out, "sft", 3)):
        assert out["step"] == n and len(out["losses"]) == n
        assert all(math.isfinite(x) and 0 < x < 10 for x in out["losses"])
        assert [s for s, _ in out["evals"]] == [0, 2, n] if n == 4 else [0, 2, 3]
        final = out["evals"][-1][1]
        assert final["val_bpb"] > 0 and final["val_loss"] > 0
        ckpt = latest_checkpoint(root / stage / "checkpoints")
        assert ckpt.name == f"step_{n:06d}"
        model = load_model(ckpt)  # the step dir is a model dir
        assert model.config.model_dim == 64
        records = [json.loads(line) for line in (root / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, n + 1))
        assert all(r["supervised_tokens"] > 0 for r in records if "loss" in r)
        rec = load_stage(root, stage)
        assert rec["metrics"]["steps"] == n and rec["metrics"]["val_bpb"] == final["val_bpb"]
        assert rec["metrics"]["tokens"] == out["tokens"] > 0
    assert mid_out["source"].endswith("base/checkpoints/step_000003")
    assert sft_out["source"].endswith("mid/checkpoints/step_000004")
    # SFT inherits mid's LRs (= base's × 1.0) × 0.8.
    assert sft_out["run_key"]["lr"] == pytest.approx([0.8 * x for x in mid_out["run_key"]["lr"]])
    assert load_stage(root, "base")["metrics"]["steps"] == 3


def test_mid_resume_is_bitwise(pipeline, tmp_path, capsys):
    root, mid_out, _ = pipeline
    run = tmp_path / "mid"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "mid" / "checkpoints" / "step_000002", run / "checkpoints" / "step_000002")
    resumed = mid.main(["--run-dir", str(run), "--from", str(root / "base" / "checkpoints" / "step_000003"),
                        "--tokenizer", str(root / "tokenizer"), "--num-iterations", "4", "--resume", *STAGE_ARGS])
    assert "resumed from" in capsys.readouterr().out
    assert resumed["losses"] == mid_out["losses"][2:]
    assert resumed["evals"][-1] == mid_out["evals"][-1]
    wa = load_file(str(root / "mid" / "checkpoints" / "step_000004" / "model.safetensors"))
    wb = load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_optimizer_warm_start_or_fresh(pipeline, tmp_path, capsys):
    root, _, _ = pipeline
    capsys.readouterr()
    # A bare model dir (no optimizer shards): fresh optimizer state, said in the log.
    bare = tmp_path / "bare"
    save_model(load_model(root / "base" / "checkpoints" / "step_000003"), bare)
    mid.main(["--run-dir", str(tmp_path / "mid"), "--from", str(bare), "--tokenizer", str(root / "tokenizer"),
              "--num-iterations", "1", "--device-batch-size", "4", "--total-batch-size", "512", *STAGE_ARGS])
    assert "optimizer state: fresh" in capsys.readouterr().out
    # A training checkpoint of this world size and sharding: its momentum buffers carry over.
    mid.main(["--run-dir", str(tmp_path / "mid2"), "--from", str(root / "base" / "checkpoints" / "step_000003"),
              "--tokenizer", str(root / "tokenizer"), "--num-iterations", "1", *STAGE_ARGS])
    assert "optimizer state warm-started from" in capsys.readouterr().out


def test_loss_falls_on_a_repeated_batch(pipeline):
    root, _, _ = pipeline
    tok = bpe_rs.Tokenizer.load(root / "tokenizer")
    model = load_model(root / "mid" / "checkpoints" / "step_000004")
    fsdp = FSDP(model)
    opt = MuonAdamW(fsdp.owned_param_groups(model.param_groups()), lr_scale=0.1)
    batch = next(PackedChatLoader(build_mixture("offline", "mid", "val", synthetic_examples=40), tok, 4, 128))
    assert (batch[1] == -1).any() and (batch[1] >= 0).any()

    class Repeat:
        def __next__(self):
            return batch

    trainer = Trainer(model=model, fsdp=fsdp, opt=opt, loader=Repeat(), run=RunLog(root / "repeat", False),
                      world=1, device=torch.device("cpu"), flops_per_token=1.0, token_mean=True)
    losses = [trainer.train_step(1)[0] for _ in range(8)]
    assert all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses
    # The step's loss is the mean over the supervised targets (−1 elsewhere).
    with torch.no_grad():
        expected = model(batch[0], batch[1], loss_reduction="sum").item() / int((batch[1] >= 0).sum())
    assert trainer.train_step(1)[0] == pytest.approx(expected, rel=1e-5)


def test_refuses_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under .*base.*run train.base first"):
        mid.main(["--run-dir", str(tmp_path / "mid"), *STAGE_ARGS])
