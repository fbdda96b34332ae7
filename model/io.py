"""Model weights on disk: one directory with `model.safetensors` (every persistent tensor) and `config.json`.

    save_model(model, "ckpt/d20")                   # atomic: a tmp directory, fsync, rename into place
    model = load_model("ckpt/d20", device="cuda")   # checks keys, shapes and dtypes, naming the tensor at fault

config.json = {"format": "flashchat-model/1", "config": ModelConfig.to_dict()}. safetensors holds no code
(unlike a pickled torch.save), so loading a checkpoint cannot execute anything. The rotary tables are
non-persistent buffers: rebuilt from the config at load, never stored.
`write_model_files` writes the two files into a directory the caller owns, for checkpoint writers (train/)
that build a larger directory (optimizer shards, loader state) and make that atomic themselves.
Limits: a directory rename is atomic on one POSIX filesystem; replacing an existing directory moves it aside
first, so a crash in between leaves the old copy under `.<name>.old-<pid>` beside it, never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.fsutil import fsync_path
from model.gpt import GPT

FORMAT = "flashchat-model/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A model directory that cannot be loaded into the model its config describes."""


def write_model_files(model: GPT, directory: str | os.PathLike) -> Path:
    """Write model.safetensors and config.json into `directory` (created if needed) and fsync both."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Contiguous CPU copies: safetensors refuses views of shared storage, and a sliced/transposed tensor
    # would otherwise be saved with its whole base.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "config": model.config.to_dict()}
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        fsync_path(d / name)
    return d


def save_model(model: GPT, directory: str | os.PathLike) -> Path:
    """Atomically (re)place `directory` with the model's weights and config."""
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}")
    old = d.with_name(f".{d.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_model_files(model, tmp)
        fsync_path(tmp)
        if d.exists():
            os.replace(d, old)
        os.replace(tmp, d)
        fsync_path(d.parent)  # the rename itself is durable only once the parent directory is synced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return d


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {directory} a directory written by save_model?")
    try:
        meta = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r}")
    try:
        return ModelConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from None


def load_model(directory: str | os.PathLike, device: torch.device | str = "cpu",
               compute_dtype: torch.dtype = torch.float32) -> GPT:
    """The model saved in `directory`, on `device`. Every stored tensor must match the model's parameter of
    the same name in shape and dtype; missing or unexpected names are errors (no partial loads)."""
    config = load_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found (the directory has {CONFIG_FILE} but no weights)")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    with torch.device("meta"):
        model = GPT(config, compute_dtype)
    expected = model.state_dict()  # meta tensors: names, shapes and dtypes, no storage
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model of its config: missing tensors {missing}, "
                              f"unexpected tensors {unexpected}")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(got.shape)}, the model expects "
                                  f"{tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {got.dtype}, the model expects {want.dtype}")
    model.to_empty(device=device)
    model.load_state_dict(tensors, strict=True)
    model.init_buffers()
    return model


# ---- finding a model directory -----------------------------------------------------------------------------------
# Training writes `<run_root>/<stage>/checkpoints/step_NNNNNN/` (train/checkpoint.py: model files + COMPLETE marker,
# written last); stages later in this tuple are further trained.
STAGES = ("base", "mid", "sft", "rl")
COMPLETE_MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def complete_steps(checkpoints: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every complete step directory under `checkpoints` (COMPLETE marker present; dot
    directories, saves in progress or killed, never match), by step number."""
    root = Path(checkpoints)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete step directory with the highest step under `root`, or None. Directories without the
    COMPLETE marker (and all dot directories: saves in progress or killed) are ignored."""
    steps = complete_steps(root)
    return steps[-1][1] if steps else None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory from a model directory itself (has config.json), a checkpoints directory (its newest
    complete step), or a stage's run directory (its checkpoints/ subdirectory)."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    for checkpoints in (p, p / "checkpoints"):
        if (step := latest_checkpoint(checkpoints)) is not None:
            return step
    raise CheckpointError(f"{p} is neither a model directory ({CONFIG_FILE}) nor holds complete checkpoints "
                          f"(step_*/{COMPLETE_MARKER})")


def latest_trained_model(base_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """(model dir, tokenizer dir) of the most recently written run under `base_dir` (`<base>/<run>/...`): the newest
    complete checkpoint of its most trained stage (rl > sft > mid > base). None when there is no checkpoint."""
    runs: dict[Path, float] = {}
    for marker in Path(base_dir).glob(f"*/*/checkpoints/step_*/{COMPLETE_MARKER}"):
        stage_dir = marker.parents[2]
        if stage_dir.name in STAGES:
            run = stage_dir.parent
            runs[run] = max(runs.get(run, 0.0), marker.stat().st_mtime)
    if not runs:
        return None
    run = max(runs, key=runs.get)
    for stage in reversed(STAGES):
        if (step := latest_checkpoint(run / stage / "checkpoints")) is not None:
            return step, run / "tokenizer"
    return None
