"""The terminal chat: one-shot and interactive, through real subprocesses on a tiny saved model."""

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bpe_rs
from model.config import ModelConfig
from model.io import save_model
from tests.models import random_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = bpe_rs.train_from_iterator([inspect.getsource(textwrap)], vocab_size=400)
    tok.save(d / "tokenizer")
    cfg = ModelConfig.for_depth(2, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=128)
    save_model(random_model(cfg, 0.1), d / "model")
    return d


def cli(run, *args, stdin=""):
    cmd = [sys.executable, "-m", "infer.cli", "--checkpoint", str(run / "model"), "--tokenizer", str(run / "tokenizer"),
           "--temperature", "0", "--max-tokens", "8", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_one_shot_prompt(run):
    out = cli(run, "--prompt", "Wrap this paragraph")
    assert out.returncode == 0, out.stderr
    assert "KV cache" in out.stderr
    again = cli(run, "--prompt", "Wrap this paragraph")
    assert again.stdout == out.stdout  # greedy: the same answer


def test_interactive_turns_clear_and_exit(run):
    out = cli(run, stdin="hello there\nand again\n/clear\nnew topic\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("model> ") == 3
    assert "[new conversation]" in out.stdout


def test_missing_checkpoint_is_a_clear_error(run, tmp_path):
    out = subprocess.run([sys.executable, "-m", "infer.cli", "--checkpoint", str(tmp_path / "nope"), "--tokenizer",
                          str(run / "tokenizer"), "--prompt", "x"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 1 and "error:" in out.stderr
