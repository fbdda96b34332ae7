"""lm_head matmul + logit softcap + cross-entropy (+ bits-per-byte sums), without (N, V) logits in memory.

x: (N, C) hidden states (fp32/fp16/bf16), weight: (V, C) the lm_head, targets: (N,) int64 with `ignore_index`
marking positions that do not count. logits = x @ weight.T in x's dtype, then fp32; with softcap s they become
s·tanh(logits/s) (nanochat: s = 15). reduction: "mean" over counted positions, "sum", or "none" (per position,
0 at ignored ones). With `token_bytes` (V,) int (the byte length of each token, 0 for special tokens) the op
returns (loss, nats, bytes): nats summed over counted positions whose target has token_bytes > 0, and those
targets' bytes -- bits per byte is nats / (ln 2 · bytes), as nanochat's evaluate_bpb.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import _dispatch

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    token_bytes: torch.Tensor | None = None,
):
    """The plain-torch twin: materialises the (N, V) fp32 logits."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = (x @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per_pos = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    valid = targets != ignore_index
    if reduction == "mean":
        loss = per_pos.sum() / valid.sum().clamp(min=1)
    elif reduction == "sum":
        loss = per_pos.sum()
    else:
        loss = per_pos
    if token_bytes is None:
        return loss
    nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets)).to(torch.int64)
    counted = nbytes > 0
    nats = (per_pos.detach() * counted).sum()
    return loss, nats, nbytes.sum()


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    token_bytes: torch.Tensor | None = None,
):
    """Cross-entropy of the lm_head's logits (see module docstring)."""
    if _dispatch.use_triton("linear_cross_entropy", x, weight, targets):
        raise NotImplementedError("linear_cross_entropy: the chunked kernel is being written (issue 3)")
    return linear_cross_entropy_ref(x, weight, targets, softcap, ignore_index, reduction, token_bytes)
