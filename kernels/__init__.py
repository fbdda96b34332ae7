"""Triton kernels, each beside its plain-torch twin with the same signature; the one door into them.

    import kernels as K
    y = K.rmsnorm(x)              # the Triton kernel on CUDA tensors, the twin elsewhere (see _dispatch)
    y_ref = K.rmsnorm_ref(x)      # the twin, for tests and benches

Training ops: attention (FlashAttention), rmsnorm, qk_norm_rope, relu2, linear_cross_entropy, newton_schulz.
Inference ops: kv_store (write k/v into the paged pool), paged_attention_decode, paged_attention_prefill.
"""

from kernels._dispatch import backend, set_backend, which
from kernels.attention import attention, attention_ref
from kernels.kv_cache import kv_store, kv_store_ref
from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from kernels.newton_schulz import newton_schulz, newton_schulz_ref
from kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_ref,
    paged_attention_prefill,
    paged_attention_prefill_ref,
)
from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from kernels.relu2 import relu2, relu2_ref
from kernels.rmsnorm import rmsnorm, rmsnorm_ref

__all__ = [
    "attention",
    "attention_ref",
    "backend",
    "kv_store",
    "kv_store_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "newton_schulz",
    "newton_schulz_ref",
    "paged_attention_decode",
    "paged_attention_decode_ref",
    "paged_attention_prefill",
    "paged_attention_prefill_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "relu2",
    "relu2_ref",
    "rmsnorm",
    "rmsnorm_ref",
    "set_backend",
    "which",
]
