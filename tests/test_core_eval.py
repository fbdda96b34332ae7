"""CORE evaluation: prompt rendering, span finding, and accuracy / centered accuracy / CORE against hand-computed
answers (a hand-written loss table as the score function), then the padded batched model scorer against
unpadded single-row forwards, and an end-to-end run of a tiny real GPT on fixture tasks (main() included)."""

import inspect
import json
import random
import textwrap

import pytest
import torch

import bpe_rs
from model.config import ModelConfig
from model.io import save_model
from tests.models import random_model
from train.core_eval import (build_rows, centered_accuracy, common_length, evaluate_core, load_tasks, main,
                             model_score_fn, render_prompts)


class CharTok:
    """One token per character (ord), BOS = 0: spans are readable as text in the loss table."""
    bos_id = 0

    def encode_batch(self, texts, disallowed_special=()):
        return [[ord(c) for c in t] for t in texts]


# ---- fixture bundle: 4 MC items (3 solvable), 2 schema items (1), 4 LM items (1) -------------------------------
MC = [
    {"query": "Q: red fruit?", "choices": ["apple", "banana", "kiwi"], "gold": 0},
    {"query": "Q: yellow fruit?", "choices": ["apple", "banana", "kiwi"], "gold": 1},
    {"query": "Q: green fruit?", "choices": ["apple", "banana", "kiwi"], "gold": 2},
    {"query": "Q: long fruit?", "choices": ["apple", "banana", "kiwi"], "gold": 1},
]
SCHEMA = [
    {"context_options": ["The cat", "The dog"], "continuation": "sat down.", "gold": 0},
    {"context_options": ["A bird", "A fish"], "continuation": "can swim.", "gold": 1},
]
LM = [
    {"context": "2+2= ", "continuation": "4"},
    {"context": "3+3=", "continuation": "6"},
    {"context": "1+1=", "continuation": "2"},
    {"context": "5+5=", "continuation": "10"},
]
BASELINES = {"mc": 25.0, "schema": 50.0, "lm": 0.0}

# Per-token loss of the item's own line (text after the last blank line, i.e. without the few-shot blocks).
# MC: the model "knows" red→apple, yellow→banana, green→kiwi and prefers kiwi on "long fruit" (gold banana).
# Mean, not sum: banana (6 tokens × 1.0) beats kiwi (4 × 1.2) on "yellow" though its sum is larger.
LOSS = {
    "Q: red fruit? apple": 0.5, "Q: red fruit? banana": 2.0, "Q: red fruit? kiwi": 2.0,
    "Q: yellow fruit? apple": 2.0, "Q: yellow fruit? banana": 1.0, "Q: yellow fruit? kiwi": 1.2,
    "Q: green fruit? apple": 2.0, "Q: green fruit? banana": 2.0, "Q: green fruit? kiwi": 0.1,
    "Q: long fruit? apple": 2.0, "Q: long fruit? banana": 1.5, "Q: long fruit? kiwi": 1.0,
    "The cat sat down.": 0.3, "The dog sat down.": 0.9,     # schema item 0: correct
    "A bird can swim.": 0.2, "A fish can swim.": 0.4,       # schema item 1: wrong (gold is the fish)
}
LM_KNOWN = {"2+2= 4"}  # the argmax reproduces only this continuation (the item line, context not trimmed here)


def write_bundle(root, lm_fewshot=0, mc_fewshot=1):
    (root / "eval_data").mkdir(parents=True)
    for name, items in (("mc.jsonl", MC), ("schema.jsonl", SCHEMA), ("lm.jsonl", LM)):
        (root / "eval_data" / name).write_text("".join(json.dumps(x) + "\n" for x in items))
    (root / "core.yaml").write_text(textwrap.dedent(f"""\
        icl_tasks:
        - label: mc
          dataset_uri: mc.jsonl
          num_fewshot: [{mc_fewshot}]
          icl_task_type: multiple_choice
        - label: schema
          dataset_uri: schema.jsonl
          num_fewshot: [0]
          icl_task_type: schema
        - label: lm
          dataset_uri: lm.jsonl
          num_fewshot: [{lm_fewshot}]
          icl_task_type: language_modeling
          continuation_delimiter: " "
        """))
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,Random baseline\n"
        + "".join(f"{k},cat,type,0,{v}\n" for k, v in BASELINES.items()))
    return root


def table_score_fn(calls=None):
    def score(rows, spans, with_argmax):
        if calls is not None:
            calls.append(len(rows))
        out = []
        for row, (s, e) in zip(rows, spans):
            assert row[0] == CharTok.bos_id and 1 <= s <= e <= len(row)
            text = "".join(map(chr, row[1:]))
            line = text.split("\n\n")[-1]
            nats = torch.full((e - s,), LOSS.get(line, 3.0))
            preds = None
            if with_argmax:
                target = torch.tensor(row[s:e])
                preds = target if line in LM_KNOWN else target + 1
            out.append((nats, preds))
        return out
    return score


def test_render_prompts_match_nanochat_templates():
    fs = [MC[1]]
    assert render_prompts("multiple_choice", MC[0], " ", fs) == [
        "Q: yellow fruit? banana\n\nQ: red fruit? apple", "Q: yellow fruit? banana\n\nQ: red fruit? banana",
        "Q: yellow fruit? banana\n\nQ: red fruit? kiwi"]
    assert render_prompts("schema", SCHEMA[0], " ", [SCHEMA[1]]) == [
        "A fish can swim.\n\nThe cat sat down.", "A fish can swim.\n\nThe dog sat down."]
    # LM: contexts trimmed; the prompt without the continuation is stripped (no trailing delimiter).
    assert render_prompts("language_modeling", LM[0], " ", [LM[1]]) == ["3+3= 6\n\n2+2=", "3+3= 6\n\n2+2= 4"]


def test_spans():
    assert common_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert common_length([[9, 2, 3], [1, 7, 2, 3]], from_right=True) == 2
    assert build_rows("multiple_choice", [[0, 5, 6, 7], [0, 5, 8]]) == [(2, 4), (2, 3)]
    assert build_rows("schema", [[0, 5, 6, 7], [0, 4, 4, 6, 7]]) == [(2, 4), (3, 5)]
    assert build_rows("language_modeling", [[0, 5], [0, 5, 6, 7]]) == [(2, 4)]
    with pytest.raises(ValueError, match="prefix"):
        build_rows("language_modeling", [[0, 5, 9], [0, 5, 6, 7]])


def test_bundle_parsing(tmp_path):
    tasks = load_tasks(write_bundle(tmp_path, lm_fewshot=2))
    assert [(t.label, t.task_type, t.num_fewshot, t.continuation_delimiter) for t in tasks] == [
        ("mc", "multiple_choice", 1, " "), ("schema", "schema", 0, " "), ("lm", "language_modeling", 2, " ")]


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_hand_computed_core(tmp_path, batch_size):
    calls = []
    out = evaluate_core(None, CharTok(), write_bundle(tmp_path), batch_size=batch_size,
                        score_fn=table_score_fn(calls), log=None)
    assert out["accuracy"] == {"mc": 0.75, "schema": 0.5, "lm": 0.25}
    assert out["centered"]["mc"] == pytest.approx((0.75 - 0.25) / 0.75)
    assert out["centered"]["schema"] == pytest.approx(0.0)
    assert out["centered"]["lm"] == pytest.approx(0.25)
    assert out["core"] == pytest.approx((2 / 3 + 0.0 + 0.25) / 3)
    assert out["num_examples"] == {"mc": 4, "schema": 2, "lm": 4}
    # Whole items per forward; an item bigger than the batch (3 MC choices > 1) goes alone.
    assert max(calls) <= max(batch_size, 3)


def test_max_per_task_keeps_the_seed_1337_prefix(tmp_path):
    out = evaluate_core(None, CharTok(), write_bundle(tmp_path), max_per_task=2, score_fn=table_score_fn(), log=None)
    mc_correct = [True, True, True, False]
    order = list(range(len(MC)))
    random.Random(1337).shuffle(order)
    assert out["num_examples"]["mc"] == 2
    assert out["accuracy"]["mc"] == sum(mc_correct[i] for i in order[:2]) / 2


def test_centered_accuracy_formula():
    assert centered_accuracy(0.62, 62.0) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 25.0) == pytest.approx(1.0)
    assert centered_accuracy(0.0, 50.0) == pytest.approx(-1.0)


# ---- the real model --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return bpe_rs.train_from_iterator([inspect.getsource(textwrap)] + [json.dumps(x) for x in MC + SCHEMA + LM],
                                      vocab_size=400)


def tiny_model(tok, seed=0):
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=64, n_kv_head=1)
    return random_model(cfg, 0.1, seed=seed).eval()


def test_model_scorer_padding_is_masked(tok):
    model = tiny_model(tok)
    score = model_score_fn(model, tok.bos_id)
    rows = [[tok.bos_id] + tok.encode("Q: red fruit? apple"), [tok.bos_id] + tok.encode("2+2= 4"),
            [tok.bos_id] + tok.encode("x")]
    spans = [(3, len(rows[0])), (2, len(rows[1])), (1, 2)]
    fused = score(rows, spans, False)
    with_logits = score(rows, spans, True)
    for i, (row, (s, e)) in enumerate(zip(rows, spans)):
        alone_nats, alone_preds = score([row], [(s, e)], True)[0]
        torch.testing.assert_close(fused[i][0], alone_nats, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(with_logits[i][0], alone_nats, atol=1e-4, rtol=1e-4)
        assert torch.equal(with_logits[i][1], alone_preds)
        # Reference: the plain full-logits forward of the row alone.
        logits = model(torch.tensor([row]), logits_positions="all")[0]
        ref = torch.nn.functional.cross_entropy(logits[s - 1: e - 1], torch.tensor(row[s:e]), reduction="none")
        torch.testing.assert_close(alone_nats, ref, atol=1e-4, rtol=1e-4)


def test_tiny_model_end_to_end(tmp_path, tok):
    bundle = write_bundle(tmp_path / "bundle", lm_fewshot=1)
    model = tiny_model(tok)
    a = evaluate_core(model, tok, bundle, batch_size=2, log=None)
    b = evaluate_core(model, tok, bundle, batch_size=64, log=None)
    assert a["accuracy"] == b["accuracy"]  # batching changes nothing
    for label, acc in a["accuracy"].items():
        assert 0.0 <= acc <= 1.0
        assert a["centered"][label] <= 1.0
    assert a["core"] == pytest.approx(sum(a["centered"].values()) / 3)

    # The CLI: checkpoint + tokenizer directories, result JSON.
    save_model(model, tmp_path / "ckpt")
    tok.save(str(tmp_path / "tok"))
    out = main(["--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"), "--bundle", str(bundle),
                "--device", "cpu", "--max-per-task", "3", "--out", str(tmp_path / "core.json")])
    assert json.loads((tmp_path / "core.json").read_text())["core"] == pytest.approx(out["core"])
    assert out["num_examples"] == {"mc": 3, "schema": 2, "lm": 3}


def test_items_too_long_for_the_context_count_as_wrong(tmp_path):
    # Two tokens of context leave no room for any item's scored tokens: every item is counted, none scored.
    calls = []
    out = evaluate_core(None, CharTok(), write_bundle(tmp_path), score_fn=table_score_fn(calls), max_seq_len=2,
                        log=None)
    assert calls == []
    assert out["accuracy"] == {"mc": 0.0, "schema": 0.0, "lm": 0.0}
    assert out["num_too_long"] == out["num_examples"] == {"mc": 4, "schema": 2, "lm": 4}
