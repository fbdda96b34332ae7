"""Inference-engine speed: offline throughput against a no-engine baseline, and TTFT / inter-token latency.

    .venv/bin/python -m pytest bench/test_bench_engine.py --benchmark-group-by=group

Entries:
- `offline[baseline]` (group `engine-offline-<case>`): nanochat's approach — the prompts one after another, each
  prefilled once, its KV cache replicated to S rows, the S samples decoded in lockstep with a dense per-row cache
  (fixed blocks per row, allocated per prompt as nanochat's generate allocates its KVCache), no continuous
  batching, no sharing between prompts. It runs on the same model call and attention kernels as the engine (the
  runner over a private pool: our GPT's only cache is the paged one), so the ratio measures scheduling — batching
  across prompts, the prefix cache — not kernel differences. On CUDA only the first BASELINE_PROMPTS prompts run
  (prompts are independent and sequential, so tok/s over a subset is the same rate); on CPU all of them.
- `offline[engine]`: `Engine.generate` on all P × S requests at once (each prompt repeated S times, one seed per
  request): continuous batching, paged KV, prefix cache (reset before every round, so rounds are alike).
- `latency[b1]`, `latency[b64]` (group `engine-latency-<case>`): `Engine.add_request` × B then `step()` until all
  finish; TTFT = first token's arrival after add_request (queueing + prefill + first draw), ITL = the gap between
  consecutive tokens of one request. Times are taken after each `step()` returns (the step syncs: it reads the
  drawn tokens on the host), pooled over all requests and rounds.
extra_info: `gen_tok_per_s` (generated tokens / wall, prompt tokens not counted), `vs_baseline` (engine tok/s /
baseline tok/s, needs the baseline entry earlier in the session), `ttft_p50_ms`, `itl_p50_ms` (and p90s).

Both sides sample at temperature 1 with no EOS stop (the engine is built with `eos_tokens=()`), so every request
generates exactly max_tokens and the token counts match. Weights are random (speed does not depend on them).

Devices:
- CUDA: d20 shapes (`ModelConfig.for_depth(20)`, vocab from a bpe_rs tokenizer trained to 32,768 on stdlib
  source), bf16, 256 prompts × 8 samples, max_tokens 256. The H100 targets (issue 6: engine ≥ 5× the baseline's
  offline tok/s and ≥ 20,000 generated tok/s at d20) can only be checked there.
- CPU (always, so the entries never rot): a tiny fp32 config (d2, C=128, D=32, V=512, T=256), 8 prompts × 4
  samples, max_tokens 24, 2 rounds, one torch thread (sized so the whole `pytest bench/` takes under a minute). At this size a step costs mostly Python and kernel-launch overhead,
  not FLOPs, so the CPU ratio says little about the H100's; record it anyway.
Limits: the engine captures CUDA graphs for decode on a GPU (`infer.runner`), the baseline is eager; no compile; no tool use, stop strings or logprobs; no
server in the loop (HTTP and detokenization latency of a served request are not in TTFT).
"""

from __future__ import annotations

import inspect
import statistics
import textwrap
import time

import pytest
import torch

import bpe_rs
from infer.engine import Engine
from infer.runner import ModelRunner, RunItem
from infer.sampling import SamplingParams
from model.config import ModelConfig
from model.gpt import GPT
from tests.models import random_model

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
CPU_THREADS = 1  # stable numbers on the shared 2-core machine (see bench/test_bench_train.py)
TEMPERATURE = 1.0

if ON_GPU:
    CASE = "d20"
    VOCAB, SEQ_LEN, DEPTH, DIMS = 32768, 2048, 20, {}
    NUM_PROMPTS, SAMPLES, MAX_TOKENS, PROMPT_LEN = 256, 8, 256, (32, 128)
    BASELINE_PROMPTS, ROUNDS, MAX_NUM_SEQS = 16, 2, 256
    LATENCY_BATCHES = [1, 64]
else:
    CASE = "tiny"
    VOCAB, SEQ_LEN, DEPTH, DIMS = 512, 256, 2, dict(model_dim=128, head_dim=32)
    NUM_PROMPTS, SAMPLES, MAX_TOKENS, PROMPT_LEN = 8, 4, 24, (16, 48)  # small: `pytest bench/` under a minute
    BASELINE_PROMPTS, ROUNDS, MAX_NUM_SEQS = NUM_PROMPTS, 2, 64
    LATENCY_BATCHES = [1, 64]
GEN_TOK_PER_S: dict[str, float] = {}  # mode -> generated tok/s, for the ratio


@pytest.fixture(autouse=True)
def _threads():
    if ON_GPU:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tok():
    if ON_GPU:
        from bench.textdata import python_source
        return bpe_rs.train_from_iterator(python_source(8), vocab_size=VOCAB)
    return bpe_rs.train_from_iterator([inspect.getsource(textwrap)], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model(tok):
    # V from the tokenizer: a tokenizer that stops merging early must not leave ids the detokenizer cannot map.
    cfg = ModelConfig.for_depth(DEPTH, vocab_size=tok.vocab_size, sequence_len=SEQ_LEN, **DIMS)
    return random_model(cfg, 0.02, device=DEVICE, compute_dtype=DTYPE).eval()


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    """NUM_PROMPTS slices of textwrap's source, lengths spread evenly over PROMPT_LEN (ordinary tokens only)."""
    ids = tok.encode_ordinary(inspect.getsource(textwrap))
    lo, hi = PROMPT_LEN
    out = []
    for i in range(NUM_PROMPTS):
        n = lo + (hi - lo) * i // max(NUM_PROMPTS - 1, 1)
        start = (i * 97) % (len(ids) - n)
        out.append(ids[start:start + n])
    return out


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def make_engine(model, tok) -> Engine:
    return Engine(model, tok, max_num_seqs=MAX_NUM_SEQS, eos_tokens=(), log=lambda _: None)


def params(seed: int) -> SamplingParams:
    return SamplingParams(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, seed=seed)


# ---- the baseline ------------------------------------------------------------------------------------------
@torch.no_grad()
def baseline_generate(model: GPT, prompt: list[int], num_samples: int, max_tokens: int,
                      gen: torch.Generator, block_size: int = 16) -> torch.Tensor:
    """nanochat's batch generation of one prompt with a dense KV cache (see the module docstring): the prompt is
    prefilled once, its cache replicated to num_samples rows, then the rows decode in lockstep, one token each per
    step, each over its own fixed cache. Returns the (num_samples, max_tokens) generated ids."""
    L = len(prompt)
    per_row = -(-(L + max_tokens) // block_size)
    # A fresh cache per call, as nanochat's generate allocates one: row r owns blocks [r·per_row, (r+1)·per_row).
    # Eager, as nanochat's engine runs (no CUDA graphs there).
    runner = ModelRunner(model, num_blocks=num_samples * per_row, block_size=block_size, max_num_seqs=num_samples,
                         enforce_eager=True, log=lambda _: None)
    tables = [list(range(r * per_row, (r + 1) * per_row)) for r in range(num_samples)]

    def draw(logits: torch.Tensor) -> torch.Tensor:  # (B, V) fp32 -> (B,)
        probs = torch.softmax(logits / TEMPERATURE, dim=-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    first = runner.run([RunItem(prompt, 0, tables[0])])  # (1, V): the prompt once
    n = -(-L // block_size)
    src = torch.tensor(tables[0][:n], device=first.device)
    dst = torch.tensor([b for t in tables[1:] for b in t[:n]], device=first.device)
    for pool in (*runner.kv.k, *runner.kv.v):  # replicate the prompt's cache to every row
        pool[dst] = pool[src].repeat(num_samples - 1, 1, 1, 1)
    out = [draw(first.expand(num_samples, -1))]
    for i in range(max_tokens - 1):
        items = [RunItem([t], L + i, tables[r]) for r, t in enumerate(out[-1].tolist())]
        out.append(draw(runner.run(items)))
    return torch.stack(out, dim=1)


# ---- offline throughput ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["baseline", "engine"])  # baseline first: the engine's ratio divides by it
def test_bench_engine_offline(benchmark, model, tok, prompts, mode):
    benchmark.group = f"engine-offline-{CASE}"
    info = dict(device=device_name(), config=model.config.summary(), dtype=str(DTYPE).removeprefix("torch."),
                samples=SAMPLES, max_tokens=MAX_TOKENS, temperature=TEMPERATURE)
    if not ON_GPU:
        info["threads"] = CPU_THREADS
    if mode == "baseline":
        todo = prompts[:BASELINE_PROMPTS]
        gen = torch.Generator(device=DEVICE)
        info.update(prompts=len(todo), baseline="dense KV cache per prompt, S samples in lockstep, "
                                                "prompts sequential (see the module docstring)")

        def run() -> int:
            gen.manual_seed(0)
            n = sum(baseline_generate(model, p, SAMPLES, MAX_TOKENS, gen).numel() for p in todo)
            sync()
            return n
    else:
        engine = make_engine(model, tok)
        reqs = [p for p in prompts for _ in range(SAMPLES)]
        plist = [params(i) for i in range(len(reqs))]
        info.update(prompts=len(prompts), max_num_seqs=MAX_NUM_SEQS, kv_tokens=engine.runner.capacity_tokens)

        def run() -> int:
            engine.block_manager.reset_prefix_cache()  # every round prefills from scratch
            n = sum(len(c.token_ids) for c in engine.generate(reqs, plist))
            sync()
            return n

    counts = []
    run()  # warm-up: allocator, first-touch of the pool
    benchmark.pedantic(lambda: counts.append(run()), rounds=ROUNDS, warmup_rounds=0)
    assert counts and all(c == counts[0] for c in counts), counts
    assert counts[0] == (len(prompts[:BASELINE_PROMPTS]) if mode == "baseline" else len(prompts)) * SAMPLES * MAX_TOKENS
    if benchmark.disabled:
        return
    wall = benchmark.stats.stats.median
    GEN_TOK_PER_S[mode] = counts[0] / wall
    info.update(generated_tokens=counts[0], gen_tok_per_s=round(GEN_TOK_PER_S[mode]))
    if mode == "engine" and "baseline" in GEN_TOK_PER_S:
        info["vs_baseline"] = round(GEN_TOK_PER_S["engine"] / GEN_TOK_PER_S["baseline"], 2)
    benchmark.extra_info.update(info)


# ---- latency -----------------------------------------------------------------------------------------------
def run_latency(engine: Engine, prompts: list[list[int]], batch: int, seed0: int) -> tuple[list[float], list[float]]:
    """Add `batch` requests at once, step to the end; returns (TTFTs, inter-token gaps) in seconds."""
    engine.block_manager.reset_prefix_cache()
    t_add = {}
    for i in range(batch):
        rid = engine.add_request(prompts[i % len(prompts)], params(seed0 + i))
        t_add[rid] = time.perf_counter()
    last: dict[str, float] = {}
    ttft, itl = [], []
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()  # step() read the drawn tokens on the host: the device work is done
        for out in outs:
            if not out.token_ids:
                continue
            rid = out.request_id
            if rid in last:
                itl.append(now - last[rid])
            else:
                ttft.append(now - t_add[rid])
            last[rid] = now
    assert len(ttft) == batch and len(itl) == batch * (MAX_TOKENS - 1), (len(ttft), len(itl))
    return ttft, itl


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


@pytest.mark.parametrize("batch", LATENCY_BATCHES, ids=[f"b{b}" for b in LATENCY_BATCHES])
def test_bench_engine_latency(benchmark, model, tok, prompts, batch):
    benchmark.group = f"engine-latency-{CASE}"
    engine = make_engine(model, tok)
    ttft, itl = [], []
    run_latency(engine, prompts, batch, seed0=10_000)  # warm-up
    rnd = iter(range(ROUNDS))

    def round_():
        t, g = run_latency(engine, prompts, batch, seed0=next(rnd) * batch)
        ttft.extend(t)
        itl.extend(g)

    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=0)
    info = dict(device=device_name(), config=model.config.summary(), dtype=str(DTYPE).removeprefix("torch."),
                batch=batch, max_tokens=MAX_TOKENS, requests_timed=len(ttft),
                ttft_p50_ms=round(statistics.median(ttft) * 1e3, 2), ttft_p90_ms=round(pct(ttft, 0.9) * 1e3, 2),
                itl_p50_ms=round(statistics.median(itl) * 1e3, 2), itl_p90_ms=round(pct(itl, 0.9) * 1e3, 2))
    if not benchmark.disabled:  # every token of every round, over the rounds' total wall time
        info["gen_tok_per_s"] = round((len(ttft) + len(itl)) / benchmark.stats.stats.total)
    if not ON_GPU:
        info["threads"] = CPU_THREADS
    benchmark.extra_info.update(info)
