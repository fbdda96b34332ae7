"""Model checkpoints (model/io.py): save/load round trip, atomic replacement, and every bad-input error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.gpt import GPT
from model.io import (CONFIG_FILE, WEIGHTS_FILE, CheckpointError, latest_trained_model, load_model, resolve_model_dir,
                      save_model)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    kw = dict(model_dim=64, head_dim=32, vocab_size=100, sequence_len=16, n_kv_head=1, value_embeds=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    return GPT.build(ModelConfig.for_depth(2, **kw))


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    return model, save_model(model, tmp_path / "ckpt")


def test_round_trip(saved):
    model, d = saved
    assert sorted(p.name for p in d.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = load_model(d)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(loaded.cos, model.cos)  # non-persistent: rebuilt, not stored
    assert "cos" not in load_file(str(d / WEIGHTS_FILE))
    idx = torch.randint(0, 100, (2, 8))
    assert torch.equal(model(idx, logits_positions="all"), loaded(idx, logits_positions="all"))


def test_save_replaces_atomically(saved):
    _, d = saved
    other = tiny_model(seed=1)
    save_model(other, d)
    assert torch.equal(load_model(d).wte.weight, other.wte.weight)
    assert [p.name for p in d.parent.iterdir()] == ["ckpt"]  # no tmp/old directories left behind


def _rewrite(d, fn):
    tensors = load_file(str(d / WEIGHTS_FILE))
    fn(tensors)
    save_file(tensors, str(d / WEIGHTS_FILE))


def test_missing_tensor(saved):
    _, d = saved
    _rewrite(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['lm_head.weight'\], unexpected tensors \[\]"):
        load_model(d)


def test_unexpected_tensor(saved):
    _, d = saved
    _rewrite(d, lambda t: t.update(extra=torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra'\]"):
        load_model(d)


def test_shape_mismatch_names_the_tensor(saved):
    _, d = saved
    _rewrite(d, lambda t: t.update({"blocks.1.mlp.c_fc.weight": torch.zeros(3, 64)}))
    with pytest.raises(CheckpointError, match=r"'blocks.1.mlp.c_fc.weight' has shape \(3, 64\).*\(256, 64\)"):
        load_model(d)


def test_dtype_mismatch_names_the_tensor(saved):
    _, d = saved
    _rewrite(d, lambda t: t.update(resid_lambdas=t["resid_lambdas"].half()))
    with pytest.raises(CheckpointError, match="'resid_lambdas' has dtype torch.float16"):
        load_model(d)


def test_config_errors(saved, tmp_path):
    _, d = saved
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    meta = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**meta, "config": {**meta["config"], "depthh": 3}}))
    with pytest.raises(CheckpointError, match="unknown keys.*'depthh'"):
        load_model(d)
    (d / CONFIG_FILE).write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(CheckpointError, match="format 'other/9'"):
        load_model(d)
    (d / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(d)
    # A config that disagrees with the weights (another depth) is a key mismatch, not a silent partial load.
    (d / CONFIG_FILE).write_text(json.dumps({**meta, "config": {**meta["config"], "depth": 3}}))
    with pytest.raises(CheckpointError, match="missing tensors.*blocks.2"):
        load_model(d)


def test_weights_errors(saved):
    _, d = saved
    (d / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(d)
    (d / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(d)


def _fake_step(root, stage, step, complete=True):
    d = root / stage / "checkpoints" / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / CONFIG_FILE).write_text("{}")
    if complete:
        (d / "COMPLETE").write_text("")
    return d


def test_resolve_model_dir(tmp_path, saved):
    assert resolve_model_dir(saved[1]) == saved[1]  # a model directory is itself
    run = tmp_path / "run"
    _fake_step(run, "sft", 5)
    newest = _fake_step(run, "sft", 40)
    _fake_step(run, "sft", 60, complete=False)  # half-written: never picked
    assert resolve_model_dir(run / "sft" / "checkpoints") == newest
    assert resolve_model_dir(run / "sft") == newest
    with pytest.raises(CheckpointError, match="neither a model directory"):
        resolve_model_dir(run / "mid")
    million = _fake_step(run, "rl", 1_000_000)
    _fake_step(run, "rl", 999_999)
    assert resolve_model_dir(run / "rl") == million  # by step number, not by name


def test_latest_trained_model_prefers_the_newest_run_and_its_most_trained_stage(tmp_path):
    import os

    old = _fake_step(tmp_path / "old", "rl", 10)
    os.utime(old / "COMPLETE", (1, 1))
    _fake_step(tmp_path / "new", "base", 100)
    sft = _fake_step(tmp_path / "new", "sft", 20)
    _fake_step(tmp_path / "new", "sft", 30, complete=False)
    assert latest_trained_model(tmp_path) == (sft, tmp_path / "new" / "tokenizer")
    assert latest_trained_model(tmp_path / "nothing") is None
