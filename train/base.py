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
The step loop, logging, saving and resume are train/loop.py's (shared with train/mid.py and train/sft.py); at the
end the stage's numbers go into the run report (train/report.py, `<run dir>/../report/base.json`).

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
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.gpt import GPT
from train.evaluate import evaluate_bpb, sample_greedy
from train.fsdp import FSDP
from train.loader import BestFitLoader
from train.loop import RunLog, Trainer, init_run, resume_checkpoint, save_run_checkpoint
from train.optim import MuonAdamW
from train.report import record_stage
from train.schedule import BASE_WEIGHT_DECAY, DEFAULT_RATIO, lr_multiplier, muon_momentum, muon_weight_decay, plan_training
from train.shards import ShardError, load_manifest

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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import bpe_rs  # the tokenizer package stands alone; imported here so `--help` needs no native library

    # ---- distributed, paths ----------------------------------------------------------------------------------
    rank, world, device = init_run()
    from train.download import cache_dir  # the one base-dir rule ($FLASHCHAT_BASE_DIR, else ~/.cache/flashchat)
    run_name = args.run_name or f"d{args.depth}"
    base = cache_dir() / run_name
    run_dir = Path(args.run_dir or base / "base")
    args.data = args.data or str(base / "shards")
    args.tokenizer = args.tokenizer or str(base / "tokenizer")
    run = RunLog(run_dir, is_master=rank == 0)
    log = run.log

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
    # What a checkpoint must agree on to continue this run exactly (the model config is checked separately).
    # "lr" is also what mid/SFT inherit from this run (nanochat's chat_sft reads the base run's LRs).
    run_key = {"batch_tokens": plan.batch_tokens, "num_iterations": num_iterations, "device_batch_size": B,
               "world_size": world, "rank_data": args.rank_data, "lr": [args.matrix_lr, args.embedding_lr,
                                                                        args.unembedding_lr, args.scalar_lr],
               "weight_decay": plan.weight_decay}

    log(f"flashchat base | {cfg.summary()}")
    log(f"world {world} on {device} ({dtype}) | batch {plan.batch_tokens:,} tokens/step = {B} rows × {T} × "
        f"{world} ranks × {plan.grad_accum_steps} micro-steps | {num_iterations:,} steps, {plan.num_tokens:,} "
        f"tokens ({plan.num_tokens / cfg.num_scaling_params():.1f} per scaling param) | lr scale "
        f"{plan.lr_scale:.4f}, muon wd {plan.weight_decay:.4f} | run dir {run_dir}")

    # Footgun of the WD transfer (WD ∝ D_ref/D): a short horizon makes it huge, and once lr·wd nears 1 the
    # cautious decay p ← p − lr·wd·p flips weights instead of shrinking them. Say so rather than train garbage.
    peak_decay = args.matrix_lr * plan.lr_scale * plan.weight_decay
    if peak_decay > 0.1:
        log(f"warning: Muon lr × weight decay at the LR peak is {peak_decay:.3f} (lr {args.matrix_lr * plan.lr_scale:.2e}"
            f" × wd {plan.weight_decay:.1f}): a horizon this short inflates the WD transfer; lower --weight-decay")

    # ---- resume --------------------------------------------------------------------------------------------------
    ckpt_root = run_dir / "checkpoints"
    step = 0
    if args.resume:
        ck = resume_checkpoint(ckpt_root, rank=rank, world=world, cfg=cfg, run_key=run_key, fsdp=fsdp, opt=opt,
                               loader=loader)
        step = ck.step
        log(f"resumed from {ck.path} at step {step}")
    run.open_wandb(args.wandb, run_name, {**vars(args), **dataclasses.asdict(plan)})

    trainer = Trainer(model=model, fsdp=fsdp, opt=opt, loader=loader, run=run, world=world, device=device,
                      flops_per_token=cfg.flops_per_token(), token_mean=False)
    trainer.tokens = step * plan.batch_tokens
    eval_steps = max(1, args.eval_tokens // micro_tokens)

    def evaluate(step: int) -> dict:
        # A fresh val loader each time: the same documents in the same rows, so evaluations are comparable.
        val = make_loader(args, "val", rank, world, device)
        return {"val_bpb": evaluate_bpb(model, (next(val) for _ in range(eval_steps)), token_bytes)}

    def schedule(step: int) -> tuple[float, float, float]:
        return (lr_multiplier(step, num_iterations), muon_momentum(step, num_iterations),
                muon_weight_decay(step, num_iterations, plan.weight_decay))

    def save(step: int) -> Path:
        return save_run_checkpoint(ckpt_root, step, fsdp=fsdp, opt=opt, cfg=cfg, loader=loader, rank=rank,
                                   world=world, keep_last=args.keep_last,
                                   meta={"run": run_key, "sharding": fsdp.sharding_meta(),
                                         "plan": dataclasses.asdict(plan)})

    out = trainer.run(start_step=step, num_iterations=num_iterations, grad_accum=plan.grad_accum_steps,
                      schedule=schedule, evaluate=evaluate,
                      sample=lambda step: sample_greedy(model, tok, SAMPLE_PROMPTS, args.sample_tokens),
                      save=save, eval_every=args.eval_every, sample_every=args.sample_every,
                      save_every=args.save_every)
    bpbs = [(s, m["val_bpb"]) for s, m in out["evals"]]
    log(f"done: {out['step']} steps, final val bpb {bpbs[-1][1]:.4f}" if bpbs else f"done: {out['step']} steps")
    if rank == 0:  # the run report: <run_root>/report/base.json, run_root = the run dir's parent
        record_stage(run_dir.parent, "base", wall_s=out["wall_s"],
                     metrics={"val_bpb": bpbs[-1][1] if bpbs else None,
                              "train_loss": out["losses"][-1] if out["losses"] else None,
                              "steps": out["step"], "tokens": out["tokens"]},
                     config={"depth": args.depth, "model_dim": cfg.model_dim, "num_params": cfg.num_params(),
                             "batch_tokens": plan.batch_tokens, "num_iterations": num_iterations, "world": world,
                             "device": str(device)})
    run.finish()
    return {"losses": out["losses"], "bpb": bpbs, "run_dir": str(run_dir), "step": out["step"], "plan": plan}


if __name__ == "__main__":
    main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
