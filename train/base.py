"""Base-model pretraining: `python -m train.base` (1 CPU process), `torchrun --nproc_per_node=N -m train.base`.

    python -m train.base --depth 20 --run-name d20                       # defaults: nanochat's speedrun recipe
    torchrun --nproc_per_node=8 -m train.base --depth 20 --target-param-data-ratio 8
    python -m train.base --depth 2 --model-dim 128 --head-dim 32 --max-seq-len 64 --device-batch-size 8 \\
        --total-batch-size 512 --num-iterations 300 --data runs/shards --tokenizer runs/tokenizer   # a CPU toy

The loop (nanochat base_train, §5): every rank builds the same model from the same seed, FSDP shards it
(train/fsdp.py), MuonAdamW steps the masters this rank owns, the loader feeds this rank its rows. Per optimizer
step: grad_accum micro-steps of device_batch_size × T tokens per rank (only the last one reduces gradients,
nanochat's "comm once per step"), schedules set as pure functions of the step (train/schedule.py), one log line,
one JSONL record. At intervals: validation bits-per-byte (§6.1, a fixed token set rebuilt each time so numbers
are comparable over the run), greedy samples, an atomic checkpoint (train/checkpoint.py). `--resume` continues
from the latest complete checkpoint bit-identically on CPU (weights, optimizer shards, loader cursor, RNG).

Step numbering: `step` counts optimizer steps done. The loop evaluates/samples/saves at the top of an iteration
(so at step 0, every interval, and once more at step == num_iterations, where it stops; nanochat does the same).

Data per rank (`--rank-data`): "docs" (default) — rank r packs documents r, r+N, … into its own rows (cheap;
the data, and so the losses, depend on the world size); "rows" — every rank packs the whole global micro-batch
and keeps its slice (N× the packing work, but the run sees the same data at any world size: N ranks == 1 rank).

Limits: no torch.compile yet; no FP8; no --target-flops horizon (use --num-iterations); a checkpoint resumes
only at the world size that wrote it (the optimizer shards do not reshard); the metrics file is appended to on
resume, so an abandoned run's later steps stay in it (each record carries its step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.gpt import GPT
from train.checkpoint import latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from train.evaluate import evaluate_bpb, sample_greedy
from train.fsdp import FSDP, init_distributed
from train.loader import BestFitLoader
from train.optim import MuonAdamW
from train.schedule import BASE_WEIGHT_DECAY, DEFAULT_RATIO, lr_multiplier, muon_momentum, muon_weight_decay, plan_training
from train.shards import ShardError, load_manifest

# Peak dense bf16 FLOP/s by device name (vendor datasheets, no sparsity); first substring match wins, so the
# specific names come first. nanochat's MFU uses 989e12 for the H100 SXM.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("L40S", 362e12),
                   ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]

# nanochat's base_train prompts (a few of them): facts a small base model picks up early.
SAMPLE_PROMPTS = ["The capital of France is", "The opposite of hot is", "If yesterday was Friday, then tomorrow will be",
                  "My favorite color is"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a base GPT (same code on 1 process, N CPU ranks, N GPUs).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20, help="transformer blocks; width = 64·depth (nanochat's dial)")
    g.add_argument("--model-dim", type=int, default=None, help="override the width (test-size models)")
    g.add_argument("--head-dim", type=int, default=128, help="channels per attention head (nanochat: 128)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="training context T, tokens")
    g.add_argument("--compute-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="activation dtype: auto = bf16 on CUDA, fp32 on CPU (masters are always fp32)")
    g = p.add_argument_group("horizon and batch (nanochat §5.4)")
    g.add_argument("--target-param-data-ratio", type=float, default=DEFAULT_RATIO,
                   help="training tokens per scaling parameter (nanochat HEAD 12, its speedrun 8)")
    g.add_argument("--num-iterations", type=int, default=None, help="optimizer steps; overrides the ratio")
    g.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step over all ranks; default: the plan's auto batch (a power of 2)")
    g.add_argument("--device-batch-size", type=int, default=32, help="rows of T tokens per rank per micro-step")
    g = p.add_argument_group("learning rates (nanochat §5.1; every LR is also scaled by √(batch/2^19))")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
    g.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of wte (× (C/768)^-0.5)")
    g.add_argument("--unembedding-lr", type=float, default=0.008, help="AdamW LR of lm_head (× (C/768)^-0.5)")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the per-layer λ scalars")
    g.add_argument("--weight-decay", type=float, default=BASE_WEIGHT_DECAY,
                   help="Muon weight decay at the d12 reference; scaled by √(B/2^19)·D_ref/D, then a cosine to 0")
    g = p.add_argument_group("evaluation, sampling, checkpoints (intervals in optimizer steps; 0 = never)")
    g.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb (nanochat: 250)")
    g.add_argument("--eval-tokens", type=int, default=80 * 2**19,
                   help="validation tokens per evaluation, all ranks (nanochat: 80 × 524,288 = 41.9M)")
    g.add_argument("--sample-every", type=int, default=2000, help="steps between greedy samples")
    g.add_argument("--sample-tokens", type=int, default=16, help="new tokens per sampled prompt")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (one is always saved at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="complete checkpoints kept on disk")
    g.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint of --run-dir")
    g = p.add_argument_group("paths and run")
    g.add_argument("--run-name", default=None, help="names the run; default d<depth>")
    g.add_argument("--run-dir", default=None, help="checkpoints, metrics.jsonl; default $FLASHCHAT_BASE_DIR/<run>/base")
    g.add_argument("--data", default=None, help="token shards dir (train.shards); default $FLASHCHAT_BASE_DIR/<run>/shards")
    g.add_argument("--tokenizer", default=None, help="bpe_rs dir; default $FLASHCHAT_BASE_DIR/<run>/tokenizer "
                                                      "(the vocab size comes from it)")
    g.add_argument("--rank-data", choices=("docs", "rows"), default="docs",
                   help="docs: each rank packs its own documents; rows: each rank packs the global batch and "
                        "keeps its rows (data independent of the world size)")
    g.add_argument("--seed", type=int, default=42, help="weight init seed (the same on every rank)")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="log to Weights & Biases (needs wandb installed)")
    return p.parse_args(argv)


# ---- helpers ---------------------------------------------------------------------------------------------------
class RowSlice:
    """`--rank-data rows`: a loader packing world × B rows, of which this rank keeps rows [rank·B, (rank+1)·B)."""

    def __init__(self, loader: BestFitLoader, rank: int, B: int):
        self.loader, self.rank, self.B = loader, rank, B

    def __next__(self):
        x, y = next(self.loader)
        s = slice(self.rank * self.B, (self.rank + 1) * self.B)
        return x[s], y[s]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def make_loader(args, split: str, rank: int, world: int, device):
    B, T = args.device_batch_size, args.max_seq_len
    if args.rank_data == "rows":
        return RowSlice(BestFitLoader(args.data, split, B * world, T, device=device), rank, B)
    return BestFitLoader(args.data, split, B, T, rank=rank, world_size=world, device=device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def memory_mib(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f}MiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f}MiB rss"  # Linux: KiB


def estimate_memory(cfg: ModelConfig, B: int, T: int, world: int, dtype: torch.dtype) -> dict[str, float]:
    """A lower bound on the bytes one rank needs, by part (deliberately optimistic: it only refuses runs that
    cannot possibly fit). The whole fp32 model is built on every rank before FSDP keeps each rank's share; then
    each rank holds its share of masters, grads and optimizer state (AdamW's two moments; Muon's momentum is
    less), the gathered root unit (embeddings, lm_head) plus two blocks in the compute dtype, and activations:
    at least 12 values of width C per token per layer are saved for backward (q, k, v, attention output, the
    MLP's 4C input and its ReLU² output would already be more)."""
    n = cfg.num_params()
    elt = torch.finfo(dtype).bits // 8
    per_block = (cfg.num_matrix_params()) / cfg.depth
    root = n - cfg.num_matrix_params()
    parts = {
        "construction (full fp32 model)": 4.0 * n,
        "sharded masters+grads+optimizer": 16.0 * n / world,
        "gathered root + 2 blocks": elt * (root + 2 * per_block),
        "activations": 12.0 * elt * B * T * cfg.depth * cfg.model_dim,
    }
    return parts


def check_fits(parts: dict[str, float], free_bytes: float, cfg: ModelConfig, B: int, device) -> None:
    """Refuse a run that cannot fit, naming the numbers (a clear error beats an OOM minutes into the run)."""
    steady = sum(v for k, v in parts.items() if not k.startswith("construction"))
    need = max(parts["construction (full fp32 model)"], steady)
    if need > free_bytes:
        detail = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in parts.items())
        raise MemoryError(f"depth {cfg.depth} ({cfg.num_params() / 1e6:,.0f}M params) at device batch {B} needs at "
                          f"least {need / 2**30:.1f} GiB per rank ({detail}), but {device} has "
                          f"{free_bytes / 2**30:.1f} GiB free: use a smaller --depth or --device-batch-size, or "
                          f"more ranks")


def free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:  # Linux: MemAvailable is what a new allocation can get without swapping
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float("inf")


def fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def all_mean(x: torch.Tensor, world: int) -> float:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x.item()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import bpe_rs  # the tokenizer package stands alone; imported here so `--help` needs no native library

    # ---- distributed, paths ----------------------------------------------------------------------------------
    if dist.is_available() and dist.is_initialized():  # a test harness (train.fsdp.spawn) made the group
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        rank, world, device = init_distributed()
    is_master = rank == 0
    barrier = dist.barrier if world > 1 else (lambda: None)
    from train.download import cache_dir  # the one base-dir rule ($FLASHCHAT_BASE_DIR, else ~/.cache/flashchat)
    run_name = args.run_name or f"d{args.depth}"
    base = cache_dir() / run_name
    run_dir = Path(args.run_dir or base / "base")
    args.data = args.data or str(base / "shards")
    args.tokenizer = args.tokenizer or str(base / "tokenizer")

    def log(msg: str) -> None:
        if is_master:
            print(msg, flush=True)  # plain lines, never \r: the same text in a terminal and in a redirected log

    # ---- tokenizer and data: fail before any model is built ----------------------------------------------------
    manifest = load_manifest(args.data)  # ShardError naming the directory when missing/unfinished
    try:
        tok = bpe_rs.Tokenizer.load(args.tokenizer)
    except Exception as e:  # noqa: BLE001 -- bpe_rs raises several types; the message names the path
        raise SystemExit(f"cannot load the tokenizer from {args.tokenizer}: {e}") from e
    if manifest["tokenizer"]["vocab_size"] != tok.vocab_size or manifest["tokenizer"]["bos_id"] != tok.bos_id:
        raise ShardError(f"{args.data} was tokenized with vocab {manifest['tokenizer']['vocab_size']} / BOS "
                         f"{manifest['tokenizer']['bos_id']}, the tokenizer at {args.tokenizer} has vocab "
                         f"{tok.vocab_size} / BOS {tok.bos_id}")

    # ---- model, plan ---------------------------------------------------------------------------------------------
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.compute_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    overrides = {} if args.model_dim is None else {"model_dim": args.model_dim}
    cfg = ModelConfig.for_depth(args.depth, head_dim=args.head_dim, vocab_size=tok.vocab_size,
                                sequence_len=args.max_seq_len, **overrides)
    B, T = args.device_batch_size, args.max_seq_len
    micro_tokens = B * T * world
    if args.total_batch_size is not None and (args.total_batch_size <= 0 or args.total_batch_size % micro_tokens):
        raise ValueError(f"--total-batch-size {args.total_batch_size} is not a positive multiple of "
                         f"--device-batch-size {B} × --max-seq-len {T} × world size {world} = {micro_tokens} "
                         f"tokens per micro-step")
    plan = plan_training(cfg, ratio=args.target_param_data_ratio, num_iterations=args.num_iterations,
                         batch_tokens=args.total_batch_size, device_batch_size=B, world_size=world,
                         base_weight_decay=args.weight_decay)
    grad_accum = plan.grad_accum_steps
    num_iterations = plan.num_iterations

    check_fits(estimate_memory(cfg, B, T, world, dtype), free_memory(device), cfg, B, device)
    torch.manual_seed(args.seed)  # same seed on every rank: identical weights before FSDP keeps each rank's share
    model = GPT.build(cfg, device, dtype)
    fsdp = FSDP(model)
    opt = MuonAdamW(fsdp.owned_param_groups(model.param_groups(
        matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
        scalar_lr=args.scalar_lr)), lr_scale=plan.lr_scale)
    loader = make_loader(args, "train", rank, world, device)
    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.int64, device=device)
    flops_per_token = cfg.flops_per_token()
    peak = peak_flops(device)
    # What a checkpoint must agree on to continue this run exactly (the model config is checked separately).
    run_key = {"batch_tokens": plan.batch_tokens, "num_iterations": num_iterations, "device_batch_size": B,
               "world_size": world, "rank_data": args.rank_data, "lr": [args.matrix_lr, args.embedding_lr,
                                                                        args.unembedding_lr, args.scalar_lr],
               "weight_decay": plan.weight_decay}

    log(f"flashchat base | {cfg.summary()}")
    log(f"world {world} on {device} ({dtype}) | batch {plan.batch_tokens:,} tokens/step = {B} rows × {T} × "
        f"{world} ranks × {grad_accum} micro-steps | {num_iterations:,} steps, {plan.num_tokens:,} tokens "
        f"({plan.num_tokens / cfg.num_scaling_params():.1f} per scaling param) | lr scale {plan.lr_scale:.4f}, "
        f"muon wd {plan.weight_decay:.4f} | run dir {run_dir}")

    # Footgun of the WD transfer (WD ∝ D_ref/D): a short horizon makes it huge, and once lr·wd nears 1 the
    # cautious decay p ← p − lr·wd·p flips weights instead of shrinking them. Say so rather than train garbage.
    peak_decay = args.matrix_lr * plan.lr_scale * plan.weight_decay
    if peak_decay > 0.1:
        log(f"warning: Muon lr × weight decay at the LR peak is {peak_decay:.3f} (lr {args.matrix_lr * plan.lr_scale:.2e}"
            f" × wd {plan.weight_decay:.1f}): a horizon this short inflates the WD transfer; lower --weight-decay")

    # ---- resume --------------------------------------------------------------------------------------------------
    step = 0
    if args.resume:
        path = latest_checkpoint(run_dir / "checkpoints")
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
        ck = load_checkpoint(path, rank=rank, world_size=world, expected_config=cfg)
        diffs = [f"{k}: checkpoint {ck.meta['run'].get(k)!r}, this run {v!r}" for k, v in run_key.items()
                 if ck.meta["run"].get(k) != v]
        if diffs:
            raise ValueError(f"{path} comes from another run configuration: {'; '.join(diffs)}")
        if ck.meta["sharding"] != json.loads(json.dumps(fsdp.sharding_meta())):
            raise ValueError(f"{path}: FSDP sharding differs from this job's (another world size or model)")
        fsdp.load_full_state_dict(ck.model_state)
        opt.load_state_dict(ck.optimizer_state)
        loader.load_state_dict(ck.rank_meta["loader"])
        restore_rng_state(ck.rng)
        step = ck.step
        log(f"resumed from {path} at step {step}")

    metrics_file = run_dir / "metrics.jsonl"
    if is_master:
        run_dir.mkdir(parents=True, exist_ok=True)
    wandb_run = None
    if args.wandb and is_master:
        try:
            import wandb
        except ImportError as e:
            raise SystemExit("--wandb needs the wandb package (pip install wandb)") from e
        wandb_run = wandb.init(project=args.wandb, name=run_name, config={**vars(args), **dataclasses.asdict(plan)})

    def record(rec: dict) -> None:
        if is_master:
            with open(metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if wandb_run is not None:
                wandb_run.log(rec, step=rec["step"])

    def save(step: int) -> None:
        full = fsdp.full_state_dict()  # every rank takes part; rank 0 gets the tensors
        path = save_checkpoint(run_dir / "checkpoints", step, model_state=full if is_master else None, config=cfg,
                               optimizer_state=opt.state_dict(), rank=rank, world_size=world,
                               meta={"run": run_key, "sharding": fsdp.sharding_meta(), "plan": dataclasses.asdict(plan)},
                               rank_meta={"loader": loader.state_dict()}, keep_last=args.keep_last, barrier=barrier)
        log(f"step {step:05d} | saved {path}")

    # ---- the loop --------------------------------------------------------------------------------------------------
    eval_steps = max(1, args.eval_tokens // micro_tokens)
    losses, bpbs = [], []
    step_times: list[float] = []
    start_step = step
    while True:
        is_last = step == num_iterations
        if args.eval_every > 0 and (is_last or step % args.eval_every == 0):
            # A fresh val loader each time: the same documents in the same rows, so evaluations are comparable.
            val = make_loader(args, "val", rank, world, device)
            t0 = time.perf_counter()
            bpb = evaluate_bpb(model, (next(val) for _ in range(eval_steps)), token_bytes)
            bpbs.append((step, bpb))
            log(f"step {step:05d} | val bpb {bpb:.4f} | {eval_steps * micro_tokens:,} tokens in "
                f"{time.perf_counter() - t0:.1f}s")
            record({"step": step, "val_bpb": bpb})
        if args.sample_every > 0 and (is_last or step % args.sample_every == 0):
            for text in sample_greedy(model, tok, SAMPLE_PROMPTS, args.sample_tokens):
                log(f"step {step:05d} | sample | {text!r}")
        if is_last or (args.save_every > 0 and step % args.save_every == 0 and step != start_step):
            save(step)
        if is_last:
            break

        # One optimizer step: schedules first (pure functions of the step, so a resume needs no schedule state).
        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_iterations)
        opt.set_lr_multiplier(lrm)
        opt.set_muon_momentum(muon_momentum(step, num_iterations))
        opt.set_muon_weight_decay(muon_weight_decay(step, num_iterations, plan.weight_decay))
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            inputs, targets = next(loader)
            # Every micro-step but the last accumulates locally; the last one reduces the sum (one gradient
            # collective per step, as nanochat). Rows are full (no −1 targets), so mean/grad_accum is the mean.
            sync = micro == grad_accum - 1
            with contextlib.nullcontext() if sync else fsdp.no_sync():
                loss = model(inputs, targets)
                (loss / grad_accum).backward()
            fsdp.finish_backward()
            loss_sum += loss.detach()
        opt.step()
        fsdp.zero_grad()
        train_loss = all_mean(loss_sum / grad_accum, world)  # also a sync point: the step's time is real
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"step {step}: loss is {train_loss}; stopping (lower the LRs?)")
        dt = time.perf_counter() - t0
        step += 1
        losses.append(train_loss)
        step_times.append(dt)

        tok_per_s = plan.batch_tokens / dt
        mfu = flops_per_token * tok_per_s / (peak * world) if peak else None
        recent = step_times[1:] or step_times  # the first step pays for warm-up (allocations, autotuning)
        eta = (num_iterations - step) * sum(recent[-50:]) / len(recent[-50:])
        log(f"step {step:05d}/{num_iterations:05d} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
            f"{tok_per_s:,.0f} tok/s | mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
            f"dt {1000 * dt:.0f}ms | eta {fmt_duration(eta)} | mem {memory_mib(device)}")
        record({"step": step, "loss": train_loss, "lrm": lrm, "tok_per_s": tok_per_s, "mfu": mfu, "dt": dt,
                "tokens": step * plan.batch_tokens})

    log(f"done: {step} steps, final val bpb {bpbs[-1][1]:.4f}" if bpbs else f"done: {step} steps")
    if wandb_run is not None:
        wandb_run.finish()
    return {"losses": losses, "bpb": bpbs, "run_dir": str(run_dir), "step": step, "plan": plan}


if __name__ == "__main__":
    main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
