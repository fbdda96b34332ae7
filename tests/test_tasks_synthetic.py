"""Synthetic tasks (train/tasks_synthetic.py): determinism from (seed, i), rendering with model/chat.py, correct
arithmetic and counts (the python parts are evaluated here), graders on tricky strings, mixture proportions and
index errors."""

import collections
import re

import pytest

import bpe_rs
from model.chat import render_conversation
from train.tasks_synthetic import (ArithmeticWordProblems, IdentityChats, MultipleChoice, SpellingCount, TaskMixture,
                                   TaskSequence, extract_answer, extract_choice_letter, grade_number, words_from_texts)

TASKS = (ArithmeticWordProblems, SpellingCount, MultipleChoice, IdentityChats)


@pytest.fixture(scope="module")
def tok():
    # Text drawn from the tasks themselves plus a pangram, so the tiny BPE sees their characters.
    texts = [str(ArithmeticWordProblems(20, seed=1)[i]["messages"]) for i in range(20)]
    texts += ["The quick brown fox jumps over the lazy dog. 0123456789 #### A. B. C. D. 'x'.count('r')"]
    return bpe_rs.train_from_iterator(texts, vocab_size=300)


def text_of(content):
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


@pytest.mark.parametrize("cls", TASKS)
def test_deterministic_and_seeded(cls):
    a, b, c = cls(50, seed=0), cls(50, seed=0), cls(50, seed=1)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(50)] != [c[i] for i in range(50)]
    assert a[7] == cls(1000, seed=0)[7]  # an example depends on (seed, i) only, not on the size or on other examples
    assert a[-1] == a[49]
    assert a.synthetic is True and a.name.startswith("synthetic-")


@pytest.mark.parametrize("cls", TASKS)
def test_every_example_renders(cls, tok):
    task = cls(60, seed=3)
    for ex in task:
        ids, mask = render_conversation(tok, ex["messages"])
        assert len(ids) == len(mask) and sum(mask) > 0
        assert ex["messages"][-1]["role"] == "assistant"


def test_arithmetic_answers_are_correct():
    task = ArithmeticWordProblems(300, seed=0)
    num_ops = collections.Counter()
    for ex in task:
        parts = ex["messages"][1]["content"]
        calls = [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
        assert all(q["type"] == "python_output" for p, q in zip(parts, parts[1:]) if p["type"] == "python")
        assert 2 <= len(calls) <= 4
        num_ops[len(calls)] += 1
        for expr, output in calls:
            assert re.fullmatch(r"\d+(\+|-|\*|//)\d+", expr), expr
            assert str(eval(expr)) == output  # each tool output is what Python computes
        for (_, out), (nxt, _) in zip(calls, calls[1:]):
            assert nxt.startswith(out)  # each step works on the previous result
        assert int(calls[-1][1]) == ex["answer"] >= 0
        assert task.evaluate(ex, parts) and extract_answer(parts) == ex["answer"]
        assert "####" not in ex["messages"][0]["content"]
    assert set(num_ops) == {2, 3, 4}


def test_spelling_counts():
    task = SpellingCount(300, seed=0)
    zeros = 0
    for ex in task:
        parts = ex["messages"][1]["content"]
        (expr,) = [p["text"] for p in parts if p["type"] == "python"]
        (output,) = [p["text"] for p in parts if p["type"] == "python_output"]
        assert expr == f"'{ex['word']}'.count('{ex['letter']}')" and ".count(" in expr
        assert int(output) == eval(expr) == ex["word"].count(ex["letter"]) == ex["answer"]
        assert "-".join(ex["word"]) in text_of(parts)
        assert task.evaluate(ex, parts)
        zeros += ex["answer"] == 0
    assert 0 < zeros < 150
    assert SpellingCount(3, words=["strawberry"])[0]["word"] == "strawberry"
    with pytest.raises(ValueError):
        SpellingCount(3, words=["Not OK"])


def test_multiple_choice_known_answers():
    task = MultipleChoice(200, seed=0)
    for ex in task:
        prompt = ex["messages"][0]["content"]
        choices = ex["choices"]
        assert len(set(choices)) == 4 and [f"{L}. {c}" in prompt for L, c in zip("ABCD", choices)] == [True] * 4
        correct = choices["ABCD".index(ex["answer"])]
        if prompt.startswith("What is"):
            expr = re.match(r"What is (.*)\?", prompt).group(1).replace(" x ", " * ").replace(" / ", " // ")
            assert str(eval(expr)) == correct
        else:
            n = int(re.search(r"exactly (\d+) letters", prompt).group(1))
            assert [len(c) == n for c in choices].count(True) == 1 and len(correct) == n
        assert ex["messages"][1]["content"] == ex["answer"] and task.evaluate(ex, ex["answer"])


def test_identity_says_flashchat():
    task = IdentityChats(100, seed=0)
    turns = collections.Counter(len(ex["messages"]) for ex in task)
    assert set(turns) <= {2, 4, 6} and len(turns) >= 2
    assert all(task.evaluate(ex, ex["messages"][1]["content"]) for ex in task)


@pytest.mark.parametrize("text, expected", [
    ("so #### 1,234", 1234), ("#### -5", -5), ("#### 3.", 3), ("#### 12.0", 12), ("####7", 7),
    ("#### 3 and later #### 4", 3), ("no marker 42", None), ("####", None), ("#### 1.2.3", None),
    ("#### abc", None), ("", None)])
def test_number_grader(text, expected):
    assert extract_answer(text) == expected
    assert grade_number(expected, text) is (expected is not None)
    assert grade_number(999, text) is False


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" B.", "B"), ("(C)", "C"), ("D) 42", "D"), ("A: 7", "A"), ("Answer: B", "B"),
    ("The answer is (D).", "D"), ("a", None), ("E", None), ("Because 7 times 8 is 56", None), ("", None),
    ([{"type": "text", "text": "C"}], "C")])
def test_choice_grader(text, expected):
    assert extract_choice_letter(text) == expected


def test_mixture_and_sequence():
    a, s, m = ArithmeticWordProblems(100, seed=0), SpellingCount(50, seed=0), IdentityChats(10, seed=0)
    plain = TaskMixture([a, s, m], seed=42)
    assert len(plain) == 160 and sorted(plain.locate(i) for i in range(160)) == sorted(
        [(0, j) for j in range(100)] + [(1, j) for j in range(50)] + [(2, j) for j in range(10)])
    assert [plain.locate(i) for i in range(160)] == [TaskMixture([a, s, m], seed=42).locate(i) for i in range(160)]
    assert [plain.locate(i) for i in range(160)] != [TaskMixture([a, s, m], seed=7).locate(i) for i in range(160)]
    k, j = plain.locate(5)
    assert plain[5] == [a, s, m][k][j] and plain.synthetic

    weighted = TaskMixture([a, s, m], weights=[1, 2, 1], seed=0, size=4000)
    counts = collections.Counter(weighted.locate(i)[0] for i in range(len(weighted)))
    assert len(weighted) == 4000 and counts == {0: 1000, 1: 2000, 2: 1000}  # m (10 examples) repeats 100 times
    head = collections.Counter(weighted.locate(i)[0] for i in range(400))  # shuffled: a prefix is mixed too
    assert 120 < head[1] < 280
    with pytest.raises(ValueError):
        TaskMixture([a, s], weights=[1])

    seq = TaskSequence([s, m])
    assert len(seq) == 60 and seq[0] == s[0] and seq[50] == m[0] and seq[59] == m[9] and seq.locate(-1) == (1, 9)


@pytest.mark.parametrize("make", [lambda: ArithmeticWordProblems(5), lambda: TaskSequence([IdentityChats(3)]),
                                  lambda: TaskMixture([IdentityChats(2), SpellingCount(3)])])
def test_index_errors(make):
    seq = make()
    with pytest.raises(IndexError, match=rf"index {len(seq)} out of range for {len(seq)} examples"):
        seq[len(seq)]
    with pytest.raises(IndexError, match="out of range"):
        seq[-len(seq) - 1]
    with pytest.raises(TypeError, match="integer"):
        seq["0"]


def test_words_from_texts():
    assert words_from_texts(["The cat, the DOG; a cat2 and x"]) == ["and", "cat", "dog", "the"]


def test_arithmetic_only_multiple_choice():
    task = MultipleChoice(50, seed=3, kinds=("arithmetic",))
    assert task.name == "synthetic-arithmetic-mc"
    assert all(ex["messages"][0]["content"].startswith("What is ") for ex in task)
    mixed = MultipleChoice(50, seed=3)
    assert mixed.name == "synthetic-mc" and any("letters?" in ex["messages"][0]["content"] for ex in mixed)
    with pytest.raises(ValueError, match="kinds must be"):
        MultipleChoice(5, kinds=("algebra",))


def test_one_step_arithmetic_problems():
    task = ArithmeticWordProblems(40, seed=5, ops=(1, 1))
    assert task.name == "synthetic-arithmetic-1op"
    for ex in task:
        assert len(ex["expressions"]) == 1 and task.evaluate(ex, f"... #### {ex['answer']}")
    assert ArithmeticWordProblems(3, seed=5)[1] == ArithmeticWordProblems(3, seed=5, ops=(2, 4))[1]  # default kept
    with pytest.raises(ValueError, match="ops must be a range"):
        ArithmeticWordProblems(3, ops=(0, 2))
