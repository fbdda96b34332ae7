"""lm_head matmul + logit softcap + cross-entropy (+ bits-per-byte sums), without (N, V) logits in memory.

x: (N, C) hidden states (fp32/fp16/bf16), weight: (V, C) the lm_head in x's dtype, targets: (N,) int64 with
`ignore_index` marking positions that do not count. logits = x @ weight.T in x's dtype, then fp32; with softcap s
they become s·tanh(logits/s) (nanochat: s = 15). reduction: "mean" over counted positions (0 when none count),
"sum", or "none" (per position, fp32, 0 at ignored ones). With `token_bytes` (V,) int (the byte length of each
token, 0 for special tokens) the op returns (loss, nats, bytes): nats summed over counted positions whose target
has token_bytes > 0 (no gradient), and those targets' bytes -- bits per byte is nats / (ln 2 · bytes), as
nanochat's evaluate_bpb.

How the Triton path avoids the (N, V) logits (Liger-Kernel's fused linear cross-entropy, done our way):
rows are processed in chunks of `chunk_rows`; per chunk, logits = x_c @ weight.T (cuBLAS) into one reused
(chunk_rows, V) buffer, then `_lce_kernel` (one program per row) computes softcap and an online logsumexp over V
in blocks, writes the row's loss, and -- when a gradient is wanted -- overwrites the row in place with
d(loss)/d(logits) = (softmax - onehot) · (1 - tanh²) · scale. Then grad_x_c = dlogits @ weight and
grad_weight += dlogits.T @ x_c (fp32 accumulator). So the gradients are computed during the forward pass, the
usual trick that makes fwd+bwd cost 3 matmuls, and peak memory is grad_x + grad_weight + one chunk of logits.

- reduction "mean"/"sum": grad_output is a scalar, so the stored gradients are scaled in place by it in
  backward (a second backward through the same graph fails loudly on the saved tensors' version check).
- reduction "none": grad_output is per row and scales dlogits *before* the weight-gradient sum over rows, so it
  cannot be folded in afterwards. Forward computes only the losses; backward recomputes the logits chunk by chunk
  with the kernel's scale set to grad_output[row] (4 matmuls instead of 3; "none" is for evaluation anyway).
- Without a gradient (eval, torch.no_grad, frozen inputs) the forward does the logits matmul and the loss only.

Limits: x and weight share a dtype (fp32/fp16/bf16); the logits and dlogits are held in that dtype like the
twin's (its autograd casts the fp32 grad back to x's dtype at the same place); all softmax math is fp32. Targets
outside [0, V) that are not ignore_index are an error (checked eagerly on CPU, with an async device assert on
CUDA, which does not synchronise). No double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import _dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # the twin still works without triton; only the fused path needs it
    triton = None

REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernel's; the twin also takes float64 (gradcheck)
# Bytes of one logits chunk (chunk_rows × V × itemsize). On an H100 256 MiB is 2048 rows of V = 65536 in bf16:
# big enough that the three per-chunk matmuls run at full cuBLAS speed, small next to 80 GB. On the CPU the
# interpreter wants small chunks (and tests want several of them).
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 4 * 2**20}
MAX_BLOCK_V = 32768  # Liger's MAX_FUSED_SIZE: two blocks per row at V = 65536, 32 fp32 registers per thread


def _check_inputs(x, weight, targets, reduction, token_bytes, dtypes=DTYPES) -> None:
    """Fail loudly at the boundary: shapes, dtypes, devices (shared by the kernel path and the twin)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be (N, C) and weight (V, C), got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x is (N, C={x.shape[1]}) but weight is (V, C={weight.shape[1]}): C differs")
    if x.dtype not in dtypes or weight.dtype != x.dtype:
        raise TypeError(f"x and weight must share one dtype of {dtypes}, got {x.dtype} and {weight.dtype}")
    if targets.dtype != torch.int64 or targets.shape != (x.shape[0],):
        raise ValueError(f"targets must be (N={x.shape[0]},) int64, got {tuple(targets.shape)} {targets.dtype}")
    if token_bytes is not None and (token_bytes.shape != (weight.shape[0],) or token_bytes.is_floating_point()):
        raise ValueError(f"token_bytes must be (V={weight.shape[0]},) int, got {tuple(token_bytes.shape)} "
                         f"{token_bytes.dtype}")
    if len({t.device for t in (x, weight, targets)}) != 1:
        raise ValueError(f"x, weight, targets on different devices: {x.device}, {weight.device}, {targets.device}")


def _bpb_sums(per_pos: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, token_bytes: torch.Tensor):
    """(nats, bytes) for bits per byte: only counted positions whose target has a byte length."""
    nbytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets)).to(torch.int64)
    counted = nbytes > 0
    nats = (per_pos.detach() * counted).sum()
    return nats, nbytes.sum()


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
    _check_inputs(x, weight, targets, reduction, token_bytes, DTYPES + (torch.float64,))
    logits = (x @ weight.t()).float() if x.dtype != torch.float64 else x @ weight.t()
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
    return (loss, *_bpb_sums(per_pos, targets, valid, token_bytes))


if triton is not None:

    @triton.jit
    def _tanh(u):
        # tanh from one exp of a non-positive argument: no overflow, and no libdevice call (which the interpreter
        # lacks and whose module path moved between Triton versions).
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(u < 0, -t, t)

    @triton.jit
    def _lce_kernel(
        logits_ptr,  # (rows, V) x's dtype: this chunk's logits, overwritten with dlogits when COMPUTE_GRAD
        stride_row,
        targets_ptr,  # (N,) int64, indexed by row_start + row
        loss_ptr,  # (N,) fp32 out, indexed by row_start + row
        scale_ptr,  # fp32: d(loss)/d(row's loss) -- one value (stride 0) or one per row (stride 1)
        scale_stride,
        row_start,
        V,
        ignore_index,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row_start + row)
        is_counted = target != ignore_index

        # Pass 1: online logsumexp over V. Every block holds at least one real column, so m is finite after the
        # first block and exp(m - m_new) never sees -inf - -inf.
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)

        z_target = tl.load(row_ptr + target, mask=is_counted, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z_target = softcap * _tanh(z_target / softcap)
        tl.store(loss_ptr + row_start + row, tl.where(is_counted, lse - z_target, 0.0))

        if COMPUTE_GRAD:
            # Pass 2: dlogits = (softmax - onehot) · dz/dlogits · scale, in place (each element is read before it
            # is written, by the same program). Ignored rows get scale 0, so their dlogits are exactly 0.
            scale = tl.load(scale_ptr + (row_start + row) * scale_stride)
            scale = tl.where(is_counted, scale, 0.0)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < V
                z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    p = tl.exp(softcap * t - lse)
                    g = tl.where(cols == target, p - 1.0, p) * (1.0 - t * t)
                else:
                    p = tl.exp(z - lse)
                    g = tl.where(cols == target, p - 1.0, p)
                tl.store(row_ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


_addmm_out_dtype_works: bool | None = None  # learnt on first use: torch.addmm(out_dtype=) is CUDA-only, torch>=2.8


def _accumulate_grad_weight(acc: torch.Tensor, dlogits: torch.Tensor, x_c: torch.Tensor) -> None:
    """acc (V, C) fp32 += dlogits.T @ x_c, summed in fp32 across chunks even when the operands are bf16/fp16."""
    global _addmm_out_dtype_works
    if dlogits.dtype == acc.dtype:
        acc.addmm_(dlogits.t(), x_c)
        return
    if acc.is_cuda and _addmm_out_dtype_works is not False:
        # cuBLAS bf16 GEMM with an fp32 C and beta = 1: the accumulation happens in the GEMM epilogue, no extra pass.
        try:
            torch.addmm(acc, dlogits.t(), x_c, out_dtype=torch.float32, out=acc)
            _addmm_out_dtype_works = True
            return
        except (TypeError, RuntimeError):
            _addmm_out_dtype_works = False
    if not acc.is_cuda:
        # CPU (tests): the product itself in fp32, so fp16 results round once, like the twin's single GEMM.
        acc.addmm_(dlogits.t().float(), x_c.float())
        return
    # Older torch on CUDA: one product rounded to x's dtype per chunk, summed in fp32 (an extra pass over (V, C)
    # per chunk; an fp32 GEMM instead would be several times slower than the whole op).
    acc.add_(dlogits.t() @ x_c)


def _default_chunk_rows(N: int, V: int, dtype: torch.dtype, device: torch.device) -> int:
    budget = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    rows = max(1, budget // (V * dtype.itemsize))
    if rows >= 128:
        rows -= rows % 128  # whole GEMM tiles
    return max(1, min(rows, N))


def _chunked_pass(x, weight, targets, grad_scale, softcap, ignore_index, chunk_rows, want_grad_x, want_grad_w):
    """Losses per row (N,) fp32, and when asked grad_x (N, C) in x's dtype, grad_weight (V, C) fp32, both already
    multiplied by grad_scale ((1,) or (N,) fp32: d(output)/d(row loss))."""
    N, C = x.shape
    V = weight.shape[0]
    compute_grad = want_grad_x or want_grad_w
    loss_rows = torch.empty(N, dtype=torch.float32, device=x.device)
    grad_x = torch.empty((N, C), dtype=x.dtype, device=x.device) if want_grad_x else None
    grad_w = torch.zeros((V, C), dtype=torch.float32, device=x.device) if want_grad_w else None
    logits_buf = torch.empty((min(chunk_rows, N), V), dtype=x.dtype, device=x.device)  # reused by every chunk
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    num_warps = 32 if block_v >= 16384 else 16 if block_v >= 4096 else 8 if block_v >= 1024 else 4
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        x_c = x[start:end]
        logits = logits_buf[: end - start]
        torch.mm(x_c, weight.t(), out=logits)
        _lce_kernel[(end - start,)](
            logits, logits.stride(0), targets, loss_rows, grad_scale, 0 if grad_scale.numel() == 1 else 1,
            start, V, ignore_index, 1.0 if softcap is None else float(softcap),
            HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
        if want_grad_x:
            torch.mm(logits, weight, out=grad_x[start:end])
        if want_grad_w:
            _accumulate_grad_weight(grad_w, logits, x_c)
    return loss_rows, grad_x, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Returns (loss, losses per row); the second output is for the nats sum and carries no gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, ignore_index, reduction, chunk_rows, want_grad_x, want_grad_w):
        ctx.reduction, ctx.softcap, ctx.ignore_index, ctx.chunk_rows = reduction, softcap, ignore_index, chunk_rows
        ctx.set_materialize_grads(False)
        valid = targets != ignore_index
        if reduction == "mean":
            num_counted = valid.sum().clamp(min=1)  # a tensor: no host sync; 0 counted gives loss 0, like the twin
            grad_scale = (1.0 / num_counted).to(torch.float32).reshape(1)
        else:
            grad_scale = torch.ones(1, dtype=torch.float32, device=x.device)
        grads_now = (want_grad_x or want_grad_w) and reduction != "none"
        loss_rows, grad_x, grad_w = _chunked_pass(
            x, weight, targets, grad_scale, softcap, ignore_index, chunk_rows,
            want_grad_x and grads_now, want_grad_w and grads_now,
        )  # fmt: skip
        if reduction == "none":
            ctx.save_for_backward(x, weight, targets)
            ctx.wants = (want_grad_x, want_grad_w)
            loss = loss_rows
            loss_rows = loss_rows.clone()  # a separate, non-differentiable output
        else:
            ctx.save_for_backward(grad_x, None if grad_w is None else grad_w.to(weight.dtype))
            loss = loss_rows.sum() / num_counted if reduction == "mean" else loss_rows.sum()
        ctx.mark_non_differentiable(loss_rows)
        return loss, loss_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_rows):
        if grad_loss is None:
            return (None,) * 9
        if ctx.reduction == "none":
            x, weight, targets = ctx.saved_tensors
            _, grad_x, grad_w = _chunked_pass(
                x, weight, targets, grad_loss.to(torch.float32).contiguous(), ctx.softcap, ctx.ignore_index,
                ctx.chunk_rows, *ctx.wants,
            )  # fmt: skip
            grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        else:
            # In place: these tensors were made for this backward; mul_ bumps their version, so a second backward
            # through a retained graph raises instead of scaling twice.
            grad_x, grad_w = ctx.saved_tensors
            for g in (grad_x, grad_w):
                if g is not None:
                    g.mul_(grad_loss)
        return grad_x, grad_w, None, None, None, None, None, None, None


def _check_targets_in_range(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    ok = ((targets >= 0) & (targets < V)) | (targets == ignore_index)
    if targets.is_cuda:
        torch._assert_async(ok.all(), "linear_cross_entropy: a target is outside [0, V) and not ignore_index")
    elif not bool(ok.all()):
        bad = targets[~ok][0].item()
        raise ValueError(f"linear_cross_entropy: target {bad} is outside [0, V={V}) and is not ignore_index")


def linear_cross_entropy_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = 15.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    token_bytes: torch.Tensor | None = None,
    *,
    chunk_rows: int | None = None,
):
    """The chunked Triton path without dispatch; `chunk_rows` (default: CHUNK_BYTES of logits) is for tests and
    benches. Peak extra memory: chunk_rows × V logits in x's dtype + grad_x + fp32 grad_weight."""
    _check_inputs(x, weight, targets, reduction, token_bytes)
    if triton is None:
        raise RuntimeError("linear_cross_entropy_fused needs triton")
    N, V = x.shape[0], weight.shape[0]
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(N, V, x.dtype, x.device)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    _check_targets_in_range(targets, V, ignore_index)
    grad_on = torch.is_grad_enabled()
    loss, loss_rows = _LinearCrossEntropy.apply(
        x, weight, targets, softcap, ignore_index, reduction, chunk_rows,
        grad_on and x.requires_grad, grad_on and weight.requires_grad,
    )  # fmt: skip
    if token_bytes is None:
        return loss
    return (loss, *_bpb_sums(loss_rows, targets, targets != ignore_index, token_bytes))


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
        return linear_cross_entropy_fused(x, weight, targets, softcap, ignore_index, reduction, token_bytes)
    return linear_cross_entropy_ref(x, weight, targets, softcap, ignore_index, reduction, token_bytes)
