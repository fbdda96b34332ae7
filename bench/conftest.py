"""The benches' set-up, plus a regression check against committed per-device baselines.

Set-up: the test suite's (TRITON_INTERPRET=1 without a GPU, `gpu` tests skipped without one).

Baselines: bench/results/baselines/<device-slug>/baseline.json, one per device (`device_slug()`: the GPU's name,
or "cpu-<model>-<N>core"), holding per entry (pytest node id) its median seconds and the throughput numbers its
extra_info carries (METRICS). Options (all off by default: a plain `pytest bench/` only measures):

    pytest bench/ --bench-save-baseline            # write this device's baseline from this run
    pytest bench/ --bench-compare                  # fail on a > 5% regression against it (--benchmark-compare,
                                                   # pytest-benchmark's flag, does the same here)
    pytest bench/ --bench-compare --bench-compare-ratios-only    # same-session ratios only: for noisy machines
    pytest bench/ --bench-compare --bench-tolerance 0.10         # another threshold

What is compared, per entry present in both runs: each METRICS key both have (higher or lower is better, as the
table says); an entry with none of them compares its median time. `--bench-compare-ratios-only` keeps the
dimensionless keys measured against another entry of the same session (RATIO_KEYS: engine vs baseline, FSDP vs
eager, world 2 vs 1, kernel vs compiled twin): both sides of those ran on the same machine minutes apart, so
another process stealing a core moves them much less than absolute times. Entries or metrics missing on one side
are listed, not failed (a new bench has no baseline yet). Only the same device slug is compared, never across.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import pytest

from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (importing it also sets TRITON_INTERPRET)

BASELINES = Path(__file__).resolve().parent / "results" / "baselines"
# extra_info key -> +1 if higher is better, -1 if lower is better.
METRICS = {
    "gen_tok_per_s": +1, "tok_per_s": +1, "MB_per_s": +1, "GB_per_s": +1, "TFLOPs": +1, "TFLOP_s": +1, "MFU": +1,
    "vs_baseline": +1, "vs_one_at_a_time": +1, "x_vs_compiled": +1, "vs_eager": -1, "vs_world1": -1,
    "step_ms": -1, "ttft_p50_ms": -1, "itl_p50_ms": -1, "ms_per_op": -1, "us_per_op": -1, "ms_per_call": -1,
}
RATIO_KEYS = ("vs_baseline", "vs_one_at_a_time", "x_vs_compiled", "vs_eager", "vs_world1")


def pytest_addoption(parser):
    g = parser.getgroup("flashchat bench baselines")
    g.addoption("--bench-save-baseline", action="store_true",
                help="write bench/results/baselines/<device>/baseline.json from this run")
    g.addoption("--bench-compare", action="store_true",
                help="compare with this device's committed baseline; fail on a regression over --bench-tolerance")
    g.addoption("--bench-compare-ratios-only", action="store_true",
                help="compare only same-session ratios (vs_baseline, vs_eager, ...): stable on a busy machine")
    g.addoption("--bench-tolerance", type=float, default=0.05,
                help="allowed regression as a fraction (default 0.05 = 5%%)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-benchmark's own `--benchmark-compare` looks for its saved runs in .benchmarks/; here it means ours:
    # the committed per-device baseline (before pytest-benchmark's plugin reads the option).
    if getattr(config.option, "benchmark_compare", False):
        config.option.benchmark_compare = False
        config.option.bench_compare = True


def device_slug() -> str:
    """'nvidia-h100-80gb-hbm3' on a GPU, 'cpu-amd-epyc-7b13-2core' without one: where baselines are filed."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        model = re.sub(r"\b(processor|cpu|\d+-core)\b", "", model, flags=re.I)
        name = f"cpu {model} {os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def collect(session) -> dict[str, dict]:
    """node id -> {"median_s", "group", "metrics"} for every entry that produced stats in this session."""
    bs = getattr(session.config, "_benchmarksession", None)
    out = {}
    for bench in getattr(bs, "benchmarks", []) or []:
        if bench.has_error or bench.stats is None:
            continue
        metrics = {k: float(v) for k, v in bench.extra_info.items()
                   if k in METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[bench.fullname] = dict(median_s=bench.stats.median, group=bench.group, metrics=metrics)
    return out


def compare(baseline: dict[str, dict], current: dict[str, dict], tolerance: float,
            ratios_only: bool) -> tuple[list[str], list[str]]:
    """(regressions, notes) as printable lines. A metric regresses when it is worse than the baseline's by more
    than `tolerance` (relative), in the direction METRICS gives; median time counts as lower-is-better."""
    regressions, notes = [], []
    missing = [name for name in baseline if name not in current]
    if missing:  # a partial run (one file, -k): say how many, not which
        notes.append(f"{len(missing)} baseline entries were not run this time")
    for name in sorted(current):
        if name not in baseline:
            notes.append(f"no baseline yet: {name}")
            continue
        old, new = baseline[name]["metrics"], current[name]["metrics"]
        keys = [k for k in old if k in new and (not ratios_only or k in RATIO_KEYS)]
        pairs = [(k, old[k], new[k], METRICS[k]) for k in keys]
        if not keys and not ratios_only:
            pairs = [("median_s", baseline[name]["median_s"], current[name]["median_s"], -1)]
        for key, was, now, sign in pairs:
            if was <= 0:
                continue
            change = (now - was) / was * sign  # > 0 better, < 0 worse
            if change < -tolerance:
                regressions.append(f"{name} {key}: {was:.4g} -> {now:.4g} ({-change:.1%} worse)")
    return regressions, notes


def pytest_sessionfinish(session, exitstatus):
    cfg = session.config
    save, check = cfg.getoption("--bench-save-baseline"), cfg.getoption("--bench-compare")
    if not (save or check):
        return
    slug = device_slug()
    path = BASELINES / slug / "baseline.json"
    current = collect(session)
    lines = []
    if check:
        if not path.exists():
            lines.append(f"bench baselines: none for device '{slug}' at {path}; nothing compared")
        else:
            baseline = json.loads(path.read_text())["entries"]
            tol = cfg.getoption("--bench-tolerance")
            regressions, notes = compare(baseline, current, tol, cfg.getoption("--bench-compare-ratios-only"))
            lines += notes
            if regressions:
                lines.append(f"bench baselines: {len(regressions)} regression(s) over {tol:.0%} on '{slug}':")
                lines += ["  " + r for r in regressions]
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            else:
                lines.append(f"bench baselines: no regression over {tol:.0%} against {path}")
    if save:
        if exitstatus != 0 or not current:
            lines.append("bench baselines: not saved (the run failed or measured nothing)")
        else:
            previous = json.loads(path.read_text())["entries"] if path.exists() else {}
            previous.update(current)  # a partial run (one file) refreshes only its own entries
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"device": slug, "entries": previous}, indent=1, sort_keys=True) + "\n")
            tmp.replace(path)
            lines.append(f"bench baselines: saved {len(current)} entries to {path}")
    cfg._flashchat_bench_lines = lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in getattr(config, "_flashchat_bench_lines", []):
        terminalreporter.write_line(line)
