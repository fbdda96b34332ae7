"""Hand-written FSDP (ZeRO-3 at tensor granularity) over torch.distributed: no DDP/FSDP wrappers.

    rank, world, device = init_distributed()                # torchrun env, or world 1 without it
    torch.manual_seed(0); model = GPT.build(cfg, device, dtype)   # same seed on every rank: identical weights
    fsdp = FSDP(model)                                      # shards it: each rank keeps only its masters
    opt = torch.optim.AdamW([p for _, p in fsdp.owned_params()])  # or fsdp.owned_param_groups(model.param_groups())
    loss = model(idx, targets); loss.backward(); fsdp.finish_backward(); opt.step(); opt.zero_grad()

Ownership. Every parameter belongs to exactly one rank, whole: tensors are dealt greedily, largest first, to the
least-loaded rank (ties: lower rank; the order is fixed by size then name, so every rank computes the same map).
The owner keeps the fp32 master (and the optimizer keeps its state beside it); other ranks keep nothing. Whole
tensors, not dim-0 slices, so Muon can orthogonalise a matrix on the rank that owns it with no extra gather.
Greedy largest-first leaves each rank within one tensor of the mean load (the test checks that bound).

Units and the step. Each Block is a unit; everything else (wte, value embeddings, lm_head, the λ scalars) is the
root unit, which is gathered at the start of forward and kept until `finish_backward()`, because GPT.forward
touches it before, between and after the blocks (torch FSDP does not reshard its root after forward either).
A gather gives each unit one full-size buffer in the compute dtype (bf16 on GPU, fp32 on CPU), laid out as one
contiguous segment per owner; every module parameter's `.data` is a view into it, and each owner broadcasts its
segment (masters cast into it first), async. Forward: block i's pre-hook waits for its gather and issues block
i+1's (prefetch: communication under block i's compute); its post-hook frees the buffer (storage resized to 0,
as torch FSDP) and hooks the block's output, whose gradient arrives just before the block's backward: that hook
re-gathers the block (its saved activations point at the same storage, refilled in place) and prefetches block
i−1. Backward: each parameter's post-accumulate-grad hook takes the grad, casts it to fp32 and issues
`reduce(SUM, dst=owner, async)`, overlapping with the rest of backward; when a block's last grad is taken its
buffer is freed. `finish_backward()` waits for the reductions, divides by the world size (the mean over ranks) and
adds the result into the owner's `master.grad`; it frees every buffer. The optimizer steps the masters and the next
forward's gathers distribute the new weights.

Gradient accumulation: by default every micro-batch's backward reduces (memory stays sharded; the owner sums the
micro-batches into `master.grad`, so scale each micro-batch loss by 1/num_micro as nanochat does). Inside
`with fsdp.no_sync():` grads are summed locally instead, in a full-size fp32 buffer per parameter on every rank
(DDP's trade: less communication, unsharded grad memory), and the next synced backward reduces the sum.
Call `finish_backward()` after every backward, synced or not.

Checkpoints: `full_state_dict()` (fp32, on CPU, rank 0 only: the unsharded model's keys), `shard_state_dict()` /
`load_shard_state_dict()` (this rank's masters; loading checks that the sharding is the same) and
`load_full_state_dict()` (each rank takes its own tensors: a checkpoint resharded to another world size).

Collectives: broadcast, reduce, send/recv; gloo (CPU) and NCCL (GPU) both have them, async included, so no
fallback was needed. World 1 (no process group, or a group of one) runs the same code with the communication
skipped: a gather is then the cast-copy of the masters.

Limits and what this does not do:
- The model must be built whole and identical on every rank first (same seed), then wrapped: peak memory at
  construction is one fp32 model per rank. Meta-device init of the owned shards only is not done.
- Units are GPT's: `model.blocks` (nn.ModuleList) and the rest as root. Other module trees are not supported.
- One compute dtype for all parameters, scalars included, so their grads are produced in bf16 on GPU (then
  reduced in fp32), unlike the unsharded model whose fp32 masters take fp32 grads through the cast.
- Broadcast per owner segment is one collective per (unit, owner): ≤ world per unit, not a single all-gather;
  reductions are one collective per tensor (no bucketing of the λ scalars).
- No activation checkpointing (a re-run forward would find its unit freed), no re-entrant or double backward,
  no forward-only graph kept across an optimizer step; `model.parameters()` and `model.state_dict()` are
  compute buffers (freed between uses): hand optimizers and checkpoints the masters, as above.
- The collective order is the autograd order, which is the same on every rank for the same graph; a rank that
  skips a block or backward hangs the others (no timeout handling beyond the process group's).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import tempfile
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

FREE, GATHERING, READY = "free", "gathering", "ready"


def assign_owners(sizes: list[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Greedy largest-first to the least-loaded rank: {name: rank}. Deterministic: sizes sorted by (−numel, the
    given order), load ties go to the lower rank. Every rank calls it with the same list and gets the same map."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names = [n for n, _ in sizes]
    if len(set(names)) != len(names):
        raise ValueError("assign_owners: duplicate parameter names")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][1], i))
    load = [0] * world_size
    owners = {}
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[sizes[i][0]] = rank
        load[rank] += sizes[i][1]
    return owners


@dataclass
class _Unit:
    name: str
    params: list[tuple[str, nn.Parameter]]  # module parameters, in segment order (grouped by owner)
    numel: int
    offsets: dict[str, int]  # param name → element offset in the flat buffer
    segments: list[tuple[int, int, int]]  # (owner rank, start, end) in the flat buffer
    flat: torch.Tensor  # full-size compute-dtype buffer; storage size 0 while FREE
    state: str = FREE
    works: list = field(default_factory=list)
    grads_left: int = 0  # grads still to arrive in this backward; 0 → the buffer can be freed


class FSDP:
    """Shards a GPT (see the module docstring). `group`: a process group, None = the default one if initialised,
    else world 1. `compute_dtype`: the dtype of gathered parameters (default: the model's compute_dtype)."""

    def __init__(self, model: nn.Module, group=None, compute_dtype: torch.dtype | None = None,
                 record_events: bool = False):
        if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
            raise TypeError("FSDP expects a GPT-like model with an nn.ModuleList `blocks`")
        self.model = model
        self.is_distributed = dist.is_available() and dist.is_initialized()
        self.group = (group or dist.group.WORLD) if self.is_distributed else None
        self.rank = dist.get_rank(self.group) if self.is_distributed else 0
        self.world_size = dist.get_world_size(self.group) if self.is_distributed else 1
        self.compute_dtype = compute_dtype or getattr(model, "compute_dtype", torch.float32)
        self.events: list[tuple[str, str]] | None = [] if record_events else None

        named = list(model.named_parameters())
        if any(p.dtype != torch.float32 for _, p in named):
            raise TypeError("FSDP expects fp32 parameters (they become the masters)")
        self.device = named[0][1].device
        self.owners = assign_owners([(n, p.numel()) for n, p in named], self.world_size)
        self.masters: dict[str, nn.Parameter] = {}
        self._params = dict(named)
        self._unit_of: dict[str, _Unit] = {}

        block_names = [{f"blocks.{i}.{n}" for n, _ in b.named_parameters()} for i, b in enumerate(model.blocks)]
        in_blocks = set().union(*block_names)
        self.root = self._make_unit("root", [n for n, _ in named if n not in in_blocks])
        self.blocks = [self._make_unit(f"blocks.{i}", [n for n, _ in named if n in names])
                       for i, names in enumerate(block_names)]

        self._pending: list[tuple[str, torch.Tensor, object]] = []  # (name, fp32 grad, work) awaiting the owner
        self._local_grads: dict[str, torch.Tensor] = {}  # no_sync(): fp32 sums kept on this rank
        self._sync = True
        self._hooks = [model.register_forward_pre_hook(self._root_pre_forward),
                       model.register_forward_hook(self._root_post_forward)]
        for i, block in enumerate(model.blocks):
            self._hooks.append(block.register_forward_pre_hook(partial(self._block_pre_forward, i)))
            self._hooks.append(block.register_forward_hook(partial(self._block_post_forward, i)))
        for name, p in named:
            self._hooks.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, name)))

    # ---- construction --------------------------------------------------------------------------------------
    def _make_unit(self, unit_name: str, names: list[str]) -> _Unit:
        # Segment order = owner order, so each owner's tensors are one contiguous broadcast.
        names = sorted(names, key=lambda n: self.owners[n])
        offsets, segments, pos = {}, [], 0
        for owner in range(self.world_size):
            start = pos
            for n in names:
                if self.owners[n] == owner:
                    offsets[n] = pos
                    pos += self._params[n].numel()
            if pos > start:
                segments.append((owner, start, pos))
        flat = torch.empty(pos, dtype=self.compute_dtype, device=self.device)
        unit = _Unit(unit_name, [(n, self._params[n]) for n in names], pos, offsets, segments, flat)
        for n, p in unit.params:
            if self.owners[n] == self.rank:
                # The fp32 tensor becomes the master as is (no copy); the module parameter gets the compute view.
                self.masters[n] = nn.Parameter(p.data, requires_grad=p.requires_grad)
            p.data = flat[offsets[n]: offsets[n] + p.numel()].view(p.shape)
            self._unit_of[n] = unit
        flat.untyped_storage().resize_(0)  # FREE until the first gather
        return unit

    # ---- public API ----------------------------------------------------------------------------------------
    def owned_params(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's fp32 masters with their model names, in model order: what the optimizer steps."""
        return [(n, self.masters[n]) for n in self._params if n in self.masters]

    def owned_param_groups(self, groups: list[dict]) -> list[dict]:
        """Map `model.param_groups()` onto this rank's masters: same groups and options, params restricted to the
        owned ones (a group may be empty on some rank), plus `param_names`."""
        name_of = {id(p): n for n, p in self._params.items()}
        out = []
        for g in groups:
            names = [name_of[id(p)] for p in g["params"] if name_of[id(p)] in self.masters]
            out.append({**g, "params": [self.masters[n] for n in names], "param_names": names})
        return out

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside accumulate fp32 grads locally (full size, every rank); the next synced backward
        reduces the sum. Still call finish_backward() after each backward."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def finish_backward(self) -> None:
        """Wait for the gradient reductions; each owner's master.grad += (Σ_ranks grad) / world. Frees every
        gathered buffer. Call after every backward, before the optimizer step."""
        for name, grad, work in self._pending:
            if work is not None:
                work.wait()
            if self.owners[name] == self.rank:
                master = self.masters[name]
                grad = grad.div_(self.world_size).view(master.shape)
                master.grad = grad if master.grad is None else master.grad.add_(grad)
        self._pending.clear()
        for unit in (self.root, *self.blocks):
            self._free(unit)

    def zero_grad(self) -> None:
        for m in self.masters.values():
            m.grad = None

    def shard_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's masters {name: fp32 tensor} (detached references, like nn.Module.state_dict)."""
        return {n: m.detach() for n, m in self.owned_params()}

    @torch.no_grad()
    def load_shard_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of shard_state_dict: the keys must be exactly this rank's (same world size and model)."""
        missing, unexpected = set(self.masters) - set(state), set(state) - set(self.masters)
        if missing or unexpected:
            raise KeyError(f"rank {self.rank}/{self.world_size}: shard state dict does not match this sharding: "
                           f"missing {sorted(missing)}, unexpected {sorted(unexpected)} (another world size? use "
                           "load_full_state_dict)")
        for n, t in state.items():
            self._copy_into_master(n, t)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Each rank copies its own tensors out of a full (unsharded) state dict, e.g. to reshard a checkpoint."""
        missing = sorted(set(self._params) - set(state))
        if missing:
            raise KeyError(f"full state dict lacks {missing}")
        for n in self.masters:
            self._copy_into_master(n, state[n])

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded fp32 weights on CPU, on rank 0 ({} elsewhere); every rank must call it. Owners send
        tensor by tensor, so rank 0 holds one extra tensor on the device at a time, the dict on CPU."""
        out = {}
        for n, p in self._params.items():
            owner = self.owners[n]
            if owner == self.rank == 0:
                out[n] = self.masters[n].detach().cpu().clone()
            elif self.rank == owner:
                dist.send(self.masters[n].detach().contiguous(), dst=self._global(0), group=self.group)
            elif self.rank == 0:
                buf = torch.empty(p.shape, dtype=torch.float32, device=self.device)
                dist.recv(buf, src=self._global(owner), group=self.group)
                out[n] = buf.cpu()
        return out

    def sharding_meta(self) -> dict:
        """JSON-able description of the sharding, for checkpoint metadata."""
        return {"world_size": self.world_size, "owners": dict(self.owners)}

    def _copy_into_master(self, name: str, t: torch.Tensor) -> None:
        m = self.masters[name]
        if t.shape != m.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(m.shape)}")
        m.copy_(t)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not dist.group.WORLD else group_rank

    def _record(self, what: str, who: str) -> None:
        if self.events is not None:
            self.events.append((what, who))

    # ---- gather / free -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _gather(self, unit: _Unit) -> None:
        """Issue the unit's gather (async); a no-op if it is already gathered or in flight."""
        if unit.state != FREE:
            return
        flat = unit.flat
        flat.untyped_storage().resize_(unit.numel * flat.element_size())
        for n, _ in unit.params:
            if n in self.masters:
                o = unit.offsets[n]
                flat[o: o + self.masters[n].numel()].copy_(self.masters[n].reshape(-1))
        if self.world_size > 1:
            # Writes through `flat` (a separate tensor from the parameters' views) do not bump the parameters'
            # autograd version counters, so a backward re-gather into saved storage is allowed.
            for owner, start, end in unit.segments:
                unit.works.append(dist.broadcast(flat[start:end], src=self._global(owner), group=self.group,
                                                 async_op=True))
        unit.state = GATHERING
        self._record("issue", unit.name)

    def _wait(self, unit: _Unit) -> None:
        if unit.state == FREE:
            self._gather(unit)
        for w in unit.works:
            w.wait()
        unit.works.clear()
        if unit.state != READY:
            unit.state = READY
            self._record("wait", unit.name)

    def _free(self, unit: _Unit) -> None:
        if unit.state == FREE:
            return
        self._wait(unit)  # never free a buffer a collective is still writing
        unit.flat.untyped_storage().resize_(0)
        unit.state = FREE
        self._record("free", unit.name)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _root_pre_forward(self, module, args):
        if self._pending:
            raise RuntimeError("FSDP: finish_backward() was not called after the last backward")
        self._gather(self.root)
        if self.blocks:
            self._gather(self.blocks[0])  # prefetch: block 0's broadcast runs under the embedding
        self._wait(self.root)
        self._record("fwd_begin", "root")

    def _root_post_forward(self, module, args, output):
        self._record("fwd_end", "root")
        if not torch.is_grad_enabled():
            self._free(self.root)  # no backward will come (eval): don't hold the root until finish_backward

    def _block_pre_forward(self, i: int, module, args):
        self._wait(self.blocks[i])
        if i + 1 < len(self.blocks):
            self._gather(self.blocks[i + 1])
        self._record("fwd_begin", self.blocks[i].name)

    def _block_post_forward(self, i: int, module, args, output):
        unit = self.blocks[i]
        self._record("fwd_end", unit.name)
        self._free(unit)
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            unit.grads_left = sum(p.requires_grad for _, p in unit.params)
            output.register_hook(partial(self._block_pre_backward, i))

    def _block_pre_backward(self, i: int, grad):
        # The gradient w.r.t. block i's output is complete: block i's own backward is next.
        self._wait(self.blocks[i])
        if i > 0:
            self._gather(self.blocks[i - 1])
        self._record("bwd_begin", self.blocks[i].name)

    @torch.no_grad()
    def _on_grad(self, name: str, param: nn.Parameter) -> None:
        grad, param.grad = param.grad, None  # the full-size grad never outlives this hook on the module
        grad = grad.to(torch.float32, memory_format=torch.contiguous_format).reshape(-1)
        if name in self._local_grads:
            grad = self._local_grads.pop(name).add_(grad)
        if not self._sync:
            self._local_grads[name] = grad
        else:
            work = None
            if self.world_size > 1:
                work = dist.reduce(grad, dst=self._global(self.owners[name]), op=dist.ReduceOp.SUM,
                                   group=self.group, async_op=True)
            self._pending.append((name, grad, work))
            self._record("reduce", name)
        unit = self._unit_of[name]
        if unit is not self.root:
            unit.grads_left -= 1
            if unit.grads_left == 0:
                self._free(unit)


# ---- launching -----------------------------------------------------------------------------------------------
def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """For entry points: join the torchrun process group if its env is set (RANK, WORLD_SIZE, LOCAL_RANK), else
    world 1 with no group. NCCL with one GPU per local rank when CUDA is present, gloo on CPU.
    Returns (rank, world_size, device)."""
    has_cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, torch.device("cuda" if has_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if has_cuda else torch.device("cpu")
    if has_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend or ("nccl" if has_cuda else "gloo"),
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if has_cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def _spawn_entry(rank: int, world_size: int, init_file: str, out_dir: str, backend: str, fn, args) -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"result_{rank}.pt"))
        dist.barrier()  # tearing gloo down while a peer is still in its last collective aborts the process
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: ~1 exit in 10 aborted in a C++ static destructor ("terminate called without an
    # active exception", no Python frame) after the result was written and the group destroyed (torch 2.13,
    # gloo, CPU). Only reached on success; an exception above propagates to mp.spawn as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world_size: int, *args, backend: str = "gloo") -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined by a process group (file://
    rendezvous, so no port can collide); returns each rank's return value (torch.save-able). For tests: `fn` must
    be importable (a module-level function)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_spawn_entry, args=(world_size, init_file, tmp, backend, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]


def main() -> None:
    """Smoke run: `torchrun --nproc_per_node=N -m train.fsdp` (or plain `python -m train.fsdp`) trains a tiny GPT
    for a few AdamW steps on a fixed batch and prints rank 0's losses, which must not depend on N."""
    from model.config import ModelConfig
    from model.gpt import GPT

    rank, world, device = init_distributed()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=256, sequence_len=16)
    torch.manual_seed(0)
    model = GPT.build(cfg, device, dtype)
    fsdp = FSDP(model)
    opt = torch.optim.AdamW([p for _, p in fsdp.owned_params()], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    B = 24  # the global batch, fixed so the losses can be compared across N (N must divide it)
    if B % world:
        raise SystemExit(f"world size {world} must divide the global batch {B}")
    data = torch.randint(0, cfg.vocab_size, (B, cfg.sequence_len + 1), generator=g).to(device)
    local = data.chunk(world)[rank]
    for step in range(5):
        loss = model(local[:, :-1], local[:, 1:])
        loss.backward()
        fsdp.finish_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        if rank == 0:
            print(f"world {world} step {step} loss {loss.item():.6f} owned {len(fsdp.masters)} params")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
