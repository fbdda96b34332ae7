"""Chat evals: batched categorical scoring == one prompt at a time == the plain forward; generative eval through the
engine == naive greedy generation; GSM8K with a real tool call; HumanEval timeouts; hand-checked ChatCORE/pass@k."""

import time

import pytest
import torch

from infer.engine import Engine
from infer.sandbox import ToolExecutor
from model.chat import render_for_completion
from model.config import ModelConfig
from model.gpt import GPT
from tests.models import random_model
from tests.test_engine import ScriptedGPT, naive_greedy, tok  # noqa: F401  (tok is a fixture)
from train.chat_eval import (assistant_text, chatcore, evaluate_categorical, evaluate_generative, letter_logits,
                             load_task, pass_at_k)


def tiny_model(tok, sequence_len=512, cls=GPT):  # noqa: F811
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=sequence_len,
                                n_kv_head=1)
    return random_model(cfg, 0.1, cls=cls).eval()


@pytest.fixture(scope="module")
def model(tok):  # noqa: F811
    return tiny_model(tok)


# ---- hand-checked numbers ------------------------------------------------------------------------------------------

def test_chatcore_matches_nanochat_published_sft_number():
    # nanochat v0 report card, SFT column: ARC-E .3876, ARC-C .2807, MMLU .3151, GSM8K .0455, HumanEval .0854 →
    # ChatCORE .0884. By hand: (.1835 + .0409 + .0868 + .0455 + .0854) / 5 = .08842.
    acc = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854}
    assert chatcore(acc) == pytest.approx(0.08842, abs=1e-5)
    # Round numbers: (0.2 + 0.0 + 1/15 + 0.05 + 0.10) / 5.
    acc = {"ARC-Easy": 0.40, "ARC-Challenge": 0.25, "MMLU": 0.30, "GSM8K": 0.05, "HumanEval": 0.10}
    assert chatcore(acc) == pytest.approx((0.2 + 0.0 + 1 / 15 + 0.05 + 0.10) / 5)
    assert chatcore({"ARC-Easy": 1.0, "ARC-Challenge": 0.25, "MMLU": 0.25},
                    tasks=("ARC-Easy", "ARC-Challenge", "MMLU")) == pytest.approx(1 / 3)


def test_chatcore_refuses_an_incomplete_set_and_says_which_ran():
    with pytest.raises(ValueError, match=r"ran \['ARC-Easy', 'GSM8K'\], missing \['ARC-Challenge', 'MMLU', "
                                         r"'HumanEval'\]"):
        chatcore({"ARC-Easy": 0.5, "GSM8K": 0.1, "synthetic-mc": 0.9})


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 4) == 1.0  # only 3 wrong samples: any 4 include a right one
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    with pytest.raises(ValueError, match="k=6"):
        pass_at_k(5, 1, 6)


# ---- categorical ---------------------------------------------------------------------------------------------------

def test_categorical_batched_equals_one_at_a_time_and_the_plain_forward(tok, model):  # noqa: F811
    task = load_task("MMLU", max_problems=4, seed=3)
    examples = list(task) + list(load_task("synthetic-mc", max_problems=3))
    batched = letter_logits(model, tok, examples, batch_size=3)  # batches of different prompt lengths
    single = letter_logits(model, tok, examples, batch_size=1)
    assert all(s is not None for s in single)  # every prompt fits the 512-token context
    for ex, b, s in zip(examples, batched, single):
        assert (b is None) == (s is None)
        if s is None:
            continue
        torch.testing.assert_close(b, s, atol=1e-4, rtol=1e-4)
        assert int(b.argmax()) == int(s.argmax())
        ids = render_for_completion(tok, ex["messages"])
        full = model(torch.tensor([ids]))[0]  # (V,) logits of the last position, no padding anywhere
        torch.testing.assert_close(s, full[[tok.encode_ordinary(x)[0] for x in ex["letters"]]], atol=1e-4,
                                   rtol=1e-4)
    a = evaluate_categorical(model, tok, task, batch_size=4, log=None)
    expected = sum(task.evaluate(ex, ex["letters"][int(s.argmax())]) for ex, s in zip(task, single))
    assert (a.num_correct, a.num_problems, a.num_too_long) == (expected, 4, 0)
    assert a.kind == "categorical" and not a.synthetic


def test_categorical_too_long_prompts_count_wrong(tok):  # noqa: F811
    model = tiny_model(tok, sequence_len=64)
    task = load_task("synthetic-mc", max_problems=4)
    res = evaluate_categorical(model, tok, task, batch_size=2, log=None)
    assert res.num_too_long == 4 and res.num_correct == 0 and res.synthetic  # every rendered prompt is > 64 tokens


# ---- generative ----------------------------------------------------------------------------------------------------

def test_generative_through_the_engine_equals_naive_greedy(tok, model):  # noqa: F811
    task = load_task("synthetic-spelling", max_problems=3)
    engine = Engine(model, tok, block_size=16, num_blocks=256, max_num_seqs=4, log=lambda _: None)
    res = evaluate_generative(engine, task, num_samples=2, temperature=0.0, top_k=50, max_tokens=10, log=None)
    eos = set(engine.eos_token_ids)
    for ex, answers in zip(task, res.answers):
        naive = naive_greedy(model, render_for_completion(tok, ex["messages"]), 10, eos)
        expected = assistant_text(tok, naive, engine.eos_token_ids)
        assert answers == [expected, expected]  # temperature 0: both samples are the greedy answer
    assert res.num_problems == 3 and res.num_samples == 2 and set(res.pass_at_k) == {1, 2}
    assert res.synthetic and res.kind == "generative"
    assert engine.block_manager.num_used_blocks == 0


def test_gsm8k_answer_with_a_calculator_call_is_graded_through_the_sandbox(tok):  # noqa: F811
    task = load_task("GSM8K", max_problems=1, seed=5)
    ex = task[0]
    answer = int(float(ex["answer"]))
    sp = tok.special_tokens
    model = tiny_model(tok, cls=ScriptedGPT)
    P = len(render_for_completion(tok, ex["messages"]))
    call = [sp["<|python_start|>"]] + tok.encode_ordinary(f"{answer} - 7 + 7") + [sp["<|python_end|>"]]
    forced = [sp["<|output_start|>"]] + tok.encode_ordinary(str(answer)) + [sp["<|output_end|>"]]
    text = tok.encode_ordinary(f" so the answer is\n#### {answer}")
    script = call + [None] * len(forced) + text  # forced tokens are not sampled: no script entries there
    model.script = {P + k: t for k, t in enumerate(script) if t is not None}
    model.end_id = sp["<|assistant_end|>"]
    with ToolExecutor(max_workers=2, timeout_s=10) as executor:
        engine = Engine(model, tok, block_size=16, num_blocks=256, tools=executor, log=lambda _: None)
        res = evaluate_generative(engine, task, max_tokens=64, log=None)
    assert res.answers == [[f" so the answer is\n#### {answer}"]]  # the tool call and its output are not text
    assert res.num_correct == 1 and res.accuracy == 1.0 and not res.synthetic


def test_grading_reads_the_text_parts_only(tok):  # noqa: F811
    task = load_task("GSM8K", max_problems=1, seed=5)
    ex = task[0]
    sp = tok.special_tokens
    wrong_text = tok.encode_ordinary("I think\n#### 0")
    tool = ([sp["<|python_start|>"]] + tok.encode_ordinary("1") + [sp["<|python_end|>"], sp["<|output_start|>"]]
            + tok.encode_ordinary(f"#### {ex['answer']}") + [sp["<|output_end|>"]])
    text = assistant_text(tok, tool + wrong_text + [sp["<|assistant_end|>"]], [sp["<|assistant_end|>"]])
    assert text == "I think\n#### 0" and not task.evaluate(ex, text)
    # A turn cut off inside a tool call is malformed: its non-special tokens are graded.
    cut = tok.encode_ordinary(f"#### {ex['answer']} ") + [sp["<|python_start|>"]] + tok.encode_ordinary("1+")
    assert task.evaluate(ex, assistant_text(tok, cut))


def test_humaneval_completion_that_loops_forever_is_wrong_within_the_time_limit():
    task = load_task("HumanEval", max_problems=1, seed=0, sandbox_timeout_s=1.0)
    ex = task[0]
    good = "```python\n" + ex["messages"][-1]["content"] + "\n```"
    loop = f"```python\ndef {ex['entry_point']}(*args, **kwargs):\n    while True:\n        pass\n```"
    assert task.evaluate(ex, good)  # the reference solution passes the problem's tests
    t0 = time.perf_counter()
    assert not task.evaluate(ex, loop)
    assert time.perf_counter() - t0 < 4.0


def test_binomial_tail():
    from train.chat_eval import binomial_tail

    assert binomial_tail(10, 0, 0.25) == 1.0
    assert binomial_tail(4, 4, 0.5) == pytest.approx(1 / 16)
    assert binomial_tail(3, 2, 0.25) == pytest.approx(3 * 0.25 ** 2 * 0.75 + 0.25 ** 3)


def test_chance_rate_of_generated_arithmetic():
    from train.chat_eval import chance_rate

    assert chance_rate(load_task("synthetic-arithmetic-mc", 8)) == 0.25  # four letters
    task = load_task("synthetic-arithmetic-1op", 64)
    answers = [str(task[i]["answer"]) for i in range(len(task))]
    assert chance_rate(task) == max(answers.count(a) for a in answers) / 64  # the best constant guess
