"""The engine against the model's naive full-recompute generation, plus seeds, stops, aborts and weight pushes."""

import inspect
import textwrap

import pytest
import torch

import bpe_rs
from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.scheduler import QueueFullError
from model.config import ModelConfig
from model.gpt import GPT
from tests.models import random_model


@pytest.fixture(scope="module")
def tok():
    return bpe_rs.train_from_iterator([inspect.getsource(textwrap)], vocab_size=400)


def make_model(tok, seed=0):
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=96, n_kv_head=1)
    return random_model(cfg, 0.1, seed=seed)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


def prompts(tok) -> list[list[int]]:
    system = tok.encode("def wrap(text, width=70, **kwargs):\n    ")  # a shared prefix: prefix-cache hits
    texts = ["Hello", "Wrap a single paragraph of text", "    return w.fill(text)", "x = 1",
             "class TextWrapper:", "indent lines with a prefix", "dedent", "fill"]
    return [system + tok.encode(t) for t in texts] + [tok.encode(t) for t in texts[:4]]


def naive_greedy(model, ids, max_tokens, eos):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            t = int(model(torch.tensor([ids]))[0].argmax())
            out.append(t)
            ids.append(t)
            if t in eos:
                break
    return out


@pytest.mark.parametrize("num_blocks,budget", [(64, 2048), (64, 16), (10, 24)],
                         ids=["roomy", "chunked-prefill", "preempting"])
def test_greedy_equals_naive_generation(tok, model, num_blocks, budget):
    engine = Engine(model, tok, block_size=8, num_blocks=num_blocks, max_num_seqs=8,
                    max_num_batched_tokens=budget, log=lambda _: None)
    ps = prompts(tok)
    params = SamplingParams(temperature=0, max_tokens=12)
    results = engine.generate(ps, params)
    for p, r in zip(ps, results):
        assert r.token_ids == naive_greedy(model, p, 12, set(engine.eos_token_ids)), r.request_id
        assert r.finish_reason in ("stop", "length")
    if budget == 16:  # admitted a few at a time: later requests find the shared prefix's blocks cached
        assert any(r.num_cached_prompt_tokens > 0 for r in results)
    assert engine.block_manager.num_used_blocks == 0  # everything freed


def test_prefix_reuse_gives_the_same_output(tok, model):
    engine = Engine(model, tok, block_size=8, num_blocks=64, log=lambda _: None)
    p = prompts(tok)[1]
    params = SamplingParams(temperature=0, max_tokens=8)
    first = engine.generate([p], params)[0]
    second = engine.generate([p], params)[0]
    assert first.num_cached_prompt_tokens == 0 and second.num_cached_prompt_tokens > 0
    assert first.token_ids == second.token_ids


def test_seeded_sampling_is_reproducible_alone_and_batched(tok, model):
    engine = Engine(model, tok, block_size=8, num_blocks=64, log=lambda _: None)
    ps = prompts(tok)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    alone = engine.generate([ps[2]], seeded)[0].token_ids
    others = [SamplingParams(temperature=0.7, seed=i, max_tokens=10) for i in range(5)]
    batched = engine.generate([ps[0], ps[5], ps[2], ps[7], ps[9], ps[1]], others[:2] + [seeded] + others[2:])
    assert batched[2].token_ids == alone
    again = engine.generate([ps[2]], seeded)[0].token_ids
    assert again == alone


def test_stop_string_ends_generation_at_the_right_place(tok, model):
    engine = Engine(model, tok, block_size=8, num_blocks=64, log=lambda _: None)
    p = prompts(tok)[3]
    full = engine.generate([p], SamplingParams(temperature=0, max_tokens=30))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.generate([p], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_abort_frees_blocks_and_is_idempotent(tok, model):
    engine = Engine(model, tok, block_size=8, num_blocks=32, log=lambda _: None)
    rid = engine.add_request(prompts(tok)[0], SamplingParams(temperature=0, max_tokens=20))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort(rid) is True
    assert engine.block_manager.num_used_blocks == 0
    assert engine.abort(rid) is False and engine.abort("never-seen") is False
    assert not engine.has_unfinished()


def test_bad_requests_are_refused_with_the_numbers(tok, model):
    engine = Engine(model, tok, block_size=8, num_blocks=32, max_waiting=1, log=lambda _: None)
    with pytest.raises(ValueError, match=r"maximum context length is 96 tokens, but 110 were requested \(10 in the "
                                         r"prompt, 100 to generate\)"):
        engine.add_request([1] * 10, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="must lie in"):
        engine.add_request([tok.vocab_size + 5], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams(max_tokens=4))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(QueueFullError):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))


def test_generate_takes_more_prompts_than_the_waiting_queue(tok, model):
    ps = prompts(tok)
    params = SamplingParams(temperature=0, max_tokens=6)
    wide = Engine(model, tok, block_size=8, num_blocks=64, log=lambda _: None).generate(ps, params)
    narrow = Engine(model, tok, block_size=8, num_blocks=64, max_num_seqs=2, max_waiting=3, log=lambda _: None)
    finished = []
    out = narrow.generate(ps, params, on_finish=lambda k, c: finished.append((k, c)))  # 12 through a queue of 3
    assert [c.token_ids for c in out] == [c.token_ids for c in wide]
    assert sorted(k for k, _ in finished) == list(range(len(ps)))  # each prompt reported once, as it finished
    assert all(c is out[k] for k, c in finished)
    bad = ps[:5] + [[1] * 200] + ps[5:]
    with pytest.raises(ValueError, match="maximum context length"):
        narrow.generate(bad, params)
    assert not narrow.has_unfinished()  # the requests queued before the bad one were aborted
    assert narrow.block_manager.num_free_blocks == 64


def test_load_weights_changes_outputs_and_bumps_the_version(tok):
    model = make_model(tok, seed=0)
    engine = Engine(model, tok, block_size=8, num_blocks=64, log=lambda _: None)
    p = prompts(tok)[4]
    params = SamplingParams(temperature=0, max_tokens=10)
    before = engine.generate([p], params)[0].token_ids
    new_state = {k: v.clone() for k, v in make_model(tok, seed=1).state_dict().items()}
    assert engine.load_weights(new_state) == 1
    rid = engine.add_request(p, params)
    outs = engine.step()
    assert all(o.version == 1 for o in outs)
    engine.abort(rid)
    after = engine.generate([p], params)[0].token_ids
    assert after != before
    assert after == naive_greedy(engine.model, p, 10, set(engine.eos_token_ids))


def test_engine_logs_kv_capacity(tok, model):
    lines = []
    Engine(model, tok, block_size=16, num_blocks=12, log=lines.append)
    assert "192 tokens in 12 blocks of 16" in lines[0] and "maximum concurrency" in lines[0]


# ---- tool use: a scripted model drives the engine's tool path; the sandbox is real -------------------------------

class ScriptedGPT(GPT):
    """A GPT whose next token is read from a script keyed by position (default <|assistant_end|>), so the test
    controls when the model 'writes' a tool call. The real forward still runs (KV pool, paged attention)."""

    script: dict[int, int] = {}
    end_id: int = 0

    def forward(self, idx, *args, positions=None, **kwargs):
        logits = super().forward(idx, *args, positions=positions, **kwargs)
        last = kwargs.get("logits_positions")
        if positions is None or last is None or not isinstance(last, torch.Tensor):
            return logits
        forced = torch.full_like(logits, -30.0)
        for row, p in enumerate(positions[last].tolist()):
            forced[0, row, self.script.get(p + 1, self.end_id)] = 30.0
        return forced


def test_tool_call_runs_in_the_sandbox_and_its_output_is_forced_back(tok):
    from infer.sandbox import ToolExecutor

    torch.manual_seed(0)
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=96)
    model = ScriptedGPT.build(cfg)
    sp = tok.special_tokens
    prompt = tok.encode("x = 1")
    code = tok.encode("print(6 * 7)")
    P = len(prompt)
    calls = [sp["<|python_start|>"]] + code + [sp["<|python_end|>"]]
    model.script = {P + k: t for k, t in enumerate(calls)}
    model.end_id = sp["<|assistant_end|>"]
    with ToolExecutor(max_workers=2, timeout_s=10) as tools:
        engine = Engine(model, tok, block_size=8, num_blocks=64, tools=tools, log=lambda _: None)
        other = tok.encode("a longer prompt that needs no tool at all")
        results = engine.generate([prompt, other], SamplingParams(temperature=0, max_tokens=30))
    r = results[0]
    out = tok.encode("42\n")
    expected = calls + [sp["<|output_start|>"]] + out + [sp["<|output_end|>"], sp["<|assistant_end|>"]]
    assert r.token_ids == expected
    assert r.mask == [1] * len(calls) + [0] * (len(out) + 2) + [1]
    assert r.tool_outputs == ["42\n"]
    assert r.finish_reason == "stop"
    assert results[1].token_ids == [sp["<|assistant_end|>"]]  # the other request went on meanwhile
    assert engine.block_manager.num_used_blocks == 0


# ---- CUDA-graph decode ------------------------------------------------------------------------------------------

def test_cpu_engine_runs_decode_eagerly(tok, model):
    for eager in (False, True):
        engine = Engine(model, tok, block_size=8, num_blocks=16, enforce_eager=eager, log=lambda _: None)
        assert not engine.runner.graphs and not engine.runner.uses_graphs


@pytest.mark.gpu
def test_greedy_outputs_identical_with_and_without_cuda_graphs(tok):
    """fp32 on the GPU (no near-ties flipped by bf16 rounding): graphs vs eager, also after a weight push, which
    the graphs must see (load_state_dict copies in place; a replay reads the new weights)."""
    model = make_model(tok, seed=0).to("cuda")
    ps = prompts(tok)
    params = SamplingParams(temperature=0, max_tokens=24)
    lines = []
    graphs = Engine(model, tok, block_size=8, max_num_seqs=8, log=lines.append)
    eager = Engine(model, tok, block_size=8, max_num_seqs=8, enforce_eager=True, log=lambda _: None)
    assert graphs.runner.uses_graphs and graphs.runner.graph_error is None, lines
    assert any("captured decode batch sizes [1, 2, 4, 8]" in line for line in lines), lines
    assert not eager.runner.graphs
    with_graphs = [r.token_ids for r in graphs.generate(ps, params)]  # 12 prompts, batches 1..8 along the way
    assert with_graphs == [r.token_ids for r in eager.generate(ps, params)]
    assert with_graphs[0] == naive_greedy(model, ps[0], 24, set(graphs.eos_token_ids))
    new_state = {k: v.clone() for k, v in make_model(tok, seed=1).to("cuda").state_dict().items()}
    graphs.load_weights(new_state)  # the same model object: the eager engine sees the new weights too
    pushed = [r.token_ids for r in graphs.generate(ps, params)]
    assert pushed != with_graphs
    assert pushed == [r.token_ids for r in eager.generate(ps, params)]
