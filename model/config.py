"""The GPT's shape as data: `ModelConfig.for_depth(d)` is the one dial, everything else derives from it.

    cfg = ModelConfig.for_depth(20)                     # 1280 wide, 10 heads of 128, vocab 65,536, T = 2048
    cfg = ModelConfig.for_depth(2, model_dim=128, head_dim=32, vocab_size=512, sequence_len=64)   # a test model
    cfg.num_params(), cfg.flops_per_token()             # MFU and the training horizon depend on these

The config is frozen and JSON-able (`to_dict`/`from_dict`); every checkpoint stores it. Parameter counts and
FLOPs are computed from the config alone, so they are known before any weight exists (tests check them against
the parameters of a model built on the meta device, and against nanochat's published counts).
Limits: head_dim must be even (rotary pairs dims i and i + D/2); n_head must be a multiple of n_kv_head (GQA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# nanochat §4.1: model_dim = depth × 64, rounded up to a multiple of head_dim ("aspect ratio" 64).
ASPECT_RATIO = 64


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True)
class ModelConfig:
    depth: int  # number of transformer blocks (L)
    model_dim: int  # C
    n_head: int  # H, query heads; model_dim = n_head × head_dim
    n_kv_head: int  # Hkv, key/value heads (GQA when < n_head)
    head_dim: int = 128  # D: nanochat fixes 128
    vocab_size: int = 65536  # V: the tokenizer's, special tokens included (nanochat v0: 65,536; HEAD: 32,768)
    sequence_len: int = 2048  # training context T
    rope_base: float = 100_000.0  # nanochat HEAD (v0 used 10,000)
    qk_scale: float = 1.2  # q and k multiplied by 1.2 after QK-norm: ×1.44 on the attention logits (nanochat)
    softcap: float = 15.0  # logits → 15·tanh(logits/15) in fp32 (nanochat, all eras)
    mlp_ratio: int = 4  # MLP hidden = 4·C, ReLU² (SwiGLU measured worse in nanochat, Feb 2026)
    # Per-layer attention span, tiled over layers: L = full causal context, S = a short sliding window.
    # nanochat HEAD uses "SSSL"; "L" is our default because SDPA has no fast sliding window (issue 4 brings FA).
    window_pattern: str = "L"
    short_window: int | None = None  # S span in keys; None = quarter context rounded up to 128 (nanochat: 512)
    value_embeds: bool = False  # ResFormer value embeddings on alternate layers; off until measured here
    pad_vocab_to: int = 64  # vocab tables padded so dim 0 shards evenly (nanochat); logits sliced back to V

    def __post_init__(self):
        for name in ("depth", "model_dim", "n_head", "n_kv_head", "head_dim", "vocab_size", "sequence_len",
                     "mlp_ratio", "pad_vocab_to"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if self.model_dim != self.n_head * self.head_dim:
            raise ValueError(f"model_dim {self.model_dim} != n_head {self.n_head} × head_dim {self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head} (GQA)")
        if not self.window_pattern or set(self.window_pattern) - {"L", "S"}:
            raise ValueError(f"window_pattern must be a non-empty string of 'L'/'S', got {self.window_pattern!r}")
        if self.short_window is not None and (not isinstance(self.short_window, int) or self.short_window <= 0):
            raise ValueError(f"short_window must be a positive int or None, got {self.short_window!r}")
        if self.softcap <= 0 or self.qk_scale <= 0 or self.rope_base <= 0:
            raise ValueError("softcap, qk_scale and rope_base must be positive")

    # ---- construction and serialisation --------------------------------------------------------------------
    @classmethod
    def for_depth(cls, depth: int, **overrides) -> ModelConfig:
        """The config of a depth-`depth` model; any field may be overridden (width and heads re-derive)."""
        head_dim = overrides.pop("head_dim", 128)
        model_dim = overrides.pop("model_dim", round_up(depth * ASPECT_RATIO, head_dim))
        if model_dim % head_dim:
            raise ValueError(f"model_dim {model_dim} is not a multiple of head_dim {head_dim}")
        n_head = overrides.pop("n_head", model_dim // head_dim)
        n_kv_head = overrides.pop("n_kv_head", n_head)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"ModelConfig.for_depth: unknown fields {sorted(unknown)}")
        return cls(depth=depth, model_dim=model_dim, n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim,
                   **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error (a checkpoint from another version must not load
        silently with a field ignored)."""
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    # ---- derived shapes ------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        return round_up(self.vocab_size, self.pad_vocab_to)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention span: None = full causal, w = a query at i sees keys i−w .. i (FlashAttention's
        window_size=(w, 0), as nanochat). The pattern tiles over the layers; the last layer is always full."""
        short = self.short_window or round_up(-(-self.sequence_len // 4), 128)
        pat = self.window_pattern
        windows = [None if pat[i % len(pat)] == "L" else short for i in range(self.depth)]
        windows[-1] = None
        return tuple(windows)

    def value_embed_layers(self) -> tuple[int, ...]:
        """Layers with a value embedding: alternate layers ending at the last one (nanochat: i ≡ L−1 mod 2)."""
        if not self.value_embeds:
            return ()
        return tuple(i for i in range(self.depth) if (self.depth - 1 - i) % 2 == 0)

    # ---- parameter counts ----------------------------------------------------------------------------------
    # Per layer: c_q C·C, c_k and c_v C·kv_dim each, attn c_proj C·C, c_fc C·rC, mlp c_proj rC·C
    # (= 12·C² with r = 4 and no GQA, nanochat §4.4), plus a (Hkv × 12) gate on value-embedding layers.
    VE_GATE_CHANNELS = 12  # the gate reads the first 12 channels of x (nanochat)

    def num_matrix_params(self) -> int:
        """Transformer block matrices (the Muon group), value-embedding gates included."""
        C = self.model_dim
        per_layer = 2 * C * C + 2 * C * self.kv_dim + 2 * self.mlp_ratio * C * C
        gates = len(self.value_embed_layers()) * self.n_kv_head * self.VE_GATE_CHANNELS
        return self.depth * per_layer + gates

    def num_embedding_params(self) -> int:
        """wte plus value-embedding tables (rows padded like the lm_head)."""
        Vp = self.padded_vocab_size
        return Vp * self.model_dim + len(self.value_embed_layers()) * Vp * self.kv_dim

    def num_lm_head_params(self) -> int:
        return self.padded_vocab_size * self.model_dim

    def num_scalar_params(self) -> int:
        return 2 * self.depth  # resid_λ and x0_λ per layer

    def num_scaling_params(self) -> int:
        """Matrices + lm_head: nanochat's "Kaplan-style" count that sets the token horizon (§5.4)."""
        return self.num_matrix_params() + self.num_lm_head_params()

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """KV-cache bytes one token occupies over all layers (k and v): L·2·Hkv·D·bytes (nanochat §4.5)."""
        return self.depth * 2 * self.n_kv_head * self.head_dim * bytes_per_element

    def num_params(self) -> int:
        return self.num_scaling_params() + self.num_embedding_params() + self.num_scalar_params()

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), nanochat §4.5: 6 × the params of every matmul
        (block matrices and lm_head; not embeddings or scalars) + Σ_layers 12·H·D·min(window, T) for attention.
        The lm_head counts V rows, not the padding: the loss multiplies by lm_head.weight[:V] only."""
        T = seq_len or self.sequence_len
        matmul = self.num_matrix_params() + self.vocab_size * self.model_dim
        attn = sum(12 * self.n_head * self.head_dim * (T if w is None else min(w, T)) for w in self.layer_windows())
        return 6 * matmul + attn

    def summary(self) -> str:
        return (f"d{self.depth}: C={self.model_dim} H={self.n_head} Hkv={self.n_kv_head} D={self.head_dim} "
                f"V={self.vocab_size} T={self.sequence_len} windows={self.window_pattern} ve={self.value_embeds} "
                f"params={self.num_params():,} flops/token={self.flops_per_token():.3e}")


def rotary_len(config: ModelConfig) -> int:
    # nanochat precomputes rotary tables for 10× the training context, so inference may run past it.
    return 10 * config.sequence_len

