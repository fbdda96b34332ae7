"""Attention with explicit metadata: `attend(q, k, v, meta, window)`; nothing is read from global state.

    meta = AttentionMeta.dense_causal(T)       # once per forward (or .packed(cu_seqlens) for document masking)
    y = attend(q, k, v, meta, window)           # in every layer, with that layer's window

q: (B, T, H, D), k and v: (B, T, Hkv, D) with H a multiple of Hkv (GQA); returns (B, T, H, D) in q's dtype.
Softmax scale 1/√D (QK-norm's ×1.2 on q and k is applied before, by the caller). Window convention as
FlashAttention's window_size=(w, 0) and nanochat: with window w a query at position i sees keys i−w .. i; None
means the whole causal prefix.

Kinds:
- "dense_causal": training and full-sequence scoring; every row starts at position 0.
- "packed": B = 1 holding several documents back to back, `cu_seqlens` their boundaries: attention stays inside
  each document. Both go through `K.attention`, which picks its backend itself: the flash_attn package or our
  Triton FlashAttention on GPU (sliding windows skip the hidden tiles), torch SDPA on the CPU.
- "paged": inference over the engine's paged KV pool. The new tokens of B sequences are packed into one row
  (B = 1, N tokens, `cu_seqlens_q`); each layer first writes its k/v into the pool (`K.kv_store` at
  `slot_mapping`), then attends over the cached prefix plus the new tokens through the block tables
  (`K.paged_attention_decode` when every sequence has exactly one new token, else
  `K.paged_attention_prefill`: chunked prefill). Rotary positions come from the caller (`positions`, one per
  token). No gradient flows through this path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels as K

KINDS = ("dense_causal", "packed", "paged")


@dataclass(frozen=True)
class PagedKV:
    """The engine's KV pool: one (num_blocks, block_size, Hkv, D) tensor per layer for k and for v."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]


@dataclass(frozen=True)
class AttentionMeta:
    """What `attend` needs to know about the batch beyond q, k, v. Build one per forward; share it across layers."""

    kind: str
    seq_len: int  # T of q and k
    cu_seqlens: torch.Tensor | None = None  # "packed": (num_docs + 1,) int32 document boundaries along T
    max_seqlen: int | None = None  # "packed": the longest document
    # "paged" only:
    kv: PagedKV | None = None
    slot_mapping: torch.Tensor | None = None  # (N,) int64: pool slot of each new token's k/v
    block_tables: torch.Tensor | None = None  # (B, max_blocks) int32
    seq_lens: torch.Tensor | None = None  # (B,) int32: cached tokens per sequence after this step (prefix + new)
    cu_seqlens_q: torch.Tensor | None = None  # (B + 1,) int32: the new tokens of each sequence along the row
    is_decode: bool = False  # every sequence has exactly one new token

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attention kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "packed") != (self.cu_seqlens is not None):
            raise ValueError("cu_seqlens goes with kind 'packed', and only with it")
        if (self.kind == "paged") != (self.kv is not None):
            raise ValueError("a KV pool goes with kind 'paged', and only with it")

    @classmethod
    def dense_causal(cls, seq_len: int) -> AttentionMeta:
        """Every row attends causally from position 0."""
        return cls("dense_causal", seq_len)

    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor) -> AttentionMeta:
        """One row of documents back to back; cu_seqlens = [0, end of doc 0, ..., T] (int32, on q's device)."""
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and hold at least one document; got {cu_seqlens}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(lengths.min()) < 0:
            raise ValueError(f"cu_seqlens must not decrease; got {cu_seqlens.tolist()}")
        return cls("packed", int(cu_seqlens[-1]), cu_seqlens.to(torch.int32), int(lengths.max()))


def paged_meta(kv: PagedKV, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               cu_seqlens_q: torch.Tensor) -> AttentionMeta:
    """Metadata of one engine step: N new tokens of B sequences packed into one row (see the module docstring)."""
    n = int(slot_mapping.shape[0])
    B = int(seq_lens.shape[0])
    if cu_seqlens_q.shape != (B + 1,) or block_tables.shape[0] != B:
        raise ValueError(f"paged metadata: {B} sequences but cu_seqlens_q {tuple(cu_seqlens_q.shape)}, "
                         f"block_tables {tuple(block_tables.shape)}")
    if int(cu_seqlens_q[-1]) != n:
        raise ValueError(f"paged metadata: cu_seqlens_q ends at {int(cu_seqlens_q[-1])} but {n} slots were given")
    return AttentionMeta("paged", n, kv=kv, slot_mapping=slot_mapping, block_tables=block_tables,
                         seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q, is_decode=(n == B))


def sliding_window_mask(seq_len: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool: key j is visible to query i iff i − window ≤ j ≤ i."""
    i = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    return (j <= i) & (j >= i - window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
           window: int | None = None, layer: int = 0) -> torch.Tensor:
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
    if meta.kind != "dense_causal" and B != 1:
        raise ValueError(f"attend: {meta.kind} metadata wants B = 1 (sequences back to back), got B = {B}")
    if meta.kind == "paged":
        kc, vc = meta.kv.k[layer], meta.kv.v[layer]
        K.kv_store(k[0], v[0], kc, vc, meta.slot_mapping)
        if meta.is_decode:
            y = K.paged_attention_decode(q[0], kc, vc, meta.block_tables, meta.seq_lens, window=window)
        else:
            y = K.paged_attention_prefill(q[0], kc, vc, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                          window=window)
        return y.unsqueeze(0)
    return K.attention(q, k, v, causal=True, window=window, cu_seqlens=meta.cu_seqlens, max_seqlen=meta.max_seqlen)


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
