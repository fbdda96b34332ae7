"""train/fsdp.py: N ranks (gloo, CPU) train exactly like 1 process on the full batch.

The multi-process tests spawn fresh processes with train.fsdp.spawn; each runs `_worker`, which checks the
gathered forward against an unsharded model, trains a few SGD-momentum steps (plain steps, a no_sync-accumulated
step, a synced two-micro-batch step), round-trips its shard state dict and records the hook/collective event order;
the parent compares losses and final weights with an unsharded model trained on the whole batch.
Tolerance: fp32, 1e-5 relative / 1e-6 absolute on losses and weights (only the summation order of the batch
halves differs; measured differences are ~1e-7).
"""

import contextlib
import io

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from train.fsdp import FSDP, assign_owners, spawn

CFG = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=256, sequence_len=16)
GLOBAL_B = 6  # divisible by 1, 2 and 3 ranks
MICRO = [1, 1, 2, 2]  # micro-batches per optimizer step
NO_SYNC = [False, False, True, False]  # step 2 accumulates its first micro-batch locally (no_sync)


def _optimizer(params):
    # SGD with momentum: the update is linear in the grads, so N ranks vs 1 differ only by the fp32 summation
    # order. (AdamW divides by √v, which magnifies that rounding noise where a grad is ~0: we measured 1e-4
    # weight differences after 4 steps with AdamW although losses agree to 1e-7.)
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)

RTOL, ATOL = 1e-5, 1e-6


def _build() -> GPT:
    torch.manual_seed(0)
    model = GPT.build(CFG, "cpu", torch.float32)
    # GPT's init zeroes the output projections and nearly zeroes lm_head, which leaves the early layers' grads
    # tiny; give every matrix a real signal so the comparison below is not vacuous.
    with torch.no_grad():
        for b in model.blocks:
            b.attn.c_proj.weight.normal_(0.0, 0.05)
            b.mlp.c_proj.weight.normal_(0.0, 0.05)
        model.lm_head.weight.normal_(0.0, 0.05)
    return model


def _batch(step: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    return torch.randint(0, CFG.vocab_size, (GLOBAL_B, CFG.sequence_len + 1), generator=g)


def _reference():
    """The unsharded model on the full batch: losses per step and final weights."""
    model = _build()
    opt = _optimizer(model.parameters())
    losses = []
    for step, n in enumerate(MICRO):
        total = 0.0
        for m in range(n):
            x = _batch(step, m)
            loss = model(x[:, :-1], x[:, 1:]) / n
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_sharded(rank: int, world: int, fsdp: FSDP, model: GPT) -> list[float]:
    import torch.distributed as dist

    opt = _optimizer([p for _, p in fsdp.owned_params()])
    losses = []
    for step, n in enumerate(MICRO):
        total = torch.zeros(())
        for m in range(n):
            x = _batch(step, m).chunk(world)[rank]  # this rank's rows of the same global batch
            ctx = fsdp.no_sync() if NO_SYNC[step] and m < n - 1 else contextlib.nullcontext()
            with ctx:
                loss = model(x[:, :-1], x[:, 1:]) / n
                loss.backward()
            fsdp.finish_backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)  # mean over ranks of per-rank means = the global-batch mean
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def _check_forward_matches_unsharded(fsdp: FSDP, model: GPT) -> None:
    ref = _build()
    x = _batch(99, 0)
    with torch.no_grad():
        assert torch.equal(model(x[:, :-1], logits_positions="all"), ref(x[:, :-1], logits_positions="all"))
    assert torch.equal(model(x[:, :-1], x[:, 1:]), ref(x[:, :-1], x[:, 1:]))  # grad mode: root stays gathered
    assert fsdp.root.state != "free" and all(b.state == "free" for b in fsdp.blocks)
    fsdp.finish_backward()  # no backward ran; frees the root
    assert all(u.state == "free" for u in (fsdp.root, *fsdp.blocks))


def _check_shard_round_trip(fsdp: FSDP) -> None:
    buf = io.BytesIO()
    torch.save(fsdp.shard_state_dict(), buf)
    saved = {k: v.clone() for k, v in fsdp.shard_state_dict().items()}
    with torch.no_grad():
        for _, m in fsdp.owned_params():
            m.add_(1.0)
    buf.seek(0)
    fsdp.load_shard_state_dict(torch.load(buf, weights_only=True))
    now = fsdp.shard_state_dict()
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    with pytest.raises(KeyError):
        fsdp.load_shard_state_dict({**saved, "not.a.param": torch.zeros(1)})


def _event_order(fsdp: FSDP, model: GPT) -> list[tuple[str, str]]:
    fsdp.events.clear()
    x = _batch(0, 0)
    model(x[:, :-1], x[:, 1:]).backward()
    fsdp.finish_backward()
    fsdp.zero_grad()
    return list(fsdp.events)


def _worker(rank: int, world: int):
    model = _build()
    fsdp = FSDP(model, record_events=True)
    _check_forward_matches_unsharded(fsdp, model)
    losses = _train_sharded(rank, world, fsdp, model)
    full = fsdp.full_state_dict()
    _check_shard_round_trip(fsdp)
    events = _event_order(fsdp, model)
    return dict(losses=losses, full=full, owned=[n for n, _ in fsdp.owned_params()], events=events)


# ---- single process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_assign_owners_covers_every_param_once_and_balances(world):
    with torch.device("meta"):
        model = GPT(ModelConfig.for_depth(4, value_embeds=True))
    sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    owners = assign_owners(sizes, world)
    assert set(owners) == {n for n, _ in sizes} and len(owners) == len(sizes)
    assert set(owners.values()) <= set(range(world))
    assert owners == assign_owners(sizes, world)  # deterministic
    load = [0] * world
    for n, s in sizes:
        load[owners[n]] += s
    # Greedy largest-first (LPT): the spread never exceeds the largest tensor.
    assert max(load) - min(load) <= max(s for _, s in sizes)
    if world <= len(sizes):
        assert min(load) > 0


def test_assign_owners_tie_break_is_fixed():
    assert assign_owners([("a", 4), ("b", 4), ("c", 4), ("d", 1)], 2) == {"a": 0, "b": 1, "c": 0, "d": 1}
    with pytest.raises(ValueError):
        assign_owners([("a", 1), ("a", 2)], 2)


def test_world1_same_code_path_matches_unsharded():
    ref_losses, ref_state = _reference()
    init = _build().state_dict()
    assert all((ref_state[k] - init[k]).abs().max() > 1e-3 for k in init)  # training really moved every tensor
    out = _worker(0, 1)
    torch.testing.assert_close(out["losses"], ref_losses, rtol=RTOL, atol=ATOL)
    assert out["full"].keys() == ref_state.keys()
    for k, v in ref_state.items():
        torch.testing.assert_close(out["full"][k], v, rtol=RTOL, atol=ATOL, msg=k)


def test_optimizer_groups_map_to_masters():
    model = _build()
    fsdp = FSDP(model)
    groups = fsdp.owned_param_groups(model.param_groups())
    assert [g["name"] for g in groups] == [g["name"] for g in model.param_groups()]
    masters = {id(m) for _, m in fsdp.owned_params()}
    assert sum(len(g["params"]) for g in groups) == len(masters)
    assert all(id(p) in masters and p.dtype == torch.float32 for g in groups for p in g["params"])


# ---- several processes (gloo) --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_train_like_one(world, reference):
    ref_losses, ref_state = reference
    results = spawn(_worker, world)
    # Ownership: every parameter on exactly one rank.
    owned = [n for r in results for n in r["owned"]]
    assert sorted(owned) == sorted(ref_state) and len(owned) == len(set(owned))
    for r in results:
        torch.testing.assert_close(r["losses"], ref_losses, rtol=RTOL, atol=ATOL)
    full = results[0]["full"]
    assert full.keys() == ref_state.keys() and all(r["full"] == {} for r in results[1:])
    for k, v in ref_state.items():
        torch.testing.assert_close(full[k], v, rtol=RTOL, atol=ATOL, msg=k)

    # Prefetch is asynchronous: the next unit's broadcast is issued before the current unit's forward ends,
    # and waited only when that unit starts; in backward, block 0 is issued before block 1's grads reduce.
    ev = results[0]["events"]
    pos = {}
    for i, e in enumerate(ev):
        pos.setdefault(e, i)
    assert pos[("issue", "blocks.0")] < pos[("fwd_begin", "root")]
    assert pos[("issue", "blocks.1")] < pos[("fwd_end", "blocks.0")] < pos[("wait", "blocks.1")]
    assert pos[("free", "blocks.0")] < pos[("fwd_begin", "blocks.1")]  # freed after its forward
    bwd = ev[pos[("bwd_begin", "blocks.1")] - 3:]
    assert ("issue", "blocks.1") in bwd  # re-gathered for backward
    first_b1_reduce = next(i for i, e in enumerate(ev) if e[0] == "reduce" and e[1].startswith("blocks.1."))
    reissue_b0 = next(i for i, e in enumerate(ev) if e == ("issue", "blocks.0") and i > pos[("fwd_end", "root")])
    assert reissue_b0 < first_b1_reduce
