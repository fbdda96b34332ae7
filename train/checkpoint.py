"""Training checkpoints: weights, per-rank optimizer shards, loader cursors and RNG, written atomically.

    save_checkpoint("ckpt/base", step, model_state=full_sd, config=cfg, optimizer_state=opt.state_dict(),
                    rank=rank, world_size=ws, meta={"plan": ...}, rank_meta={"loader": loader.state_dict()},
                    barrier=dist.barrier, keep_last=3)
    path = latest_checkpoint("ckpt/base")            # newest *complete* step directory, or None
    ck = load_checkpoint(path, rank=rank, world_size=ws, expected_config=cfg)
    model.load_state_dict(ck.model_state); opt.load_state_dict(ck.optimizer_state)
    loader.load_state_dict(ck.rank_meta["loader"]); restore_rng_state(ck.rng)   # loading restores nothing itself

On disk, one directory per step (no pickle anywhere, so loading a checkpoint cannot execute code):

    root/step_000123/
      model.safetensors, config.json   model/io.py's files: the directory is also a model dir for load_model()
      optim_rank000.safetensors        this rank's optimizer state: every tensor under its path name
                                       ("adamw.0.exp_avg"); the header metadata "structure" is a JSON tree that
                                       rebuilds the nested dict exactly (dict/list/tuple/int/float/str/bool/None)
      rank000.json                     {"rank", "rng": capture_rng_state(), "rank_meta": caller's JSON,
                                        "files": sha256 + size of this rank's shard}
      meta.json                        {"format", "step", "world_size", "config", "meta": caller's JSON}
      COMPLETE                         written last: {"format", "step", "world_size", "files": {name: sha256,
                                       bytes}} for every file above. Only directories holding it count.

Atomicity: everything is written into `root/.tmp_step_000123_<pid>/`, each file fsynced, then the directory is
renamed to `step_000123` and `root` fsynced. A rename on one POSIX filesystem is atomic, so a kill (or power
loss) at any moment leaves either no `step_*` directory for that step or a complete one; leftovers are dot
directories that `latest_checkpoint` never looks at and the next save deletes. A file damaged later (disk,
hand edits) fails `load_checkpoint` with an error naming the file (size and sha256 from the marker).

Multi-rank protocol (N ranks, one shared directory; `barrier` is e.g. torch.distributed.barrier, a no-op
default for one rank — this module never imports torch.distributed):
  1. rank 0 deletes stale dot directories in root (killed saves), creates `.tmp_step_<step>_<pid0>`;  barrier
  2. every rank finds that one tmp directory (the only `.tmp_step_<step>_*` after step 1), writes
     `optim_rank<r>.safetensors` + `rank<r>.json` and fsyncs them; rank 0 also writes the model files; barrier
  3. rank 0 checks every rank's files are there, writes meta.json and COMPLETE, fsyncs, renames into place,
     fsyncs root, prunes to keep_last;                                                                 barrier
so no rank returns before the checkpoint exists. A rank that dies or raises never reaches the next barrier:
the job fails by the process group's timeout and no COMPLETE is written — the save is lost, never half-kept.

Limits: one writing job per root (rank 0 deletes every stale tmp directory it finds there). Multi-node needs a
shared filesystem whose directory listings are consistent after a barrier (NFS attribute caching may not be).
No resharding: a checkpoint loads with the world size that wrote it (the full model state is world-size free;
the optimizer shards are not). Re-saving an existing step moves the old directory aside first, so a kill in
between leaves that step's previous copy under `.old_step_*` (the next save deletes it) and the latest is an older
step. keep_last deletes only checkpoints with lower steps than the one just saved: after resuming from an older step,
the abandoned run's higher steps stay, and latest_checkpoint picks them (delete them, or resume from the latest).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.fsutil import fsync_path
from model.gpt import GPT
from model.io import (COMPLETE_MARKER, CONFIG_FILE, WEIGHTS_FILE, CheckpointError, complete_steps, latest_checkpoint,
                      load_config, write_model_files)

FORMAT = "flashchat-checkpoint/1"
OPTIM_FORMAT = "flashchat-optim/1"
META_FILE = "meta.json"
MARKER_FILE = COMPLETE_MARKER  # model.io owns the layout rule: inference finds checkpoints by it too

__all__ = ["Checkpoint", "CheckpointError", "capture_rng_state", "latest_checkpoint", "load_checkpoint",
           "restore_rng_state", "save_checkpoint", "step_dir_name"]


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def optim_file(rank: int) -> str:
    return f"optim_rank{rank:03d}.safetensors"


def rank_file(rank: int) -> str:
    return f"rank{rank:03d}.json"


def _noop_barrier() -> None:
    pass


# ---- filesystem primitives (every mutation of the tree goes through these, so tests can kill between them) ----

_fsync_path = fsync_path  # a module-level name, so the kill tests can interpose on every fsync


def _write_json(path: Path, obj) -> None:
    # allow_nan=False: NaN/Infinity are not JSON and other readers (jq, browsers) reject them.
    data = (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    _fsync_path(path)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


# ---- nested state ↔ (tensors, JSON tree) ---------------------------------------------------------------------
# A tree node is a JSON scalar (int, str, bool, None, finite float) or a one-key object naming its kind:
# {"dict": {...}}, {"list": [...]}, {"tuple": [...]}, {"tensor": name}, {"float": "nan"|"inf"|"-inf"}.
# Tagging every container keeps tuples tuples (MuonAdamW's betas) and cannot collide with user keys.

def flatten_state(obj, tensors: dict[str, torch.Tensor], path: str = "") -> object:
    """The JSON tree of `obj`; its tensors are added to `tensors` under their path, as contiguous CPU tensors
    (GPU state is copied; CPU state stays a reference to the live tensor, so write it before stepping again)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        name = path or "."
        if name in tensors:
            raise ValueError(f"optimizer state: two tensors at the path {name!r}")
        tensors[name] = obj.detach().to("cpu").contiguous()
        return {"tensor": name}
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"optimizer state at {path or '<root>'!r}: dict keys must be str, got {bad[:3]!r}")
        return {"dict": {k: flatten_state(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": items}
    raise TypeError(f"optimizer state at {path or '<root>'!r}: cannot store a {type(obj).__name__} "
                    "(tensors, dict/list/tuple, int, float, str, bool, None only)")


def unflatten_state(node, tensors: dict[str, torch.Tensor], where: str) -> object:
    """Inverse of flatten_state; `where` names the file in errors."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        (kind, value), = node.items()
        if kind == "dict" and isinstance(value, dict):
            return {k: unflatten_state(v, tensors, where) for k, v in value.items()}
        if kind in ("list", "tuple") and isinstance(value, list):
            items = [unflatten_state(v, tensors, where) for v in value]
            return tuple(items) if kind == "tuple" else items
        if kind == "tensor" and isinstance(value, str):
            if value not in tensors:
                raise CheckpointError(f"{where}: the structure names tensor {value!r}, which the file lacks")
            return tensors[value]
        if kind == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
    raise CheckpointError(f"{where}: malformed structure node {str(node)[:80]!r}")


# ---- RNG ---------------------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Every RNG a training step may draw from, as plain JSON: torch CPU, this process's current CUDA device
    (only when CUDA is already initialised: capturing every visible GPU would create a context on each of
    them from every rank), python `random` and numpy's global generator."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        state["cuda"] = {"device": dev, "state": base64.b64encode(
            torch.cuda.get_rng_state(dev).numpy().tobytes()).decode("ascii")}
    return state


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)


def restore_rng_state(state: dict) -> None:
    """Set every RNG `capture_rng_state` captured. A CUDA state with no CUDA here is an error (the run would
    continue with other random draws), not skipped."""
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": np.asarray(npst["key"], dtype=np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            raise RuntimeError("the RNG state holds a CUDA generator state but CUDA is not available here")
        torch.cuda.set_rng_state(_bytes_tensor(cuda["state"]), cuda["device"])


# ---- save --------------------------------------------------------------------------------------------------

class _StateView:
    """What write_model_files reads from a model (state_dict() and config), for a full state dict that FSDP
    gathered on rank 0 without a GPT object to hold it."""

    def __init__(self, state: dict[str, torch.Tensor], config: ModelConfig):
        self._state, self.config = state, config

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _check_plain_json(obj, what: str) -> None:
    # A tuple would come back as a list and a non-str key as a str: refuse rather than resume with other data.
    try:
        same = json.loads(json.dumps(obj, allow_nan=False)) == obj
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be plain JSON (dict/list/str/int/float/bool/None): {e}") from None
    if not same:
        raise TypeError(f"{what} does not survive a JSON round trip unchanged (tuples or non-str keys?)")


def _clean_stale(root: Path) -> None:
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((".tmp_step_", ".old_step_", ".del_step_")):
            _rmtree(p)


def save_checkpoint(root: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor] | None,
                    config: ModelConfig, optimizer_state: dict, rank: int = 0, world_size: int = 1,
                    meta: dict | None = None, rank_meta: dict | None = None, rng_state: dict | None = None,
                    keep_last: int | None = None, barrier: Callable[[], None] = _noop_barrier) -> Path:
    """Write checkpoint `step` under `root` with the protocol of the module docstring; every rank calls it.

    model_state: the full fp32 state dict, needed on rank 0 only (others may pass None).
    optimizer_state: this rank's optimizer `state_dict()` — nested dicts/lists/tuples of tensors and scalars.
    meta: JSON, written once by rank 0 (plan, schedule, loss EMA...); rank_meta: this rank's JSON (its loader
    cursor); rng_state: this rank's RNG, captured here when None (saving draws no random numbers).
    keep_last: after the save, delete complete checkpoints of lower steps so that this one and keep_last − 1
    lower ones remain (higher steps are never touched).
    Returns the step directory. Tensors are copied to CPU before anything returns, so the live optimizer
    state may be stepped as soon as this returns."""
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if world_size > 1 and barrier is _noop_barrier:
        raise ValueError(f"world_size {world_size} needs a real barrier (e.g. torch.distributed.barrier)")
    if rank == 0 and model_state is None:
        raise ValueError("rank 0 must pass model_state (the full state dict)")
    meta = {} if meta is None else meta
    rank_meta = {} if rank_meta is None else rank_meta
    _check_plain_json(meta, "meta")
    _check_plain_json(rank_meta, "rank_meta")
    rng_state = capture_rng_state() if rng_state is None else rng_state
    # Flatten before touching the disk: a state we cannot store fails here, on every rank, before any barrier.
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_state(optimizer_state, tensors)

    root = Path(root)
    final = root / step_dir_name(step)
    prefix = f".tmp_step_{step:06d}_"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale(root)
        tmp = root / f"{prefix}{os.getpid()}"
        tmp.mkdir()
    barrier()  # 1: the tmp directory exists
    if rank != 0:
        found = sorted(p for p in root.iterdir() if p.name.startswith(prefix))
        if len(found) != 1:
            raise CheckpointError(f"rank {rank}: expected one {prefix}* directory in {root} after the barrier, "
                                  f"found {[p.name for p in found]} (is another job saving here?)")
        tmp = found[0]

    _write_safetensors(tmp / optim_file(rank), tensors,
                       {"format": OPTIM_FORMAT, "structure": json.dumps(structure, allow_nan=False),
                        "rank": str(rank), "world_size": str(world_size), "step": str(step)})
    _write_json(tmp / rank_file(rank), {"format": FORMAT, "rank": rank, "world_size": world_size, "step": step,
                                        "rng": rng_state, "rank_meta": rank_meta,
                                        "files": {optim_file(rank): _file_record(tmp / optim_file(rank))}})
    if rank == 0:
        write_model_files(_StateView(model_state, config), tmp)  # fsyncs both files
    barrier()  # 2: every rank's shard is durable

    if rank == 0:
        files = {}
        for r in range(world_size):
            if not (tmp / rank_file(r)).is_file():
                raise CheckpointError(f"{tmp}: rank {r} wrote no {rank_file(r)} before the barrier")
            files.update(json.loads((tmp / rank_file(r)).read_text("utf-8"))["files"])
        _write_json(tmp / META_FILE, {"format": FORMAT, "step": step, "world_size": world_size,
                                      "config": config.to_dict(), "meta": meta})
        for name in (WEIGHTS_FILE, CONFIG_FILE, META_FILE, *(rank_file(r) for r in range(world_size))):
            files[name] = _file_record(tmp / name)
        _write_json(tmp / MARKER_FILE, {"format": FORMAT, "step": step, "world_size": world_size,
                                        "files": dict(sorted(files.items()))})
        _fsync_path(tmp)
        if final.exists():
            old = root / f".old_step_{step:06d}_{os.getpid()}"
            _rename(final, old)
            _rename(tmp, final)
            _fsync_path(root)
            _rmtree(old)
        else:
            _rename(tmp, final)
            _fsync_path(root)  # the rename is durable only once the parent directory is synced
        if keep_last is not None:
            _prune(root, keep_last, step)
    barrier()  # 3: the checkpoint is in place before any rank moves on
    return final


def _prune(root: Path, keep_last: int, step: int) -> None:
    # Only lower steps are "older"; higher ones (an abandoned run's, after resuming from an earlier step) stay.
    older = [p for s, p in complete_steps(root) if s < step]
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        # Rename first: an rmtree killed halfway would leave a step directory with its marker but missing files.
        doomed = root / f".del_{p.name}_{os.getpid()}"
        _rename(p, doomed)
        _rmtree(doomed)
    _fsync_path(root)


# ---- load --------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    step: int
    path: Path
    config: ModelConfig
    model_state: dict[str, torch.Tensor]  # full fp32, CPU
    optimizer_state: dict  # this rank's, for MuonAdamW.load_state_dict (CPU tensors, copied in by it)
    meta: dict  # the caller's global meta
    rank_meta: dict  # this rank's rank_meta (its loader state)
    rng: dict  # this rank's RNG state at save time, for restore_rng_state


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    return obj


def _verify(d: Path, name: str, files: dict, full: bool) -> Path:
    path = d / name
    want = files.get(name) if isinstance(files, dict) else None
    if not (isinstance(want, dict) and isinstance(want.get("bytes"), int) and isinstance(want.get("sha256"), str)):
        raise CheckpointError(f"{d}/{MARKER_FILE} has no size and sha256 for {name}")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (the checkpoint was damaged after it was written)")
    size = path.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes, {MARKER_FILE} says {want['bytes']}: truncated or replaced")
    if full and _file_record(path)["sha256"] != want["sha256"]:
        raise CheckpointError(f"{path}: sha256 differs from the one in {MARKER_FILE}: the file is corrupt")
    return path


def config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: checkpoint {da[k]!r}, expected {db[k]!r}" for k in da if da[k] != db[k]]


def load_checkpoint(path: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
                    expected_config: ModelConfig | None = None, verify: bool = True) -> Checkpoint:
    """Read the checkpoint directory `path` for `rank` of `world_size` and restore nothing: the caller loads
    the pieces into its objects. Checks the marker, the world size, the config (against `expected_config`
    and the model's tensor names/shapes/dtypes) and — with verify — the sha256 of every file this rank reads."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory")
    marker = _read_json(d / MARKER_FILE) if (d / MARKER_FILE).is_file() else None
    if marker is None:
        raise CheckpointError(f"{d} has no {MARKER_FILE} marker: an incomplete or foreign directory")
    files = marker.get("files", {})
    if marker.get("world_size") != world_size:
        raise CheckpointError(f"{d} was written by {marker.get('world_size')} ranks, this job has {world_size}: "
                              "optimizer shards do not reshard (resume with the same world size)")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
    for name in (META_FILE, CONFIG_FILE, WEIGHTS_FILE, rank_file(rank), optim_file(rank)):
        _verify(d, name, files, verify)

    meta = _read_json(d / META_FILE)
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / META_FILE}: bad model config: {e}") from None
    if load_config(d) != config:
        raise CheckpointError(f"{d}: {CONFIG_FILE} and {META_FILE} disagree: {config_diff(load_config(d), config)}")
    if expected_config is not None and config != expected_config:
        raise CheckpointError(f"{d} holds another model config: {'; '.join(config_diff(config, expected_config))}")
    step = meta.get("step")
    if meta.get("world_size") != world_size or marker.get("step") != step or "meta" not in meta:
        raise CheckpointError(f"{d}: {META_FILE} and {MARKER_FILE} disagree on step/world size, or meta is missing")

    model_state = _load_tensors(d / WEIGHTS_FILE)[0]
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(model_state)), sorted(set(model_state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{d / WEIGHTS_FILE}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, want in expected.items():
        got = model_state[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{d / WEIGHTS_FILE}: tensor {name!r} is {tuple(got.shape)} {got.dtype}, the "
                                  f"config's model has {tuple(want.shape)} {want.dtype}")

    opt_path = d / optim_file(rank)
    tensors, header = _load_tensors(opt_path)
    if header.get("format") != OPTIM_FORMAT or "structure" not in header:
        raise CheckpointError(f"{opt_path}: not a {OPTIM_FORMAT} file")
    if header.get("rank") != str(rank):
        raise CheckpointError(f"{opt_path} holds rank {header.get('rank')}'s state, not rank {rank}'s")
    try:
        structure = json.loads(header["structure"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{opt_path}: structure metadata is not JSON: {e}") from None
    optimizer_state = unflatten_state(structure, tensors, str(opt_path))

    rank_info = _read_json(d / rank_file(rank))
    if rank_info.get("rank") != rank or not {"rng", "rank_meta"} <= set(rank_info):
        raise CheckpointError(f"{d / rank_file(rank)}: not rank {rank}'s file, or it lacks rng/rank_meta")
    return Checkpoint(step=step, path=d, config=config, model_state=model_state, optimizer_state=optimizer_state,
                      meta=meta["meta"], rank_meta=rank_info["rank_meta"], rng=rank_info["rng"])


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = f.keys()  # a safe_open handle is not iterable itself
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
