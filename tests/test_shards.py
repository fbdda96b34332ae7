"""Tests for train/shards.py: tokenized shards round-trip to the text, the manifest is right, a re-run skips,
an unfinished or corrupt directory fails loudly naming the file, and val is disjoint from train.

Documents are ~300 KB of Shakespeare cut into paragraphs groups (read once per module, ~1.5 s); the tokenizer
is a 1,000-token bpe_rs trained on them in a fixture (<1 s).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

import bpe_rs
from train import shards
from train.corpus import Document, iter_directory_documents, iter_offline_documents, split_of
from train.shards import ShardError, iter_documents, open_split, read_shard, tokenize_to_shards


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    paragraphs = [p for doc in iter_offline_documents(["shakespeare"]) for p in doc.text.split("\n\n") if p.strip()]
    out, i = [], 0
    while sum(map(len, out)) < 300_000:
        n = rng.choice([1, 1, 2, 3, 5, 20])  # lengths from one line to a few pages
        out.append("\n\n".join(paragraphs[i: i + n]))
        i += n
    # Special-token text in a document is ordinary text; non-ASCII must survive the round trip.
    out[3] = "A page that quotes <|bos|> and <|assistant_end|> literally, café, 東京, 🎭."
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts) -> Path:
    d = tmp_path_factory.mktemp("tok")
    bpe_rs.train_from_iterator(texts, vocab_size=1000).save(d)
    return d


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> bpe_rs.Tokenizer:
    return bpe_rs.Tokenizer.load(tokenizer_dir)


def _write_input(root: Path, texts: list[str]) -> Path:
    """Three files: a .jsonl, a .txt and another .jsonl (the last file in sorted order)."""
    root.mkdir(parents=True, exist_ok=True)
    k = len(texts) // 2
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for t in texts[:k]:
            f.write(json.dumps({"text": t}) + "\n")
    (root / "b.txt").write_text(texts[k], encoding="utf-8")
    with open(root / "c.jsonl", "w", encoding="utf-8") as f:
        for t in texts[k + 1:]:
            f.write(json.dumps({"text": t}) + "\n")
    return root


def _decoded(tok, split_shards) -> list[str]:
    out = []
    for doc in iter_documents(split_shards):
        assert doc[0] == tok.bos_id and tok.bos_id not in doc[1:]  # BOS prefix, and only there
        out.append(tok.decode(doc[1:].tolist(), errors="strict"))
    return out


def _quiet(_msg: str) -> None:
    pass


def test_round_trip_and_manifest(tmp_path, texts, tok, tokenizer_dir):
    src = _write_input(tmp_path / "in", texts)
    out = tmp_path / "shards"
    manifest, skipped = tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=10_000, val="last-file", log=_quiet)
    assert not skipped
    k = len(texts) // 2
    train, val = _decoded(tok, open_split(out, "train")), _decoded(tok, open_split(out, "val"))
    assert train == texts[: k + 1]  # every document once, in order; the last file is val (nanochat's rule)
    assert val == texts[k + 1:]

    # Manifest: tokenizer identity, dtype, counts that add up, and files that match their sha256 and size.
    assert manifest == json.loads((out / "manifest.json").read_text())
    ranks = (tokenizer_dir / bpe_rs.RANKS_FILE).read_bytes()
    assert manifest["tokenizer"] == {"ranks_sha256": hashlib.sha256(ranks).hexdigest(), "vocab_size": 1000,
                                     "bos_id": tok.bos_id}
    assert manifest["dtype"] == "uint16" and manifest["input"]["val_file"] == "c.jsonl"
    for split, docs in (("train", train), ("val", val)):
        info = manifest["splits"][split]
        assert info["num_docs"] == len(docs) == sum(s["num_docs"] for s in info["shards"])
        assert info["num_tokens"] == sum(s["num_tokens"] for s in info["shards"])
        assert info["num_tokens"] == sum(len(tok.encode(t, disallowed_special=())) + 1 for t in docs)
        for s in info["shards"]:
            data = (out / s["file"]).read_bytes()
            assert len(data) == s["num_bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
            assert s["file"].startswith(split + "_") and s["file"].endswith(".bin.zst")
    assert len(manifest["splits"]["train"]["shards"]) > 3  # shard_tokens cuts the split into several files
    # Every shard but the last reaches shard_tokens, and no document straddles two shards.
    for s in manifest["splits"]["train"]["shards"][:-1]:
        assert s["num_tokens"] >= 10_000
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def test_rerun_skips_and_changes_rebuild(tmp_path, texts, tokenizer_dir):
    src = _write_input(tmp_path / "in", texts[:60])
    out = tmp_path / "shards"
    first, skipped = tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=5_000, log=_quiet)
    assert not skipped
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again, skipped = tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=5_000, log=_quiet)
    assert skipped and again == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten

    # Another option, or an edited input file, means another tokenization.
    _, skipped = tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=7_000, log=_quiet)
    assert not skipped
    with open(src / "a.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    m, skipped = tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=7_000, log=_quiet)
    assert not skipped and m["splits"]["train"]["num_docs"] + m["splits"]["val"]["num_docs"] == 61
    # A missing shard file is not a finished tokenization either.
    (out / m["splits"]["train"]["shards"][0]["file"]).unlink()
    _, skipped = tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=7_000, log=_quiet)
    assert not skipped


def test_unfinished_directory_is_not_mistaken_for_finished(tmp_path, texts, tokenizer_dir):
    src = _write_input(tmp_path / "in", texts[:40])
    out = tmp_path / "shards"
    tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=5_000, log=_quiet)
    (out / "manifest.json").unlink()  # as if killed before the manifest was written
    (out / "train_00000.bin.zst.tmp").write_bytes(b"half a shard")
    with pytest.raises(ShardError, match="manifest.json not found"):
        open_split(out, "train")
    _, skipped = tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=5_000, log=_quiet)
    assert not skipped and not list(out.glob("*.tmp"))
    with pytest.raises(ShardError, match="no split 'test'"):
        open_split(out, "test")


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "missing"])
def test_corrupt_shard_names_the_file(tmp_path, texts, tokenizer_dir, damage):
    src = _write_input(tmp_path / "in", texts[:40])
    out = tmp_path / "shards"
    tokenize_to_shards(tokenizer_dir, out, src, shard_tokens=5_000, log=_quiet)
    info = open_split(out, "train")[1]
    data = bytearray(info.path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "magic":
        data[:8] = b"NOTASHRD"
    if damage == "missing":
        info.path.unlink()
    else:
        info.path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=info.path.name):
        list(iter_documents(open_split(out, "train")))
    if damage != "missing":
        # Without the manifest's sha256, the header, the length and zstd's own checksum still catch it.
        with pytest.raises(ShardError, match=info.path.name):
            read_shard(info.path)


def test_val_split_is_held_out_by_hash(tmp_path, texts, tok, tokenizer_dir, monkeypatch):
    # The offline path with a small stand-in corpus: the same code, documents named as the real ones are.
    docs = [Document("shakespeare", f"part/{i}", t) for i, t in enumerate(texts)]
    monkeypatch.setattr(shards, "iter_offline_documents", lambda: iter(docs))
    out = tmp_path / "shards"
    manifest, _ = tokenize_to_shards(tokenizer_dir, out, None, shard_tokens=20_000, log=_quiet)
    assert manifest["input"]["kind"] == "offline"
    want_val = [d.text for d in docs if split_of(d) == "val"]
    assert 0 < len(want_val) < len(docs) // 10
    # The offline corpus is written shuffled (fixed seed): the same documents, not in source order.
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    assert manifest["input"]["order"] == "shuffled:seed=0"
    assert _decoded(tok, open_split(out, "val")) == [d.text for d in shuffled if split_of(d) == "val"]
    train_texts = _decoded(tok, open_split(out, "train"))
    assert train_texts == [d.text for d in shuffled if split_of(d) == "train"]
    assert train_texts != [d.text for d in docs if split_of(d) == "train"] and sorted(want_val) == sorted(
        _decoded(tok, open_split(out, "val")))
    with pytest.raises(ValueError, match="last-file needs --input"):
        tokenize_to_shards(tokenizer_dir, tmp_path / "x", None, val="last-file", log=_quiet)

    # A directory split by hash holds out the same documents train.corpus says are val.
    src = _write_input(tmp_path / "in", texts)
    out2 = tmp_path / "shards2"
    tokenize_to_shards(tokenizer_dir, out2, src, shard_tokens=20_000, log=_quiet)
    dir_docs = list(iter_directory_documents(src))
    assert _decoded(tok, open_split(out2, "val")) == [d.text for d in dir_docs if split_of(d) == "val"]


def test_uint32_shards_for_large_vocab(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[7], rng.integers(0, 200_000, size=n)]).astype(np.uint32) for n in (5, 1, 300, 40)]
    m = shards.write_token_shards(tmp_path, [("train", d) for d in docs] + [("val", docs[0])], vocab_size=200_000,
                                  bos_id=7, shard_tokens=100)
    assert m["dtype"] == "uint32" and m["splits"]["val"]["num_docs"] == 1
    got = list(iter_documents(open_split(tmp_path, "train")))
    assert len(got) == len(docs) and all(np.array_equal(a, b) for a, b in zip(got, docs))
    assert got[0].dtype == np.uint32


def test_cli_main(tmp_path, texts, tokenizer_dir, capsys):
    src = _write_input(tmp_path / "in", texts[:30])
    args = ["--tokenizer", str(tokenizer_dir), "--input", str(src), "--out", str(tmp_path / "o"),
            "--shard-tokens", "4000"]
    shards.main(args)
    assert "tokens" in capsys.readouterr().out
    shards.main(args)
    assert "nothing to do" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "o" / "manifest.json")
