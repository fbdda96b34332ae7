"""Durable-write helpers shared by checkpoint, model and download code (standard library only, so importing it
pulls in nothing heavy)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory. A rename is durable only once its parent directory is synced too."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
