"""GRPO's arithmetic: rewards, group advantages, the token-level policy-gradient loss and pass@k (nanochat §7.4).

    r = answer_reward(completion_text, reference)        # 1.0 for the right final "#### n", else 0.0
    A = group_advantages(torch.tensor(rewards).view(Q, G))   # r − mean over each question's G samples
    loss = pg_loss(token_logprobs, A_per_row, valid_mask)  # −Σ valid (logp·A) / #valid tokens
    pass_at_k(n=8, c=3, k=4)                             # unbiased estimator (Chen et al. 2021, HumanEval)

Reward. The number after the *last* "####" (commas stripped, `$` allowed, negatives and decimals kept, parsed
exactly as a Decimal) must equal the reference numerically ("#### 12.0" == 12, "#### 1,234" == 1234). This is
the GSM8K task's own grader (`train.tasks.common.extract_final_number`, the one train.tasks.offline.GSM8K uses),
so the reward RL optimises is exactly the metric it is evaluated on. nanochat takes the first "####"; either way a
completion gets one answer, so writing several "####" lines cannot hedge. No "####", or no number after it: 0.
Optional format reward (`format_bonus` > 0): that bonus for a completion that ends its turn by itself (finish
reason "stop", not cut by max_tokens) with a parseable "#### n", whether right or wrong. Off by default.

Advantage = r − group mean (nanochat: no division by the std; `normalize_std=True` divides by std + eps as in
DeepSeek's GRPO, which amplifies near-unanimous groups). A group with equal rewards gets 0 everywhere.

Loss: on-policy REINFORCE with DAPO-style token-level normalisation: every sampled (mask 1) completion token
contributes −logp·A; the sum is divided by the number of such tokens in the whole batch over all ranks (pass
`num_valid_tokens`, the all-reduced count, when training on several ranks), never per sequence, so long and
short completions weigh the same per token. No KL, no reference model, no ratio or clipping.
Limits: rewards are only for "#### n" numeric answers; no partial credit.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import torch

from train.chat_eval import pass_at_k  # noqa: F401 -- pass@k is defined once, with the chat evals
from train.tasks.common import extract_final_number


def reference_number(reference) -> Decimal:
    """A task's reference answer (int from the synthetic tasks, numeric string from GSM8K) as an exact Decimal."""
    try:
        return Decimal(str(reference).replace(",", "").strip())
    except InvalidOperation:
        raise ValueError(f"reference answer {reference!r} is not a number") from None


def answer_reward(completion_text: str, reference) -> float:
    """1.0 when the final "#### n" of the completion equals the reference numerically, else 0.0."""
    got = extract_final_number(completion_text)
    return 1.0 if got is not None and got == reference_number(reference) else 0.0


def reward(completion_text: str, reference, finish_reason: str | None = None, format_bonus: float = 0.0) -> float:
    """answer_reward, plus `format_bonus` for a self-terminated turn with a parseable "#### n" (see the docstring)."""
    r = answer_reward(completion_text, reference)
    if format_bonus and finish_reason == "stop" and extract_final_number(completion_text) is not None:
        r += format_bonus
    return r


def group_advantages(rewards: torch.Tensor, normalize_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """rewards: (Q, G), G samples per question → advantages (Q, G): r − mean_g(r) [/ (std_g(r) + eps)]."""
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be (questions, samples), got shape {tuple(rewards.shape)}")
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        # unbiased=False: a group of 2 with rewards (0, 1) gets ±1, not ±0.71.
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv


def pg_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            num_valid_tokens: float | None = None) -> torch.Tensor:
    """−Σ_{b,t} mask·logp·A_b / num_valid_tokens (default: mask.sum() of this batch).

    logprobs: (B, T) log-probabilities of the tokens that were sampled; advantages: (B,) one per sequence;
    mask: (B, T) 1 where the token was sampled by the policy (0: prompt, forced tool output, padding)."""
    if logprobs.shape != mask.shape or advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, mask {tuple(mask.shape)} and advantages "
                         f"{tuple(advantages.shape)} must be (B, T), (B, T) and (B,)")
    n = float(mask.sum()) if num_valid_tokens is None else float(num_valid_tokens)
    if n <= 0:
        raise ValueError("no valid (sampled) tokens to train on")
    return -(logprobs * mask * advantages[:, None]).sum() / n

