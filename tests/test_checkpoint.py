"""Training checkpoints (train/checkpoint.py): bitwise resume, atomicity under kills, multi-rank protocol, and
every bad-input error."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train.checkpoint as ckpt
from model.config import ModelConfig
from model.gpt import GPT
from model.io import WEIGHTS_FILE, load_model
from train.checkpoint import (
    MARKER_FILE,
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from train.optim import MuonAdamW

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=256, sequence_len=16)


def make(seed: int = 0) -> tuple[GPT, MuonAdamW]:
    torch.manual_seed(seed)
    model = GPT.build(CFG)
    return model, MuonAdamW(model.param_groups())


def train(model: GPT, opt: MuonAdamW, steps: int) -> list[float]:
    """Batches come from the global RNGs, so a resume is only exact if they are restored too."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len + 1))
        ids[0, random.randrange(CFG.sequence_len)] = int(np.random.randint(CFG.vocab_size))
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.set_lr_multiplier(0.5 + 0.1 * len(losses))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def save(root, step, model, opt, **kw) -> Path:
    return save_checkpoint(root, step, model_state=model.state_dict(), config=model.config,
                           optimizer_state=opt.state_dict(), **kw)


def assert_same_state(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}.{i}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def model_opt():
    model, opt = make()
    train(model, opt, 1)  # non-zero moments and steps; the tests below only save it, never step it again
    return model, opt


@pytest.fixture
def trained(tmp_path, model_opt):
    model, opt = model_opt
    return model, opt, save(tmp_path, 2, model, opt, meta={"plan": {"steps": 6}})


# ---- resume ------------------------------------------------------------------------------------------------

def test_resume_is_bitwise(tmp_path):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    model, opt = make()
    train(model, opt, 3)
    path = save(tmp_path, 3, model, opt, meta={"lossema": 1.5}, rank_meta={"loader": {"cursor": 3}})
    losses_a = train(model, opt, 3)

    model_b, opt_b = make(seed=7)  # other weights, fresh state: everything must come from the checkpoint
    torch.manual_seed(999)
    random.seed(999)
    ck = load_checkpoint(latest_checkpoint(tmp_path), expected_config=CFG)
    assert ck.path == path and ck.step == 3 and ck.config == CFG
    assert ck.meta == {"lossema": 1.5} and ck.rank_meta == {"loader": {"cursor": 3}}
    model_b.load_state_dict(ck.model_state)
    opt_b.load_state_dict(ck.optimizer_state)
    restore_rng_state(ck.rng)
    losses_b = train(model_b, opt_b, 3)

    assert losses_a == losses_b
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert_same_state(opt.state_dict(), opt_b.state_dict())


def test_optimizer_state_rebuilt_exactly(trained):
    _, opt, path = trained
    ck = load_checkpoint(path)
    assert_same_state(opt.state_dict(), ck.optimizer_state)
    assert isinstance(ck.optimizer_state["groups"][1]["betas"], tuple)  # not a list: JSON alone would lose this
    for live, loaded in zip(opt.state_dict()["adamw"], ck.optimizer_state["adamw"]):  # copies, not references
        assert live["exp_avg"].data_ptr() != loaded["exp_avg"].data_ptr()


def test_flatten_handles_odd_values():
    state = {"t": (torch.arange(3, dtype=torch.int64), torch.zeros(())), "f": [float("inf"), float("nan"), 0.1],
             "n": None, "b": True, "s": "x", "nested": {"dict": {"tensor": 1}}}  # user keys that look like tags
    tensors = {}
    tree = json.loads(json.dumps(ckpt.flatten_state(state, tensors), allow_nan=False))
    back = ckpt.unflatten_state(tree, tensors, "test")
    assert back["nested"] == {"dict": {"tensor": 1}} and back["t"][1].shape == () and back["f"][0] == float("inf")
    assert back["f"][1] != back["f"][1] and back["f"][2] == 0.1
    with pytest.raises(TypeError, match=r"dict keys must be str"):
        ckpt.flatten_state({"a": {1: 2}}, {})
    with pytest.raises(TypeError, match=r"at 'a.0': cannot store a set"):
        ckpt.flatten_state({"a": [{1}]}, {})


def test_step_directory_is_a_model_directory(trained):
    model, _, path = trained
    assert torch.equal(load_model(path).lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in path.iterdir()) == [MARKER_FILE, "config.json", "meta.json", "model.safetensors",
                                                      "optim_rank000.safetensors", "rank000.json"]


# ---- latest / atomicity --------------------------------------------------------------------------------------

def test_latest_picks_newest_complete(tmp_path, trained):
    model, opt, _ = trained
    assert latest_checkpoint(tmp_path / "nothing") is None
    save(tmp_path, 10, model, opt)
    (tmp_path / ".tmp_step_000020_123").mkdir()  # a save in progress or killed
    (tmp_path / "step_000030").mkdir()  # no marker: not ours to trust
    (tmp_path / "step_40").mkdir()  # not our name pattern
    assert latest_checkpoint(tmp_path).name == "step_000010"
    save(tmp_path, 11, model, opt)  # also deletes the stale tmp directory
    assert latest_checkpoint(tmp_path).name == "step_000011"
    assert not (tmp_path / ".tmp_step_000020_123").exists()
    with pytest.raises(CheckpointError, match=r"step_000030 has no COMPLETE marker"):
        load_checkpoint(tmp_path / "step_000030")


class _Killed(Exception):
    pass


def _events_module():
    """The primitives every tree mutation goes through (see train/checkpoint.py)."""
    return ["_write_json", "_write_safetensors", "_fsync_path", "_rename", "_rmtree", "write_model_files"]


def _run_killed_child(root: Path, model, opt, kill_at: int, torn: bool) -> list[str]:
    """Fork; the child saves step 3 (keep_last=1) and SIGKILLs itself at primitive call number `kill_at` (before
    it runs, or — torn — after writing half of the file). Returns the names of the calls the child made."""
    counter = root.parent / "calls"
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            calls = []
            for name in _events_module():
                orig = getattr(ckpt, name)

                def wrapped(*args, _orig=orig, _name=name, **kw):
                    calls.append(_name)
                    counter.write_text(json.dumps(calls))
                    if len(calls) == kill_at:
                        if torn and _orig in (ckpt._write_json, ckpt._write_safetensors):
                            _orig(*args, **kw)
                            path = Path(args[0])
                            os.truncate(path, path.stat().st_size // 2)
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _orig(*args, **kw)

                setattr(ckpt, name, wrapped)
            save(root, 3, model, opt, keep_last=1)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("forked save hung")
        time.sleep(0.005)
    return json.loads(counter.read_text())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_at_every_point_never_yields_a_bad_checkpoint(tmp_path, model_opt):
    model, opt = model_opt
    for step in (1, 2):
        save(tmp_path / "ck", step, model, opt)
    calls = _run_killed_child(tmp_path / "ck", model, opt, kill_at=0, torn=False)  # a full run: list the calls
    assert len(calls) >= 10 and latest_checkpoint(tmp_path / "ck").name == "step_000003"
    writes = [k for k, name in enumerate(calls, 1) if name in ("_write_json", "_write_safetensors")]

    outcomes = set()
    for torn, kill_points in ((False, range(1, len(calls) + 1)), (True, writes)):
        for k in kill_points:
            root = tmp_path / f"k{k}{torn}"
            for step in (1, 2):
                save(root, step, model, opt, meta={"step": step})
            _run_killed_child(root, model, opt, kill_at=k, torn=torn)
            latest = latest_checkpoint(root)
            assert latest is not None and latest.name in ("step_000002", "step_000003"), (k, torn)
            ck = load_checkpoint(latest, expected_config=CFG)  # whatever latest picks loads and verifies
            assert ck.step == int(latest.name[5:])
            if ck.step == 2:
                assert ck.meta == {"step": 2}, (k, torn)
            for d in root.iterdir():
                if d.name.startswith("step_"):  # every step directory that exists is complete and loads
                    load_checkpoint(d)
            save(root, 4, model, opt, keep_last=1)  # the next save clears every leftover
            assert sorted(p.name for p in root.iterdir()) == ["step_000004"], (k, torn)
            outcomes.add(ck.step)
    assert outcomes == {2, 3}  # kills before the final rename fall back, kills after it keep the new one


def test_sigkill_from_outside_mid_save(tmp_path, trained):
    """A real subprocess, killed by the parent while it is between two files of the save."""
    model, opt, _ = trained
    root = tmp_path / "ck"
    save(root, 1, model, opt)
    script = f"""
import sys, time, torch
sys.path.insert(0, {str(REPO)!r})
import train.checkpoint as ckpt
from model.gpt import GPT
from train.optim import MuonAdamW
from tests.test_checkpoint import CFG
orig = ckpt._write_json
def slow(*a, **k):
    orig(*a, **k)
    print("wrote", a[0], flush=True)
    time.sleep(60)
ckpt._write_json = slow
model = GPT.build(CFG)
ckpt.save_checkpoint({str(root)!r}, 2, model_state=model.state_dict(), config=CFG,
                     optimizer_state=MuonAdamW(model.param_groups()).state_dict())
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("wrote"), line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(p.name.startswith(".tmp_step_000002_") for p in root.iterdir())
    assert latest_checkpoint(root).name == "step_000001"
    assert load_checkpoint(latest_checkpoint(root)).step == 1


# ---- errors ------------------------------------------------------------------------------------------------

def test_missing_file(trained):
    *_, path = trained
    (path / "optim_rank000.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optim_rank000.safetensors is missing"):
        load_checkpoint(path)


def test_truncated_file(trained):
    *_, path = trained
    os.truncate(path / "meta.json", 10)
    with pytest.raises(CheckpointError, match=r"meta.json has 10 bytes, COMPLETE says \d+"):
        load_checkpoint(path)


def test_corrupt_file(trained):
    *_, path = trained
    f = path / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit of a weight: same size, still a valid safetensors file
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 differs .* corrupt"):
        load_checkpoint(path)
    load_checkpoint(path, verify=False)  # without the hash it loads (the damage is in the data, not the header)


def test_garbage_marker(trained):
    *_, path = trained
    (path / MARKER_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=r"COMPLETE is not valid JSON"):
        load_checkpoint(path)


def test_config_mismatch_names_fields(trained):
    *_, path = trained
    other = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=256, sequence_len=32, softcap=20.0)
    with pytest.raises(CheckpointError, match=r"sequence_len: checkpoint 16, expected 32; softcap: checkpoint "
                                              r"15.0, expected 20.0"):
        load_checkpoint(path, expected_config=other)


def test_world_size_mismatch(trained):
    *_, path = trained
    with pytest.raises(CheckpointError, match=r"written by 1 ranks, this job has 2"):
        load_checkpoint(path, rank=1, world_size=2)


def test_bad_arguments_fail_before_touching_disk(tmp_path, trained):
    model, opt, _ = trained
    with pytest.raises(TypeError, match=r"meta must be plain JSON"):
        save(tmp_path / "a", 1, model, opt, meta={"x": object()})
    with pytest.raises(TypeError, match=r"rank_meta does not survive a JSON round trip"):
        save(tmp_path / "a", 1, model, opt, rank_meta={"x": (1, 2)})
    with pytest.raises(ValueError, match=r"needs a real barrier"):
        save(tmp_path / "a", 1, model, opt, rank=0, world_size=2)
    assert not (tmp_path / "a").exists()


# ---- keep_last, re-save, multi-rank --------------------------------------------------------------------------

def test_keep_last(tmp_path, trained):
    model, opt, _ = trained
    root = tmp_path / "ck"
    for step in range(1, 6):
        save(root, step, model, opt, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000005"]
    save(root, 3, model, opt, keep_last=1)  # a lower step (resumed from elsewhere): higher ones are not "older"
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004", "step_000005"]
    save(root, 5, model, opt, keep_last=1)  # re-saving a step replaces it and keeps it
    assert sorted(p.name for p in root.iterdir()) == ["step_000005"]
    assert load_checkpoint(root / "step_000005").step == 5


def test_multi_rank_protocol(tmp_path):
    """Two ranks as threads sharing a barrier: each writes and reads back its own optimizer shard."""
    world = 2
    model, _ = make()
    barrier = threading.Barrier(world, timeout=30)
    states = [{"shard": torch.full((3,), float(r)), "groups": [{"lr": 0.1 * (r + 1), "betas": (0.9, 0.95)}]}
              for r in range(world)]
    errors = []

    def rank_main(r):
        try:
            save_checkpoint(tmp_path, 7, model_state=model.state_dict() if r == 0 else None, config=CFG,
                            optimizer_state=states[r], rank=r, world_size=world, meta={"plan": "x"},
                            rank_meta={"loader": {"rank": r}}, barrier=barrier.wait)
        except Exception as e:  # noqa: BLE001 — re-raised below; a dead rank would hang the other one
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    path = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000007"]
    for r in range(world):
        ck = load_checkpoint(path, rank=r, world_size=world)
        assert_same_state(ck.optimizer_state, states[r])
        assert ck.rank_meta == {"loader": {"rank": r}} and ck.meta == {"plan": "x"}
    with pytest.raises(CheckpointError, match=r"written by 2 ranks, this job has 1"):
        load_checkpoint(path)
    marker = json.loads((path / MARKER_FILE).read_text())
    assert {"optim_rank000.safetensors", "optim_rank001.safetensors", "rank001.json"} <= set(marker["files"])


# ---- RNG ---------------------------------------------------------------------------------------------------

def draws():
    return (torch.rand(4).tolist(), torch.randn(2).tolist(), random.random(), random.gauss(0, 1),
            np.random.rand(3).tolist(), np.random.standard_normal())


def test_rng_capture_restore():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # ... and in numpy's
    state = json.loads(json.dumps(capture_rng_state(), allow_nan=False))  # survives meta.json
    first = draws()
    assert draws() != first
    restore_rng_state(state)
    assert draws() == first


@pytest.mark.gpu
def test_cuda_rng_and_cuda_optimizer_state(tmp_path):
    """CUDA generator captured and restored; optimizer state living on the GPU (fused AdamW) round-trips."""
    torch.manual_seed(0)
    model = GPT.build(CFG, device="cuda")
    opt = MuonAdamW(model.param_groups())
    ids = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len + 1), device="cuda")
    model(ids[:, :-1], ids[:, 1:]).backward()
    opt.step()
    path = save(tmp_path, 1, model, opt)
    ck = load_checkpoint(path)
    assert ck.rng["cuda"] is not None
    first = torch.rand(5, device="cuda").tolist()
    restore_rng_state(ck.rng)
    assert torch.rand(5, device="cuda").tolist() == first
    model_b = GPT.build(CFG, device="cuda")
    opt_b = MuonAdamW(model_b.param_groups())
    model_b.load_state_dict(ck.model_state)
    opt_b.load_state_dict(ck.optimizer_state)
    a, b = opt.state_dict(), opt_b.state_dict()
    assert b["adamw"][0]["exp_avg"].is_cuda
    assert_same_state({k: a[k] for k in ("adamw", "muon")}, {k: b[k] for k in ("adamw", "muon")})
