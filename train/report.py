"""The run report: every stage records its numbers as JSON; report.md is rendered from those files at any time.

    from train.report import record_stage, load_stages
    record_stage(run_root, "mid", wall_s=812.0, metrics={"val_bpb": 0.71}, config={"steps": 500})
    record_stage(run_root, "sft", summary={"ARC-Easy": 0.38, "ChatCORE": 0.09}, timings={"ARC-Easy": 12.4},
                 source="eval")

`run_root` is the directory of one run (the tier's directory: tokenizer/, base/, mid/, sft/, rl/ live in it);
each stage's record is `<run_root>/report/<stage>.json`, with one part per source: "train" (the stage's own
command) and "eval" (train.eval on its checkpoint). A second call from the same source replaces that part (a
re-run evaluation replaces its numbers); `load_stage` merges the parts into one view (dicts updated, notes once,
`wall_s` summed). Writes are atomic (tmp file, fsync, rename), so a crash never leaves half a record.

Record fields: stage, wall_s (seconds the stage took, evaluations included), metrics (name → number: anything the
stage measured), summary (the numbers of the Metric × Stage table, by the canonical names in SUMMARY_METRICS),
timings (evaluation wall time per task, seconds), config (what the stage ran with), notes (free text, e.g. that a
task is the project's synthetic one, never the real benchmark), hardware (filled in on first write), updated.

The run header (`record_run`: start time, tier, git commit, software and hardware) lives in `report/_run.json`.
`python -m train.report --run-root DIR` renders `DIR/report.md`: header, a Metric × Stage summary table (nanochat's
rows: CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, ChatCORE), total wall clock, a cost estimate (per-GPU
hourly prices by GPU name, or --hourly-price), then one section per stage with its metrics, eval timings, notes and
configuration. Limits: the total is the sum of the speedrun's stage commands (`stage_seconds` in the run header),
or of the stages' own records when they ran by hand; set-up outside a stage is not counted; the cost of a CPU
run is only estimated when a price is given.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

from model.fsutil import fsync_path

# Stages in pipeline order (the report's sections and the summary table's columns follow it).
STAGES = ("tokenizer", "base", "mid", "sft", "rl")
# Rows of the summary table, nanochat's report order.
SUMMARY_METRICS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE")


def report_dir(run_root: str | os.PathLike) -> Path:
    return Path(run_root) / "report"


def hardware_info() -> dict:
    """What ran the stage: host, CPU count, GPUs (name, count) when torch sees CUDA, versions."""
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = torch.cuda.device_count()
            info["gpu_name"] = torch.cuda.get_device_name(0)
    except ImportError:  # the report can be rendered without torch
        pass
    return info


def _check_numbers(what: str, d: Mapping) -> dict:
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise TypeError(f"{what}: keys must be strings, got {k!r}")
        if v is not None and not isinstance(v, (int, float)):
            raise TypeError(f"{what}[{k!r}] must be a number or None, got {type(v).__name__}")
        out[k] = v
    return out


_PART_DICTS = ("metrics", "summary", "timings", "config")


def _read_record(run_root: str | os.PathLike, stage: str) -> dict | None:
    path = report_dir(run_root) / f"{stage}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and re-run the stage") from e
    if not isinstance(rec, dict) or not isinstance(rec.get("sources"), dict):
        raise ValueError(f"{path} is not a stage record of this version (no 'sources'); delete it and re-run")
    return rec


def load_stage(run_root: str | os.PathLike, stage: str) -> dict | None:
    """The stage's record as one view: its sources (training, evaluation) merged in the order they were first
    recorded — dicts updated, notes concatenated once, wall_s summed."""
    rec = _read_record(run_root, stage)
    if rec is None:
        return None
    view = {"stage": stage, "hardware": rec.get("hardware", {}), "updated": rec.get("updated"), "wall_s": 0.0,
            "notes": [], **{k: {} for k in _PART_DICTS}}
    for part in rec["sources"].values():
        view["wall_s"] += float(part.get("wall_s", 0.0))
        for k in _PART_DICTS:
            view[k].update(part.get(k, {}))
        view["notes"] += [n for n in part.get("notes", []) if n not in view["notes"]]
    return view


def load_stages(run_root: str | os.PathLike) -> dict[str, dict]:
    """Every stage record of the run, pipeline stages first (STAGES order), then any others by name."""
    d = report_dir(run_root)
    names = sorted(p.stem for p in d.glob("*.json") if not p.stem.startswith("_")) if d.is_dir() else []
    order = [s for s in STAGES if s in names] + [s for s in names if s not in STAGES]
    return {s: load_stage(run_root, s) for s in order}


def record_stage(run_root: str | os.PathLike, stage: str, *, wall_s: float | None = None,
                 metrics: Mapping | None = None, summary: Mapping | None = None, timings: Mapping | None = None,
                 config: Mapping | None = None, notes: Sequence[str] = (), source: str = "train") -> Path:
    """Record what `source` ("train": the stage's own command; "eval": train.eval on its checkpoint) measured for
    `stage` in `<run_root>/report/<stage>.json`, replacing that source's earlier record (a re-run evaluation
    replaces its numbers, never adds to them) and keeping the other sources'. Returns the file's path."""
    if not stage or "/" in stage or stage.startswith("."):
        raise ValueError(f"bad stage name {stage!r}")
    unknown = sorted(set(summary or ()) - set(SUMMARY_METRICS))
    if unknown:
        raise ValueError(f"summary metrics must be among {SUMMARY_METRICS}, got {unknown}")
    if wall_s is not None and wall_s < 0:
        raise ValueError(f"wall_s must be ≥ 0, got {wall_s}")
    part = {"wall_s": float(wall_s or 0.0), "metrics": _check_numbers("metrics", metrics or {}),
            "summary": _check_numbers("summary", summary or {}), "timings": _check_numbers("timings", timings or {}),
            "config": json.loads(json.dumps(dict(config or {}), default=str)), "notes": list(dict.fromkeys(notes))}
    rec = _read_record(run_root, stage) or {"stage": stage, "hardware": hardware_info(), "sources": {}}
    rec["sources"][source] = part
    rec["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    d = report_dir(run_root)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{stage}.json"
    tmp = d / f".{stage}.json.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(d)
    return path


# ---- the run header and report.md -------------------------------------------------------------------------------
# Per-GPU hourly prices for the cost estimate (nanochat's report used the same defaults); --hourly-price overrides.
GPU_HOURLY_USD = (("H100", 3.00), ("H200", 3.50), ("A100", 1.79), ("V100", 0.55))
DEFAULT_GPU_HOURLY_USD = 2.00
STAGE_TITLES = {"tokenizer": "Tokenizer", "base": "Base model", "mid": "Mid-training", "sft": "SFT", "rl": "RL (GRPO)"}


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def software_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "numpy", "bpe_rs", "flash-attn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def record_run(run_root: str | os.PathLike, **info) -> Path:
    """Write the run header (`report/_run.json`) once per run: start time, tier, git commit, software; later calls
    merge `info` (e.g. `finished=...`) without moving the start time."""
    d = report_dir(run_root)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "_run.json"
    rec = json.loads(path.read_text("utf-8")) if path.exists() else {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
        "software": software_versions(), "hardware": hardware_info()}
    rec.update(json.loads(json.dumps(info, default=str)))
    tmp = d / f"._run.json.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(rec, indent=1), "utf-8")  # insertion order: stage_seconds stays in pipeline order
    os.replace(tmp, path)
    return path


def hourly_price(hardware: dict, override: float | None) -> float | None:
    """USD per hour of the machine: the override, else GPUs × the per-GPU price of their name; None on a CPU box."""
    if override is not None:
        return override
    n = hardware.get("gpus") or 0
    if not n:
        return None
    name = hardware.get("gpu_name", "")
    per_gpu = next((p for key, p in GPU_HOURLY_USD if key in name), DEFAULT_GPU_HOURLY_USD)
    return n * per_gpu


def fmt_value(v) -> str:
    """Floats with 4 decimals, big ints with thousands separators (nanochat's report style)."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 10_000 else f"{v:.4f}"
    return str(v)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_report(run_root: str | os.PathLike, hourly_usd: float | None = None) -> str:
    """report.md for the run at `run_root`, from its stage records (any subset of the stages may exist)."""
    root = Path(run_root)
    stages = {k: v for k, v in load_stages(root).items() if not k.startswith("_")}
    run_path = report_dir(root) / "_run.json"
    run = json.loads(run_path.read_text("utf-8")) if run_path.exists() else {}
    hw = run.get("hardware") or next((s.get("hardware") for s in stages.values() if s.get("hardware")), {}) or {}
    lines = [f"# flashchat run report: {run.get('tier', root.name)}", ""]
    lines += [f"- Run directory: `{root}`", f"- Started: {run.get('started', 'unknown')}"]
    if run.get("git_commit"):
        lines.append(f"- Git commit: `{run['git_commit']}`{' (uncommitted changes)' if run.get('git_dirty') else ''}")
    gpus = f"{hw['gpus']} × {hw.get('gpu_name', 'GPU')}" if hw.get("gpus") else "none"
    lines += [f"- Hardware: {hw.get('cpus', '?')} CPUs, GPUs: {gpus}, host {hw.get('host', '?')} "
              f"({hw.get('platform', '?')})"]
    sw = run.get("software") or software_versions()
    lines += ["- Software: " + ", ".join(f"{k} {v}" for k, v in sw.items()), ""]

    # Summary table: Metric × Stage, nanochat's order, only the stages that exist.
    cols = [s for s in STAGES if s in stages and s != "tokenizer"]
    if cols:
        lines += ["## Summary", ""]
        rows = [[m] + [fmt_value(stages[s]["summary"].get(m)) for s in cols] for m in SUMMARY_METRICS
                if any(m in stages[s]["summary"] for s in cols)]
        lines += _table(["Metric"] + [s.upper() for s in cols], rows) if rows else ["(no evaluation numbers yet)"]
        lines.append("")
    # The speedrun times every stage's whole command (start-up, training, evaluation); without it (stages run by
    # hand) the total is the sum of the times the stages recorded themselves.
    stage_seconds = run.get("stage_seconds") or {}
    if stage_seconds:
        total = sum(stage_seconds.values())
        lines += ["- Total wall clock: " + fmt_seconds(total) + " (" + ", ".join(
            f"{k} {fmt_seconds(v)}" for k, v in stage_seconds.items()) + ")"]
    else:
        total = sum(float(s.get("wall_s", 0.0)) for s in stages.values())
        lines += [f"- Total wall clock (sum of the stages' own records): {fmt_seconds(total)}"]
    price = hourly_price(hw, hourly_usd)
    if price is None:
        lines += ["- Cost estimate: n/a on a CPU machine (pass --hourly-price to estimate one)"]
    else:
        lines += [f"- Cost estimate: ${price * total / 3600:,.2f} at ${price:,.2f}/h"]
    lines.append("")

    for name, rec in stages.items():
        lines += [f"## {STAGE_TITLES.get(name, name)}", "", f"- Wall time: {fmt_seconds(float(rec.get('wall_s', 0)))}"]
        if rec.get("updated"):
            lines.append(f"- Recorded: {rec['updated']}")
        for note in rec.get("notes", []):
            lines.append(f"- Note: {note}")
        lines.append("")
        numbers = {**rec.get("metrics", {}), **rec.get("summary", {})}
        if numbers:
            lines += _table(["Metric", "Value"], [[k, fmt_value(v)] for k, v in numbers.items()]) + [""]
        if rec.get("timings"):
            lines += _table(["Evaluation", "Wall time (s)"],
                            [[k, f"{v:.1f}"] for k, v in rec["timings"].items()]) + [""]
        if rec.get("config"):
            cfg = ", ".join(f"{k}={v}" for k, v in rec["config"].items())
            lines += [f"<details><summary>Configuration</summary>\n\n{cfg}\n\n</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_root: str | os.PathLike, out: str | os.PathLike | None = None,
                 hourly_usd: float | None = None) -> Path:
    out = Path(out) if out else Path(run_root) / "report.md"
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.write_text(render_report(run_root, hourly_usd), "utf-8")
    os.replace(tmp, out)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    import argparse

    p = argparse.ArgumentParser(description="Render report.md from a run's stage records (at any time).")
    p.add_argument("--run-root", required=True, help="the run's directory (holds report/*.json)")
    p.add_argument("--out", default=None, help="default <run-root>/report.md")
    p.add_argument("--hourly-price", type=float, default=None,
                   help="USD per hour of the whole machine for the cost estimate (default: by GPU type; none on CPU)")
    args = p.parse_args(argv)
    if not report_dir(args.run_root).is_dir():
        raise SystemExit(f"{args.run_root} has no report/ directory: no stage has recorded anything yet")
    path = write_report(args.run_root, args.out, args.hourly_price)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
