"""Prometheus metrics of the server, in the text exposition format (version 0.0.4), with no client library.

    metrics = ServerMetrics()
    metrics.on_first_token(ttft_s); metrics.on_token(gap_s); metrics.on_finish("stop", prompt_tokens=12, completion_tokens=30)
    text = metrics.render(engine)       # GET /metrics; gauges are read from the engine at scrape time

Names follow serving conventions §1.6 (vLLM's set, `infer_` prefix):
    infer_requests_running / infer_requests_waiting      gauges: the scheduler's running and waiting sequences
    infer_kv_blocks_used / infer_kv_blocks_total         gauges: the paged KV pool (used includes prefix-cached
                                                         blocks that a live sequence holds; evictable ones are free)
    infer_prompt_tokens_total, infer_generation_tokens_total   counters (per finished request)
    infer_requests_total{finish_reason="stop|length|abort|error"}   counter
    infer_ttft_seconds, infer_itl_seconds, infer_e2e_seconds    histograms (cumulative buckets, _sum, _count)

Limits: one process (no multi-process aggregation); the gauges are read from the engine thread's structures
without its lock — a scrape may see a step half done, which is fine for a gauge; counters and histograms are
updated on the event loop's thread only (no lock needed there).
"""

from __future__ import annotations

import bisect
import math

# Latency buckets in seconds: TTFT spans queueing + prefill (ms to tens of s under load); ITL is one engine step.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


def _fmt(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


class Histogram:
    """Cumulative-bucket histogram: `observe(v)` counts v in every bucket whose upper bound is >= v."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        if list(buckets) != sorted(buckets) or len(set(buckets)) != len(buckets):
            raise ValueError(f"histogram {name}: buckets must be strictly increasing, got {buckets}")
        self.name, self.help, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last slot is the +Inf overflow
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets + (math.inf,), self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Everything GET /metrics reports. Update from the event loop; `render(engine)` for a scrape."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = {r: 0 for r in FINISH_REASONS}
        self.ttft = Histogram("infer_ttft_seconds", "Time from request arrival to its first generated token.",
                              TTFT_BUCKETS)
        self.itl = Histogram("infer_itl_seconds", "Time between consecutive generated tokens of one request.",
                             ITL_BUCKETS)
        self.e2e = Histogram("infer_e2e_seconds", "Time from request arrival to its end.", E2E_BUCKETS)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token(self, gap_s: float) -> None:
        self.itl.observe(gap_s)

    def on_finish(self, reason: str, *, prompt_tokens: int, completion_tokens: int, total_s: float) -> None:
        if reason not in self.requests:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        self.requests[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        self.e2e.observe(total_s)

    def render(self, engine=None) -> str:
        """The exposition text. `engine` (an infer.engine.Engine, or None while the model loads) feeds the gauges."""
        lines: list[str] = []

        def scalar(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_fmt(value)}"])

        sched = engine.scheduler if engine is not None else None
        bm = engine.block_manager if engine is not None else None
        scalar("infer_requests_running", "gauge", "Sequences the scheduler is running.",
               sched.num_running if sched else 0)
        scalar("infer_requests_waiting", "gauge", "Sequences waiting (new or preempted).",
               sched.num_waiting if sched else 0)
        scalar("infer_kv_blocks_used", "gauge", "KV cache blocks held by live sequences.",
               bm.num_used_blocks if bm else 0)
        scalar("infer_kv_blocks_total", "gauge", "KV cache blocks in the pool.", bm.num_blocks if bm else 0)
        scalar("infer_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
        scalar("infer_generation_tokens_total", "counter", "Generated tokens of finished requests.",
               self.generation_tokens)
        lines += ["# HELP infer_requests_total Finished requests by finish reason.",
                  "# TYPE infer_requests_total counter"]
        lines += [f'infer_requests_total{{finish_reason="{r}"}} {n}' for r, n in self.requests.items()]
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"
