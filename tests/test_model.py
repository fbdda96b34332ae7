"""The GPT and its config: counts and FLOPs against nanochat's published numbers, init, loss, shapes, options,
parameter groups, and the model with Triton kernels against the model with their twins."""

import math

import pytest
import torch

import kernels as K
from model.attention import AttentionMeta, attend, attend_naive
from model.config import ModelConfig
from model.gpt import GPT

V = 320  # small vocab for CPU tests: pads to 320 (a multiple of 64); 300 checks the padding below


def tiny(**overrides) -> ModelConfig:
    kw = dict(model_dim=128, head_dim=32, vocab_size=V, sequence_len=32)
    kw.update(overrides)
    return ModelConfig.for_depth(2, **kw)


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT.build(cfg)


def batch(cfg: ModelConfig, B: int = 4, T: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = T or cfg.sequence_len
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


# ---- config: counts and FLOPs vs nanochat (reference §4.4, §4.5) ----------------------------------------------

def test_v0_d20_param_count():
    # nanochat v0 d20 (65,536 vocab, no value embeddings, no scalars): 560,988,160. We add 2 scalars per layer.
    cfg = ModelConfig.for_depth(20)
    assert (cfg.model_dim, cfg.n_head, cfg.head_dim) == (1280, 10, 128)
    assert cfg.num_params() - cfg.num_scalar_params() == 560_988_160
    assert cfg.num_scalar_params() == 40
    assert ModelConfig.for_depth(32).num_params() - 64 == 1_879_048_192  # v0 d32


@pytest.mark.parametrize("depth,total", [(12, 286_261_730), (20, 896_533_746), (24, 1_384_122_122),
                                         (26, 1_681_786_938), (32, 2_818_575_450)])
def test_head_param_counts(depth, total):
    # nanochat HEAD (vocab 32,768, value embeddings): its totals include smear (24 + 1) and backout (1) scalars,
    # which we leave out: 26 fewer.
    cfg = ModelConfig.for_depth(depth, vocab_size=32768, value_embeds=True, window_pattern="SSSL")
    assert cfg.num_params() == total - 26


def test_head_d20_breakdown():
    cfg = ModelConfig.for_depth(20, vocab_size=32768, value_embeds=True, window_pattern="SSSL")
    assert cfg.num_lm_head_params() == 41_943_040
    assert cfg.num_embedding_params() == 41_943_040 * 11  # wte + 10 value-embedding tables
    assert round(cfg.num_matrix_params() / 1e5) == 3932  # 393.2M
    assert round(cfg.num_scaling_params() / 1e5) == 4352  # 435.2M


def test_flops_per_token():
    # v0 d20: ≈3.49e9 (full attention); HEAD d20 2.886e9, d24 ≈4.775e9, d12 7.60e8 (SSSL, S = 512).
    assert ModelConfig.for_depth(20).flops_per_token() == 3_491_758_080
    head = dict(vocab_size=32768, value_embeds=True, window_pattern="SSSL")
    assert round(ModelConfig.for_depth(20, **head).flops_per_token() / 1e6) == 2886
    assert round(ModelConfig.for_depth(24, **head).flops_per_token() / 1e6) == 4775
    assert round(ModelConfig.for_depth(12, **head).flops_per_token() / 1e7) == 76


def test_flops_formula_by_hand():
    cfg = tiny(window_pattern="SL", short_window=8)  # layer 0: window 8, layer 1 (last): full
    C, Vv, T = 128, V, 32
    matmul = 2 * 12 * C * C + Vv * C
    assert cfg.flops_per_token() == 6 * matmul + 12 * 4 * 32 * (8 + T)
    assert cfg.flops_per_token(seq_len=4) == 6 * matmul + 12 * 4 * 32 * (4 + 4)


def test_windows_and_value_embed_layers():
    cfg = ModelConfig.for_depth(24, window_pattern="SSSL")
    w = cfg.layer_windows()
    assert w.count(None) == 6 and w.count(512) == 18 and w[-1] is None  # nanochat: d24 → 6 L + 18 S
    assert ModelConfig.for_depth(5, window_pattern="S").layer_windows() == (512,) * 4 + (None,)
    assert ModelConfig.for_depth(4, value_embeds=True).value_embed_layers() == (1, 3)
    assert ModelConfig.for_depth(5, value_embeds=True).value_embed_layers() == (0, 2, 4)


@pytest.mark.parametrize("cfg", [tiny(), tiny(n_kv_head=2, value_embeds=True, window_pattern="SL", short_window=8),
                                 ModelConfig.for_depth(20, vocab_size=32768, value_embeds=True)])
def test_counts_match_built_model(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    assert sum(p.numel() for p in model.matrix_params()) == cfg.num_matrix_params()


def test_config_dict_round_trip_and_errors():
    cfg = tiny(n_kv_head=2, window_pattern="SSL", value_embeds=True)
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown keys.*'nope'"):
        ModelConfig.from_dict({**d, "nope": 1})
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="window_pattern"):
        tiny(window_pattern="SXL")
    with pytest.raises(TypeError, match="unknown fields"):
        ModelConfig.for_depth(2, widht=3)
    assert ModelConfig.for_depth(3).model_dim == 256  # 192 rounded up to a multiple of 128


# ---- the model ----------------------------------------------------------------------------------------------

def test_meta_build_init_is_finite():
    cfg = tiny(value_embeds=True, n_kv_head=2)
    model = build(cfg)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32, name
        assert torch.isfinite(p).all(), name
    assert torch.isfinite(model.cos).all() and torch.isfinite(model.sin).all()
    assert (model.blocks[0].attn.c_proj.weight == 0).all() and (model.blocks[1].mlp.c_proj.weight == 0).all()
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.05]))
    assert abs(model.wte.weight.std().item() - 0.8) < 0.02


def test_init_loss_is_ln_vocab():
    cfg = tiny(vocab_size=300)  # padded to 320 rows; the padding must not enter the softmax
    model = build(cfg)
    assert model.lm_head.weight.shape[0] == 320
    idx, tgt = batch(cfg)
    loss = model(idx, tgt)
    assert abs(loss.item() - math.log(300)) < 0.1


def test_logits_shapes_and_softcap():
    cfg = tiny()
    model = build(cfg)
    idx, _ = batch(cfg, B=3, T=10)
    last = model(idx)
    assert last.shape == (3, V) and last.dtype == torch.float32
    full = model(idx, logits_positions="all")
    assert full.shape == (3, 10, V)
    torch.testing.assert_close(full[:, -1], last)
    some = model(idx, logits_positions=torch.tensor([0, 4]))
    torch.testing.assert_close(some, full[:, [0, 4]])
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # huge logits: the softcap bounds them by 15
    assert model(idx).abs().max() <= cfg.softcap
    with pytest.raises(ValueError, match="logits_positions"):
        model(idx, logits_positions="first")


def test_loss_reductions_agree():
    cfg = tiny()
    model = build(cfg)
    idx, tgt = batch(cfg)
    tgt = tgt.clone()
    tgt[0, :5] = -1
    mean, total, per = (model(idx, tgt, loss_reduction=r) for r in ("mean", "sum", "none"))
    assert per.shape == tgt.shape and (per[0, :5] == 0).all()
    n = (tgt != -1).sum()
    torch.testing.assert_close(total, per.sum())
    torch.testing.assert_close(mean, total / n)


def test_logits_and_loss_agree():
    cfg = tiny()
    model = build(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.1)
    idx, tgt = batch(cfg, B=2, T=12)
    logits = model(idx, logits_positions="all")
    expected = torch.nn.functional.cross_entropy(logits.view(-1, V), tgt.reshape(-1))
    torch.testing.assert_close(model(idx, tgt), expected)


def test_causality():
    # Changing a future token must not change the logits of earlier positions.
    cfg = tiny(n_kv_head=1, value_embeds=True, window_pattern="SL", short_window=5)
    model = build(cfg)
    _scramble(model)
    idx, _ = batch(cfg, B=1, T=16)
    idx2 = idx.clone()
    idx2[0, 10] = (idx2[0, 10] + 1) % V
    a, b = model(idx, logits_positions="all"), model(idx2, logits_positions="all")
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def _scramble(model: GPT, seed: int = 3) -> None:
    """Random nonzero weights everywhere (init zeroes the output projections, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)


def test_gqa_runs_and_matches_repeated_heads():
    cfg = tiny(n_kv_head=2)
    model = build(cfg)
    _scramble(model)
    idx, tgt = batch(cfg)
    loss = model(idx, tgt)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn.c_k.weight.grad.shape == (64, 128)
    # attend with GQA == attention over repeated KV heads
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    meta = AttentionMeta.dense_causal(9)
    torch.testing.assert_close(attend(q, k, v, meta), attend_naive(q, k, v), atol=1e-5, rtol=1e-5)


def test_packed_documents_attend_only_within_each():
    # Two documents back to back in one row with "packed" metadata give the logits of each document run alone
    # (rotary is relative, so the second document's shifted positions do not matter).
    cfg = tiny()
    model = build(cfg)
    _scramble(model)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, V, (1, 11), generator=g), torch.randint(0, V, (1, 6), generator=g)
    meta = AttentionMeta.packed(torch.tensor([0, 11, 17], dtype=torch.int32))
    both = model(torch.cat([a, b], dim=1), logits_positions="all", attn_meta=meta)
    torch.testing.assert_close(both[:, :11], model(a, logits_positions="all"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[:, 11:], model(b, logits_positions="all"), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="start at 0"):
        AttentionMeta.packed(torch.tensor([1, 5], dtype=torch.int32))


@pytest.mark.parametrize("window", [0, 1, 3, 7, 8, None])
def test_sliding_window_attend(window):
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 4, 8), torch.randn(2, 9, 4, 8)
    meta = AttentionMeta.dense_causal(9)
    torch.testing.assert_close(attend(q, k, v, meta, window), attend_naive(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_sliding_window_model_differs_from_full():
    full_cfg = tiny()
    swa_cfg = tiny(window_pattern="SL", short_window=8)
    full, swa = build(full_cfg), build(swa_cfg)
    _scramble(full)
    swa.load_state_dict(full.state_dict())
    idx, tgt = batch(full_cfg, T=32)
    assert not torch.allclose(full(idx, tgt), swa(idx, tgt))
    short, _ = batch(full_cfg, T=8)  # T ≤ window + 1: every causal key is inside the window
    torch.testing.assert_close(full(short, logits_positions="all"), swa(short, logits_positions="all"))


def test_positions_shift_rotary():
    cfg = tiny()
    model = build(cfg)
    _scramble(model)
    idx, _ = batch(cfg, B=2, T=8)
    default = model(idx, logits_positions="all")
    torch.testing.assert_close(model(idx, positions=torch.arange(8), logits_positions="all"), default)
    # Rotary encodes relative position: shifting all positions leaves attention scores (nearly) unchanged.
    shifted = model(idx, positions=torch.arange(8) + 100, logits_positions="all")
    torch.testing.assert_close(shifted, default, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="positions"):
        model(idx, positions=torch.arange(7))


def test_param_groups_cover_every_parameter_once():
    for cfg in (tiny(), tiny(value_embeds=True, n_kv_head=2)):
        model = build(cfg)
        groups = model.param_groups()
        seen = [id(p) for g in groups for p in g["params"]]
        assert len(seen) == len(set(seen)) == len(list(model.parameters()))
        muon = [g for g in groups if g["optimizer"] == "muon"]
        assert len(muon) == 1 and all(p.ndim == 2 for p in muon[0]["params"]) and muon[0]["lr"] == 0.02
        names = {g["name"] for g in groups}
        assert {"matrix", "lm_head", "wte", "resid_lambdas", "x0_lambdas"} <= names
        assert ("value_embeds" in names) == cfg.value_embeds


def test_overfits_one_batch():
    cfg = tiny(vocab_size=256, n_kv_head=2, value_embeds=True)
    model = build(cfg)
    idx, tgt = batch(cfg, B=4, T=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(150):
        loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.3:
            break
    assert loss.item() < 0.5, f"loss {loss.item():.3f} after {step + 1} steps"


def test_compute_dtype_bf16_forward_backward():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT.build(cfg, compute_dtype=torch.bfloat16)
    ref = build(cfg)
    idx, tgt = batch(cfg)
    loss = model(idx, tgt)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref(idx, tgt).item()) < 0.05
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


# ---- kernels vs twins through the whole model -----------------------------------------------------------------

def _loss_and_grads(model, idx, tgt):
    model.zero_grad(set_to_none=True)
    loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


TRITON_CFG = dict(vocab_size=200, n_kv_head=2, value_embeds=True, window_pattern="SL", short_window=8)


# Relative error ‖kernels − twins‖ / ‖twins‖ allowed for the loss and for every gradient, per compute dtype.
MODEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_kernels_match_twins_through_the_model(dtype):
    # Under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); fp32
    # parameters, activations in `dtype`. bf16 is a gpu test (the interpreter computes bf16 wrongly).
    cfg = tiny(**TRITON_CFG)
    torch.manual_seed(0)
    model = GPT.build(cfg, compute_dtype=dtype)
    _scramble(model)
    idx, tgt = batch(cfg, B=2, T=16)
    with K.backend("ref"):
        loss_ref, grads_ref = _loss_and_grads(model, idx, tgt)
    with K.backend("triton"):
        loss_tri, grads_tri = _loss_and_grads(model, idx, tgt)
        ops = ("attention", "rmsnorm", "qk_norm_rope", "relu2", "linear_cross_entropy")
        assert all(K.which(op) == "triton" for op in ops), {op: K.which(op) for op in ops}
    tol = MODEL_TOL[dtype]
    assert _rel(loss_tri, loss_ref) < tol
    assert grads_tri.keys() == grads_ref.keys()
    for name in grads_ref:
        assert _rel(grads_tri[name], grads_ref[name]) < tol, name


@pytest.mark.gpu
def test_triton_kernels_match_twins_through_the_model_bf16_gpu():
    cfg = ModelConfig.for_depth(4, vocab_size=32768, n_kv_head=2, value_embeds=True, window_pattern="SL")
    torch.manual_seed(0)
    model = GPT.build(cfg, device="cuda", compute_dtype=torch.bfloat16)
    _scramble(model)
    idx, tgt = (t.cuda() for t in batch(cfg, B=4, T=512))
    with K.backend("ref"):
        loss_ref, grads_ref = _loss_and_grads(model, idx, tgt)
    with K.backend("triton"):
        loss_tri, grads_tri = _loss_and_grads(model, idx, tgt)
    assert _rel(loss_tri, loss_ref) < 1e-2
    for name in grads_ref:
        assert _rel(grads_tri[name], grads_ref[name]) < 5e-2, name


def test_training_steps_with_and_without_kernels_agree():
    cfg = tiny(**TRITON_CFG)
    idx, tgt = batch(cfg, B=2, T=16)
    losses = {}
    for mode in ("ref", "triton"):
        model = build(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[mode] = []
        with K.backend(mode):
            for _ in range(3):
                loss = model(idx, tgt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[mode].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["ref"], rel=1e-4, abs=1e-4)


# ---- paged inference path ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("cfg_overrides", [{}, dict(n_kv_head=2, value_embeds=True, window_pattern="SL",
                                                    short_window=5)], ids=["plain", "gqa-ve-window"])
def test_paged_forward_equals_dense(cfg_overrides, backend):
    """Chunked prefill then decode steps over a paged pool (shuffled blocks, several sequences of different lengths
    in one row) give the logits of the dense forward over each whole sequence."""
    from model.attention import paged_meta

    cfg = tiny(**cfg_overrides)
    model = build(cfg)
    _scramble(model)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 13, 9)]
    bs, num_blocks = 4, 24
    kv = model.allocate_kv_cache(num_blocks, bs, torch.float32)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[i * 6:(i + 1) * 6] for i in range(3)]  # 6 blocks (24 tokens) per sequence, shuffled ids
    cached = [0, 0, 0]

    def step(new: list[list[int]]) -> torch.Tensor:
        """Feed the new tokens of each sequence; returns the logits of each sequence's last new token."""
        ids, pos, slots, cu = [], [], [], [0]
        for i, toks in enumerate(new):
            for j, t in enumerate(toks):
                p = cached[i] + j
                ids.append(t)
                pos.append(p)
                slots.append(tables[i][p // bs] * bs + p % bs)
            cu.append(cu[-1] + len(toks))
        for i, toks in enumerate(new):
            cached[i] += len(toks)
        meta = paged_meta(kv, torch.tensor(slots), torch.tensor(tables, dtype=torch.int32),
                          torch.tensor(cached, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32))
        last = torch.tensor(cu[1:]) - 1
        with torch.no_grad(), K.backend(backend):
            return model(torch.tensor([ids]), positions=torch.tensor(pos), attn_meta=meta, logits_positions=last)[0]

    def dense_last(toks: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([toks]))[0]

    # Chunked prefill: uneven chunks, then the rest, then three decode steps (greedy continuation).
    out = step([s[:3] for s in seqs])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i], dense_last(s[:3]), atol=1e-4, rtol=1e-4)
    out = step([s[3:] for s in seqs])
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i], dense_last(s), atol=1e-4, rtol=1e-4)
    for _ in range(3):
        nxt = out.argmax(-1).tolist()
        for i, t in enumerate(nxt):
            seqs[i].append(t)
        out = step([[t] for t in nxt])  # one new token each: the decode kernel
        for i, s in enumerate(seqs):
            torch.testing.assert_close(out[i], dense_last(s), atol=1e-4, rtol=1e-4)
    assert K.which("paged_attention_decode") == backend


def test_kv_bytes_per_token():
    cfg = ModelConfig.for_depth(20)
    assert cfg.kv_bytes_per_token() == 20 * 2 * 10 * 128 * 2
