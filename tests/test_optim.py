"""MuonAdamW (train/optim.py): AdamW against torch's, Muon's pieces against hand math, training and exact resume.

Tolerances: the plain AdamW path is written as torch.optim.AdamW(foreach=False) computes, so they must agree
bitwise (atol = rtol = 0); torch's fused kernel against the plain path: 1e-6 relative (different op order).
"""

import copy
import math

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from train.optim import (
    MuonAdamW,
    adamw_update,
    cautious_update_,
    equilibrate_rows_,
    group_by_shape,
    muon_lr_scale,
    muon_update,
    nesterov_,
    second_moment_shape,
    variance_reduce,
)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig.for_depth(2, model_dim=128, head_dim=32, vocab_size=256, sequence_len=32)
    return GPT.build(cfg)


def fixed_batch(seed: int = 1, B: int = 4, T: int = 32, V: int = 256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


# ---- AdamW ---------------------------------------------------------------------------------------------------
def _adamw_pair(wd=0.05, betas=(0.8, 0.95), eps=1e-10, lr=3e-2):
    torch.manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonAdamW([dict(name="a", optimizer="adamw", params=ours, lr=lr, betas=betas, eps=eps, weight_decay=wd)])
    ref_opt = torch.optim.AdamW(ref, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    return ours, ref, opt, ref_opt


def test_adamw_matches_torch_bitwise():
    ours, ref, opt, ref_opt = _adamw_pair()
    for step in range(6):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:  # a changed LR mid-run (what the schedule does) must be honoured
            opt.set_lr_multiplier(0.5)
            ref_opt.param_groups[0]["lr"] *= 0.5
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_adamw_fused_kernel_matches_plain_math():
    # torch._fused_adamw_ is the CUDA path; torch also implements it on the CPU, so its call is tested here.
    torch.manual_seed(0)
    ps = [torch.randn(17, 9), torch.randn(33)]
    qs = [p.clone() for p in ps]
    state = lambda ts: ([torch.zeros_like(t) for t in ts], [torch.zeros_like(t) for t in ts],  # noqa: E731
                        [torch.zeros(()) for _ in ts])
    (m1, v1, s1), (m2, v2, s2) = state(ps), state(qs)
    for _ in range(5):
        gs = [torch.randn_like(p) for p in ps]
        kw = dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-10, weight_decay=0.1)
        adamw_update(ps, gs, m1, v1, s1, fused=True, **kw)
        adamw_update(qs, [g.clone() for g in gs], m2, v2, s2, fused=False, **kw)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert [s.item() for s in s1] == [5.0, 5.0]


def test_adamw_bf16_param_keeps_fp32_state():
    p = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = MuonAdamW([dict(name="e", optimizer="adamw", params=[p], lr=0.1, betas=(0.8, 0.995), eps=1e-10)])
    before = p.detach().clone()
    p.grad = torch.randn(8, 4).bfloat16()
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
    assert not torch.equal(p, before)


# ---- Muon pieces ---------------------------------------------------------------------------------------------
def test_nesterov_two_steps_by_hand():
    mu = 0.9
    buf = torch.zeros(1, 1, 2)
    g1 = torch.tensor([[[1.0, -2.0]]])
    g2 = torch.tensor([[[3.0, 0.5]]])
    # step 1: buf = 0.1·g1 = [0.1, -0.2]; g = 0.1·g1 + 0.9·buf = [0.19, -0.38]
    out = nesterov_(g1.clone(), buf, mu)
    torch.testing.assert_close(buf, torch.tensor([[[0.1, -0.2]]]))
    torch.testing.assert_close(out, torch.tensor([[[0.19, -0.38]]]))
    # step 2: buf = 0.9·[0.1, -0.2] + 0.1·[3, 0.5] = [0.39, -0.13]; g = 0.1·g2 + 0.9·buf = [0.651, -0.067]
    out = nesterov_(g2.clone(), buf, mu)
    torch.testing.assert_close(buf, torch.tensor([[[0.39, -0.13]]]))
    torch.testing.assert_close(out, torch.tensor([[[0.651, -0.067]]]))


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 160)])
def test_muon_update_is_orthogonal_times_lr_scale(shape):
    # With momentum 0, no WD and every refinement off, the update is −lr·√max(1, m/n)·polar(G): its singular
    # values lie near 1 × that scale (Polar Express, 5 steps, leaves them within ~±15% of 1 on a random matrix).
    torch.manual_seed(0)
    m, n = shape
    p = torch.randn(1, m, n)
    before = p.clone()
    buf = torch.zeros(1, m, n)
    lr = 0.02
    muon_update(p, torch.randn(1, m, n), buf, None, lr=lr, momentum=0.0, weight_decay=0.0, muoneq=False,
                muon_plus=False)
    s = torch.linalg.svdvals((before - p)[0] / (lr * muon_lr_scale(m, n)))
    assert 0.8 < s.min() and s.max() < 1.2, (s.min(), s.max())
    assert s.shape[0] == min(m, n)


def test_muon_plus_sets_frobenius_norm_and_normuon_keeps_it():
    torch.manual_seed(0)
    m, n = 48, 80
    p = torch.zeros(2, m, n)
    sm = torch.zeros(second_moment_shape(2, m, n))
    muon_update(p, torch.randn(2, m, n), torch.zeros(2, m, n), sm, lr=1.0, momentum=0.0, weight_decay=0.0)
    # p started at 0, so p = −u: ‖u‖_F = √min(m, n) per matrix (Muon+), kept by the variance reduction.
    torch.testing.assert_close(p.norm(dim=(-2, -1)), torch.full((2,), math.sqrt(min(m, n))), rtol=1e-5, atol=0)
    assert sm.shape == (2, 1, n) and (sm > 0).all()  # wide: one second moment per column


def test_variance_reduce_equalises_rows_first_step():
    # First step from a zero buffer: the second moment is (1−β2)·mean(u²) per row, so every row gets the same
    # RMS, and the total norm is unchanged.
    torch.manual_seed(0)
    U = torch.randn(1, 6, 3) * torch.arange(1, 7.0).view(1, 6, 1)  # tall: rows of very different size
    sm = torch.zeros(second_moment_shape(1, 6, 3))
    out = variance_reduce(U, sm, beta2=0.9)
    rms = out.square().mean(dim=-1)
    torch.testing.assert_close(rms, rms[:, :1].expand_as(rms), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.norm(), U.norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sm, 0.1 * U.square().mean(dim=-1, keepdim=True))


def test_equilibrate_rows():
    X = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]])
    target = X.norm() / math.sqrt(3)
    out = equilibrate_rows_(X.clone())
    torch.testing.assert_close(out[0, :2].norm(dim=-1), torch.full((2,), target.item()))
    assert torch.equal(out[0, 2], torch.zeros(2))  # a zero row stays zero


def test_cautious_weight_decay_masks():
    p = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    u = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0])  # u·p: +, −, +, −, 0 (0 counts: decay applies)
    lr, wd = 0.1, 0.5
    out = p.clone()
    cautious_update_(out, u, lr, wd)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(out, p - lr * u - lr * wd * p * mask)


def test_grouping_covers_every_matrix_once():
    model = tiny_model()
    mats = model.matrix_params()
    groups = group_by_shape(mats)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(mats)))
    for g in groups:
        assert len({tuple(mats[i].shape) for i in g}) == 1
    assert len({tuple(mats[g[0]].shape) for g in groups}) == len(groups)  # one stack per shape
    opt = MuonAdamW(model.param_groups())
    muon = [g for g in opt.param_groups if g["optimizer"] == "muon"]
    assert sum(len(i) for g in muon for i in g["stacks"]) == len(mats)
    every = [p for g in opt.param_groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


def test_rejects_bad_groups():
    a = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="twice"):
        MuonAdamW([dict(optimizer="muon", params=[a], lr=0.1), dict(optimizer="adamw", params=[a], lr=0.1)])
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(optimizer="muon", params=[torch.nn.Parameter(torch.randn(3))], lr=0.1)])
    with pytest.raises(ValueError, match="optimizer"):
        MuonAdamW([dict(optimizer="sgd", params=[a], lr=0.1)])


def test_muon_stack_equals_matrices_one_by_one():
    # FSDP runs muon_update on the matrices a rank owns: any partition of a stack must give the same result.
    torch.manual_seed(0)
    P, G = torch.randn(3, 16, 24), torch.randn(3, 16, 24)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    whole, bw, sw = P.clone(), torch.randn(3, 16, 24), torch.rand(3, 1, 24)
    parts, bp, sp = whole.clone(), bw.clone(), sw.clone()
    muon_update(whole, G.clone(), bw, sw, **kw)
    for k in range(3):
        muon_update(parts[k:k + 1], G[k:k + 1].clone(), bp[k:k + 1], sp[k:k + 1], **kw)
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bp, bw, atol=0, rtol=0)


# ---- the optimizer on a model --------------------------------------------------------------------------------
def _train(model, opt, steps, batch):
    idx, tgt = batch
    losses = []
    for step in range(steps):
        loss = model(idx, tgt)
        loss.backward()
        opt.set_muon_momentum(0.85 + 0.1 * step / max(steps, 1))
        opt.set_muon_weight_decay(0.1)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_trains_tiny_gpt():
    model = tiny_model()
    opt = MuonAdamW(model.param_groups())
    losses = _train(model, opt, 30, fixed_batch())
    assert losses[0] > 5.0  # ≈ ln 256 = 5.55 at init
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(math.isfinite(x) for x in losses)
    # Muon moved the matrices too, including the zero-initialised output projections.
    for block in model.blocks:
        assert block.attn.c_proj.weight.abs().max() > 0 and block.mlp.c_proj.weight.abs().max() > 0


def test_state_dict_round_trip_is_bitwise():
    batch = fixed_batch()
    model = tiny_model()
    opt = MuonAdamW(model.param_groups(), lr_scale=0.7)
    _train(model, opt, 3, batch)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    expected = _train(model, opt, 3, batch)

    resumed = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = MuonAdamW(resumed.param_groups(), lr_scale=0.7)
    opt2.load_state_dict(saved_opt)
    got = _train(resumed, opt2, 3, batch)
    assert got == expected
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_state_dict_rejects_mismatch():
    model = tiny_model()
    opt = MuonAdamW(model.param_groups())
    sd = copy.deepcopy(opt.state_dict())
    sd["groups"] = sd["groups"][:-1]
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["adamw"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)


def test_hyperparameter_setters():
    model = tiny_model()
    opt = MuonAdamW(model.param_groups(), lr_scale=2.0)
    base = {g["name"]: g["lr"] for g in opt.param_groups}
    assert base["matrix"] == pytest.approx(0.04)
    opt.set_lr_multiplier(0.25)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base[g["name"]] * 0.25)
    opt.set_muon_momentum(0.9)
    opt.set_muon_weight_decay(0.05)
    muon = [g for g in opt.param_groups if g["optimizer"] == "muon"]
    assert muon and all(g["momentum"] == 0.9 and g["weight_decay"] == 0.05 for g in muon)
    adamw = [g for g in opt.param_groups if g["optimizer"] == "adamw"]
    assert all("momentum" not in g for g in adamw)


@pytest.mark.gpu
def test_gpu_step_bf16_polar_express_and_fused_adamw():
    # CUDA path: Muon through the Triton kernel in bf16, AdamW through torch._fused_adamw_; compare with the
    # same optimizer in fp32 on the CPU over a few steps (bf16 iterates: loose tolerance on the weights).
    batch = fixed_batch()
    cpu = tiny_model()
    gpu = copy.deepcopy(cpu).cuda()
    opt_cpu, opt_gpu = MuonAdamW(cpu.param_groups()), MuonAdamW(gpu.param_groups())
    lc = _train(cpu, opt_cpu, 5, batch)
    lg = _train(gpu, opt_gpu, 5, tuple(t.cuda() for t in batch))
    assert abs(lc[-1] - lg[-1]) < 0.05 * lc[-1], (lc, lg)
    for (n, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        torch.testing.assert_close(b.cpu(), a, atol=2e-2, rtol=5e-2, msg=n)
