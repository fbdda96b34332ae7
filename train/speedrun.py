"""The speedrun: every pipeline stage in order, each skipped when its outputs are complete (`./run_speedrun.sh`).

    python -m train.speedrun                       # tier: cpu without a GPU, d20 with GPUs
    python -m train.speedrun --tier d26 --gpus 8   # nanochat's bigger tiers; --depth N for any depth
    python -m train.speedrun --dry-run             # the plan: stages, commands, tokens, steps, estimated time
    python -m train.speedrun --from sft            # forget sft and every later stage, then run from there

Stages: tokenizer, tok_eval, shards, base, base_eval, mid, mid_eval, sft, sft_eval, rl, rl_eval, report (GPU tiers
start with `download`: the first shards in the foreground, the rest in the background while the tokenizer trains).
Each stage is one command (a `python -m` module of this repo, under torchrun when there are several GPUs); the
stage's numbers land in `<run_root>/report/*.json` (train/report.py) and the last stage renders report.md.

Completion: a stage that exits 0 gets a marker `<run_root>/stages/<stage>.json` (written atomically, last) that
holds the hash of its command. A stage with a marker of the same command is skipped; a missing marker means the
stage did not finish, so it runs again — training stages with `--resume` when a complete checkpoint of theirs
exists, so a crash costs at most the steps since the last checkpoint; a marker of another command (changed flags)
re-runs that stage and every later one. `--from STAGE` deletes the markers, outputs and report records of STAGE
and everything after it. No half-written output is trusted: every writer in train/ writes tmp + rename.

Tiers (the cpu tier is a demonstration on 2 cores in ≤ 20 minutes, not a useful model; the GPU tiers follow
nanochat's recipes, reference §2): see TIERS. Limits: the time estimate of --dry-run is compute / (peak × an
assumed MFU) on GPUs and the last measured tokens/s (or the committed CPU bench number) on CPU; download time is
not estimated. One node only (torchrun --standalone).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig
from model.io import latest_checkpoint
from train.download import DATASETS, cache_dir
from train.report import record_run, report_dir, write_report

ALL_STAGES = ("download", "tokenizer", "tok_eval", "shards", "base", "base_eval", "mid", "mid_eval", "sft",
              "sft_eval", "rl", "rl_eval", "report")
# Assumed model FLOPs utilisation for a GPU estimate when no measurement exists (nanochat's d20 runs: ~47-50%).
ASSUMED_MFU = 0.45
H100_PEAK_FLOPS = 989e12  # dense bf16, the number nanochat's MFU uses
# The cpu tier's base pretraining throughput on the 2-core reference machine (bench/results/train-cpu.md, d4,
# 1 thread: 1,379 tok/s; the tier runs 2 threads): only for --dry-run before any run has been measured.
CPU_TOK_PER_S = 2000.0


@dataclass
class Tier:
    name: str
    depth: int
    vocab_size: int
    max_seq_len: int
    device_batch_size: int
    base: list[str]  # extra train.base flags (horizon, batch, eval cadence)
    mid: list[str]
    sft: list[str]
    rl: list[str]
    base_eval: list[str]
    chat_eval: list[str]
    rl_eval: list[str]
    tok_max_chars: int | None = None
    num_shards: int = 0  # pretraining parquet shards to download (0: the offline corpus)
    first_shards: int = 8  # downloaded before the tokenizer trains
    run_rl: bool = True
    model_dim: int | None = None  # None: 64 × depth (nanochat's dial); set for the tiny cpu model
    head_dim: int = 128

    @property
    def model_flags(self) -> list[str]:
        return (["--model-dim", str(self.model_dim)] if self.model_dim else []) + ["--head-dim", str(self.head_dim)]


def _gpu_tier(name: str, depth: int, dbs: int, num_shards: int) -> Tier:
    # d20 is nanochat's v0 recipe (Chinchilla ratio 20, 524,288-token batches); the bigger tiers take its HEAD
    # ratio of 8 and the auto batch.
    base = ["--target-param-data-ratio", "20", "--total-batch-size", "524288"] if name == "d20" else \
        ["--target-param-data-ratio", "8"]
    return Tier(name=name, depth=depth, vocab_size=65536, max_seq_len=2048, device_batch_size=dbs, base=base,
                mid=[], sft=[], rl=["--task", "gsm8k"], base_eval=["--core-bundle", "download"],
                chat_eval=[], rl_eval=["--tasks", "GSM8K"], tok_max_chars=2_000_000_000, num_shards=num_shards)


TIERS: dict[str, Tier] = {
    # The demonstration tier: offline data only, a 4-layer 256-wide model, minutes per stage on 2 CPU cores.
    "cpu": Tier(name="cpu", depth=4, vocab_size=8192, max_seq_len=256, device_batch_size=16,
                base=["--total-batch-size", "4096", "--num-iterations", "120", "--eval-every", "40",
                      "--eval-tokens", "16384", "--sample-every", "120", "--save-every", "40"],
                # 20,000 examples per synthetic task: they are most of what mid/SFT see, so the tiny model learns
                # the chat and tool-call format and some one-step arithmetic (measured: 16/128 one-step problems
                # after SFT against a best-guess chance of 5/128).
                mid=["--mixture", "offline", "--num-iterations", "60", "--eval-every", "30", "--eval-tokens", "65536",
                     "--synthetic-examples", "20000"],
                sft=["--mixture", "offline", "--num-iterations", "120", "--eval-every", "60", "--eval-tokens", "65536",
                     "--synthetic-examples", "20000"],
                # GRPO on one-step problems at temperature 0.7 and 1% of nanochat's LRs, λ scalars frozen: the tiny
                # SFT model solves a few, so groups carry a signal (at temperature 1 it solves none; at full LR it
                # collapses; with the scalars trained, Adam's ~LR-sized steps on them alone took one-step arithmetic
                # from 13/128 to 0/128, and restoring them gave 15/128).
                rl=["--task", "synthetic-1op", "--num-steps", "8", "--examples-per-step", "8", "--num-samples", "8",
                    "--max-new-tokens", "128", "--eval-every", "4", "--eval-examples", "32", "--eval-samples", "4",
                    "--temperature", "0.7", "--init-lr-frac", "0.01", "--scalar-lr", "0"],
                base_eval=["--core-bundle", "offline", "--max-per-task", "32", "--bpb-tokens", "16384"],
                # 32 problems per benchmark task (the generative ones cost seconds each on CPU); 256 generated
                # arithmetic questions (categorical, cheap) for the report's better-than-chance statement.
                chat_eval=["--max-problems", "32", "--problems", "synthetic-arithmetic-mc=256", "--problems",
                           "synthetic-arithmetic-1op=128", "--max-tokens", "128"],
                rl_eval=["--max-problems", "32", "--problems", "synthetic-arithmetic-mc=256", "--problems",
                         "synthetic-arithmetic-1op=128", "--max-tokens", "128"],
                model_dim=256, head_dim=64),
    # nanochat's v0 $100 run (d20, Chinchilla ratio 20, 11.2B tokens; 240 shards ≈ 24 GB).
    "d20": _gpu_tier("d20", 20, 32, 240),
    # Bigger tiers (nanochat's miniseries device batches: 16 for depth 20-27, 8 from 28).
    "d26": _gpu_tier("d26", 26, 16, 450),
    "d32": _gpu_tier("d32", 32, 8, 800),
}


def detect_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _command_key(cmd: list[str]) -> str:
    return hashlib.sha256(json.dumps(cmd).encode()).hexdigest()[:16]


class Speedrun:
    def __init__(self, tier: Tier, root: Path, gpus: int, python: str = sys.executable, log=print):
        self.tier, self.root, self.gpus, self.python, self.log = tier, root, gpus, python, log
        self.markers = root / "stages"

    # ---- commands --------------------------------------------------------------------------------------------
    def module(self, mod: str, *args: str, distributed: bool = False) -> list[str]:
        if distributed and self.gpus > 1:
            return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}",
                    "-m", mod, *args]
        return [self.python, "-m", mod, *args]

    def stages(self) -> list[str]:
        t = self.tier
        names = [s for s in ALL_STAGES if s != "download" or t.num_shards]
        if not t.run_rl:
            names = [s for s in names if s not in ("rl", "rl_eval")]
        return names

    def ckpt_of(self, stage: str) -> Path:
        return self.root / stage / "checkpoints"

    def command(self, stage: str) -> list[str]:
        t, r = self.tier, self.root
        tok, shards = str(r / "tokenizer"), str(r / "shards")
        data_dir = str(r / "data")
        parquet_dir = str(r / "data" / DATASETS["climbmix"].subdir)
        common_eval = ["--tokenizer", tok, "--run-root", str(r)]
        if stage == "download":
            return self.module("train.download", "-n", str(t.first_shards), "--base-dir", data_dir)
        if stage == "tokenizer":
            cmd = ["--vocab-size", str(t.vocab_size), "--out", tok, "--report-root", str(r)]
            if t.num_shards:
                cmd += ["--input", parquet_dir]
            if t.tok_max_chars:
                cmd += ["--max-chars", str(t.tok_max_chars)]
            return self.module("train.tok_train", *cmd)
        if stage == "tok_eval":
            return self.module("train.tok_eval", "--tokenizer", tok, "--out", str(r / "tok_eval.md"),
                               "--report-root", str(r))
        if stage == "shards":
            cmd = ["--tokenizer", tok, "--out", shards]
            if t.num_shards:
                cmd += ["--input", parquet_dir, "--val", "last-file"]
            return self.module("train.shards", *cmd)
        if stage == "base":
            return self.module("train.base", "--depth", str(t.depth), *t.model_flags, "--max-seq-len",
                               str(t.max_seq_len), "--device-batch-size", str(t.device_batch_size), *t.base,
                               "--data", shards, "--tokenizer", tok, "--run-dir", str(r / "base"),
                               distributed=True)
        if stage in ("mid", "sft"):  # they start from the newest checkpoint of base / mid in the same run root
            return self.module(f"train.{stage}", "--tokenizer", tok, "--run-dir", str(r / stage),
                               "--device-batch-size", str(t.device_batch_size), *getattr(t, stage),
                               distributed=True)
        if stage == "rl":
            return self.module("rlgrpo.grpo", "--from", str(self.ckpt_of("sft")), "--tokenizer", tok,
                               "--run-root", str(r), *t.rl, distributed=True)
        if stage.endswith("_eval") and stage != "tok_eval":
            src = stage.removesuffix("_eval")
            extra = {"base": t.base_eval + ["--shards", shards], "mid": t.chat_eval, "sft": t.chat_eval,
                     "rl": t.rl_eval}[src]
            return self.module("train.eval", "--stage", src, "--checkpoint", str(self.ckpt_of(src)), *common_eval,
                               *extra)
        if stage == "report":
            return self.module("train.report", "--run-root", str(r))
        raise KeyError(stage)

    # ---- markers ---------------------------------------------------------------------------------------------
    def marker(self, stage: str) -> dict | None:
        path = self.markers / f"{stage}.json"
        try:
            return json.loads(path.read_text("utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):  # a torn marker counts as "not done"
            return None

    def mark_done(self, stage: str, cmd: list[str], wall_s: float) -> None:
        self.markers.mkdir(parents=True, exist_ok=True)
        tmp = self.markers / f".{stage}.json.tmp"
        tmp.write_text(json.dumps({"command": cmd, "key": _command_key(cmd), "wall_s": wall_s,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}), "utf-8")
        os.replace(tmp, self.markers / f"{stage}.json")

    def forget(self, stage: str) -> None:
        """Delete a stage's marker, its outputs and its report record (for --from and for changed commands)."""
        (self.markers / f"{stage}.json").unlink(missing_ok=True)
        outputs = {"tokenizer": ["tokenizer"], "tok_eval": ["tok_eval.md"], "shards": ["shards"], "base": ["base"],
                   "mid": ["mid"], "sft": ["sft"], "rl": ["rl"], "report": ["report.md"]}.get(stage, [])
        for name in outputs:
            p = self.root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        record = {"tokenizer": "tokenizer", "tok_eval": None, "base": "base", "mid": "mid", "sft": "sft",
                  "rl": "rl"}.get(stage)
        if record:
            (report_dir(self.root) / f"{record}.json").unlink(missing_ok=True)

    # ---- running ---------------------------------------------------------------------------------------------
    def resume_flag(self, stage: str) -> list[str]:
        ckpts = self.ckpt_of(stage)
        return ["--resume"] if latest_checkpoint(ckpts) is not None else []

    def run(self, from_stage: str | None = None) -> None:
        names = self.stages()
        if from_stage is not None:
            if from_stage not in names:
                raise SystemExit(f"--from {from_stage}: not a stage of tier {self.tier.name} ({', '.join(names)})")
            for s in names[names.index(from_stage):]:
                self.forget(s)
        self.root.mkdir(parents=True, exist_ok=True)
        header = json.loads(record_run(self.root, tier=self.tier.name, gpus=self.gpus).read_text("utf-8"))
        # Wall time per stage command, kept across runs (a resumed run adds the stages it ran; --from forgets).
        self.stage_seconds = {k: v for k, v in (header.get("stage_seconds") or {}).items() if self.marker(k)}
        background = None
        invalidated = False
        t_start = time.perf_counter()
        for stage in names:
            cmd = self.command(stage)
            done = self.marker(stage)
            if done is not None and done.get("key") == _command_key(cmd) and not invalidated:
                self.log(f"stage {stage}: done already ({done.get('finished')}), skipping")
                continue
            if done is not None:  # a finished stage whose command changed: it and all later stages re-run
                self.log(f"stage {stage}: " + ("an earlier stage ran again; so does this one" if invalidated else
                                               "its command changed since it ran; running it again (and every "
                                               "later stage)"))
                self.forget(stage)
                invalidated = True
            if stage == "tokenizer" and self.tier.num_shards and background is None:
                # nanochat: the rest of the pretraining shards download while the tokenizer trains.
                bg = self.module("train.download", "-n", str(self.tier.num_shards), "--base-dir",
                                 str(self.root / "data"))
                self.log(f"background: {' '.join(bg)}")
                background = subprocess.Popen(bg)
            if stage == "shards" and background is not None:
                self.log("waiting for the background download")
                if background.wait() != 0:
                    raise SystemExit(f"the background download failed (exit {background.returncode})")
            run_cmd = cmd + (self.resume_flag(stage) if stage in ("base", "mid", "sft", "rl") else [])
            self.log(f"stage {stage}: {' '.join(run_cmd)}")
            t0 = time.perf_counter()
            proc = subprocess.run(run_cmd)
            if proc.returncode != 0:
                raise SystemExit(f"stage {stage} failed (exit {proc.returncode}); fix the cause and run the same "
                                 f"command again: finished stages are skipped, training resumes from its checkpoint")
            wall = time.perf_counter() - t0
            self.mark_done(stage, cmd, wall)
            self.stage_seconds[stage] = wall
            record_run(self.root, stage_seconds=self.stage_seconds)
        record_run(self.root, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_report(self.root)
        self.log(f"all stages done in {time.perf_counter() - t_start:.0f} s; report: {self.root / 'report.md'}")
        final = self.root / ("rl" if "rl" in names else "sft")
        tok = self.root / "tokenizer"
        self.log(f"chat with it in the terminal: .venv/bin/python -m infer.cli --checkpoint {final} --tokenizer {tok}")
        self.log(f"or in the browser: .venv/bin/python -m infer.server --checkpoint {final} --tokenizer {tok}  "
                 f"(then open http://127.0.0.1:8000)")

    # ---- the plan --------------------------------------------------------------------------------------------
    def plan(self) -> list[str]:
        from train.schedule import plan_training

        t = self.tier
        overrides = {"model_dim": t.model_dim} if t.model_dim else {}
        cfg = ModelConfig.for_depth(t.depth, head_dim=t.head_dim, vocab_size=t.vocab_size, sequence_len=t.max_seq_len,
                                    **overrides)
        world = max(self.gpus, 1)
        flags = dict(zip(t.base[::2], t.base[1::2]))
        p = plan_training(cfg, num_iterations=int(flags["--num-iterations"]) if "--num-iterations" in flags else None,
                          ratio=float(flags.get("--target-param-data-ratio", 8)),
                          batch_tokens=int(flags["--total-batch-size"]) if "--total-batch-size" in flags else None,
                          device_batch_size=t.device_batch_size, world_size=world)
        flops = p.num_tokens * cfg.flops_per_token()
        if self.gpus:
            est = flops / (self.gpus * H100_PEAK_FLOPS * ASSUMED_MFU)
            how = f"{self.gpus} GPUs × 989 TFLOP/s (H100 bf16 dense) × assumed MFU {ASSUMED_MFU:.0%}"
        else:
            tps, how = self.measured_cpu_tok_per_s()
            est = p.num_tokens / tps
        lines = [f"tier {t.name}: {cfg.summary()}", f"run root {self.root}; GPUs: {self.gpus or 'none'}",
                 f"base: {p.num_iterations:,} steps × {p.batch_tokens:,} tokens = {p.num_tokens:,} tokens "
                 f"({p.num_tokens / cfg.num_scaling_params():.1f} per scaling parameter), {flops:.3g} FLOPs; "
                 f"estimated {est / 60:.1f} min ({how})", "stages:"]
        for s in self.stages():
            state = "done" if self.marker(s) else "to run"
            lines.append(f"  {s:<9} [{state}] {' '.join(self.command(s))}")
        return lines

    def measured_cpu_tok_per_s(self) -> tuple[float, str]:
        metrics = self.root / "base" / "metrics.jsonl"
        if metrics.exists():
            rates = [r["tok_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "tok_per_s" in r]
            if len(rates) > 2:
                rates = sorted(rates[1:])
                return rates[len(rates) // 2], f"median {rates[len(rates) // 2]:,.0f} tok/s measured in {metrics}"
        return CPU_TOK_PER_S, f"{CPU_TOK_PER_S:,.0f} tok/s, the reference machine's (no run measured yet)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the whole pipeline; finished stages are skipped.")
    p.add_argument("--tier", choices=sorted(TIERS), default=None, help="default: d20 with GPUs, else cpu")
    p.add_argument("--depth", type=int, default=None, help="any depth, with the tier's recipe (a GPU tier by default)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all that torch sees)")
    p.add_argument("--from", dest="from_stage", choices=ALL_STAGES, default=None,
                   help="forget this stage and every later one, then run from here")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-rl", action="store_true", help="leave out the GRPO stage")
    p.add_argument("--base-dir", default=None, help="default $FLASHCHAT_BASE_DIR or ~/.cache/flashchat")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gpus = detect_gpus() if args.gpus is None else args.gpus
    name = args.tier or ("d20" if gpus else "cpu")
    tier = dataclasses.replace(TIERS[name])
    if args.depth is not None:
        tier = dataclasses.replace(tier, name=f"{name}-d{args.depth}" if name == "cpu" else f"d{args.depth}",
                                   depth=args.depth)
    if args.no_rl:
        tier.run_rl = False
    base = Path(args.base_dir) if args.base_dir else cache_dir()
    run = Speedrun(tier, base / tier.name, gpus, log=lambda m: print(f"[speedrun {time.strftime('%H:%M:%S')}] {m}",
                                                                    flush=True))
    if args.dry_run:
        print("\n".join(run.plan()))
        return
    run.run(args.from_stage)


if __name__ == "__main__":
    main()
