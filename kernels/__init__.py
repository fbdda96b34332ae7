"""Triton kernels, each beside a plain-torch twin with the same signature (DESIGN.md "Kernels").

Not built yet: fused RMSNorm, QK-norm + rotary, chunked cross-entropy with bits-per-byte, Newton-Schulz,
FlashAttention and paged attention arrive with their issues. Nothing is exported until then.
"""
