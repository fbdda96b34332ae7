"""KV store for the paged KV cache: write the new tokens' k and v rows into the block pool, in place.

    kv_store(k, v, k_cache, v_cache, slot_mapping)

k, v: (N, Hkv, D) fp32/fp16/bf16, the new tokens of every sequence in the step, packed; the last dim must have
unit stride (k and v may be head slices of a fused qkv projection: any token and head strides).
k_cache, v_cache: (num_blocks, block_size, Hkv, D), contiguous, same shape and dtype (any of fp32/fp16/bf16; rows
are cast to it). slot_mapping: (N,) int64, the flat slot of each token, block_id * block_size + offset; a slot < 0
skips the token (vLLM's convention for padded rows, e.g. a CUDA-graph batch padded to its captured size).
Returns nothing; no autograd (the cache is inference state). Slots are not range-checked on the device (that would
need a host sync every step); the caller (the block manager) owns them. Two tokens mapped to one slot: one wins.

Kernel: one program per tile of BLOCK_R tokens x (Hkv*D) columns, plain pointer arithmetic and masks (triton
3.6-3.9). The caches must be contiguous because the write is in place: a copy would silently drop it.
"""

from __future__ import annotations

import torch

from kernels import _dispatch

if _dispatch.HAS_TRITON:  # a CPU-only install without triton still has the twin
    import triton
    import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kv_store_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """The plain-torch twin of `kv_store`: index_copy into the flattened pool (boolean masking syncs on a GPU)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    Hkv, D = k_cache.shape[2:]
    with torch.no_grad():
        k_cache.view(-1, Hkv, D).index_copy_(0, slots, k[keep].to(k_cache.dtype))
        v_cache.view(-1, Hkv, D).index_copy_(0, slots, v[keep].to(v_cache.dtype))


if _dispatch.HAS_TRITON:

    @triton.jit
    def _kv_store_kernel(
        K, V, K_CACHE, V_CACHE, SLOTS, N,
        stride_kn, stride_kh, stride_vn, stride_vh,
        D: tl.constexpr, HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < N
        slot = tl.load(SLOTS + rows, mask=row_mask, other=-1)  # int64: pools can pass 2^31 elements
        keep = row_mask & (slot >= 0)
        cols = tl.arange(0, BLOCK_C)  # flattened (head, d): a cache slot is one contiguous row of Hkv*D
        h = cols // D
        d = cols % D
        mask = keep[:, None] & (cols < HD)[None, :]
        rows64 = rows.to(tl.int64)
        dst = slot[:, None] * HD + cols[None, :]
        k = tl.load(K + rows64[:, None] * stride_kn + (h * stride_kh + d)[None, :], mask=mask)
        tl.store(K_CACHE + dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
        v = tl.load(V + rows64[:, None] * stride_vn + (h * stride_vh + d)[None, :], mask=mask)
        tl.store(V_CACHE + dst, v.to(V_CACHE.dtype.element_ty), mask=mask)


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"kv_store: k_cache and v_cache must both be (num_blocks, block_size, Hkv, D), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Hkv, D = k_cache.shape[2:]
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (Hkv, D):
        raise ValueError(f"kv_store: k and v must both be (N, Hkv, D) = (N, {Hkv}, {D}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"kv_store: slot_mapping must be ({k.shape[0]},) int64, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"kv_store: {name} must be fp32/fp16/bf16, got {t.dtype}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"kv_store: k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kv_store: k_cache and v_cache must be contiguous (the write is in place; a copy would "
                         "drop it)")
    if len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("kv_store: all tensors must be on one device")


def _kv_store_triton(k, v, k_cache, v_cache, slot_mapping, block_r: int | None = None) -> None:
    N = k.shape[0]
    if N == 0:
        return
    # Unit stride on d is what makes a row load contiguous; q/k/v slices of a fused projection already have it.
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    Hkv, D = k_cache.shape[2:]
    block_c = triton.next_power_of_2(Hkv * D)
    if block_r is None:
        # GPU: ~4k elements per program (d20: Hkv*D = 1280 -> 2 tokens). The interpreter pays per program, not
        # per element, so it takes many rows at once.
        budget = 65536 if _dispatch.interpreting() else 4096
        block_r = max(1, min(triton.next_power_of_2(N), budget // block_c))
    num_warps = max(1, min(8, block_r * block_c // 512))
    _kv_store_kernel[(triton.cdiv(N, block_r),)](
        k, v, k_cache, v_cache, slot_mapping, N, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        D=D, HD=Hkv * D, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v (N, Hkv, D) into the pools at flat slots `slot_mapping` (< 0: skip), in place (module docstring)."""
    if _dispatch.use_triton("kv_store", k, v, k_cache, v_cache, slot_mapping):
        _check(k, v, k_cache, v_cache, slot_mapping)
        with torch.no_grad():
            _kv_store_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    kv_store_ref(k, v, k_cache, v_cache, slot_mapping)
