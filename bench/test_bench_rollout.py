"""GRPO rollout throughput: G samples per question through the continuous-batching engine vs nanochat's way.

    .venv/bin/python -m pytest bench/test_bench_rollout.py --benchmark-group-by=group

Entries (group `rollout-<case>`), generated tok/s in extra_info `gen_tok_per_s`, ratio in `vs_baseline`:
- `rollout[baseline]`: nanochat chat_rl's sampling without an engine: one question at a time, its G samples
  decoded in lockstep as one (G, t) batch over a dense per-row KV cache (prompt prefilled once, its cache
  replicated). The decode loop is bench/test_bench_engine.py's `baseline_generate` (imported, not re-typed).
- `rollout[engine]`: `rlgrpo.rollout.rollout` — all questions × G requests in one `Engine.generate` (continuous
  batching, paged KV, the G copies of a prompt sharing its prefix blocks), rewards scored.
Prompts are GSM8K-format synthetic word problems rendered with `render_for_completion`; both sides sample at
temperature 1 with no EOS stop (the engine is built with `eos_tokens=()`) and no tool calls, so both generate
exactly questions × G × max_tokens tokens. Model, tokenizer and device set-up are test_bench_engine's fixtures.
CPU: 8 questions × G=4, 16 new tokens (baseline on 4 of them), one round, one torch thread; CUDA: 32 questions ×
G=16, 256 new tokens (baseline on the first 4 questions: they are sequential, so its rate over a subset is the
same).
"""

from __future__ import annotations

import pytest
import torch

from bench.test_bench_engine import (DEVICE, DTYPE, ON_GPU, _threads, baseline_generate, device_name,  # noqa: F401
                                     model, sync, tok)
from infer.engine import Engine
from infer.sampling import SamplingParams
from rlgrpo.rollout import example_prompt, rollout
from train.tasks_synthetic import ArithmeticWordProblems

if ON_GPU:
    CASE, QUESTIONS, G, MAX_TOKENS, BASELINE_QUESTIONS, ROUNDS = "d20", 32, 16, 256, 4, 2
else:
    CASE, QUESTIONS, G, MAX_TOKENS, BASELINE_QUESTIONS, ROUNDS = "tiny", 8, 4, 16, 4, 1
RATE: dict[str, float] = {}


@pytest.fixture(scope="module")
def examples():
    task = ArithmeticWordProblems(QUESTIONS, seed=123)
    return [task[i] for i in range(QUESTIONS)]


@pytest.mark.parametrize("mode", ["baseline", "engine"])  # baseline first: the ratio divides by it
def test_bench_rollout(benchmark, model, tok, examples, mode):
    benchmark.group = f"rollout-{CASE}"
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)
    info = dict(device=device_name(), config=model.config.summary(), dtype=str(DTYPE).removeprefix("torch."),
                group_size=G, max_tokens=MAX_TOKENS)
    if mode == "baseline":
        todo = [example_prompt(tok, ex) for ex in examples[:BASELINE_QUESTIONS]]
        gen = torch.Generator(device=DEVICE)
        info.update(questions=len(todo), baseline="one question at a time, G samples lockstep, dense KV cache")

        def run() -> int:
            gen.manual_seed(0)
            n = sum(baseline_generate(model, p, G, MAX_TOKENS, gen).numel() for p in todo)
            sync()
            return n
    else:
        engine = Engine(model, tok, max_num_seqs=256 if ON_GPU else 64, eos_tokens=(), log=lambda _: None)
        info.update(questions=len(examples))
        rnd = iter(range(1000))

        def run() -> int:
            engine.block_manager.reset_prefix_cache()
            groups = rollout(engine, tok, examples, G, params, seed=0, step=next(rnd))
            sync()
            return sum(len(s.token_ids) for g in groups for s in g)

    counts = []
    run()  # warm-up
    benchmark.pedantic(lambda: counts.append(run()), rounds=ROUNDS, warmup_rounds=0)
    n_q = BASELINE_QUESTIONS if mode == "baseline" else QUESTIONS
    assert counts and all(c == n_q * G * MAX_TOKENS for c in counts), counts
    if benchmark.disabled:
        return
    RATE[mode] = counts[0] / benchmark.stats.stats.median
    info["gen_tok_per_s"] = round(RATE[mode])
    if mode == "engine" and "baseline" in RATE:
        info["vs_baseline"] = round(RATE["engine"] / RATE["baseline"], 2)
    benchmark.extra_info.update(info)
