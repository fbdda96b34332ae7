"""ReLU² (relu(x) squared), the MLP activation of nanochat's GPT. x: any shape, fp32/fp16/bf16."""

from __future__ import annotations

import torch

from kernels import _dispatch


def relu2_ref(x: torch.Tensor) -> torch.Tensor:
    """The plain-torch twin of `relu2`."""
    return torch.relu(x).square()


def relu2(x: torch.Tensor) -> torch.Tensor:
    if _dispatch.use_triton("relu2", x):
        raise NotImplementedError("relu2: the Triton kernel is being written (issue 3)")
    return relu2_ref(x)
