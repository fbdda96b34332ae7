"""The run report: every stage records its numbers as JSON; report.md is rendered from those files at any time.

    from train.report import record_stage, load_stages
    record_stage(run_root, "mid", wall_s=812.0, metrics={"val_bpb": 0.71}, config={"steps": 500})
    record_stage(run_root, "sft", summary={"ARC-Easy": 0.38, "ChatCORE": 0.09}, timings={"ARC-Easy": 12.4})

`run_root` is the directory of one run (the tier's directory: tokenizer/, base/, mid/, sft/, rl/ live in it);
each stage's record is `<run_root>/report/<stage>.json`. A second call for the same stage merges into the record
(an evaluation adds its numbers to the stage it evaluated): dicts are updated key by key, notes are appended once,
`wall_s` adds up. Writes are atomic (tmp file, fsync, rename), so a crash never leaves half a record.

Record fields: stage, wall_s (seconds the stage took, evaluations included), metrics (name → number: anything the
stage measured), summary (the numbers of the Metric × Stage table, by the canonical names in SUMMARY_METRICS),
timings (evaluation wall time per task, seconds), config (what the stage ran with), notes (free text, e.g. that a
task is the project's synthetic one, never the real benchmark), hardware (filled in on first write), updated.
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


def load_stage(run_root: str | os.PathLike, stage: str) -> dict | None:
    path = report_dir(run_root) / f"{stage}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and re-run the stage") from e


def load_stages(run_root: str | os.PathLike) -> dict[str, dict]:
    """Every stage record of the run, pipeline stages first (STAGES order), then any others by name."""
    d = report_dir(run_root)
    names = sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []
    order = [s for s in STAGES if s in names] + [s for s in names if s not in STAGES]
    return {s: load_stage(run_root, s) for s in order}


def record_stage(run_root: str | os.PathLike, stage: str, *, wall_s: float | None = None,
                 metrics: Mapping | None = None, summary: Mapping | None = None, timings: Mapping | None = None,
                 config: Mapping | None = None, notes: Sequence[str] = ()) -> Path:
    """Create or merge `<run_root>/report/<stage>.json`; returns its path."""
    if not stage or "/" in stage or stage.startswith("."):
        raise ValueError(f"bad stage name {stage!r}")
    unknown = sorted(set(summary or ()) - set(SUMMARY_METRICS))
    if unknown:
        raise ValueError(f"summary metrics must be among {SUMMARY_METRICS}, got {unknown}")
    rec = load_stage(run_root, stage) or {"stage": stage, "wall_s": 0.0, "metrics": {}, "summary": {},
                                            "timings": {}, "config": {}, "notes": [],
                                            "hardware": hardware_info()}
    if wall_s is not None:
        if wall_s < 0:
            raise ValueError(f"wall_s must be ≥ 0, got {wall_s}")
        rec["wall_s"] = float(rec.get("wall_s", 0.0)) + float(wall_s)
    rec["metrics"].update(_check_numbers("metrics", metrics or {}))
    rec["summary"].update(_check_numbers("summary", summary or {}))
    rec["timings"].update(_check_numbers("timings", timings or {}))
    rec["config"].update(json.loads(json.dumps(dict(config or {}), default=str)))
    for n in notes:
        if n not in rec["notes"]:
            rec["notes"].append(n)
    rec["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    d = report_dir(run_root)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{stage}.json"
    tmp = d / f".{stage}.json.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(d)
    return path
