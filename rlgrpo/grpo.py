"""GRPO on GSM8K (nanochat §7.4, "GRPO" that reduces to on-policy REINFORCE): `python -m rlgrpo.grpo`.

    python -m rlgrpo.grpo --from runs/sft/model --tokenizer runs/tokenizer --run-root runs/d20 --task gsm8k
    torchrun --nproc_per_node=8 -m rlgrpo.grpo --from ... --task gsm8k          # 2 questions per rank per step
    python -m rlgrpo.grpo --from CKPT --tokenizer DIR --run-root DIR --task synthetic --num-steps 50   # CPU tier

One step: every rank takes its share of the step's `--examples-per-step` questions (a fixed seeded order over the
train split, so a step's questions depend only on (seed, step)), samples `--num-samples` completions per question
through its own `infer.engine.Engine` (continuous batching, tool calls in the sandbox, one seed per sample),
scores them (rlgrpo/rewards.py), and computes advantages within each group. Then the policy gradient: sequences
are packed into rows of prompt + completion, targets −1 wherever the token was not sampled (prompt, forced tool
output, padding), and −Σ logp·A / (sampled tokens over all ranks) is backpropagated through the FSDP-sharded
model (train/fsdp.py), micro-batch by micro-batch; one MuonAdamW step; the new weights are gathered and pushed
into every rank's engine (`Engine.load_weights`, which bumps its version). Samples carry the version that made
them and the step asserts it equals the weights being updated: a stale sample is never trained on.
Sequences with advantage 0 (their group agreed) add nothing to the gradient and are not run (they still count in
the token normaliser, as nanochat); every rank runs the same number of micro-batches (FSDP's collectives need it).

Optimizer (nanochat): MuonAdamW over `model.param_groups` with embedding/unembedding/matrix LRs 0.2/0.004/0.02
× init frac 0.05, weight decay 0 everywhere, LR multiplier 1 − step/num_steps (linear to 0).
Every `--eval-every` steps: pass@1..k on held-out questions (k samples each at the training temperature).
Checkpoints (train/checkpoint.py, model + optimizer shards + RNG) every `--save-every` steps and at the end;
`--resume` continues from the latest one (the step's questions and seeds derive from (seed, step), so no loader
state is needed). At the end `record_stage(run_root, "rl", ...)`; the GSM8K summary number only when the eval was
the real GSM8K test split.

Data: --task gsm8k trains on GSM8K train (train.tasks.remote, needs the network) and evaluates on GSM8K test
(offline package data); --task synthetic (CPU tier, no network) trains on ArithmeticWordProblems(seed=--train-seed)
and evaluates on another seed (--eval-seed), optionally plus --eval-gsm8k real test questions. Test splits are
never trained on (train.tasks.common.check_trainable).
Limits: one update per batch (strictly on-policy; no PPO epochs); the engine holds a second copy of the weights on
every rank; pushing weights goes through rank 0's full state dict and a broadcast (CPU round trip); a checkpoint
resumes only at the world size that wrote it.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from infer.engine import Engine
from infer.sampling import SamplingParams
from model.gpt import GPT
from model.io import load_model, resolve_model_dir
from rlgrpo.rewards import group_advantages, pass_at_k
from rlgrpo.rollout import Sample, rollout
from train.loop import RunLog, all_sum, init_run, resume_checkpoint, save_run_checkpoint
from train.fsdp import FSDP
from train.optim import MuonAdamW
from train.report import record_stage


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GRPO (on-policy REINFORCE, group-mean baseline) on GSM8K.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="from_", required=True, help="model directory to start from (the SFT model)")
    p.add_argument("--tokenizer", required=True, help="bpe_rs tokenizer directory")
    p.add_argument("--run-root", required=True, help="the run's directory: rl/ and report/ are written in it")
    p.add_argument("--task", choices=("synthetic", "synthetic-1op", "gsm8k"), default="gsm8k",
                   help="gsm8k (GPU tiers); synthetic: generated 2-4-step word problems; synthetic-1op: one-step "
                        "ones (the CPU tier: its tiny model solves some, so rewards carry a signal)")
    g = p.add_argument_group("rollouts (nanochat §7.4 defaults)")
    g.add_argument("--num-steps", type=int, default=None, help="optimizer steps; default one epoch of the train set")
    g.add_argument("--examples-per-step", type=int, default=16, help="questions per step over all ranks")
    g.add_argument("--num-samples", type=int, default=16, help="G: samples per question")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--no-tools", action="store_true", help="do not run tool calls (the model sees no output)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="engine: sequences decoded at once")
    g = p.add_argument_group("rewards and loss")
    g.add_argument("--format-reward", type=float, default=0.0, help="bonus for a finished turn with a '#### n'")
    g.add_argument("--std-advantage", action="store_true", help="divide advantages by the group's std")
    g.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward/backward")
    g = p.add_argument_group("optimizer (nanochat §7.4)")
    g.add_argument("--embedding-lr", type=float, default=0.2)
    g.add_argument("--unembedding-lr", type=float, default=0.004)
    g.add_argument("--matrix-lr", type=float, default=0.02)
    g.add_argument("--scalar-lr", type=float, default=0.5,
                   help="AdamW LR of the per-layer λ scalars (× --init-lr-frac); 0 freezes them. Adam moves a scalar by "
                        "~LR per step whatever its gradient: on small models that alone can undo SFT")
    g.add_argument("--init-lr-frac", type=float, default=0.05, help="every LR × this; then linear to 0")
    g = p.add_argument_group("data, eval, checkpoints")
    g.add_argument("--train-seed", type=int, default=0, help="synthetic train split seed")
    g.add_argument("--eval-seed", type=int, default=1, help="synthetic eval split seed (must differ)")
    g.add_argument("--train-size", type=int, default=8000, help="synthetic train questions")
    g.add_argument("--eval-examples", type=int, default=400, help="held-out questions per eval")
    g.add_argument("--eval-samples", type=int, default=8, help="k of pass@1..k")
    g.add_argument("--eval-gsm8k", type=int, default=0, help="synthetic tier: also eval this many GSM8K test Qs")
    g.add_argument("--eval-every", type=int, default=60, help="steps; 0 = only at the end")
    g.add_argument("--save-every", type=int, default=60, help="steps; 0 = only at the end")
    g.add_argument("--keep-last", type=int, default=2)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--seed", type=int, default=42, help="question order and sampling seeds")
    return p.parse_args(argv)


# ---- data --------------------------------------------------------------------------------------------------------
def load_tasks(args):
    """(train task, [(eval name, eval task, is the real GSM8K test)])."""
    from train.tasks.common import check_trainable

    if args.task == "gsm8k":
        from train.tasks.offline import load as load_offline
        from train.tasks.remote import load as load_remote  # network: GSM8K train is not in the offline packages

        train = load_remote("gsm8k", "train")
        check_trainable([train])
        test = load_offline("gsm8k")
        n = min(args.eval_examples, len(test))
        return train, [("gsm8k", test.subset(n, seed=0), True)]
    from train.tasks_synthetic import ArithmeticWordProblems

    if args.train_seed == args.eval_seed:
        raise ValueError(f"--train-seed and --eval-seed are both {args.train_seed}: the eval would be the train set")
    ops = (1, 1) if args.task == "synthetic-1op" else (2, 4)
    evals = [("synthetic", ArithmeticWordProblems(args.eval_examples, seed=args.eval_seed, ops=ops), False)]
    if args.eval_gsm8k:
        from train.tasks.offline import load as load_offline

        evals.append(("gsm8k", load_offline("gsm8k").subset(args.eval_gsm8k, seed=0), False))  # a few: not the metric
    return ArithmeticWordProblems(args.train_size, seed=args.train_seed, ops=ops), evals


def step_questions(num_train: int, step: int, per_step: int, seed: int) -> list[int]:
    """The step's global question indices: a seeded permutation of the train set, walked `per_step` at a time
    (wrapping into a new permutation each epoch)."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(i, num_train)
        order = list(range(num_train))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out.append(order[pos])
    return out


# ---- the update --------------------------------------------------------------------------------------------------
def make_rows(samples: list[Sample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), (B, T) int64: each row is prompt + completion shifted by one; targets −1 except at the
    completion tokens the policy sampled (mask 1). Rows are right-padded with pad_id (targets −1)."""
    seqs = [s.prompt_ids + s.token_ids for s in samples]
    T = max(len(q) for q in seqs) - 1
    inputs = torch.full((len(samples), T), pad_id, dtype=torch.int64)
    targets = torch.full((len(samples), T), -1, dtype=torch.int64)
    for b, (s, q) in enumerate(zip(samples, seqs)):
        inputs[b, : len(q) - 1] = torch.tensor(q[:-1])
        P = len(s.prompt_ids)
        for t, (tok, m) in enumerate(zip(s.token_ids, s.mask, strict=True)):
            if m:
                targets[b, P + t - 1] = tok  # position P+t−1 predicts completion token t
    return inputs.to(device), targets.to(device)


def sum_over_ranks(values: list[float], world: int, device) -> list[float]:
    """Each value summed over all ranks, in float64, with one collective."""
    return all_sum(torch.tensor(values, dtype=torch.float64, device=device), world).tolist()


def all_max(x: int, world: int, device) -> int:
    if world == 1:
        return int(x)
    t = torch.tensor([int(x)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def policy_gradient_step(model: GPT, fsdp: FSDP, opt: MuonAdamW, samples: list[Sample], advantages: list[float],
                         *, device_batch_size: int, pad_id: int, world: int, device) -> dict:
    """Accumulate the token-normalised policy gradient of this rank's samples, then one optimizer step.
    Returns {"pg_loss", "num_tokens", "num_trained"} (all ranks' totals). Every rank must call it."""
    [num_tokens] = sum_over_ranks([sum(sum(s.mask) for s in samples)], world, device)
    train = [(s, a) for s, a in zip(samples, advantages, strict=True) if a != 0.0 and sum(s.mask) > 0]
    num_micro = all_max(math.ceil(len(train) / device_batch_size), world, device)
    pg = torch.zeros((), dtype=torch.float64, device=device)
    for m in range(num_micro):
        chunk = train[m * device_batch_size: (m + 1) * device_batch_size]
        if chunk:
            x, y = make_rows([s for s, _ in chunk], pad_id, device)
            adv = torch.tensor([a for _, a in chunk], dtype=torch.float32, device=device)
            nll = model(x, y, loss_reduction="none")  # (B, T): −logp of each target, 0 where the target is −1
            # FSDP averages grads over ranks, so × world turns each rank's share into the global sum / N.
            loss = (nll * adv[:, None]).sum() * (world / num_tokens)
        else:  # this rank ran out: a zero-weight pass keeps the collectives in step with the other ranks
            x = torch.full((1, 2), pad_id, dtype=torch.int64, device=device)
            loss = model(x, x, loss_reduction="sum") * 0.0
        loss.backward()
        fsdp.finish_backward()
        pg += loss.detach().double() / world
    if num_micro > 0:
        opt.step()
    fsdp.zero_grad()
    pg_loss, num_trained = sum_over_ranks([pg.item(), len(train)], world, device)
    return {"pg_loss": pg_loss, "num_tokens": num_tokens, "num_trained": num_trained, "updated": num_micro > 0}


@torch.no_grad()
def push_weights(fsdp: FSDP, engine: Engine, world: int, device) -> int:
    """Gather the trained weights (rank 0), broadcast them, load them into this rank's engine; the new version."""
    full = fsdp.full_state_dict()
    if world > 1:
        ref = engine.model.state_dict()
        for name, t in ref.items():
            buf = full[name].to(device) if dist.get_rank() == 0 else torch.empty(t.shape, dtype=t.dtype, device=device)
            dist.broadcast(buf, src=0)
            full[name] = buf
    return engine.load_weights(full)


@torch.no_grad()
def evaluate_pass_at_k(engine: Engine, tok, task, k: int, params: SamplingParams, *, rank: int, world: int,
                       device, seed: int) -> dict[str, float]:
    """pass@1..k averaged over the task's questions (rank r takes questions r, r+N, ...); same on every rank."""
    idx = list(range(rank, len(task), world))
    sums = [0.0] * k
    if idx:
        groups = rollout(engine, tok, [task[i] for i in idx], k, params, seed=seed, step=-1, question_ids=idx)
        for group in groups:
            c = sum(s.correct for s in group)
            for j in range(1, k + 1):
                sums[j - 1] += pass_at_k(k, c, j)
    return {f"pass@{j}": total / len(task) for j, total in enumerate(sum_over_ranks(sums, world, device), start=1)}


# ---- the loop ----------------------------------------------------------------------------------------------------
def main(argv=None, *, tasks=None, log=None) -> dict:
    """tasks: optional (train task, [(name, eval task, is_real_gsm8k_test)]) overriding --task (tests, scripts)."""
    args = parse_args(argv)
    import bpe_rs

    rank, world, device = init_run()
    is_master = rank == 0
    run_dir = Path(args.run_root) / "rl"
    run = RunLog(run_dir, is_master)
    log = log or run.log
    t_start = time.perf_counter()

    E, G = args.examples_per_step, args.num_samples
    if E % world:
        raise ValueError(f"--examples-per-step {E} must be a multiple of the world size {world}")
    if G < 2:
        raise ValueError(f"--num-samples must be >= 2 (the advantage is relative to the group), got {G}")
    train_task, evals = tasks if tasks is not None else load_tasks(args)
    num_steps = args.num_steps or len(train_task) // E
    if num_steps <= 0:
        raise ValueError(f"{len(train_task)} train questions make no step of {E}")

    tok = bpe_rs.Tokenizer.load(args.tokenizer)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = resolve_model_dir(args.from_)  # a model dir, or a checkpoints/stage dir: its newest complete step
    engine_model = load_model(source, device=device, compute_dtype=dtype)
    cfg = engine_model.config
    if cfg.vocab_size != tok.vocab_size:
        raise ValueError(f"model vocab {cfg.vocab_size} != tokenizer vocab {tok.vocab_size} ({args.tokenizer})")
    model = load_model(source, device=device, compute_dtype=dtype).train()
    fsdp = FSDP(model)
    groups = model.param_groups(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                unembedding_lr=args.unembedding_lr, scalar_lr=args.scalar_lr)
    for grp in groups:
        grp["lr"] *= args.init_lr_frac
        grp["weight_decay"] = 0.0  # nanochat RL: no weight decay
    opt = MuonAdamW(fsdp.owned_param_groups(groups), weight_decay=0.0)
    executor = None
    if not args.no_tools:
        from infer.sandbox import ToolExecutor

        executor = ToolExecutor(max_workers=4)
    engine = Engine(engine_model, tok, tools=executor,
                    max_num_seqs=args.max_num_seqs, log=log)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens)
    pad_id = tok.special_id("<|assistant_end|>")
    run_key = {"examples_per_step": E, "num_samples": G, "num_steps": num_steps, "world_size": world,
               "seed": args.seed, "task": args.task if tasks is None else "custom",
               "lr": [args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.scalar_lr, args.init_lr_frac]}

    step = 0
    if args.resume:
        ck = resume_checkpoint(run_dir / "checkpoints", rank=rank, world=world, cfg=cfg, run_key=run_key, fsdp=fsdp,
                               opt=opt)
        engine.load_weights(ck.model_state)
        step = ck.step
        log(f"resumed from {ck.path} at step {step}")
    version = engine.version  # the weights the next rollouts come from
    log(f"flashchat grpo | {cfg.summary()} | world {world} on {device} | {num_steps} steps × {E} questions × "
        f"{G} samples | train {len(train_task)} questions | evals {[(n, len(t)) for n, t, _ in evals]}")

    def run_evals(step: int) -> dict:
        out = {}
        for name, task, _ in evals:
            t0 = time.perf_counter()
            res = evaluate_pass_at_k(engine, tok, task, args.eval_samples, params, rank=rank, world=world,
                                     device=device, seed=args.seed)
            out[name] = res
            shown = " ".join(f"{k} {v:.3f}" for k, v in res.items())
            log(f"step {step:05d} | eval {name} ({len(task)} questions) | {shown} | {time.perf_counter() - t0:.1f}s")
            run.record({"step": step, "eval": name, **res})
        return out

    rewards_hist, last_eval, start_step = [], {}, step
    try:
        while True:
            is_last = step == num_steps
            if is_last or (args.eval_every > 0 and step % args.eval_every == 0):
                last_eval = run_evals(step)
            if is_last or (args.save_every > 0 and step % args.save_every == 0 and step != start_step):
                path = save_run_checkpoint(run_dir / "checkpoints", step, fsdp=fsdp, opt=opt, cfg=cfg, loader=None,
                                           rank=rank, world=world, keep_last=args.keep_last,
                                           meta={"run": run_key, "sharding": fsdp.sharding_meta()})
                log(f"step {step:05d} | saved {path}")
            if is_last:
                break
            t0 = time.perf_counter()
            qids = step_questions(len(train_task), step, E, args.seed)
            mine = qids[rank * (E // world): (rank + 1) * (E // world)]
            groups_ = rollout(engine, tok, [train_task[q] for q in mine], G, params, seed=args.seed, step=step,
                              question_ids=list(range(rank * (E // world), (rank + 1) * (E // world))),
                              format_bonus=args.format_reward)
            t_roll = time.perf_counter() - t0
            samples = [s for g in groups_ for s in g]
            stale = [s.version for s in samples if s.version != version]
            assert not stale, f"step {step}: samples from weights version {stale[0]}, training version {version}"
            rew = torch.tensor([[s.reward for s in g] for g in groups_], dtype=torch.float32)
            adv = group_advantages(rew, normalize_std=args.std_advantage).flatten().tolist()
            lrm = 1.0 - step / num_steps
            opt.set_lr_multiplier(lrm)
            stats = policy_gradient_step(model, fsdp, opt, samples, adv, device_batch_size=args.device_batch_size,
                                         pad_id=pad_id, world=world, device=device)
            if stats["updated"]:
                version = push_weights(fsdp, engine, world, device)
            step += 1
            n_seq = len(samples) * world
            reward_sum, num_correct, gen_tokens = sum_over_ranks(
                [float(rew.sum()), sum(s.correct for s in samples), sum(len(s.token_ids) for s in samples)],
                world, device)
            reward_mean, correct = reward_sum / n_seq, num_correct / n_seq
            dt = time.perf_counter() - t0
            rewards_hist.append(reward_mean)
            log(f"step {step:05d}/{num_steps:05d} | reward {reward_mean:.3f} | correct {correct:.3f} | "
                f"pg {stats['pg_loss']:+.4f} | tokens {stats['num_tokens']:,.0f} ({stats['num_trained']:.0f} seqs "
                f"trained) | lrm {lrm:.3f} | rollout {t_roll:.1f}s {gen_tokens / t_roll:,.0f} tok/s | dt {dt:.1f}s")
            run.record({"step": step, "reward": reward_mean, "correct": correct, "pg_loss": stats["pg_loss"],
                    "num_tokens": stats["num_tokens"], "lrm": lrm, "rollout_s": t_roll, "dt": dt,
                    "version": version})
    finally:
        if executor is not None:
            executor.shutdown()

    wall = time.perf_counter() - t_start
    metrics = {"steps": step}
    if rewards_hist:
        tail = rewards_hist[-max(1, len(rewards_hist) // 10):]
        metrics.update(reward_first=rewards_hist[0], reward_last=sum(tail) / len(tail))
    summary, notes = {}, []
    for (name, task, is_real), res in zip(evals, last_eval.values()):
        metrics.update({f"{name}_{k}": v for k, v in res.items()})
        if is_real:
            summary["GSM8K"] = res["pass@1"]
            notes.append(f"GSM8K: pass@1 over {len(task)} test questions, {args.eval_samples} samples each "
                         f"(temperature {args.temperature})")
        elif name == "synthetic":
            kind = "one-step arithmetic" if args.task == "synthetic-1op" else "arithmetic"
            notes.append(f"rl trained and evaluated on flashchat's synthetic {kind} word problems, not GSM8K")
    if is_master:
        record_stage(args.run_root, "rl", wall_s=wall, metrics=metrics, summary=summary, notes=notes,
                     config={k: v for k, v in vars(args).items()})
    return {"rewards": rewards_hist, "eval": last_eval, "step": step, "run_dir": str(run_dir), "version": version,
            "model_state": fsdp.full_state_dict()}


if __name__ == "__main__":
    main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
