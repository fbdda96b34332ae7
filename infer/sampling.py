"""Sampling: validated per-request parameters, one batched draw on the device, and when a sequence stops.

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1234, stop=["\\n\\nUser:"], max_tokens=256)
    seed = resolve_seed(params)                                    # once per request; the engine keeps it
    tokens, logprobs = sample(logits, [params, ...], seeds=[seed, ...], steps=[num_generated, ...])
    checker = StopChecker(params, IncrementalDetokenizer(tok), eos_token_ids=[tok.special_id("<|assistant_end|>")])
    delta, finish_reason = checker.push(token_id)                 # text safe to stream; "stop" / "length" / None

Processing order (HF's logits-warper order): temperature → top-k → top-p → min-p → draw. Temperature 0 is greedy
(argmax of the raw logits; no other knob applies). Every filter is a *value threshold* on the temperature-scaled
logits, so tokens tied with the last kept value are all kept (top-k=2 over [3, 1, 1] keeps three tokens). That
makes the kept set a function of the row's values alone — not of sort stability, nor of which code path the
batch-mates forced (a full sort when any row uses top-p, `torch.topk` when only top-k is used).

Seeding — counter-based, one uniform per row. Every sampled row draws its token by inverse CDF over its processed
distribution with u = hash(seed, step), a 32-bit integer hash computed on the device for the whole batch at once
(no torch.Generator, no Python loop over rows). `step` is the index of the token being generated in its request
(0 for the first). Consequences:
  - a request's draw depends only on (its logits row, its params, seed, step): the same request gives the same
    tokens alone, batched, in any batch order, after preemption + recompute, and in another process;
  - u is bit-identical on CPU and GPU (integer ops); the *logits* are not, nor are they batch-invariant on GPU
    (matmul reduction order depends on the batch), so end-to-end reproducibility across batch shapes on GPU needs
    a batch-invariant model path too (vllm#1595, #17524) — this module only guarantees its own part;
  - unseeded requests are given a random 64-bit seed by `resolve_seed` when they are added, which makes every
    request replayable from its logged seed;
  - two requests with the same seed draw the same u at the same step (like any seeded RNG); for n samples of
    one prompt (GRPO) give each its own seed, e.g. base_seed + sample_index.
Why not Gumbel-max with per-(seed, step, v) noise: it needs V hashes per row, ~15 int64 passes over (B, V); on
a 2-core CPU the noise alone took 190 ms for B=64, V=65536; a whole temperature-only `sample` now takes 22 ms
(top-p: 260 ms, the full sort dominates on CPU).
Resolution: u has 23 bits and the CDF is fp32, so a token whose processed probability is below ~1e-7 is
under-sampled. Good enough for text; not a statistics-grade RNG.

Logprobs: `sample` returns the logprob of each sampled token under the RAW model distribution,
log_softmax(logits)[token] (temperature 1, no filtering) — vLLM's default and what OpenAI-style clients, lm-eval
and an RL trainer recomputing log_softmax expect; it is defined for greedy rows too. `logprobs_mode="processed"`
returns it under the distribution the token was actually drawn from (temperature + filters; 0.0 for greedy rows,
whose processed distribution is a point mass). Both cost one logsumexp per row and are skipped when no row asks.

Stop conditions (`StopChecker`, one per sequence): stop token ids (the request's plus the model's end tokens the
caller passes, e.g. <|assistant_end|>), stop strings matched on the detokenized text across token boundaries,
max_tokens. The returned text excludes the stop token's text and the stop string and everything after it
(OpenAI). It is also the one place that holds back streamed text that could be the start of a stop string, so a
delta never shows text that a later token turns into a stop string; held text is released when it can no longer
match, and at the end.

Limits: logits must be fp32 (B, V) with finite values (NaN is not checked: that would sync the device); rows of a
vocabulary padded past the tokenizer's must be masked to -inf by the caller; the full sort when any row uses top-p
is O(V log V) per row (the fused sampler kernel in kernels/ is the planned replacement, with this as its twin).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Validation ranges (serving conventions §1.5; nanochat's old server used the same temperature/top_k caps).
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
FINISH_REASONS = ("stop", "length")


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names the field (OpenAI's error object has a `param` key)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. Defaults are the documentation: temperature 1 (OpenAI's default), no
    filters, random seed, 256 new tokens. Validated on construction; `stop` and `stop_token_ids` are stored as
    tuples (a single string is accepted for `stop`, as OpenAI does)."""

    temperature: float = 1.0  # 0 = greedy; [0, 2]
    top_k: int = 0  # 0 = off; [0, MAX_TOP_K]
    top_p: float = 1.0  # 1 = off; (0, 1]
    min_p: float = 0.0  # 0 = off; [0, 1): keep tokens with prob >= min_p * max prob
    seed: int | None = None  # None = random (see resolve_seed); any int, reduced to 64 bits
    max_tokens: int = 256  # new tokens, >= 1 (the engine checks prompt + max_tokens against the context)
    stop: tuple[str, ...] = ()  # stop strings, excluded from the returned text
    stop_token_ids: tuple[int, ...] = ()  # stop tokens, excluded from the returned text
    logprobs: bool = False  # return the logprob of each sampled token

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first bad field and its allowed range."""
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise SamplingParamsError("temperature", f"must be a number in [0, {MAX_TEMPERATURE}] "
                                                     f"(0 = greedy), got {t!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise SamplingParamsError("top_k", f"must be an integer in [0, {MAX_TOP_K}] (0 disables it), "
                                               f"got {self.top_k!r}")
        p = self.top_p
        if not _is_number(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise SamplingParamsError("top_p", f"must be a number in (0, 1] (1 disables it), got {p!r}")
        m = self.min_p
        if not _is_number(m) or not math.isfinite(m) or not 0 <= m < 1:
            raise SamplingParamsError("min_p", f"must be a number in [0, 1) (0 disables it), got {m!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise SamplingParamsError("seed", f"must be an integer or null, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.stop, tuple):
            raise SamplingParamsError("stop", f"must be a string or a list of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_STRING_CHARS:
                raise SamplingParamsError("stop", f"each stop string must be a non-empty string of at most "
                                                  f"{MAX_STOP_STRING_CHARS} characters, got {s!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise SamplingParamsError("stop_token_ids", f"must be a list of integers, got {self.stop_token_ids!r}")
        for i in self.stop_token_ids:
            if not _is_int(i) or i < 0:
                raise SamplingParamsError("stop_token_ids", f"each id must be an integer >= 0, got {i!r}")
        if not isinstance(self.logprobs, bool):
            raise SamplingParamsError("logprobs", f"must be true or false, got {self.logprobs!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """Stop token ids must exist in the model's vocabulary (known only to the engine)."""
        bad = [i for i in self.stop_token_ids if i >= vocab_size]
        if bad:
            raise SamplingParamsError("stop_token_ids", f"ids {bad} are outside the vocabulary [0, {vocab_size})")


def resolve_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or a fresh random 64-bit one (log it to replay the request)."""
    return params.seed if params.seed is not None else secrets.randbits(64)


# ---- counter-based noise ------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (Wellons' hash-prospector, bias ~0.11) on int64 tensors holding [0, 2^32).
    Both multipliers are < 2^31, so every product stays < 2^63: no int64 overflow, bit-identical on CPU and GPU."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) keys from 64-bit seeds given as (B, 2) int64 [lo, hi] 32-bit halves and (B,) steps. The added odd
    constants keep seed 0 / step 0 away from the hash's fixed point mix(0) = 0."""
    k = _mix32((seeds[:, 0] + 0x3C6EF372) & _M32)
    k = _mix32(k ^ ((seeds[:, 1] + 0x5851F42D) & _M32))
    return _mix32(k ^ ((steps + 0x2545F491) & _M32))


def _uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 uniforms in [2^-24, 1 - 2^-24]: u[b] = hash(seed_b, step_b), 23 random bits each. (23, not 24,
    bits: 2^23 values + 0.5 are exact in fp32, so u never rounds to 0 or 1.)"""
    x = _mix32(_row_keys(seeds, steps) ^ 0x68E31DA4)
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def _inverse_cdf(processed: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token per row with P(v) = softmax(processed)[v], by inverse CDF: the first v with cdf[v] >= u * cdf[-1].
    Scaling u by the row's total absorbs fp32 cumsum error; since u > 0, a token of probability 0 can only be
    picked if the scan is not exactly monotone (a parallel scan on GPU), which the last line guards."""
    probs = processed.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=processed.shape[1] - 1)
    return torch.where(probs.gather(1, idx) > 0, idx, processed.argmax(dim=-1, keepdim=True)).squeeze(1)


# ---- the batched draw ---------------------------------------------------------------------------------------
def _seed_halves(seed: int) -> tuple[int, int]:
    s = seed & 0xFFFFFFFFFFFFFFFF  # any Python int (negative, huge) → 64 bits
    return s & _M32, s >> 32


def _pack(params: Sequence[SamplingParams], seeds: Sequence[int] | torch.Tensor,
          steps: Sequence[int] | torch.Tensor, B: int, V: int, device) -> dict:
    """Per-row tensors (four small host→device copies) plus host-side flags that pick the code path without a sync."""
    if len(params) != B:
        raise ValueError(f"sample: {len(params)} SamplingParams for {B} logits rows")
    if len(seeds) != B or len(steps) != B:
        raise ValueError(f"sample: seeds ({len(seeds)}) and steps ({len(steps)}) must have one entry per row ({B})")
    greedy = [p.temperature == 0 for p in params]
    # Greedy rows get temperature 1 in the batched math (their result is replaced by the argmax) to avoid 0/0.
    floats = torch.tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy)],
                           [p.top_p for p in params],
                           [p.min_p for p in params]], dtype=torch.float32)
    top_k = [min(p.top_k, V) if p.top_k > 0 else 0 for p in params]
    if isinstance(seeds, torch.Tensor):
        seeds_t = seeds.to(device=device, dtype=torch.int64).reshape(B, 2)  # already (lo, hi) halves
    else:
        seeds_t = torch.tensor([_seed_halves(int(s)) for s in seeds], dtype=torch.int64).to(device)
    steps_t = torch.as_tensor(steps, dtype=torch.int64).to(device)
    ints = torch.tensor([top_k, greedy], dtype=torch.int64).to(device)
    floats = floats.to(device)
    sampled = [not g for g in greedy]
    return dict(
        temperature=floats[0], top_p=floats[1], min_p=floats[2], top_k=ints[0], greedy=ints[1].bool(),
        seeds=seeds_t, steps=steps_t,
        all_greedy=not any(sampled),
        use_top_k=any(k > 0 and s for k, s in zip(top_k, sampled)),
        max_top_k=max(top_k),
        use_top_p=any(p.top_p < 1 and s for p, s in zip(params, sampled)),
        use_min_p=any(p.min_p > 0 and s for p, s in zip(params, sampled)),
        any_logprobs=any(p.logprobs for p in params),
    )


def _processed_logits(logits: torch.Tensor, b: dict) -> torch.Tensor:
    """Temperature-scaled logits with every filtered-out token at -inf (thresholds, see the module docstring)."""
    scaled = logits / b["temperature"][:, None]
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    keep = None

    def both(a, m):
        return m if a is None else a & m

    top_k = b["top_k"]
    if b["use_top_p"]:
        vals = scaled.sort(dim=-1, descending=True).values  # one sort serves top-k and top-p
        if b["use_top_k"]:
            kth = vals.gather(1, (top_k - 1).clamp(min=0)[:, None])
            kth = torch.where(top_k[:, None] > 0, kth, neg_inf)
            keep = both(keep, scaled >= kth)
            vals = vals.masked_fill(vals < kth, float("-inf"))
        probs = vals.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability strictly above each sorted position
        num_keep = (mass_before < b["top_p"][:, None]).sum(dim=-1).clamp(min=1)  # >= 1: the top token
        cut = vals.gather(1, (num_keep - 1)[:, None])
        # Rows without top-p skip it (fp32 cumsum can exceed 1, which would otherwise cut their tail).
        keep = both(keep, scaled >= torch.where(b["top_p"][:, None] < 1, cut, neg_inf))
    elif b["use_top_k"]:
        vals = torch.topk(scaled, b["max_top_k"], dim=-1, sorted=True).values  # (B, max_k): the k-th largest
        kth = vals.gather(1, (top_k - 1).clamp(min=0)[:, None])
        keep = both(keep, scaled >= torch.where(top_k[:, None] > 0, kth, neg_inf))
    if b["use_min_p"]:
        # p >= min_p * p_max  ⇔  s >= s_max + log(min_p) on scaled logits; log(0) = -inf keeps everything.
        floor = scaled.amax(dim=-1, keepdim=True) + torch.log(b["min_p"])[:, None]
        keep = both(keep, scaled >= floor)
    return scaled if keep is None else scaled.masked_fill(~keep, float("-inf"))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], *, seeds: Sequence[int] | torch.Tensor,
           steps: Sequence[int] | torch.Tensor, logprobs_mode: str = "raw"
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw one token per row for the whole batch on the logits' device.

    logits: (B, V) fp32; params: B SamplingParams; seeds: B effective seeds (`resolve_seed`; any int, or a
    (B, 2) int64 tensor of [lo, hi] 32-bit halves); steps: B indices of the token being generated in each request.
    Returns tokens (B,) int64 and, when any row has `logprobs`, (B,) fp32 logprobs of the drawn tokens for every
    row (`logprobs_mode` "raw" or "processed", see the module docstring), else None.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be (B, V), got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise TypeError(f"sample: logits must be fp32 (softcapped in fp32 by the model), got {logits.dtype}")
    if logprobs_mode not in ("raw", "processed"):
        raise ValueError(f"sample: logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
    B, V = logits.shape
    b = _pack(params, seeds, steps, B, V, logits.device)

    greedy_tokens = logits.argmax(dim=-1)
    processed = None
    if b["all_greedy"]:  # evals and temperature-0 chat: no noise, no filters
        tokens = greedy_tokens
    else:
        processed = _processed_logits(logits, b)
        drawn = _inverse_cdf(processed, _uniform(b["seeds"], b["steps"]))
        tokens = torch.where(b["greedy"], greedy_tokens, drawn)

    if not b["any_logprobs"]:
        return tokens, None
    idx = tokens[:, None]
    if logprobs_mode == "raw" or processed is None:
        raw = (logits.gather(1, idx) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(1)
        if logprobs_mode == "raw":
            return tokens, raw
        return tokens, torch.zeros_like(raw)  # all greedy: a point mass
    lp = (processed.gather(1, idx) - torch.logsumexp(processed, dim=-1, keepdim=True)).squeeze(1)
    return tokens, torch.where(b["greedy"], torch.zeros_like(lp), lp)


# ---- stop conditions ----------------------------------------------------------------------------------------
class StopResult(NamedTuple):
    text: str  # delta safe to show now (never part of a stop string that a later token completes)
    finish_reason: str | None  # None while generating, else "stop" or "length"


class StopChecker:
    """Per sequence: feeds sampled tokens through a detokenizer, ends the sequence on a stop token id, a stop
    string or max_tokens, and returns the text that is safe to stream.

    `detokenizer` is anything with push(token_id) -> str and flush() -> str (infer.detokenizer's
    IncrementalDetokenizer). Stop strings are matched on its output, so whether special tokens render as text is
    its setting. A stop token's own text is never detokenized. `text` is everything returned so far; once
    finished it is the final output. Cost per token: a `find` and a few `endswith` per stop string over the
    held-back text, which is shorter than the longest stop string plus one token.
    """

    def __init__(self, params: SamplingParams, detokenizer, eos_token_ids: Iterable[int] = ()):
        self._detok = detokenizer
        self._stop_ids = frozenset(params.stop_token_ids) | frozenset(int(i) for i in eos_token_ids)
        self._stop = params.stop
        self._max_tokens = params.max_tokens
        self._held = ""  # detokenized text not yet returned: could be the start of a stop string
        self.text = ""
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> StopResult:
        """Account for one generated token; returns the text delta and the finish reason (None = go on)."""
        if self.finish_reason is not None:
            raise RuntimeError(f"StopChecker.push after the sequence finished ({self.finish_reason})")
        self.num_tokens += 1
        if token_id in self._stop_ids:
            return self._finish("stop", "")
        delta = self._feed(self._detok.push(token_id))
        if self.finish_reason is not None:  # a stop string completed
            return StopResult(delta, self.finish_reason)
        if self.num_tokens >= self._max_tokens:
            return self._finish("length", delta)
        return StopResult(delta, None)

    def finish(self, reason: str = "length") -> StopResult:
        """End the sequence from outside (the context is full, or an abort): release the held text."""
        if reason not in FINISH_REASONS and reason != "abort":
            raise ValueError(f"finish reason must be one of {FINISH_REASONS + ('abort',)}, got {reason!r}")
        if self.finish_reason is not None:
            return StopResult("", self.finish_reason)
        return self._finish(reason, "")

    def _finish(self, reason: str, delta: str) -> StopResult:
        # Nothing more will be generated: held text can no longer become a stop string, unless the detokenizer's
        # flush (U+FFFD for dangling bytes) completes one.
        delta += self._feed(self._detok.flush(), final=True)
        if self.finish_reason is None:
            self.finish_reason = reason
        return StopResult(delta, self.finish_reason)

    def _feed(self, new: str, final: bool = False) -> str:
        """Add detokenized text; return what may be shown now and keep the rest held."""
        if not self._stop:
            self.text += new
            return new
        buf = self._held + new
        # Searching `buf` suffices: any occurrence starting in already-returned text would have had its beginning
        # held, since we hold the longest suffix that is a prefix of a stop string.
        hits = [i for i in (buf.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._held = buf[: min(hits)], ""
            self.finish_reason = "stop"
        elif final:
            out, self._held = buf, ""
        else:
            hold = 0
            for s in self._stop:
                for n in range(min(len(s) - 1, len(buf)), hold, -1):
                    if buf.endswith(s[:n]):
                        hold = n
                        break
            out, self._held = buf[: len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out
