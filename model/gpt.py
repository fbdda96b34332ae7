"""The GPT: nanochat HEAD's architecture (§4.2) without smear and backout.

    model = GPT.build(ModelConfig.for_depth(20), device="cuda", compute_dtype=torch.bfloat16)
    loss = model(idx, targets)                       # idx, targets: (B, T) int64; targets −1 = not counted
    logits = model(idx)                              # (B, V) fp32 softcapped logits of the last position

idx → wte → RMSNorm → x0; per layer i: x = resid_λ[i]·x + x0_λ[i]·x0, x += attn(norm(x)), x += mlp(norm(x));
→ RMSNorm → untied lm_head (rows padded to a multiple of 64, logits sliced to V) → fp32 → 15·tanh(z/15).
Attention: bias-free c_q/c_k/c_v/c_proj, QK-norm + rotary + ×1.2 (`K.qk_norm_rope`), causal SDPA through
`model.attention.attend` (`K.attention`: FlashAttention on GPU, SDPA on CPU) with explicit metadata; optional sliding windows and value embeddings (config).
MLP: c_fc (C → 4C), ReLU² (`K.relu2`), c_proj (4C → C). RMSNorms are weightless; no biases anywhere.

Dtypes: parameters are fp32 masters; `compute_dtype` (bf16 on GPU) is what activations run in — every Linear
casts its weight to the activation dtype in forward (nanochat's custom Linear, which replaced autocast), the
embedding output and the per-layer scalars are cast the same way. Logits and the loss are fp32.
Footgun (nanochat's warning too): build on the meta device and call `init_weights()`; nothing in `__init__`
computes real values, so a model made with `GPT(config)` on a real device holds garbage until initialised.
The loss goes through `K.linear_cross_entropy`, which never materialises the (B·T, V) logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels as K
from model.attention import AttentionMeta, PagedKV, attend
from model.config import ModelConfig, rotary_len

LOGITS_POSITIONS = ("last", "all")


class Linear(nn.Linear):
    """Bias-free Linear with an fp32 master weight, cast to the input's dtype in forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        C, D = config.model_dim, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, D
        self.qk_scale = config.qk_scale
        self.window = config.layer_windows()[layer_idx]
        self.layer_idx = layer_idx
        self.c_q = Linear(C, config.n_head * D)
        self.c_k = Linear(C, config.kv_dim)
        self.c_v = Linear(C, config.kv_dim)
        self.c_proj = Linear(C, C)
        # Value-embedding gate: per KV head, 3·sigmoid(W·x[..., :12]) (nanochat HEAD), range (0, 3).
        has_ve = layer_idx in config.value_embed_layers()
        self.ve_gate = Linear(config.VE_GATE_CHANNELS, config.n_kv_head) if has_ve else None

    def forward(self, x, ve, cos, sin, meta: AttentionMeta) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = K.qk_norm_rope(q, k, cos, sin, scale=self.qk_scale)
        y = attend(q, k, v, meta, self.window, self.layer_idx)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.model_dim
        self.c_fc = Linear(config.model_dim, hidden)
        self.c_proj = Linear(hidden, config.model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(K.relu2(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, meta: AttentionMeta) -> torch.Tensor:
        x = x + self.attn(K.rmsnorm(x), ve, cos, sin, meta)
        return x + self.mlp(K.rmsnorm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        C, Vp = config.model_dim, config.padded_vocab_size
        self.wte = nn.Embedding(Vp, C)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.depth))
        # Value embeddings (ResFormer): a table of the input ids per chosen layer, added (gated) to v.
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, config.kv_dim)
                                           for i in config.value_embed_layers()})
        self.lm_head = Linear(C, Vp)
        self.resid_lambdas = nn.Parameter(torch.empty(config.depth))
        self.x0_lambdas = nn.Parameter(torch.empty(config.depth))
        # Rotary tables (angle per position and frequency), fp32: rebuilt by init_buffers, never saved.
        n = rotary_len(config)
        self.register_buffer("cos", torch.empty(n, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(n, config.head_dim // 2), persistent=False)

    @classmethod
    def build(cls, config: ModelConfig, device: torch.device | str = "cpu",
              compute_dtype: torch.dtype = torch.float32) -> GPT:
        """Meta-device construction, storage on `device`, then init_weights: the one way to get a fresh model."""
        with torch.device("meta"):
            model = cls(config, compute_dtype)
        model.to_empty(device=device)
        model.init_weights()
        return model

    # ---- initialisation (nanochat HEAD §4.3) ---------------------------------------------------------------
    @torch.no_grad()
    def init_buffers(self) -> None:
        cfg = self.config
        dev = self.cos.device
        # Frequencies base^(−2i/D), i < D/2: nanochat's (and the usual) rotary spectrum, base 100k.
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64, device=dev)
                                            / cfg.head_dim))
        angles = torch.outer(torch.arange(self.cos.shape[0], dtype=torch.float64, device=dev), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer (uses torch's global RNG; seed it for reproducibility)."""
        cfg = self.config
        C = cfg.model_dim
        bound = math.sqrt(3.0) / math.sqrt(C)  # uniform with std 1/√C
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)  # near-zero logits: the loss starts at ln(V)
        for block in self.blocks:
            a = block.attn
            for lin in (a.c_q, a.c_k, a.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(a.c_proj.weight)  # every block starts as the identity on the residual stream
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if a.ve_gate is not None:
                nn.init.uniform_(a.ve_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)  # like c_v
        # Residual and x0 mixing scalars: linear ramps over depth (nanochat HEAD).
        frac = torch.arange(cfg.depth, dtype=torch.float32, device=self.resid_lambdas.device) / max(cfg.depth - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        self.init_buffers()

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                positions: torch.Tensor | None = None, logits_positions="last",
                attn_meta: AttentionMeta | None = None):
        """idx: (B, T) int64 token ids < V.
        targets: (B, T) int64, −1 = ignored. With targets: the loss ("mean" over counted positions: a scalar;
        "sum": a scalar; "none": (B, T), 0 at ignored positions).
        Without targets: fp32 softcapped logits — logits_positions "last" → (B, V), "all" → (B, T, V), a 1-D
        int64 tensor of P positions → (B, P, V).
        positions: rotary positions, (T,) int64 shared by every row (default 0 .. T−1); attention stays causal
        within idx. (Per-row positions belong to the paged inference metadata of issue 4: the fused
        qk_norm_rope kernel takes (T, D/2) tables.)
        attn_meta: attention metadata (default: dense causal over T with the config's windows)."""
        cfg = self.config
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        cos, sin = self._rotary(T, positions)
        if attn_meta is None:
            attn_meta = AttentionMeta.dense_causal(T)
        dt = self.compute_dtype
        x = K.rmsnorm(self.wte(idx).to(dt))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i].to(dt) * x + self.x0_lambdas[i].to(dt) * x0
            ve = self.value_embeds[str(i)](idx).to(dt) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, attn_meta)
        x = K.rmsnorm(x)
        weight = self.lm_head.weight[: cfg.vocab_size].to(x.dtype)  # padding rows never become logits
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
            loss = K.linear_cross_entropy(x.reshape(B * T, -1), weight, targets.reshape(B * T),
                                          softcap=cfg.softcap, ignore_index=-1, reduction=loss_reduction)
            return loss.view(B, T) if loss_reduction == "none" else loss
        if isinstance(logits_positions, torch.Tensor):
            if logits_positions.ndim != 1:
                raise ValueError(f"logits_positions tensor must be 1-D, got shape {tuple(logits_positions.shape)}")
            x = x[:, logits_positions]
        elif logits_positions == "last":
            x = x[:, -1]
        elif logits_positions != "all":
            raise ValueError(f"logits_positions must be one of {LOGITS_POSITIONS} or an index tensor, "
                             f"got {logits_positions!r}")
        logits = F.linear(x, weight).float()
        return cfg.softcap * torch.tanh(logits / cfg.softcap)

    def _rotary(self, T: int, positions: torch.Tensor | None):
        n = self.cos.shape[0]
        if positions is None:
            if T > n:
                raise ValueError(f"sequence of {T} tokens is longer than the rotary table ({n} = 10 × sequence_len)")
            return self.cos[:T], self.sin[:T]
        if positions.shape != (T,):
            raise ValueError(f"positions must be (T,) with T={T}, got shape {tuple(positions.shape)}")
        # The range check reads values back to the host: skipped while a CUDA graph is being captured (the
        # runner's decode graphs), where a host sync is illegal; eager calls with the same metadata check it.
        capturing = positions.is_cuda and torch.cuda.is_current_stream_capturing()
        if positions.numel() and not capturing and (int(positions.min()) < 0 or int(positions.max()) >= n):
            raise ValueError(f"positions must lie in [0, {n}), got [{int(positions.min())}, {int(positions.max())}]")
        return self.cos[positions], self.sin[positions]

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None) -> PagedKV:
        """The engine's KV pool on the model's device: per layer (num_blocks, block_size, Hkv, D) for k and v."""
        cfg = self.config
        shape = (num_blocks, block_size, cfg.n_kv_head, cfg.head_dim)
        dev, dt = self.cos.device, dtype or self.compute_dtype
        return PagedKV(k=[torch.zeros(shape, device=dev, dtype=dt) for _ in range(cfg.depth)],
                       v=[torch.zeros(shape, device=dev, dtype=dt) for _ in range(cfg.depth)])

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def matrix_params(self) -> list[nn.Parameter]:
        """The 2-D block matrices (Muon's), in a fixed order."""
        return list(self.blocks.parameters())

    def param_groups(self, matrix_lr: float = 0.02, embedding_lr: float = 0.3, unembedding_lr: float = 0.008,
                     scalar_lr: float = 0.5) -> list[dict]:
        """Every parameter exactly once, grouped as nanochat's setup_optimizer (§5.1), with its base LRs,
        betas and weight decay as the defaults. The optimizer (train/) decides what to do with them; batch-size
        LR scaling (§5.4) is its business too. AdamW LRs of embeddings and lm_head are scaled by
        (C/768)^−0.5 as nanochat ("dmodel_lr_scale": LRs were tuned at d12, C = 768)."""
        dmodel = (self.config.model_dim / 768) ** -0.5
        groups = [
            dict(name="matrix", optimizer="muon", params=self.matrix_params(), lr=matrix_lr),
            dict(name="lm_head", optimizer="adamw", params=[self.lm_head.weight], lr=unembedding_lr * dmodel,
                 betas=(0.8, 0.96), weight_decay=0.01, eps=1e-10),
            dict(name="wte", optimizer="adamw", params=[self.wte.weight], lr=embedding_lr * dmodel,
                 betas=(0.8, 0.995), weight_decay=0.001, eps=1e-10),
            dict(name="resid_lambdas", optimizer="adamw", params=[self.resid_lambdas], lr=scalar_lr * 0.01,
                 betas=(0.8, 0.95), weight_decay=0.05, eps=1e-10),
            dict(name="x0_lambdas", optimizer="adamw", params=[self.x0_lambdas], lr=scalar_lr,
                 betas=(0.96, 0.95), weight_decay=0.0, eps=1e-10),
        ]
        if len(self.value_embeds):
            groups.insert(3, dict(name="value_embeds", optimizer="adamw", params=list(self.value_embeds.parameters()),
                                  lr=embedding_lr * dmodel * 0.5, betas=(0.8, 0.995), weight_decay=0.01, eps=1e-10))
        return groups
