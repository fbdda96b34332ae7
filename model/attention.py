"""Attention with explicit metadata: `attend(q, k, v, meta, window)`; nothing is read from global state.

    meta = AttentionMeta.dense_causal(T, windows=cfg.layer_windows(), device=x.device)   # once per forward
    y = attend(q, k, v, meta, window)                                                    # in every layer

q: (B, T, H, D), k and v: (B, T, Hkv, D) with H a multiple of Hkv (GQA); returns (B, T, H, D) in q's dtype.
Softmax scale 1/√D (QK-norm's ×1.2 on q and k is applied before, by the caller). Window convention as
FlashAttention's window_size=(w, 0) and nanochat: with window w a query at position i sees keys i−w .. i; None
means the whole causal prefix.

Kinds: "dense_causal" only (training and full-sequence scoring; every row of the batch starts at position 0).
Limits: this path is torch SDPA. Full causal layers use `is_causal` (SDPA's flash/memory-efficient kernels on
GPU); sliding-window layers need an explicit (T, T) boolean mask, which SDPA serves with its slower math or
memory-efficient kernel — nanochat's README says the same and recommends window pattern "L" without FA3.
Issue 4 adds FlashAttention and paged (KV-cache) metadata behind this same call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KINDS = ("dense_causal",)


@dataclass(frozen=True)
class AttentionMeta:
    """What `attend` needs to know about the batch beyond q, k, v. Build one per forward, share it across
    layers: the sliding-window masks are made here once, not once per layer."""

    kind: str
    seq_len: int  # T of q and k
    # window → (T, T) bool mask, True = may attend; only for windows that are shorter than the sequence.
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attention kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def dense_causal(cls, seq_len: int, windows=(), device: torch.device | str = "cpu") -> AttentionMeta:
        """Every row attends causally from position 0; `windows` are the per-layer spans that will be asked for
        (None entries mean full causal and need no mask)."""
        masks = {}
        for w in set(windows):
            if w is not None and not _is_full(w, seq_len):
                masks[w] = sliding_window_mask(seq_len, w, device)
        return cls("dense_causal", seq_len, masks)


def _is_full(window: int | None, seq_len: int) -> bool:
    # A window reaching back T−1 keys already covers every causal key.
    return window is None or window >= seq_len - 1


def sliding_window_mask(seq_len: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool: key j is visible to query i iff i − window ≤ j ≤ i."""
    i = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    return (j <= i) & (j >= i - window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
           window: int | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) attention; see the module docstring for shapes and conventions."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attend wants q (B, T, H, D), k and v (B, T, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D or H % Hkv:
        raise ValueError(f"attend: k/v shape {tuple(k.shape)} does not fit q {tuple(q.shape)} (H % Hkv must be 0)")
    if T != meta.seq_len:
        raise ValueError(f"attend: q has T={T} but the metadata was built for T={meta.seq_len}")
    # SDPA wants (B, H, T, D); the transposes are views, SDPA handles the strides.
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = H != Hkv
    if _is_full(window, T):
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        mask = meta.window_masks.get(window)
        if mask is None:
            raise KeyError(f"attend: no mask for window {window} in the metadata (built for "
                           f"{sorted(meta.window_masks)}); pass every layer's window to AttentionMeta.dense_causal")
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def attend_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Explicit softmax(q·kᵀ/√D + mask)·v in fp32, for tests: the meaning of `attend`, written out."""
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) / D**0.5
    allowed = sliding_window_mask(T, T if window is None else window, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v.float()).to(q.dtype)
