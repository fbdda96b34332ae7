"""Train-step throughput: one micro-batch of forward + backward + MuonAdamW step, as the pretraining loop runs it.

    ./run_speedrun.sh test bench/test_bench_train.py --benchmark-group-by=group   # = pytest bench/test_bench_train.py

What each entry times, per step: `loss = model(idx, targets)`, `loss.backward()` (FSDP: `finish_backward()`),
`opt.step()` on all groups (Muon for the block matrices, AdamW for the rest), `opt.zero_grad()`. Data loading,
LR schedules, logging and gradient accumulation are not in it; the tokens are fixed random ids (speed does not
depend on their content). Every entry records in extra_info: `step_ms` (the median round; a step is long
enough that the median, not the minimum, is the steady state a training run sees), `tok_per_s`, `TFLOPs` achieved
(`ModelConfig.flops_per_token(T)`: 6 × matmul params incl. lm_head + attention, nanochat §4.5) and `MFU` against
the device's dense bf16 peak (PEAK_FLOPS, by device name; an unknown device gets no MFU).

Entries (group `train-<config>`):
- `compile`: torch.compile(model) (forward and backward; the optimizer step is eager, see train/optim.py). If
  compiling fails the entry times the eager model instead and says so (`compiled: False`, `compile_error`).
- `eager`: the plain model.
- `fsdp1`: the same step through `train.fsdp.FSDP` at world 1 (no process group: gathers are the cast-copies of
  the masters, grads go through the post-accumulate hooks), eager; `vs_eager` = its step time / eager's, i.e.
  the cost of the FSDP machinery alone. Needs the `eager` entry earlier in the same session for the ratio.
- `dist` (marked `dist`, CPU only, gloo): `train.fsdp.spawn` of 1 and of 2 processes, each with one torch thread
  and its own micro-batch of B rows (data parallel: the global batch doubles with the ranks). pytest-benchmark
  times the whole spawn (process start, imports, model build, warm-up: meaningless as a speed); the numbers that
  count are timed inside the workers, after WARMUP steps, and recorded in extra_info: `step_ms` (slowest rank's
  median step), `tok_per_s` (global), and on the world-2 entry `vs_world1` = its step time / world 1's (1.0 =
  perfect weak scaling; the cost of the broadcasts and reductions over gloo plus the 2 cores' shared memory
  bandwidth). Needs the world-1 entry earlier in the session for the ratio.

Devices:
- CUDA: d12 and d20 at T = 2048, bf16 compute (fp32 masters), B = 16 rows per device, INNER = 1 step per round
  then a synchronise. The H100 target is MFU ≥ 50% at d20 (nanochat: ~47–50%); it can only be measured there.
- CPU (always, so the entries never rot; the whole `pytest bench/` under a minute): a tiny fp32 config, eager (the kernels dispatch to their plain-torch
  twins on CPU tensors), one torch thread in every entry: then eager, fsdp1 and each dist rank do the same work
  per core, and a busy machine costs a little instead of the 10-20x that OpenMP's spinning threads lose when one
  of the 2 cores is taken by another process. CPU numbers only compare with each other on the same machine.
  `compile` runs on CPU only with FLASHCHAT_BENCH_COMPILE=1 (compiling takes minutes on 2 cores).
Limits: one micro-batch per step (no accumulation), no checkpointing or eval; the optimizer step is included in
every number, so MFU here is a little below the forward/backward-only MFU some reports quote.
"""

import os
import statistics
import time

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from train.fsdp import FSDP, spawn
from train.optim import MuonAdamW

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
COMPILE = ON_GPU or os.environ.get("FLASHCHAT_BENCH_COMPILE") == "1"
ROUNDS = 10 if ON_GPU else 3
WARMUP = 2 if ON_GPU else 1  # steps before timing: allocator, autotuning, the optimizer state's first touch
# Dense bf16 peak FLOP/s by device-name substring, first match wins (NVIDIA datasheets, without sparsity).
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]

# name -> (config, B rows per device)
GPU_CASES = {
    "d12": (ModelConfig.for_depth(12, sequence_len=2048), 16),
    "d20": (ModelConfig.for_depth(20, sequence_len=2048), 16),
}
CPU_CASES = {
    # Small enough that `pytest bench/` stays under a minute on 2 cores (~40 ms a step on one thread), big
    # enough that a step is matmuls and the optimizer, not Python: 2 blocks of C = 128, V = 1024, 4 × 128 tokens.
    "tiny": (ModelConfig.for_depth(2, model_dim=128, head_dim=64, vocab_size=1024, sequence_len=128), 4),
}
CASES = GPU_CASES if ON_GPU else CPU_CASES
DIST_CASE = CPU_CASES["tiny"]
DIST_STEPS = 4  # timed steps inside each worker
MODES = ["compile", "eager", "fsdp1"]  # eager before fsdp1: fsdp1's ratio divides by it
CPU_THREADS = 1  # see the module docstring
STEP_MS: dict[tuple, float] = {}  # (case, mode) -> median step ms, for the ratios


@pytest.fixture(autouse=True)
def _isolate():
    """CPU: CPU_THREADS torch threads for the entry. GPU: drop compiled graphs (they hold the model) and cached
    blocks after each entry, so d20 does not run beside d12's leftovers."""
    if ON_GPU:
        yield
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(saved)


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def throughput(cfg: ModelConfig, tokens_per_step: int, step_s: float, device: str) -> dict:
    """tok/s, achieved TFLOP/s and (on a known device) MFU of a step over `tokens_per_step` tokens."""
    flops = cfg.flops_per_token(cfg.sequence_len) * tokens_per_step / step_s
    info = dict(device=device, config=cfg.summary(), step_ms=round(step_s * 1e3, 2),
                tok_per_s=round(tokens_per_step / step_s), TFLOPs=float(f"{flops / 1e12:.4g}"))
    peak = peak_flops(device)
    if peak is not None:
        info.update(peak_TFLOPs=peak / 1e12, MFU=round(flops / peak, 4))
    return info


def make_batch(cfg: ModelConfig, B: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (B, cfg.sequence_len + 1), generator=g).to(device)
    return data[:, :-1], data[:, 1:]


def make_step(model, opt: MuonAdamW, idx: torch.Tensor, targets: torch.Tensor, fsdp: FSDP | None = None):
    def step():
        loss = model(idx, targets)
        loss.backward()
        if fsdp is not None:
            fsdp.finish_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


# ---- one process: compiled / eager / FSDP at world 1 ---------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_bench_train_step(benchmark, case, mode):
    cfg, B = CASES[case]
    if mode == "compile" and not COMPILE:
        pytest.skip("torch.compile on CPU takes minutes on 2 cores; set FLASHCHAT_BENCH_COMPILE=1 to include it")
    benchmark.group = f"train-{case}"
    torch.manual_seed(0)
    model = GPT.build(cfg, DEVICE, DTYPE)
    idx, targets = make_batch(cfg, B, DEVICE)
    info = dict(B=B, T=cfg.sequence_len, dtype=str(DTYPE).removeprefix("torch."))
    if not ON_GPU:
        info["threads"] = CPU_THREADS
    fsdp = None
    if mode == "fsdp1":
        fsdp = FSDP(model)
        opt = MuonAdamW(fsdp.owned_param_groups(model.param_groups()))
    else:
        opt = MuonAdamW(model.param_groups())
    step = make_step(model, opt, idx, targets, fsdp)
    if mode == "compile":
        try:
            step = make_step(torch.compile(model), opt, idx, targets)
            step()  # compiles forward and backward, outside the timing
            sync()
            info["compiled"] = True
        except Exception as e:  # noqa: BLE001  (record why, then time eager so the entry still says something)
            opt.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            step = make_step(model, opt, idx, targets)
            info.update(compiled=False, compile_error=f"{type(e).__name__}: {e}"[:500])
    with torch.no_grad():  # a step that does not train has no speed
        loss0 = model(idx, targets).item()
    for _ in range(WARMUP):
        step()
    sync()

    def round_():
        step()
        sync()

    benchmark.pedantic(round_, rounds=ROUNDS, warmup_rounds=0)
    loss1 = step().item()
    assert loss1 < loss0, f"{mode}: loss did not fall on a fixed batch ({loss0:.4f} -> {loss1:.4f})"
    if benchmark.disabled:  # --benchmark-disable: ran once as a plain test, no stats
        return
    step_s = benchmark.stats.stats.median
    STEP_MS[(case, mode)] = step_s * 1e3
    info.update(throughput(cfg, B * cfg.sequence_len, step_s, device_name()))
    if mode == "fsdp1" and (case, "eager") in STEP_MS:
        info["vs_eager"] = round(STEP_MS[(case, "fsdp1")] / STEP_MS[(case, "eager")], 3)
    benchmark.extra_info.update(info)


# ---- several processes (gloo, CPU) ---------------------------------------------------------------------------
def _dist_worker(rank: int, world: int, cfg_dict: dict, B: int, warmup: int, steps: int) -> dict:
    """One rank: FSDP over the process group, MuonAdamW on the owned masters, its own micro-batch; returns the
    wall time of every timed step (each ends when this rank's optimizer step returns)."""
    torch.set_num_threads(CPU_THREADS)  # one core per rank on the 2-core machine; world 1 the same (fair ratio)
    cfg = ModelConfig.from_dict(cfg_dict)
    torch.manual_seed(0)  # identical weights on every rank, as FSDP requires
    model = GPT.build(cfg, "cpu", torch.float32)
    fsdp = FSDP(model)
    opt = MuonAdamW(fsdp.owned_param_groups(model.param_groups()))
    idx, targets = make_batch(cfg, B, "cpu", seed=rank)
    step = make_step(model, opt, idx, targets, fsdp)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(times=times, owned=len(fsdp.masters))


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
def test_bench_train_step_dist(benchmark, world):
    cfg, B = DIST_CASE
    benchmark.group = "train-dist-cpu"
    results = []

    def run():
        results[:] = spawn(_dist_worker, world, cfg.to_dict(), B, WARMUP, DIST_STEPS)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)  # the whole spawn: see the module docstring
    medians = [statistics.median(r["times"]) for r in results]
    step_s = max(medians)  # collectives keep ranks in lock-step; the slowest one is the step
    STEP_MS[("dist", world)] = step_s * 1e3
    info = dict(world=world, B_per_rank=B, T=cfg.sequence_len, threads_per_rank=CPU_THREADS, timed_steps=DIST_STEPS,
                rank_step_ms=[round(m * 1e3, 2) for m in medians], owned_params=[r["owned"] for r in results],
                measured="in-worker median step (fwd+bwd+finish_backward+MuonAdamW); benchmark time = whole spawn")
    info.update(throughput(cfg, world * B * cfg.sequence_len, step_s, "cpu (gloo)"))
    if world > 1 and ("dist", 1) in STEP_MS:
        info["vs_world1"] = round(STEP_MS[("dist", world)] / STEP_MS[("dist", 1)], 3)
    benchmark.extra_info.update(info)
