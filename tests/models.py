"""Random-weight models for tests and benches."""

import torch

from model.config import ModelConfig
from model.gpt import GPT


def random_model(cfg: ModelConfig, scale: float, *, seed: int = 0, cls: type[GPT] = GPT,
                 device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32) -> GPT:
    """cls.build(cfg) after torch.manual_seed(seed), then N(0, scale²) noise added to every parameter: the init
    zeroes the output projections, and random weights make outputs depend on every token."""
    torch.manual_seed(seed)
    model = cls.build(cfg, device, compute_dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model
