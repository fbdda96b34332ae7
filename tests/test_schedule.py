"""Schedules and the training plan (train/schedule.py) against nanochat HEAD's rules and derived numbers (§5.3–5.4)."""

import math

import pytest

from model.config import ModelConfig
from train.schedule import (
    TrainingPlan,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
    plan_training,
    reference_config,
    warmdown_steps,
)

N = 1000  # warmdown = 650 steps, starting after step 350


def nanochat_config(depth: int) -> ModelConfig:
    # The reference's numbers are for its own config: vocab 32,768, value embeddings, "SSSL" windows.
    return ModelConfig.for_depth(depth, vocab_size=32768, value_embeds=True, window_pattern="SSSL")


def test_lr_multiplier_boundaries():
    assert warmdown_steps(N) == 650
    assert lr_multiplier(0, N) == 1 / 40
    assert lr_multiplier(38, N) == 39 / 40
    assert lr_multiplier(39, N) == 1.0  # end of warmup
    assert lr_multiplier(40, N) == 1.0
    assert lr_multiplier(350, N) == 1.0  # start of warmdown
    assert lr_multiplier(351, N) == pytest.approx(649 / 650 + (1 / 650) * 0.05)
    assert lr_multiplier(N - 1, N) == pytest.approx(1 / 650 + (649 / 650) * 0.05)  # last training step
    assert lr_multiplier(N, N) == pytest.approx(0.05)
    values = [lr_multiplier(s, N) for s in range(N + 1)]
    assert all(b <= a for a, b in zip(values[350:], values[351:]))  # monotone in the warmdown


def test_muon_momentum_boundaries():
    assert muon_momentum(0, N) == 0.85
    assert muon_momentum(200, 10_000) == pytest.approx(0.91)
    assert muon_momentum(400, 10_000) == pytest.approx(0.97)
    assert muon_momentum(3000, 10_000) == pytest.approx(0.97)  # held
    start = 10_000 - warmdown_steps(10_000)  # 3500
    assert muon_momentum(start, 10_000) == pytest.approx(0.97)
    assert muon_momentum(10_000, 10_000) == pytest.approx(0.90)
    assert muon_momentum(start + 3250, 10_000) == pytest.approx(0.935)
    # A run whose warmdown begins before the 400-step ramp ends stays continuous.
    vals = [muon_momentum(s, N) for s in range(N + 1)]
    assert max(abs(a - b) for a, b in zip(vals, vals[1:])) < 1e-3
    assert vals[-1] == pytest.approx(0.90)


def test_muon_weight_decay_cosine():
    assert muon_weight_decay(0, N, 0.2) == 0.2
    assert muon_weight_decay(N // 2, N, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(N, N, 0.2) == pytest.approx(0.0, abs=1e-15)


def test_schedules_are_pure():
    for f in (lambda s: lr_multiplier(s, N), lambda s: muon_momentum(s, N), lambda s: muon_weight_decay(s, N, 0.3)):
        first = [f(s) for s in (0, 500, 39, 999, 500)]
        assert first == [f(s) for s in (0, 500, 39, 999, 500)]
        assert first[1] == first[4]


def test_schedule_rejects_out_of_range():
    with pytest.raises(ValueError):
        lr_multiplier(N + 1, N)
    with pytest.raises(ValueError):
        muon_momentum(-1, N)
    with pytest.raises(ValueError):
        muon_weight_decay(0, 0, 0.1)


@pytest.mark.parametrize("depth,ratio,batch,steps", [
    (24, 8, 2**20, 5568),    # the speedrun
    (12, 12, 2**19, 2520),
    (26, 12, 2**20, 10510),
    (32, 12, 2**21, 9600),
    (20, 8, 2**20, 3320),    # third-party runs
])
def test_plan_matches_nanochat_derived_numbers(depth, ratio, batch, steps):
    plan = plan_training(nanochat_config(depth), ratio=ratio)
    assert isinstance(plan, TrainingPlan)
    assert (plan.batch_tokens, plan.num_iterations) == (batch, steps)
    assert plan.lr_scale == math.sqrt(batch / 2**19)
    assert plan.num_tokens == steps * batch
    assert plan.grad_accum_steps == batch // (32 * 2048)


def test_plan_speedrun_d24_details():
    plan = plan_training(nanochat_config(24), ratio=8, device_batch_size=16, world_size=8)
    assert plan.target_tokens == 5_838_484_992
    assert plan.num_tokens == 5_838_471_168  # confirmed by third-party runs
    assert plan.lr_scale == pytest.approx(1.414, abs=1e-3)
    assert plan.weight_decay == pytest.approx(0.0597, abs=1e-4)
    assert plan.grad_accum_steps == 4  # 16 × 2048 × 8 = 262,144 tokens per micro-step
    assert plan_training(nanochat_config(12), ratio=12).weight_decay == pytest.approx(0.28)


def test_plan_overrides_and_errors():
    cfg = nanochat_config(12)
    plan = plan_training(cfg, num_iterations=100, batch_tokens=2**18)
    assert (plan.num_iterations, plan.batch_tokens, plan.num_tokens) == (100, 2**18, 100 * 2**18)
    assert plan.lr_scale == pytest.approx(math.sqrt(0.5))
    flops = plan_training(cfg, target_flops=1e18)
    assert flops.num_iterations == int(1e18 / cfg.flops_per_token()) // flops.batch_tokens
    with pytest.raises(ValueError, match="multiple"):
        plan_training(cfg, batch_tokens=3 * 2048, device_batch_size=2)
    tiny = ModelConfig.for_depth(2, model_dim=128, head_dim=32, vocab_size=256, sequence_len=32)
    small = plan_training(tiny, ratio=20, batch_tokens=4 * 32, device_batch_size=4)
    assert small.num_iterations == 20 * tiny.num_scaling_params() // 128


def test_reference_config_keeps_choices():
    ref = reference_config(nanochat_config(26))
    assert (ref.depth, ref.model_dim, ref.vocab_size, ref.value_embeds, ref.window_pattern) == (
        12, 768, 32768, True, "SSSL")
