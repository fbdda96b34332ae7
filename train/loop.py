"""The training-loop machinery that base, mid and SFT share: one optimizer step, the step loop, logging, saving and
exact resume. Each stage file (train/base.py, train/mid.py, train/sft.py) builds its model, data and schedule and
hands them to `Trainer`; the algorithm of a stage still reads top to bottom in its own file.

    rank, world, device = init_run()
    run = RunLog(run_dir, is_master=rank == 0)
    trainer = Trainer(model=model, fsdp=fsdp, opt=opt, loader=loader, run=run, world=world, device=device,
                      flops_per_token=cfg.flops_per_token(), token_mean=True)
    out = trainer.run(start_step=0, num_iterations=n, grad_accum=k, schedule=sched, evaluate=ev, sample=None,
                      save=save, eval_every=100, sample_every=0, save_every=0)

One optimizer step: `schedule(step)` gives (LR multiplier, Muon momentum, Muon weight decay), set before the step
(schedules are pure functions of the step, so a resume needs no schedule state); grad_accum micro-steps, of which
only the last reduces gradients (nanochat's "comm once per step"); opt.step; one log line (step/total, loss, LR
multiplier, tok/s, MFU, ETA, memory) and one metrics.jsonl record. At the top of each iteration: evaluation at
step 0, every eval_every and at the end; samples likewise; a checkpoint every save_every (not at the step just
resumed from) and always at the end.

Loss normalisation (`token_mean`):
  False  every row is full (pretraining: no −1 targets), so each micro-step's mean / grad_accum is the step's mean
         (bitwise what train.base always did).
  True   rows carry −1 targets (chat masks, padding), so micro-step means would weight a token by how crowded its
         micro-batch is. Instead the step's micro-batches are fetched first, the supervised targets counted over all
         ranks (one all-reduce), and each micro-step backpropagates sum(loss) × world / count: after FSDP's mean over
         ranks every supervised token of the step weighs the same, on any world size.

Limits: a step whose batches hold no supervised target contributes zero gradient (count clamped to 1) rather than
failing; tok/s and MFU count every token forwarded, padding included (the compute was spent on it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from train.fsdp import FSDP, init_distributed

# Peak dense bf16 FLOP/s by device name (vendor datasheets, no sparsity); first substring match wins, so the
# specific names come first. nanochat's MFU uses 989e12 for the H100 SXM.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("L40S", 362e12),
                   ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def init_run() -> tuple[int, int, torch.device]:
    """(rank, world, device): the process group a test harness (train.fsdp.spawn) already made, else torchrun's
    environment, else one process."""
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    return init_distributed()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def memory_mib(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f}MiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f}MiB rss"  # Linux: KiB


def fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def all_mean(x: torch.Tensor, world: int) -> float:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x.item()


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


class RunLog:
    """Plain log lines (rank 0 only, never \\r: a terminal and a redirected log read the same), the run's
    metrics.jsonl (appended to, one JSON object per record, each carrying its step) and optional wandb."""

    def __init__(self, run_dir: str | os.PathLike, is_master: bool):
        self.run_dir = Path(run_dir)
        self.is_master = is_master
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        if is_master:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def log(self, msg: str) -> None:
        if self.is_master:
            print(msg, flush=True)

    def record(self, rec: dict) -> None:
        if self.is_master:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log(rec, step=rec["step"])

    def open_wandb(self, project: str | None, name: str, config: dict) -> None:
        if not project or not self.is_master:
            return
        try:
            import wandb
        except ImportError as e:
            raise SystemExit("--wandb needs the wandb package (pip install wandb)") from e
        self.wandb_run = wandb.init(project=project, name=name, config=config)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def resume_checkpoint(ckpt_root: Path, *, rank: int, world: int, cfg, run_key: dict, fsdp: FSDP, opt,
                      loader=None) -> Checkpoint:
    """Load the latest complete checkpoint under ckpt_root into fsdp/opt/loader and the RNGs, after checking that
    it belongs to this run configuration (run_key), model config and sharding; errors name what differs.
    loader None: a loop without a data cursor (GRPO draws its questions from the step)."""
    path = latest_checkpoint(ckpt_root)
    if path is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {ckpt_root}")
    ck = load_checkpoint(path, rank=rank, world_size=world, expected_config=cfg)
    diffs = [f"{k}: checkpoint {ck.meta['run'].get(k)!r}, this run {v!r}" for k, v in run_key.items()
             if ck.meta["run"].get(k) != v]
    if diffs:
        raise ValueError(f"{path} comes from another run configuration: {'; '.join(diffs)}")
    if ck.meta["sharding"] != json.loads(json.dumps(fsdp.sharding_meta())):
        raise ValueError(f"{path}: FSDP sharding differs from this job's (another world size or model)")
    fsdp.load_full_state_dict(ck.model_state)
    opt.load_state_dict(ck.optimizer_state)
    if loader is not None:
        loader.load_state_dict(ck.rank_meta["loader"])
    restore_rng_state(ck.rng)
    return ck


def save_run_checkpoint(ckpt_root: Path, step: int, *, fsdp: FSDP, opt, cfg, loader, rank: int, world: int,
                        meta: dict, keep_last: int) -> Path:
    """Every rank calls this: rank 0 writes the gathered model, each rank its optimizer shard and loader cursor
    (loader None: none). meta must hold "run" (the run key) and "sharding", which resume_checkpoint checks."""
    full = fsdp.full_state_dict()  # every rank takes part; rank 0 gets the tensors
    barrier = dist.barrier if world > 1 else (lambda: None)
    return save_checkpoint(ckpt_root, step, model_state=full if rank == 0 else None, config=cfg,
                           optimizer_state=opt.state_dict(), rank=rank, world_size=world,
                           meta=meta,
                           rank_meta={} if loader is None else {"loader": loader.state_dict()}, keep_last=keep_last,
                           barrier=barrier)


Schedule = Callable[[int], tuple[float, float, float]]  # step -> (LR multiplier, Muon momentum, Muon weight decay)


class Trainer:
    """The step loop over a model wrapped by FSDP with its MuonAdamW and a loader of (inputs, targets) batches."""

    def __init__(self, *, model, fsdp: FSDP, opt, loader, run: RunLog, world: int, device: torch.device,
                 flops_per_token: float, token_mean: bool):
        self.model, self.fsdp, self.opt, self.loader, self.run_log = model, fsdp, opt, loader, run
        self.world, self.device = world, device
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.token_mean = token_mean
        self.tokens = 0  # tokens forwarded so far (all ranks); a stage restores it on resume from its meta

    def train_step(self, grad_accum: int) -> tuple[float, int, int]:
        """One optimizer step; returns (train loss, tokens forwarded, supervised targets), all ranks together."""
        model, fsdp, world = self.model, self.fsdp, self.world
        if self.token_mean:
            batches = [next(self.loader) for _ in range(grad_accum)]
            local = torch.tensor([sum(int((t >= 0).sum()) for _, t in batches)], dtype=torch.float64,
                                 device=self.device)
            count = all_sum(local, world).item()
            scale = world / max(count, 1.0)
        loss_sum = torch.zeros((), device=self.device)
        num_tokens = 0
        for micro in range(grad_accum):
            inputs, targets = batches[micro] if self.token_mean else next(self.loader)
            num_tokens += inputs.numel()
            # Every micro-step but the last accumulates locally; the last one reduces the sum.
            sync = micro == grad_accum - 1
            with contextlib.nullcontext() if sync else fsdp.no_sync():
                if self.token_mean:
                    loss = model(inputs, targets, loss_reduction="sum")
                    (loss * scale).backward()
                else:
                    loss = model(inputs, targets)
                    (loss / grad_accum).backward()
            fsdp.finish_backward()
            loss_sum += loss.detach()
        self.opt.step()
        fsdp.zero_grad()
        # The reductions below are also sync points: the step's measured time is real.
        if self.token_mean:
            train_loss = all_sum(loss_sum.double(), world).item() / max(count, 1.0)
        else:
            train_loss = all_mean(loss_sum / grad_accum, world)
            return train_loss, num_tokens * world, num_tokens * world  # full rows: every rank the same shape
        num_tokens = int(all_sum(torch.tensor(num_tokens, device=self.device), world).item())
        return train_loss, num_tokens, int(count)

    def run(self, *, start_step: int, num_iterations: int, grad_accum: int, schedule: Schedule,
            evaluate: Callable[[int], dict] | None, sample: Callable[[int], list[str]] | None,
            save: Callable[[int], Path], eval_every: int, sample_every: int, save_every: int) -> dict:
        """Steps start_step .. num_iterations; see the module docstring. evaluate(step) returns {name: number}
        (logged and recorded); sample(step) returns texts (logged). Returns losses, evals [(step, metrics)],
        step, tokens and the wall seconds of this call."""
        log, record = self.run_log.log, self.run_log.record
        step = start_step
        losses: list[float] = []
        evals: list[tuple[int, dict]] = []
        step_times: list[float] = []
        t_start = time.perf_counter()
        while True:
            is_last = step == num_iterations
            if evaluate is not None and eval_every > 0 and (is_last or step % eval_every == 0):
                t0 = time.perf_counter()
                metrics = evaluate(step)
                evals.append((step, metrics))
                shown = " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
                log(f"step {step:05d} | {shown} | {time.perf_counter() - t0:.1f}s")
                record({"step": step, **metrics})
            if sample is not None and sample_every > 0 and (is_last or step % sample_every == 0):
                for text in sample(step):
                    log(f"step {step:05d} | sample | {text!r}")
            if is_last or (save_every > 0 and step % save_every == 0 and step != start_step):
                log(f"step {step:05d} | saved {save(step)}")
            if is_last:
                break

            t0 = time.perf_counter()
            lrm, momentum, weight_decay = schedule(step)
            self.opt.set_lr_multiplier(lrm)
            self.opt.set_muon_momentum(momentum)
            self.opt.set_muon_weight_decay(weight_decay)
            train_loss, num_tokens, num_supervised = self.train_step(grad_accum)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"step {step}: loss is {train_loss}; stopping (lower the LRs?)")
            dt = time.perf_counter() - t0
            step += 1
            self.tokens += num_tokens
            losses.append(train_loss)
            step_times.append(dt)

            tok_per_s = num_tokens / dt
            mfu = self.flops_per_token * tok_per_s / (self.peak * self.world) if self.peak else None
            recent = step_times[1:] or step_times  # the first step pays for warm-up (allocations, autotuning)
            eta = (num_iterations - step) * sum(recent[-50:]) / len(recent[-50:])
            log(f"step {step:05d}/{num_iterations:05d} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
                f"{tok_per_s:,.0f} tok/s | mfu {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"dt {1000 * dt:.0f}ms | eta {fmt_duration(eta)} | mem {memory_mib(self.device)}")
            rec = {"step": step, "loss": train_loss, "lrm": lrm, "tok_per_s": tok_per_s, "mfu": mfu, "dt": dt,
                   "tokens": self.tokens}
            if self.token_mean:
                rec["supervised_tokens"] = num_supervised
            record(rec)
        return {"losses": losses, "evals": evals, "step": step, "tokens": self.tokens,
                "wall_s": time.perf_counter() - t_start}
