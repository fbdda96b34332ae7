"""GRPO reinforcement learning on GSM8K, rollouts through infer's engine (nanochat §7.4).

    rewards.py  "#### n" reward (+ optional format bonus), group-mean advantages, token-level PG loss, pass@k
    rollout.py  G samples per question through infer.engine.Engine (tool calls in the sandbox, seeded per sample,
                weights version on every sample); `python -m rlgrpo.rollout`: offline batched rollouts to JSONL
    grpo.py     `python -m rlgrpo.grpo`: the on-policy loop (FSDP, MuonAdamW, weight push, pass@k evals,
                checkpoints and --resume, the "rl" report stage)

Nothing imports rlgrpo (it is the top of the dependency chain); tests and benches may.
"""
