"""infer/sampling.py: parameter validation, the batched draw (greedy, top-k, top-p, min-p, temperature,
distributions, seeded reproducibility alone vs batched, logprobs) and StopChecker (stop ids, stop strings split
across tokens, held-back text, length). A tiny BPE is trained on real text so stop strings span several tokens."""

import json
import math
import os
import textwrap

import pytest
import torch

import bpe_rs
from infer.detokenizer import IncrementalDetokenizer
from infer.sampling import (MAX_TOP_K, SamplingParams, SamplingParamsError, StopChecker, _seed_halves, _uniform,
                            resolve_seed, sample)


# ---- validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, needle", [
    ("temperature", -0.1, "[0, 2.0]"),
    ("temperature", 2.5, "[0, 2.0]"),
    ("temperature", float("nan"), "[0, 2.0]"),
    ("temperature", "hot", "[0, 2.0]"),
    ("top_k", -1, f"[0, {MAX_TOP_K}]"),
    ("top_k", MAX_TOP_K + 1, f"[0, {MAX_TOP_K}]"),
    ("top_k", 2.0, "integer"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("min_p", 1.0, "[0, 1)"),
    ("min_p", -0.5, "[0, 1)"),
    ("seed", 1.5, "integer"),
    ("seed", True, "integer"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", 3.0, ">= 1"),
    ("stop", [""], "non-empty"),
    ("stop", ["x" * 1000], "at most"),
    ("stop", [str(i) for i in range(17)], "at most 16"),
    ("stop", 5, "string"),
    ("stop_token_ids", [-1], ">= 0"),
    ("stop_token_ids", 7, "list of integers"),
    ("logprobs", 1, "true or false"),
])
def test_validation_names_field_and_range(field, value, needle):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
    assert str(e.value).startswith(field + ":") and needle in str(e.value), str(e.value)


def test_valid_params_are_normalized_and_frozen():
    p = SamplingParams(temperature=0, top_k=MAX_TOP_K, top_p=1, min_p=0.99, seed=-3, max_tokens=1,
                       stop="END", stop_token_ids=[1, 2], logprobs=True)
    assert p.stop == ("END",) and p.stop_token_ids == (1, 2) and p.is_greedy
    assert hash(p) == hash(SamplingParams(temperature=0, top_k=MAX_TOP_K, top_p=1, min_p=0.99, seed=-3,
                                          max_tokens=1, stop=["END"], stop_token_ids=(1, 2), logprobs=True))
    with pytest.raises(AttributeError):
        p.temperature = 1.0
    with pytest.raises(SamplingParamsError, match=r"stop_token_ids: ids \[400\] are outside"):
        SamplingParams(stop_token_ids=[3, 400]).check_vocab(400)


def test_resolve_seed():
    assert resolve_seed(SamplingParams(seed=7)) == 7
    a, b = resolve_seed(SamplingParams()), resolve_seed(SamplingParams())
    assert a != b and 0 <= a < 2 ** 64


def test_bad_inputs_to_sample():
    p = [SamplingParams()]
    with pytest.raises(TypeError, match="fp32"):
        sample(torch.zeros(1, 8, dtype=torch.bfloat16), p, seeds=[0], steps=[0])
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample(torch.zeros(8), p, seeds=[0], steps=[0])
    with pytest.raises(ValueError, match="2 SamplingParams for 1"):
        sample(torch.zeros(1, 8), p * 2, seeds=[0], steps=[0])
    with pytest.raises(ValueError, match="one entry per row"):
        sample(torch.zeros(1, 8), p, seeds=[0, 1], steps=[0])


# ---- the draw -----------------------------------------------------------------------------------------------
def draw(logits, params, seeds=None, steps=None, **kw):
    B = logits.shape[0]
    seeds = list(range(B)) if seeds is None else seeds
    steps = [0] * B if steps is None else steps
    return sample(logits, params, seeds=seeds, steps=steps, **kw)


def test_greedy_is_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.3), SamplingParams(temperature=0, top_k=5)]
    tokens, lp = draw(logits, params * 2)
    assert lp is None
    for r in (0, 2, 3, 5):
        assert tokens[r] == logits[r].argmax()


@pytest.mark.parametrize("params", [SamplingParams(top_k=1, temperature=1.5), SamplingParams(top_p=1e-6),
                                    SamplingParams(top_k=1, top_p=0.5), SamplingParams(min_p=0.999)])
def test_degenerate_filters_equal_greedy(params):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 500, generator=g)
    tokens, _ = draw(logits, [params] * 64, seeds=list(range(100, 164)), steps=list(range(64)))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_min_p_filters():
    # probs ∝ [8, 4, 2, 1, 0.5, ...]: min_p=0.2 keeps tokens with p >= 0.2 * p_max, i.e. the first three.
    V, N = 10, 4000
    logits = torch.log(torch.tensor([2.0 ** -i for i in range(V)]) * 8).expand(N, V).contiguous()
    tokens, _ = draw(logits, [SamplingParams(min_p=0.2)] * N)
    counts = torch.bincount(tokens, minlength=V)
    assert counts[3:].sum() == 0 and (counts[:3] > 0).all()


def chi_square(tokens, probs):
    N = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * N
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token outside the expected support"
    return (((counts - expected) ** 2 / expected)[support]).sum().item(), int(support.sum()) - 1


# p < 1e-3 thresholds of chi-square for the degrees of freedom used below (the draws are seeded, so fixed).
CHI2_999 = {2: 13.8, 3: 16.3, 4: 18.5, 5: 20.5, 6: 22.5, 7: 24.3}


@pytest.mark.parametrize("vary", ["seed", "step"])
def test_temperature_distribution(vary):
    V, N, T = 8, 20000, 0.7
    base = torch.tensor([1.0, 0.5, 0.0, -0.3, 2.0, -1.0, 0.2, 0.8])
    logits = base.expand(N, V).contiguous()
    seeds = list(range(N)) if vary == "seed" else [42] * N
    steps = [0] * N if vary == "seed" else list(range(N))
    tokens, _ = draw(logits, [SamplingParams(temperature=T)] * N, seeds=seeds, steps=steps)
    stat, dof = chi_square(tokens, torch.softmax(base / T, dim=-1))
    assert stat < CHI2_999[dof], (stat, dof)


def test_top_k_top_p_distribution_is_renormalized():
    # T=1, top_k=6 drops the two smallest; top_p=0.8 then keeps the fewest tokens whose mass reaches 0.8.
    V, N = 8, 20000
    base = torch.tensor([1.0, 0.5, 0.0, -0.3, 2.0, -1.0, 0.2, 0.8])
    p = torch.softmax(base, -1)
    order = p.argsort(descending=True)
    kept = order[:6]
    pk = torch.zeros(V).index_put_((kept,), p[kept] / p[kept].sum())
    mass = 0.0
    final = []
    for i in order[:6].tolist():
        final.append(i)
        mass += pk[i].item()
        if mass >= 0.8:
            break
    expected = torch.zeros(V).index_put_((torch.tensor(final),), pk[final] / pk[final].sum())
    tokens, _ = draw(base.expand(N, V).contiguous(), [SamplingParams(top_k=6, top_p=0.8)] * N)
    stat, dof = chi_square(tokens, expected)
    assert stat < CHI2_999[dof], (stat, dof, final)


def test_ties_are_kept_on_both_code_paths():
    # top_k=2 over [3, 1, 1, 0]: the threshold is the 2nd largest value (1), so both tied tokens stay in.
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]]).expand(3000, 4).contiguous()
    topk_only = draw(logits, [SamplingParams(temperature=2.0, top_k=2)] * 3000)[0]
    # A batch-mate with top_p forces the sort path; the kept set must not change.
    params = [SamplingParams(temperature=2.0, top_k=2)] * 2999 + [SamplingParams(top_p=0.5)]
    with_sort = draw(logits, params)[0][:2999]
    assert torch.equal(topk_only[:2999], with_sort)
    counts = torch.bincount(topk_only, minlength=4)
    assert counts[1] > 0 and counts[2] > 0 and counts[3] == 0


def logits_for_step(step, V=300):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(V, generator=g) * 2


def run_request(params, seed, steps, mates=0, position=0, mate_params=None):
    """Generate `steps` tokens for one request whose logits row is a fixed function of the step, with `mates`
    other random rows around it (at `position`), and return its tokens."""
    out = []
    g = torch.Generator().manual_seed(7 + mates + position)
    for step in range(steps):
        rows = [torch.randn(300, generator=g) for _ in range(mates)]
        rows.insert(position, logits_for_step(step))
        plist = [mate_params or SamplingParams(temperature=0.9, top_p=0.95)] * mates
        plist.insert(position, params)
        seeds = torch.randint(0, 2 ** 62, (mates,), generator=g).tolist()
        seeds.insert(position, seed)
        mate_steps = torch.randint(0, 100, (mates,), generator=g).tolist()
        mate_steps.insert(position, step)
        tokens, _ = sample(torch.stack(rows), plist, seeds=seeds, steps=mate_steps)
        out.append(int(tokens[position]))
    return out


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=40),
                                    SamplingParams(temperature=1.2, top_p=0.9, min_p=0.01)])
def test_seeded_request_same_alone_and_batched(params):
    alone = run_request(params, seed=1234, steps=12)
    assert alone == run_request(params, seed=1234, steps=12)  # again, in this process
    assert alone == run_request(params, seed=1234, steps=12, mates=5, position=0)
    assert alone == run_request(params, seed=1234, steps=12, mates=5, position=3)
    assert alone == run_request(params, seed=1234, steps=12, mates=9, position=9,
                                mate_params=SamplingParams(temperature=0))  # greedy mates, no sort path
    assert alone != run_request(params, seed=1235, steps=12)
    assert len(set(alone)) > 3  # it really sampled


def test_noise_is_fixed_across_runs_and_devices():
    # Golden integers of the counter-based hash: any change to it silently changes every seeded output.
    seeds = torch.tensor([_seed_halves(1234), _seed_halves(-1), _seed_halves(0)])
    u = _uniform(seeds, torch.tensor([0, 7, 0]))
    assert ((u * 2 ** 23) - 0.5).round().to(torch.int64).tolist() == [2474679, 2902210, 68595]
    assert _seed_halves(2 ** 64 + 5) == _seed_halves(5)


def test_logprobs_raw_and_processed():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 200, generator=g) * 2
    params = [SamplingParams(temperature=0, logprobs=True), SamplingParams(temperature=0.5, top_k=10),
              SamplingParams(temperature=1.5, top_p=0.7), SamplingParams(min_p=0.1), SamplingParams()]
    tokens, raw = draw(logits, params)
    ref = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(raw, ref)

    tokens2, proc = draw(logits, params, logprobs_mode="processed")
    assert torch.equal(tokens, tokens2)
    assert proc[0] == 0.0  # greedy: a point mass
    # Row 1 by hand: temperature 0.5, keep the 10 largest, renormalize.
    s = logits[1] / 0.5
    s = s.masked_fill(s < s.topk(10).values[-1], float("-inf"))
    torch.testing.assert_close(proc[1], torch.log_softmax(s, -1)[tokens[1]])
    assert (proc <= 0).all()


def test_all_greedy_logprobs():
    logits = torch.randn(3, 50)
    tokens, lp = draw(logits, [SamplingParams(temperature=0, logprobs=True)] * 3)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).max(-1).values)
    assert (draw(logits, [SamplingParams(temperature=0, logprobs=True)] * 3, logprobs_mode="processed")[1] == 0).all()


# ---- StopChecker ---------------------------------------------------------------------------------------------
class FakeDetok:
    """Each token id is a fixed string: exact control over token boundaries."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, t):
        return self.pieces[t]

    def flush(self):
        return ""


def run_checker(params, token_texts, eos=()):
    pieces = dict(enumerate(token_texts))
    pieces.update({i: "<eos>" for i in eos})
    checker = StopChecker(params, FakeDetok(pieces), eos_token_ids=eos)
    deltas = []
    ids = list(range(len(token_texts)))
    for t in ids:
        delta, reason = checker.push(t)
        deltas.append(delta)
        if reason:
            break
    return checker, deltas


def test_stop_string_held_back_then_released():
    checker, deltas = run_checker(SamplingParams(stop=["STOP!"]), ["go ", "ST", "O", "P", " and ", "more"])
    # "ST", "O" and "P" could all start STOP!; " and " proves they do not, so they are released together.
    assert deltas == ["go ", "", "", "", "STOP and ", "more"]
    assert checker.text == "go STOP and more" and checker.finish_reason is None


def test_stop_string_split_over_tokens_is_cut():
    checker, deltas = run_checker(SamplingParams(stop=["STOP!"]), ["go ", "ST", "O", "P", "!tail", "never"])
    assert deltas == ["go ", "", "", "", ""]
    assert checker.finish_reason == "stop" and checker.text == "go " and checker.num_tokens == 5


def test_stop_string_inside_one_token_and_earliest_wins():
    checker, deltas = run_checker(SamplingParams(stop=["cd", "b"]), ["xa", "bcdx"])
    assert "".join(deltas) == "xa" and checker.finish_reason == "stop"


def test_stop_token_ids_and_eos():
    checker, deltas = run_checker(SamplingParams(stop_token_ids=[2]), ["a", "b", "c", "d"])
    assert checker.finish_reason == "stop" and checker.text == "ab" and checker.num_tokens == 3
    checker, deltas = run_checker(SamplingParams(stop=["zzz"]), ["a", "z", "z", "b"], eos=(2,))
    # eos ends the sequence: the held "z" is released (it can no longer become "zzz"), eos text is not shown.
    assert checker.finish_reason == "stop" and checker.text == "az" and deltas[-1] == "z"


def test_length_releases_held_text_and_push_after_finish_fails():
    checker, deltas = run_checker(SamplingParams(stop=["xyz"], max_tokens=3), ["a", "b", "xy", "z"])
    assert checker.finish_reason == "length" and deltas == ["a", "b", "xy"] and checker.text == "abxy"
    with pytest.raises(RuntimeError, match="finished"):
        checker.push(3)
    checker = StopChecker(SamplingParams(stop=["xyz"]), FakeDetok({0: "ax"}))
    assert checker.push(0) == ("a", None)
    assert checker.finish("length") == ("x", "length")


@pytest.fixture(scope="module")
def tok():
    # Real text that ships with CPython: module docstrings of the standard library.
    texts = [m.__doc__ for m in (os, json, textwrap, math) if m.__doc__]
    texts += ["The quick brown fox jumps over the lazy dog. The answer is 84. Thanks! You are welcome."]
    return bpe_rs.train_from_iterator(texts, vocab_size=400)


@pytest.mark.parametrize("stop", ["User:", "welcome", "\n\n", "😀"])
def test_stop_strings_on_a_real_tokenizer(tok, stop):
    text = "The answer is 84.\n\nUser: Thanks! You are welcome 😀 ok"
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces) or stop == "\n\n", "stop string should span several tokens"
    end = text.index(stop)
    detok = IncrementalDetokenizer(tok)
    checker = StopChecker(SamplingParams(stop=[stop, "never seen"]), detok,
                          eos_token_ids=[tok.special_id("<|assistant_end|>")])
    shown = ""
    for i in ids:
        delta, reason = checker.push(i)
        shown += delta
        assert text.startswith(shown)  # nothing shown is ever taken back
        assert stop not in shown and "\ufffd" not in shown
        if reason:
            break
    assert reason == "stop" and shown == checker.text == text[:end]


def test_eos_special_token_on_a_real_tokenizer(tok):
    ids = tok.encode("Thanks! You are welcome.") + [tok.special_id("<|assistant_end|>")] + tok.encode(" more")
    checker = StopChecker(SamplingParams(), IncrementalDetokenizer(tok, skip_special_tokens=False),
                          eos_token_ids=[tok.special_id("<|assistant_end|>")])
    out = [checker.push(i) for i in ids[: ids.index(tok.special_id("<|assistant_end|>")) + 1]]
    assert out[-1].finish_reason == "stop" and checker.text == "Thanks! You are welcome."
