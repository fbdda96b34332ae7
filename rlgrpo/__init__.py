"""GRPO reinforcement learning on GSM8K, rollouts through infer's engine.

Not built yet: arrives with its issue; this package exports nothing until then.
"""
