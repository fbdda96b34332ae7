"""`python -m train.eval` on a tiny saved model and tokenizer: bpb on real shards, CORE on a fixture bundle, every
chat task, and the report record it writes (summary names, synthetic scores in metrics, timings, notes)."""

import inspect
import json
import textwrap

import numpy as np
import pytest

import bpe_rs
from model.config import ModelConfig
from model.io import save_model
from tests.models import random_model
from tests.test_core_eval import write_bundle
from train.chat_eval import DEFAULT_TASKS, binomial_tail, chatcore
from train.eval import main
from train.report import load_stage
from train.shards import write_token_shards


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    text = inspect.getsource(textwrap)
    tok = bpe_rs.train_from_iterator([text], vocab_size=400)
    tok.save(d / "tokenizer")
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=512)
    save_model(random_model(cfg, 0.1), d / "model")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    docs = [("val" if i % 5 == 0 else "train", np.array([tok.bos_id] + tok.encode_ordinary(p), dtype=np.uint32))
            for i, p in enumerate(paragraphs)]
    write_token_shards(d / "shards", docs, vocab_size=tok.vocab_size, bos_id=tok.bos_id)
    write_bundle(d / "bundle")
    return d


def args(run, stage, *extra):
    return ["--stage", stage, "--checkpoint", str(run / "model"), "--tokenizer", str(run / "tokenizer"),
            "--run-root", str(run / stage), "--device", "cpu", *extra]


def test_sft_eval_records_every_requested_task(run):
    tasks = ",".join(DEFAULT_TASKS)
    out = main(args(run, "sft", "--tasks", tasks, "--max-problems", "2", "--max-tokens", "8", "--shards",
                    str(run / "shards"), "--bpb-tokens", "1024", "--core-bundle", str(run / "bundle"),
                    "--max-per-task", "2", "--sandbox-timeout", "2"))
    rec = load_stage(run / "sft", "sft")
    assert rec["summary"].keys() == {"CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"}
    for name in ("synthetic-arithmetic", "synthetic-spelling", "synthetic-mc"):
        assert 0.0 <= rec["metrics"][f"{name} accuracy"] <= 1.0
        assert any(name in n and "synthetic task" in n for n in rec["notes"])
    for name in DEFAULT_TASKS:
        assert rec["timings"][name] > 0
        assert out["results"][name].num_problems == 2
    assert rec["summary"]["ChatCORE"] == pytest.approx(chatcore({k: rec["summary"][k] for k in
                                                                ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K",
                                                                 "HumanEval")}))
    assert 0 < rec["metrics"]["train_bpb"] < 20 and 0 < rec["metrics"]["val_bpb"] < 20
    assert {"CORE mc (centered)", "CORE schema (centered)", "CORE lm (centered)"} <= rec["metrics"].keys()
    assert any("at most 2 problems" in n for n in rec["notes"])
    assert rec["config"]["eval_tasks"] == list(DEFAULT_TASKS)
    assert json.loads((run / "sft" / "report" / "sft.json").read_text())["stage"] == "sft"


def test_base_eval_without_chat_tasks_says_what_it_skipped(run, capsys):
    out = main(args(run, "base", "--shards", str(run / "shards"), "--bpb-tokens", "512"))
    rec = load_stage(run / "base", "base")
    assert out["results"] == {} and rec["summary"] == {}
    assert "CORE not measured: no --core-bundle given" in rec["notes"]
    assert "val_bpb" in capsys.readouterr().out


def test_incomplete_chatcore_names_the_tasks_that_ran(run):
    main(args(run, "mid", "--tasks", "ARC-Easy,synthetic-mc", "--max-problems", "2"))
    rec = load_stage(run / "mid", "mid")
    assert "ChatCORE" not in rec["summary"] and rec["summary"].keys() == {"ARC-Easy"}
    assert any("ChatCORE not computed" in n and "ran ['ARC-Easy']" in n for n in rec["notes"])


def test_arithmetic_mc_is_judged_against_chance(run):
    out = main(args(run, "rl", "--tasks", "synthetic-arithmetic-mc,ARC-Easy", "--max-problems", "2", "--problems",
                    "synthetic-arithmetic-mc=12"))
    res = out["results"]["synthetic-arithmetic-mc"]
    assert res.num_problems == 12 and out["results"]["ARC-Easy"].num_problems == 2  # the override, per task
    rec = load_stage(run / "rl", "rl")
    p_value = rec["metrics"]["synthetic-arithmetic-mc p-value vs chance"]
    assert p_value == pytest.approx(binomial_tail(12, res.num_correct, 0.25))
    verdict = "better than chance" if p_value < 0.05 else "not better than chance"
    assert any(n.startswith(f"generated arithmetic questions (4 choices): {res.num_correct}/12 = ")
               and "against chance 0.250" in n and n.endswith(verdict) for n in rec["notes"])


def test_bad_arguments_fail_with_the_names(run, capsys):
    with pytest.raises(SystemExit):
        main(args(run, "sft", "--tasks", "ARC-Easy,GSM9K"))
    assert "GSM9K" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args(run, "sft", "--problems", "ARC-Easy=zero"))
    assert "expected TASK=N" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="neither a model directory"):
        main(["--stage", "sft", "--checkpoint", str(run), "--tokenizer", str(run / "tokenizer"),
              "--run-root", str(run / "x")])


@pytest.mark.slow
def test_offline_core_bundle_is_reported_as_a_subset(run):
    pytest.importorskip("train.core_offline")
    main(args(run, "base", "--core-bundle", "offline", "--max-per-task", "1"))
    rec = load_stage(run / "base", "base")
    key = next(k for k in rec["metrics"] if k.startswith("CORE (offline subset, "))
    assert key.endswith("/22 tasks)") and rec["metrics"][key] == rec["summary"]["CORE"]
    assert any("offline subset" in n for n in rec["notes"])
