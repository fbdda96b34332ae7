"""Training schedules and the training plan: pure functions of the step, and the depth-derived horizon (§5.3–5.4).

    plan = plan_training(cfg, ratio=8, device_batch_size=16, world_size=8)   # tokens, batch, steps, LR/WD scale
    opt.set_lr_multiplier(lr_multiplier(step, plan.num_iterations))
    opt.set_muon_momentum(muon_momentum(step, plan.num_iterations))
    opt.set_muon_weight_decay(muon_weight_decay(step, plan.num_iterations, plan.weight_decay))

Schedules (nanochat HEAD base_train): LR ×(step+1)/40 over the first 40 steps, 1 until the warmdown, then linear to
0.05× over the last 65% of steps; Muon momentum 0.85 → 0.97 over the first 400 steps, held, then linear to 0.90
over the warmdown; Muon weight decay a cosine from its scaled value to 0 over the run.
Plan (nanochat §5.4, "muP-style" transfer from d12): D = ratio × num_scaling_params (matrices + lm_head);
B = 2^round(log2(2^19 · (D/D_ref)^0.383)) (Power Lines, B_opt ∝ D^0.383) with D_ref the same ratio at depth 12;
num_iterations = D // B; every LR × √(B/2^19); Muon WD = 0.28 · √(B/2^19) · D_ref/D (T_epoch, arXiv 2405.13698).

Limits: the steps are the optimizer steps 0 .. num_iterations−1 (nanochat's loop evaluates once more at step
num_iterations and stops, so the LR there, 0.05×, is never used to train). Short runs where warmup and warmdown
overlap take the warmup branch first (as nanochat). The d12 reference keeps the model's vocab, head dim, windows
and value-embedding choice, so numbers match nanochat only for nanochat's config (vocab 32,768, VE, "SSSL").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from model.config import ModelConfig

WARMUP_STEPS = 40
WARMDOWN_RATIO = 0.65
FINAL_LR_FRAC = 0.05
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END = 0.85, 0.97, 0.90
MOMENTUM_WARMUP_STEPS = 400
REF_DEPTH = 12
REF_BATCH_TOKENS = 2**19  # 524,288 tokens per step at d12, where nanochat's LRs were tuned
BATCH_EXPONENT = 0.383  # Power Lines: B_opt ∝ D^0.383
BASE_WEIGHT_DECAY = 0.28  # Muon WD at the reference point (nanochat's --weight-decay)
DEFAULT_RATIO = 12.0  # nanochat HEAD's --target-param-data-ratio; its speedrun passes 8


def _check_step(step: int, num_iterations: int) -> None:
    if num_iterations <= 0:
        raise ValueError(f"num_iterations must be positive, got {num_iterations}")
    if not 0 <= step <= num_iterations:
        raise ValueError(f"step {step} outside [0, {num_iterations}]")


def warmdown_steps(num_iterations: int, warmdown_ratio: float = WARMDOWN_RATIO) -> int:
    return round(warmdown_ratio * num_iterations)


def lr_multiplier(step: int, num_iterations: int, *, warmup_steps: int = WARMUP_STEPS,
                  warmdown_ratio: float = WARMDOWN_RATIO, final_lr_frac: float = FINAL_LR_FRAC) -> float:
    """The factor on every group's LR at `step`: (step+1)/warmup, then 1, then linear to final_lr_frac, which is
    reached at step == num_iterations."""
    _check_step(step, num_iterations)
    num_warmdown = warmdown_steps(num_iterations, warmdown_ratio)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - num_warmdown:
        return 1.0
    progress = (num_iterations - step) / num_warmdown  # 1 at the start of the warmdown, 0 at the end
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, *, warmup_steps: int = MOMENTUM_WARMUP_STEPS,
                  warmdown_ratio: float = WARMDOWN_RATIO, start: float = MOMENTUM_START,
                  peak: float = MOMENTUM_PEAK, end: float = MOMENTUM_END) -> float:
    """Muon's momentum μ at `step`: start → peak over warmup_steps, held, then linear to `end` over the LR
    warmdown (from the value it had when the warmdown began, so a run shorter than the ramp stays continuous)."""
    _check_step(step, num_iterations)

    def ramp(s: int) -> float:
        frac = min(s / warmup_steps, 1.0)
        return start + frac * (peak - start)

    num_warmdown = warmdown_steps(num_iterations, warmdown_ratio)
    warmdown_start = num_iterations - num_warmdown
    if num_warmdown == 0 or step <= warmdown_start:
        return ramp(step)
    progress = (step - warmdown_start) / num_warmdown  # 0 → 1 over the warmdown
    return ramp(warmdown_start) + progress * (end - ramp(warmdown_start))


def muon_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine from `weight_decay` (the plan's scaled value) at step 0 to 0 at step == num_iterations."""
    _check_step(step, num_iterations)
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))


# ---- the plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingPlan:
    num_tokens: int  # tokens the run trains on: num_iterations × batch_tokens (≤ the target D, whole batches)
    target_tokens: int  # D, the horizon the rule asked for
    batch_tokens: int  # B, tokens per optimizer step, all ranks and micro-steps together
    num_iterations: int  # optimizer steps
    lr_scale: float  # √(B/B_ref), multiplies every LR (MuonAdamW(lr_scale=...))
    weight_decay: float  # Muon WD at step 0 (the cosine schedule's start)
    ref_tokens: int  # D_ref, the same horizon rule at the reference depth
    grad_accum_steps: int  # micro-steps per optimizer step: B / (device_batch_size · T · world_size)
    device_batch_size: int
    world_size: int
    sequence_len: int

    @property
    def tokens_per_micro_step(self) -> int:
        return self.device_batch_size * self.sequence_len * self.world_size


def reference_config(config: ModelConfig, depth: int = REF_DEPTH) -> ModelConfig:
    """The depth-`depth` model with every non-shape choice of `config` (vocab, head dim, windows, VE, ...)."""
    keep = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in ("depth", "model_dim", "n_head", "n_kv_head")}
    return ModelConfig.for_depth(depth, **keep)


def auto_batch_tokens(num_tokens: int, ref_tokens: int, ref_batch_tokens: int = REF_BATCH_TOKENS) -> int:
    """B = 2^round(log2(B_ref · (D/D_ref)^0.383)): the Power-Lines batch rounded to a power of two."""
    return 2 ** round(math.log2(ref_batch_tokens * (num_tokens / ref_tokens) ** BATCH_EXPONENT))


def plan_training(config: ModelConfig, *, ratio: float = DEFAULT_RATIO, num_iterations: int | None = None,
                  target_flops: float | None = None, batch_tokens: int | None = None, device_batch_size: int = 32,
                  world_size: int = 1, ref_depth: int = REF_DEPTH, ref_batch_tokens: int = REF_BATCH_TOKENS,
                  base_weight_decay: float = BASE_WEIGHT_DECAY) -> TrainingPlan:
    """The horizon, batch and LR/WD transfer of a run (nanochat §5.4). Horizon precedence as nanochat:
    num_iterations > target_flops (D = flops / flops_per_token) > ratio (D = ratio × num_scaling_params).
    batch_tokens None = the auto batch from D (the ratio's D when num_iterations is given). The batch must be a
    whole number of micro-steps of device_batch_size × sequence_len × world_size tokens."""
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    ref_tokens = int(ratio * reference_config(config, ref_depth).num_scaling_params())
    if target_flops is not None:
        target_tokens = int(target_flops / config.flops_per_token())
    else:
        target_tokens = int(ratio * config.num_scaling_params())
    if batch_tokens is None:
        batch_tokens = auto_batch_tokens(target_tokens, ref_tokens, ref_batch_tokens)
    micro = device_batch_size * config.sequence_len * world_size
    if batch_tokens <= 0 or batch_tokens % micro:
        raise ValueError(f"batch of {batch_tokens} tokens is not a positive multiple of device_batch_size "
                         f"{device_batch_size} × sequence_len {config.sequence_len} × world_size {world_size} "
                         f"= {micro}")
    if num_iterations is None:
        num_iterations = target_tokens // batch_tokens
    else:
        target_tokens = num_iterations * batch_tokens  # the horizon that the WD transfer must see
    if num_iterations <= 0:
        raise ValueError(f"the horizon of {target_tokens} tokens is under one batch of {batch_tokens}")
    lr_scale = math.sqrt(batch_tokens / ref_batch_tokens)
    # D here is the target (as nanochat), not the floor of whole batches: d12 at its own ratio gets exactly 0.28.
    weight_decay = base_weight_decay * lr_scale * ref_tokens / target_tokens
    return TrainingPlan(num_tokens=num_iterations * batch_tokens, target_tokens=target_tokens,
                        batch_tokens=batch_tokens, num_iterations=num_iterations, lr_scale=lr_scale,
                        weight_decay=weight_decay, ref_tokens=ref_tokens,
                        grad_accum_steps=batch_tokens // micro, device_batch_size=device_batch_size,
                        world_size=world_size, sequence_len=config.sequence_len)
