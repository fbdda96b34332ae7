"""Mid-training: `python -m train.mid` (1 process) or `torchrun --nproc_per_node=N -m train.mid`.

    python -m train.mid --run-name d20                           # from <run>/base's latest checkpoint, nanochat mix
    python -m train.mid --run-dir runs/cpu/mid --mixture offline --num-iterations 200     # the CPU tier

Continues a base checkpoint on conversations (nanochat §7.2): the same loop as pretraining (train/loop.py: FSDP,
MuonAdamW, one log line and one metrics.jsonl record per step, atomic checkpoints, exact `--resume`), with rows
from train/chat_data.py — whole conversations packed best-fit (BOS-aligned; padding where none fits; cropped
only when longer than T, which is counted and reported) and targets −1 wherever render_conversation's mask is 0,
so the loss covers assistant text, tool calls and <|assistant_end|> only. The step's loss is the mean over its
supervised tokens (train/loop.py, token_mean).

Defaults (nanochat §7.2): LRs inherited from the source run (its meta "run.lr") × --init-lr-frac 1.0, each ×
√(batch/2^19) as in pretraining; batch tokens and device batch inherited from the source run; T = the model's
sequence_len; LR constant for the first 80% of steps, then linear to 0; Muon momentum 0.85 → 0.95 over 300 steps;
Muon weight decay 0; val loss and bpb (assistant tokens only) every 150 steps. Horizon: --num-iterations, else one
epoch of the mixture, estimated from the mean rendered length of ≤2,000 conversations (packing pads a little, so
the real epoch runs slightly past the horizon; the loader just continues into the next epoch).
Optimizer state: warm-started from the source checkpoint's shards (momentum buffers, Adam moments and step counts;
the LRs, betas and weight decay are this stage's) when it was written with this job's world size and sharding;
otherwise fresh, and the log says why. At the end the stage's numbers go to `<run_root>/report/mid.json`.

train/sft.py is this file's stage with other defaults (StageDefaults) and one conversation per row.
Limits: no samples during training (the chat evals are `python -m train.eval`); a `--resume` needs the same
world size, mixture and batch; the source checkpoint must be a complete one of train/checkpoint.py's format.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.io import load_config, load_model
from train.chat_data import MIXTURES, PackedChatLoader, PaddedChatLoader, build_mixture, mean_conversation_tokens
from train.checkpoint import META_FILE, latest_checkpoint, load_checkpoint
from train.evaluate import loss_byte_sums
from train.fsdp import FSDP
from train.loop import RunLog, Trainer, init_run, resume_checkpoint, save_run_checkpoint
from train.optim import MuonAdamW
from train.report import record_stage
from train.schedule import REF_BATCH_TOKENS

BASE_LRS = (0.02, 0.3, 0.008, 0.5)  # train.base's defaults (matrix, embedding, unembedding, scalar)


@dataclass(frozen=True)
class StageDefaults:
    stage: str  # "mid" | "sft": the run directory and the report record
    source_stage: str  # where the default source checkpoint lives: <run_root>/<source_stage>/checkpoints
    init_lr_frac: float  # × the inherited LRs
    warmdown_ratio: float  # LR constant, then linear to 0 over this last fraction of the steps
    eval_every: int
    packed: bool  # best-fit packed rows (mid) or one padded conversation per row (SFT)


MID = StageDefaults(stage="mid", source_stage="base", init_lr_frac=1.0, warmdown_ratio=0.2, eval_every=150,
                    packed=True)


def parse_args(argv: list[str] | None, d: StageDefaults) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"{d.stage}: continue a {d.source_stage} checkpoint on conversations.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="source", default=None,
                   help=f"a checkpoint step dir; default the latest complete one of <run_root>/{d.source_stage}/checkpoints")
    p.add_argument("--run-name", default="d20", help="run_root = $FLASHCHAT_BASE_DIR/<run-name> (as train.base)")
    p.add_argument("--run-dir", default=None, help=f"default <run_root>/{d.stage}; run_root is its parent")
    p.add_argument("--tokenizer", default=None, help="bpe_rs dir; default <run_root>/tokenizer")
    p.add_argument("--mixture", choices=MIXTURES, default="nanochat",
                   help="offline: synthetic tasks + offline conversations (CPU tier); nanochat: SmolTalk/MMLU/GSM8K")
    p.add_argument("--synthetic-examples", type=int, default=2000, help="offline mixture: examples per synthetic task")
    p.add_argument("--num-iterations", type=int, default=None, help="optimizer steps; default one epoch of the mixture")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per step (all ranks); default the source run's")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per rank per micro-step; default the source's")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length T, tokens; default the model's sequence_len")
    p.add_argument("--init-lr-frac", type=float, default=d.init_lr_frac, help="× the inherited LRs")
    for name in ("matrix", "embedding", "unembedding", "scalar"):
        p.add_argument(f"--{name}-lr", type=float, default=None, help=f"{name} LR; default the source run's")
    p.add_argument("--warmdown-ratio", type=float, default=d.warmdown_ratio, help="final fraction of steps: LR → 0")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (constant)")
    p.add_argument("--compute-dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between val loss/bpb (0 = at the start and the end only)")
    p.add_argument("--eval-tokens", type=int, default=20 * 2**19, help="val tokens per evaluation, all ranks")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (always one at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="complete checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint of the run dir")
    p.add_argument("--seed", type=int, default=42, help="mixture shuffle seed")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="log to Weights & Biases")
    return p.parse_args(argv)


# ---- schedules (pure functions of the step) ------------------------------------------------------------------
def lr_multiplier(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    """1 until the warmdown, then linear to 0 at step == num_iterations (nanochat mid/SFT: no warmup)."""
    warmdown_start = num_iterations * (1 - warmdown_ratio)
    if step < warmdown_start:
        return 1.0
    return max(0.0, (num_iterations - step) / (num_iterations - warmdown_start))


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    frac = min(step / warmup_steps, 1.0)
    return start + frac * (end - start)


@torch.no_grad()
def evaluate_chat(model, batches, token_bytes: torch.Tensor) -> dict:
    """Val loss (nats per supervised target) and bits per byte over the supervised targets with bytes > 0
    (§6.1's rule: special tokens such as <|assistant_end|> carry no bytes), summed over all ranks."""
    nats, count, nats_b, nbytes = loss_byte_sums(model, batches, token_bytes)
    if count == 0 or nbytes == 0:
        raise ValueError("evaluate_chat: the val batches hold no supervised target with bytes")
    return {"val_loss": nats / count, "val_bpb": nats_b / (math.log(2) * nbytes)}


def source_run_meta(path: Path) -> tuple[int | None, dict]:
    """(world size, run meta) of a train/checkpoint.py step dir; (None, {}) for a bare model dir."""
    meta_file = path / META_FILE
    if not meta_file.is_file():
        return None, {}
    meta = json.loads(meta_file.read_text("utf-8"))
    return meta.get("world_size"), meta.get("meta", {})


# ---- the stage -------------------------------------------------------------------------------------------------
def run_stage(args: argparse.Namespace, d: StageDefaults) -> dict:
    import bpe_rs

    rank, world, device = init_run()
    from train.download import cache_dir

    run_dir = Path(args.run_dir) if args.run_dir else cache_dir() / args.run_name / d.stage
    run_root = run_dir.parent
    run = RunLog(run_dir, is_master=rank == 0)
    log = run.log
    source = Path(args.source) if args.source else latest_checkpoint(run_root / d.source_stage / "checkpoints")
    if source is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_root / d.source_stage / 'checkpoints'}: run "
                                f"train.{d.source_stage} first or pass --from")
    cfg = load_config(source)
    tok_dir = args.tokenizer or str(run_root / "tokenizer")
    try:
        tok = bpe_rs.Tokenizer.load(tok_dir)
    except Exception as e:  # noqa: BLE001 -- bpe_rs raises several types; the message names the path
        raise SystemExit(f"cannot load the tokenizer from {tok_dir}: {e}") from e
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"the tokenizer at {tok_dir} has vocab {tok.vocab_size}, the model at {source} "
                         f"{cfg.vocab_size}")

    # ---- inherited hyperparameters (nanochat's chat_sft reads the base run's), CLI overrides -------------------
    src_world, src_meta = source_run_meta(source)
    src_run = src_meta.get("run", {})
    B = args.device_batch_size or src_run.get("device_batch_size") or 32
    T = args.max_seq_len or cfg.sequence_len
    if T > cfg.sequence_len:
        raise ValueError(f"--max-seq-len {T} is over the model's trained context {cfg.sequence_len}")
    micro_tokens = B * T * world
    batch_tokens = args.total_batch_size or src_run.get("batch_tokens") or micro_tokens
    if batch_tokens <= 0 or batch_tokens % micro_tokens:
        raise ValueError(f"batch of {batch_tokens} tokens (--total-batch-size or the source run's) is not a multiple "
                         f"of device batch {B} × T {T} × world {world} = {micro_tokens}")
    grad_accum = batch_tokens // micro_tokens
    inherited = src_run.get("lr") or list(BASE_LRS)
    lrs = [args.init_lr_frac * (mine if mine is not None else theirs) for mine, theirs in
           zip((args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.scalar_lr), inherited, strict=True)]
    lr_scale = math.sqrt(batch_tokens / REF_BATCH_TOKENS)

    # ---- model, optimizer (warm-started from the source's shards when they fit this job) ------------------------
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.compute_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(source, device, dtype)
    fsdp = FSDP(model)
    opt = MuonAdamW(fsdp.owned_param_groups(model.param_groups(
        matrix_lr=lrs[0], embedding_lr=lrs[1], unembedding_lr=lrs[2], scalar_lr=lrs[3])), lr_scale=lr_scale)
    if not args.resume:
        same_sharding = src_meta.get("sharding") == json.loads(json.dumps(fsdp.sharding_meta()))
        if src_world == world and same_sharding:
            ck = load_checkpoint(source, rank=rank, world_size=world, expected_config=cfg)
            mine = [{k: v for k, v in g.items() if k not in ("params", "stacks")} for g in opt.param_groups]
            opt.load_state_dict(ck.optimizer_state)
            for group, hyper in zip(opt.param_groups, mine, strict=True):
                group.update(hyper)  # the buffers carry over; LRs, betas and decay are this stage's
            log(f"optimizer state warm-started from {source}")
        else:
            why = "it has no optimizer shards" if src_world is None else \
                f"it was written by {src_world} ranks with another sharding, this job has {world}"
            log(f"optimizer state: fresh ({source}: {why})")

    # ---- data, horizon ---------------------------------------------------------------------------------------------
    train_mix = build_mixture(args.mixture, d.stage, "train", seed=args.seed, synthetic_examples=args.synthetic_examples)
    val_mix = build_mixture(args.mixture, d.stage, "val", seed=args.seed, synthetic_examples=args.synthetic_examples)

    def make_loader(dataset):
        if d.packed:
            return PackedChatLoader(dataset, tok, B, T, rank=rank, world_size=world, device=device)
        return PaddedChatLoader(dataset, tok, B, T, rank=rank, world_size=world, device=device)

    loader = make_loader(train_mix)
    if args.num_iterations is not None:
        num_iterations = args.num_iterations
    elif d.packed:  # one epoch: conversations × mean length / tokens per step
        mean_len = mean_conversation_tokens(train_mix, tok)
        num_iterations = math.ceil(len(train_mix) * mean_len / batch_tokens)
        log(f"horizon: one epoch ≈ {len(train_mix):,} conversations × {mean_len:.0f} tokens / {batch_tokens:,}")
    else:  # one conversation per row: one epoch is exact
        num_iterations = math.ceil(len(train_mix) / (B * grad_accum * world))
    if num_iterations <= 0:
        raise ValueError(f"--num-iterations must be positive, got {num_iterations}")

    run_key = {"stage": d.stage, "mixture": args.mixture, "batch_tokens": batch_tokens,
               "num_iterations": num_iterations, "device_batch_size": B, "max_seq_len": T, "world_size": world,
               "lr": lrs, "weight_decay": args.weight_decay, "warmdown_ratio": args.warmdown_ratio}
    log(f"flashchat {d.stage} | {cfg.summary()} | from {source}")
    log(f"world {world} on {device} ({dtype}) | batch {batch_tokens:,} tokens/step = {B} rows × {T} × {world} "
        f"ranks × {grad_accum} micro-steps | {num_iterations:,} steps | mixture {args.mixture}: "
        f"{len(train_mix):,} train / {len(val_mix):,} val conversations | lrs {[f'{x:g}' for x in lrs]} × "
        f"{lr_scale:.4f} | run dir {run_dir}")

    ckpt_root = run_dir / "checkpoints"
    trainer = Trainer(model=model, fsdp=fsdp, opt=opt, loader=loader, run=run, world=world, device=device,
                      flops_per_token=cfg.flops_per_token(), token_mean=True)
    step = 0
    if args.resume:
        ck = resume_checkpoint(ckpt_root, rank=rank, world=world, cfg=cfg, run_key=run_key, fsdp=fsdp, opt=opt,
                               loader=loader)
        step, trainer.tokens = ck.step, ck.meta["tokens"]
        log(f"resumed from {ck.path} at step {step}")
    run.open_wandb(args.wandb, f"{run_root.name}-{d.stage}", {**vars(args), **run_key})

    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.int64, device=device)
    # At most one pass over the val conversations (every row holds at least one; the same count on every rank, so
    # FSDP's collectives line up): a small val set is not cycled through again and again.
    eval_steps = max(1, min(args.eval_tokens // micro_tokens, -(-len(val_mix) // (B * world))))

    def evaluate(step: int) -> dict:
        val = make_loader(val_mix)  # fresh each time: the same rows, so evaluations compare
        return evaluate_chat(model, (next(val) for _ in range(eval_steps)), token_bytes)

    def schedule(step: int) -> tuple[float, float, float]:
        return lr_multiplier(step, num_iterations, args.warmdown_ratio), muon_momentum(step), args.weight_decay

    def save(step: int) -> Path:
        meta = {"run": run_key, "sharding": fsdp.sharding_meta(), "tokens": trainer.tokens, "source": str(source)}
        return save_run_checkpoint(ckpt_root, step, fsdp=fsdp, opt=opt, cfg=cfg, loader=loader, rank=rank,
                                   world=world, meta=meta, keep_last=args.keep_last)

    out = trainer.run(start_step=step, num_iterations=num_iterations, grad_accum=grad_accum, schedule=schedule,
                      evaluate=evaluate, sample=None, save=save, eval_every=args.eval_every or num_iterations,
                      sample_every=0, save_every=args.save_every)
    st = loader.stream
    log(f"done: {out['step']} steps | this rank: {st.num_conversations:,} conversations (epoch {st.epoch}), "
        f"{st.num_cropped} cropped to T ({st.cropped_tokens:,} tokens dropped), {loader.pad_tokens:,} padding tokens")
    final = out["evals"][-1][1] if out["evals"] else {}
    if rank == 0:
        notes = ["offline mixture: synthetic tasks (not benchmarks) + offline conversations"] \
            if args.mixture == "offline" else []
        record_stage(run_root, d.stage, wall_s=out["wall_s"],
                     metrics={"val_bpb": final.get("val_bpb"), "val_loss": final.get("val_loss"),
                              "train_loss": out["losses"][-1] if out["losses"] else None, "steps": out["step"],
                              "tokens": out["tokens"], "cropped_conversations": st.num_cropped},
                     config={"source": str(source), "mixture": args.mixture, "batch_tokens": batch_tokens,
                             "num_iterations": num_iterations, "lr": lrs, "lr_scale": lr_scale, "world": world,
                             "device": str(device), "T": T, "device_batch_size": B}, notes=notes)
    run.finish()
    return {**out, "run_dir": str(run_dir), "source": str(source), "run_key": run_key,
            "cropped": st.num_cropped}


def main(argv: list[str] | None = None) -> dict:
    return run_stage(parse_args(argv, MID), MID)


if __name__ == "__main__":
    main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
