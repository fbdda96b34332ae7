"""Cheap evaluations that every training loop calls: bits-per-byte on a fixed token set, and greedy samples.

    bpb = evaluate_bpb(model, batches, token_bytes)        # batches: a fixed list/iterator of (inputs, targets)
    texts = sample_greedy(model, tok, ["The capital of France is"], max_new_tokens=16)

Bits per byte (nanochat §6.1, `loss_eval.evaluate_bpb`): the per-token cross-entropy in nats, summed over the
target positions whose token has token_bytes > 0 (special tokens such as BOS carry no bytes of text and are not
counted; targets −1 are not counted either), divided by ln 2 × the bytes of those targets. Both sums are
all-reduced over the ranks of the default process group when one exists, so every rank gets the same number.
Dividing by bytes rather than tokens makes the number independent of the tokenizer (a bigger vocabulary has
fewer, longer tokens), which is why it is the primary research signal of nanochat.

Sampling here is the plain recompute loop (the whole prefix forward again for every new token, no KV cache):
enough to eyeball a model during training. The real engine (paged KV cache, batching) lives in infer/.
Under FSDP every rank must call both functions with the same arguments (each forward gathers parameters with
collectives); the samples come out the same on every rank.

Limits: sums are float64 (exact enough for 10^9 tokens), so the device must support float64 (not MPS).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


@torch.no_grad()
def loss_byte_sums(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   token_bytes: torch.Tensor) -> tuple[float, float, float, float]:
    """(nats, supervised targets, nats of the targets with bytes > 0, their bytes) summed over `batches`
    (inputs, targets: (B, T) int64; target −1 = not supervised) and all-reduced over the default group, in float64.
    token_bytes: (V,) int64 on the model's device, the UTF-8 length of each token (0 for special tokens)."""
    sums = torch.zeros(4, dtype=torch.float64, device=token_bytes.device)
    for inputs, targets in batches:
        nats = model(inputs, targets, loss_reduction="none").double()  # (B, T), 0 where target == −1
        valid = targets >= 0
        nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)
        sums += torch.stack([nats.sum(), valid.sum().double(), (nats * (nbytes > 0)).sum(), nbytes.sum().double()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    nats, count, nats_with_bytes, nbytes = sums.tolist()
    return nats, count, nats_with_bytes, nbytes


def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over `batches` (inputs, targets: (B, T) int64); token_bytes: (V,) int64 on the
    model's device, the UTF-8 length of each token (0 for special tokens). All-reduced over the default group."""
    _, _, nats, nbytes = loss_byte_sums(model, batches, token_bytes)
    if nbytes == 0:
        raise ValueError("evaluate_bpb: no target token with bytes > 0 in the evaluation batches")
    return nats / (math.log(2) * nbytes)


@torch.no_grad()
def sample_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy continuation of each prompt (BOS + prompt tokens); returns prompt + continuation as text.
    Stops a prompt early at BOS (a new document would begin). Recomputes the whole prefix per token."""
    device = next(iter(model.buffers())).device  # buffers are real tensors even when FSDP has freed parameters
    out = []
    for prompt in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt, disallowed_special=())
        new = []
        for _ in range(max_new_tokens):
            idx = torch.tensor([ids + new], dtype=torch.long, device=device)
            next_id = int(model(idx).argmax(dim=-1).item())  # logits of the last position: (1, V)
            if next_id == tokenizer.bos_id:
                break
            new.append(next_id)
        out.append(prompt + tokenizer.decode(new))
    return out
