"""MuonAdamW: Muon for the transformer's block matrices, AdamW for embeddings, lm_head and scalars (nanochat §5.1).

    opt = MuonAdamW(model.param_groups(), lr_scale=plan.lr_scale)
    loss.backward(); opt.set_lr_multiplier(lr_multiplier(step, N)); opt.set_muon_momentum(...); opt.step()

One object, two update rules, each a pure function on tensors so the FSDP code can call it on what a rank owns:

  adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, ...)   elementwise: any shard (slice) of a parameter
  muon_update(params, grads, momentum_buffer, second_moment, ...)  whole matrices, stacked (K, m, n)

Muon step, per stack of same-shape matrices (nanochat HEAD §5.2; each refinement behind a flag, all on by default
as at HEAD): Nesterov momentum → MuonEq row equilibration → Polar Express orthogonalisation (5 steps, batched
through `K.newton_schulz`, bf16 iterates on CUDA, fp32 on CPU) → Muon+ (Frobenius norm set to √min(m, n)) →
NorMuon variance reduction (factored second moment, beta2 0.9, total norm kept) → cautious weight decay and the
update with LR × max(1, m/n)^0.5.
AdamW: decoupled decay p ← p·(1 − lr·wd), bias-corrected moments, fp32 state. On CUDA (fp32 params) it is torch's
fused multi-tensor kernel `torch._fused_adamw_`; elsewhere the plain math, written exactly as
torch.optim.AdamW(foreach=False) computes it, so the two agree bitwise on CPU.

Hyperparameters live in `param_groups` (plain dicts: lr, initial_lr, betas, eps, weight_decay for AdamW; lr,
initial_lr, momentum, weight_decay, beta2, ns_steps, muoneq, muon_plus, normuon for Muon); a schedule sets them
each step through `set_lr_multiplier`, `set_muon_momentum`, `set_muon_weight_decay` (or the dicts directly).

Limits and footguns:
- Single process. Gradients must already be averaged over data-parallel ranks; the FSDP code owns communication.
- Muon stacks copy: each step stacks the grads and params of a shape group into (K, m, n) tensors and copies the
  params back (as nanochat does); peak extra memory is ~2× the largest shape group.
- The Muon step consumes the stacked grads (they are overwritten by the Nesterov blend), never `p.grad` itself.
- A Muon matrix whose grad is None is stepped with a zero grad (its momentum keeps moving it), unlike torch's
  optimizers, which skip it; a whole stack with no grads is skipped. AdamW skips params with no grad.
- `state_dict()` returns references to the live state (as torch does): save or deep-copy it before stepping again.
- Not torch.compile'd yet: the elementwise Muon/NorMuon math runs as separate kernels (nanochat compiles its step).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch

import kernels as K

# Defaults of the Muon group that GPT.param_groups() leaves to the optimizer (nanochat §5.1/§5.2).
MUON_DEFAULTS = dict(momentum=0.95, weight_decay=0.0, beta2=0.9, ns_steps=5, ns_coeffs="polar_express",
                     muoneq=True, muon_plus=True, normuon=True)
ADAMW_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # torch.optim.AdamW's, except wd = 0
NS_EPS = 1e-6  # added to the Frobenius norm before Polar Express (nanochat: ‖X‖·1.01 + 1e-6)


# ---- AdamW ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, fused: bool = False) -> None:
    """One AdamW step on a list of tensors, in place. Elementwise, so any slice of a parameter (an FSDP shard)
    with the matching slice of its grad and state is a valid input.

    exp_avgs, exp_avg_sqs: fp32, shaped like params; steps: 0-D fp32 tensors on the params' device, incremented
    here. fused=True calls torch's fused kernel (all tensors on one device, params/grads fp32 like the state);
    otherwise the math of torch.optim.AdamW(foreach=False), in fp32 with the result written back to the
    param's dtype (so bf16 params work)."""
    if not params:
        return
    if fused:
        torch._foreach_add_(steps, 1.0)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step_t += 1
        p32 = p if p.dtype == torch.float32 else p.float()
        g = g if g.dtype == torch.float32 else g.float()
        p32.mul_(1 - lr * weight_decay)  # decoupled decay (Loshchilov & Hutter), before the moment update
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p32.addcdiv_(m, denom, value=-lr / bias_correction1)
        if p32 is not p:
            p.copy_(p32)


# ---- Muon ----------------------------------------------------------------------------------------------------
def muon_lr_scale(m: int, n: int) -> float:
    """nanochat's shape factor: tall matrices (more rows than columns, e.g. c_fc (4C, C)) get √(m/n) more LR, so
    the update's RMS per element matches a square matrix's."""
    return max(1.0, m / n) ** 0.5


def second_moment_shape(K_: int, m: int, n: int) -> tuple[int, int, int]:
    """NorMuon's factored second moment: one value per row when m ≥ n, per column otherwise (nanochat)."""
    return (K_, m, 1) if m >= n else (K_, 1, n)


def nesterov_(grads: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float) -> torch.Tensor:
    """buf ← lerp(buf, g, 1−μ); g ← lerp(g, buf, μ) (nanochat's Nesterov form), in place; returns g."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    return grads.lerp_(momentum_buffer, momentum)


def equilibrate_rows_(X: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """MuonEq (nanochat HEAD, Jul 2026): scale every row of each (m, n) matrix to the RMS row norm ‖X‖_F/√m, in
    place, so no single row dominates the orthogonalisation. Zero rows stay zero."""
    row_norm = X.norm(dim=-1, keepdim=True)
    target = X.norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.shape[-2])
    return X.mul_(target / row_norm.clamp_min(eps))


def variance_reduce(U: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon-style variance reduction (arXiv 2510.05491, nanochat HEAD): EMA (beta2) of the mean squared update
    per row (m ≥ n) or per column into `second_moment` (updated in place), divide by its square root, then
    rescale each matrix so the update's total Frobenius norm is what it was. U: (K, m, n) fp32."""
    red_dim = -1 if second_moment.shape[-1] == 1 else -2
    red_size = U.shape[red_dim]
    v_mean = U.square().mean(dim=red_dim, keepdim=True)
    norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    new_norm = ((v_mean * red_size) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return U * (step_size * (norm / new_norm.clamp_min(1e-10)))


def cautious_update_(params: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """p ← p − lr·u − lr·wd·p·[u·p ≥ 0] (cautious weight decay, arXiv 2411.16085, nanochat HEAD): decay only the
    coordinates where the update already pulls the weight toward zero, so decay never fights the gradient."""
    mask = (update * params) >= 0
    params.sub_(lr * update + (lr * weight_decay) * params * mask)


@torch.no_grad()
def muon_update(params: torch.Tensor, grads: torch.Tensor, momentum_buffer: torch.Tensor,
                second_moment: torch.Tensor | None, *, lr: float, momentum: float, weight_decay: float,
                beta2: float = 0.9, ns_steps: int = 5, ns_coeffs: str = "polar_express",
                compute_dtype: torch.dtype = torch.float32, muoneq: bool = True, muon_plus: bool = True) -> None:
    """One Muon step on a stack of K same-shape matrices, in place. The contract FSDP relies on:

    params: (K, m, n) fp32, the whole matrices (Muon is not elementwise: a rank must own entire matrices);
    grads: (K, m, n), already averaged over ranks; overwritten (the Nesterov blend is written into it);
    momentum_buffer: (K, m, n) fp32, updated; second_moment: `second_moment_shape(K, m, n)` fp32, updated, or
    None to switch NorMuon variance reduction off;
    lr: the group's LR *before* the shape factor — `muon_lr_scale(m, n)` is applied here;
    compute_dtype: the Polar-Express iterates (bf16 on CUDA as nanochat, fp32 on CPU).
    Matrices are independent, so any partition of a stack (e.g. the matrices one rank owns) gives the same
    result as the whole stack. Nothing is communicated and nothing else is read."""
    if params.ndim != 3:
        raise ValueError(f"muon_update needs a (K, m, n) stack, got params of shape {tuple(params.shape)}")
    if grads.shape != params.shape or momentum_buffer.shape != params.shape:
        raise ValueError(f"grads {tuple(grads.shape)} and momentum_buffer {tuple(momentum_buffer.shape)} must be "
                         f"shaped like params {tuple(params.shape)}")
    K_, m, n = params.shape
    if second_moment is not None and tuple(second_moment.shape) != second_moment_shape(K_, m, n):
        raise ValueError(f"second_moment must be {second_moment_shape(K_, m, n)}, got {tuple(second_moment.shape)}")
    g = nesterov_(grads, momentum_buffer, momentum)
    if muoneq:
        equilibrate_rows_(g)  # on the fp32 blend (nanochat does it after the bf16 cast); g is ours to overwrite
    U = K.newton_schulz(g, steps=ns_steps, coeffs=ns_coeffs, eps=NS_EPS, compute_dtype=compute_dtype).float()
    if muon_plus:
        # Polar Express stops short of σ = 1 (σ ∈ ~[0.86, 1.14]); an exact UVᵀ has ‖·‖_F = √min(m, n).
        U = U * (math.sqrt(min(m, n)) / U.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    if second_moment is not None:
        U = variance_reduce(U, second_moment, beta2)
    cautious_update_(params, U, lr * muon_lr_scale(m, n), weight_decay)


def group_by_shape(params: Iterable[torch.Tensor]) -> list[list[int]]:
    """Indices of `params` grouped by (shape, dtype, device), groups in order of first appearance and indices in
    order within each: every index exactly once. One group = one stacked `muon_update` call."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
    return list(groups.values())


# ---- the optimizer -------------------------------------------------------------------------------------------
class MuonAdamW:
    """Muon + AdamW over the groups of `GPT.param_groups()` (each: params, optimizer "muon"|"adamw", lr, ...).

    lr_scale multiplies every group's LR once (nanochat's batch-size transfer √(B/2^19), §5.4); `initial_lr` in
    each group is that scaled LR and `set_lr_multiplier(x)` sets lr = initial_lr·x.
    Constructor keywords give the Muon defaults a group does not set itself (see MUON_DEFAULTS).
    compute_dtype: Polar-Express iterates; None = bf16 for CUDA params, fp32 otherwise.
    fused: AdamW through torch._fused_adamw_; None = when a group's params and grads are fp32 on CUDA."""

    def __init__(self, param_groups: list[dict], *, lr_scale: float = 1.0, compute_dtype: torch.dtype | None = None,
                 fused: bool | None = None, **muon_defaults):
        unknown = set(muon_defaults) - set(MUON_DEFAULTS)
        if unknown:
            raise TypeError(f"MuonAdamW: unknown keywords {sorted(unknown)}; Muon defaults are {sorted(MUON_DEFAULTS)}")
        self.compute_dtype = compute_dtype
        self.fused = fused
        self.param_groups: list[dict] = []
        self.state: dict = {}
        seen: set[int] = set()
        for i, src in enumerate(param_groups):
            group = dict(src)
            kind = group.get("optimizer")
            if kind not in ("muon", "adamw"):
                raise ValueError(f"param group {i} ({group.get('name')!r}): optimizer must be 'muon' or 'adamw', "
                                 f"got {kind!r}")
            if "lr" not in group:
                raise ValueError(f"param group {i} ({group.get('name')!r}) has no lr")
            group["params"] = list(group["params"])
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"a parameter appears twice (again in group {i}, {group.get('name')!r})")
                seen.add(id(p))
            for k, v in (MUON_DEFAULTS if kind == "muon" else ADAMW_DEFAULTS).items():
                group.setdefault(k, muon_defaults.get(k, v) if kind == "muon" else v)
            group["lr"] = group["lr"] * lr_scale
            group["initial_lr"] = group["lr"]
            if kind == "muon":
                bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon group {group.get('name')!r} takes 2-D matrices only, got shapes {bad}")
                group["stacks"] = group_by_shape(group["params"])
            self.param_groups.append(group)
        self._init_state()

    # State is allocated up front (not lazily at the first step) so that load_state_dict can copy into it and
    # state_dict() means the same thing before and after the first step.
    def _init_state(self) -> None:
        for gi, group in enumerate(self.param_groups):
            if group["optimizer"] == "adamw":
                for p in group["params"]:
                    self.state[p] = dict(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                         exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                         exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
            else:
                for si, idx in enumerate(group["stacks"]):
                    p0 = group["params"][idx[0]]
                    shape = (len(idx), *p0.shape)
                    self.state[(gi, si)] = dict(
                        momentum_buffer=torch.zeros(shape, dtype=torch.float32, device=p0.device),
                        second_moment=torch.zeros(second_moment_shape(*shape), dtype=torch.float32, device=p0.device))

    # ---- hyperparameters (a schedule sets these every step) ----------------------------------------------------
    def set_lr_multiplier(self, x: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * x

    def set_muon_momentum(self, momentum: float) -> None:
        for group in self._groups("muon"):
            group["momentum"] = momentum

    def set_muon_weight_decay(self, weight_decay: float) -> None:
        for group in self._groups("muon"):
            group["weight_decay"] = weight_decay

    def _groups(self, kind: str) -> list[dict]:
        return [g for g in self.param_groups if g["optimizer"] == kind]

    # ---- the step ----------------------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for gi, group in enumerate(self.param_groups):
            if group["optimizer"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(gi, group)

    def _step_adamw(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        st = [self.state[p] for p in params]
        fused = self.fused
        if fused is None:
            fused = all(p.is_cuda and p.dtype == torch.float32 and g.dtype == torch.float32
                        for p, g in zip(params, grads, strict=True))
            fused = fused and len({p.device for p in params}) == 1
        beta1, beta2 = group["betas"]
        adamw_update(params, grads, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                     [s["step"] for s in st], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], fused=fused)

    def _step_muon(self, gi: int, group: dict) -> None:
        for si, idx in enumerate(group["stacks"]):
            params = [group["params"][i] for i in idx]
            if all(p.grad is None for p in params):
                continue
            grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params]).float()
            stacked = torch.stack(params).float()
            st = self.state[(gi, si)]
            compute_dtype = self.compute_dtype or (torch.bfloat16 if stacked.is_cuda else torch.float32)
            muon_update(stacked, grads, st["momentum_buffer"], st["second_moment"] if group["normuon"] else None,
                        lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                        beta2=group["beta2"], ns_steps=group["ns_steps"], ns_coeffs=group["ns_coeffs"],
                        compute_dtype=compute_dtype, muoneq=group["muoneq"], muon_plus=group["muon_plus"])
            torch._foreach_copy_(params, list(stacked.unbind(0)))

    # ---- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"groups": per-group hyperparameters (no params), "adamw": per AdamW param in group order,
        "muon": per Muon stack in group order}. Tensors are the live state (not copies)."""
        groups, adamw, muon = [], [], []
        for gi, group in enumerate(self.param_groups):
            groups.append({k: copy.deepcopy(v) for k, v in group.items() if k not in ("params", "stacks")})
            if group["optimizer"] == "adamw":
                adamw.extend(self.state[p] for p in group["params"])
            else:
                muon.extend(self.state[(gi, si)] for si in range(len(group["stacks"])))
        return dict(groups=groups, adamw=adamw, muon=muon)

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy a `state_dict()` of an optimizer over the same groups into this one; bitwise on CPU. Groups must
        match by count, name and optimizer, and every tensor by shape; a mismatch is an error, never ignored."""
        groups = state_dict["groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        for saved, group in zip(groups, self.param_groups, strict=True):
            if (saved.get("name"), saved["optimizer"]) != (group.get("name"), group["optimizer"]):
                raise ValueError(f"param group mismatch: saved {saved.get('name')!r}/{saved['optimizer']}, "
                                 f"here {group.get('name')!r}/{group['optimizer']}")
        mine = self.state_dict()
        for kind in ("adamw", "muon"):
            if len(state_dict[kind]) != len(mine[kind]):
                raise ValueError(f"state_dict has {len(state_dict[kind])} {kind} entries, expected {len(mine[kind])}")
            for j, (src, dst) in enumerate(zip(state_dict[kind], mine[kind], strict=True)):
                if set(src) != set(dst):
                    raise ValueError(f"{kind} state {j}: keys {sorted(src)} != {sorted(dst)}")
                for k, t in dst.items():
                    if tuple(src[k].shape) != tuple(t.shape):
                        raise ValueError(f"{kind} state {j} {k}: shape {tuple(src[k].shape)} != {tuple(t.shape)}")
                    t.copy_(src[k])
        for saved, group in zip(groups, self.param_groups, strict=True):
            group.update(copy.deepcopy(saved))
