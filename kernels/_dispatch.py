"""Which backend runs each kernel op: our Triton kernel or its plain-torch twin.

Modes: "auto" (default: Triton for CUDA tensors when triton imports, the twin otherwise), "triton" (always the
kernel; on CPU tensors that needs the Triton interpreter, TRITON_INTERPRET=1, which tests set), "ref" (always the
twin). The mode comes from `set_backend()` (entry points), the `backend()` context manager (tests), or once, at
first use, from the environment variable FLASHCHAT_KERNELS (for debugging). `which(op)` says what ran last.

Each op asks `use_triton(op, *tensors)` once per call; nothing else in the codebase branches on triton.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # a CPU-only install without triton still runs every twin
    HAS_TRITON = False

MODES = ("auto", "triton", "ref")
_mode: str | None = None
_last: dict[str, str] = {}


def _current() -> str:
    global _mode
    if _mode is None:
        _mode = _check(os.environ.get("FLASHCHAT_KERNELS", "auto"))
    return _mode


def _check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernel backend must be one of {MODES}, got {mode!r}")
    return mode


def set_backend(mode: str) -> None:
    global _mode
    _mode = _check(mode)


@contextlib.contextmanager
def backend(mode: str) -> Iterator[None]:
    """Run a block with every op forced to `mode` ("triton", "ref" or "auto")."""
    global _mode
    saved, _mode = _current(), _check(mode)
    try:
        yield
    finally:
        _mode = saved


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Should `op` run its Triton kernel on these tensors? Records the answer for `which`."""
    mode = _current()
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "ref":
        choice = False
    elif mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend 'triton' was asked for, but triton is not installed")
        if not on_cuda and not interpreting():
            raise RuntimeError(f"{op}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU")
        choice = True
    else:
        choice = HAS_TRITON and on_cuda
    _last[op] = "triton" if choice else "ref"
    return choice


def mode() -> str:
    """The current mode ("auto", "triton" or "ref"), for ops with more than two backends (attention)."""
    return _current()


def record(op: str, backend_name: str) -> None:
    """Note which backend `op` ran, for ops that choose among more than two backends themselves."""
    _last[op] = backend_name


def which(op: str) -> str | None:
    """The backend `op` used on its last call ("triton", "ref", or another recorded name), or None."""
    return _last.get(op)
