"""Tokenize a corpus once into zstd-compressed token shards: `python -m train.shards --tokenizer DIR --out DIR`.

    python -m train.shards --tokenizer runs/tokenizer --out runs/shards                  # the offline corpus
    python -m train.shards --tokenizer runs/tokenizer --input base_data/ --val last-file --out runs/shards

Input is a stream of train.corpus Documents: the offline corpus (its documents shuffled with a fixed seed, since
it comes source by source), or every .txt/.jsonl/.parquet file of a directory in file order (the real parquet
pretraining shards, shuffled upstream, go through the same path). Documents are read on a background
thread while the main thread encodes batches of ~--batch-chars characters with bpe_rs's `encode_batch_flat`
(all cores, GIL released, so reading the next batch overlaps encoding this one). Each document is stored with
the BOS token in front (BOS is the document delimiter the loader packs on, as in nanochat). A document never
straddles two shards; a shard is closed after the document that brings it to >= --shard-tokens tokens.

Split: a document goes to `val_*` shards when `split_of(doc) == "val"` (a stable hash, ~1.5% of documents), or,
with `--val last-file` on a directory, when it comes from the last file in sorted order (nanochat's rule: its
validation set is the last parquet shard). Everything else goes to `train_*` shards.

Shard file `{split}_{k:05d}.bin.zst` (little-endian):

    header, 40 bytes, uncompressed   magic b"FCTOKSH\\0", version u32, token itemsize u32 (2: uint16, 4: uint32),
                                     num_docs u64, num_tokens u64, payload_bytes u64 (length of what follows)
    payload, one zstd frame (level 3, with content size and content checksum) of
                                     doc_lens uint32[num_docs] then tokens uint16|uint32[num_tokens]

Tokens are uint16 when the vocabulary has <= 65536 ids, else uint32. `manifest.json` lists the tokenizer
(sha256 of its ranks file, vocab size, BOS id), dtype, the input's fingerprint, and per split its shards with
doc/token counts, byte sizes and sha256. Shards are written to a .tmp name and renamed; the manifest is written
last and deleted first, so a directory without a manifest is an unfinished tokenization, never a finished one.
A re-run whose manifest matches (same tokenizer, input fingerprint, options, shard files present) does nothing.

Reading: `open_split(dir, split)` -> [ShardInfo]; `read_shard(info)` -> Shard (tokens, offsets) checks magic,
version, length (truncation), the zstd checksum and the manifest's sha256, and names the file in every error;
`iter_documents(shards)` yields each document's token array (numpy, BOS first) lazily, one shard in memory.

Limits: the input fingerprint of a directory is its files' relative paths, sizes and mtimes (not their
contents: hashing 100 GB of parquet is slower than tokenizing it); that of the offline corpus is its package
versions and the CPython version. A shard is held in memory while it is built (~2 bytes per token plus the
text of one batch). Documents are kept whole, so one huge document makes one big shard.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.corpus import PINNED, Document, iter_directory_documents, iter_offline_documents, split_of

MAGIC = b"FCTOKSH\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")  # magic, version, itemsize, num_docs, num_tokens, payload_bytes
MANIFEST = "manifest.json"
FORMAT = "flashchat-shards/1"
SPLITS = ("train", "val")
ZSTD_LEVEL = 3  # as nanochat's parquet shards; uint16 BPE ids are near-incompressible (~1.5x), 3 is fast
DEFAULT_SHARD_TOKENS = 100_000_000  # ~200 MB of uint16 before compression; a few seconds to decompress-check
DEFAULT_BATCH_CHARS = 8_000_000  # text per encode call: enough documents to keep every core busy


class ShardError(ValueError):
    """A shard or manifest that is missing, corrupt, truncated or from another tokenization."""


def _zstd():
    try:
        import zstandard
    except ImportError as e:
        raise ModuleNotFoundError("token shards need the zstandard package: pip install zstandard==0.25.0") from e
    return zstandard


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    # ids run 0..vocab_size-1, so a 65536-id vocabulary still fits uint16.
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------- writing

def _atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for part in [data] if isinstance(data, bytes) else data:
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_shard(tokens: np.ndarray, doc_lens: np.ndarray, level: int = ZSTD_LEVEL) -> tuple[bytes, bytes]:
    """(header, payload) of one shard; tokens: (N,) uint16|uint32 with each document's BOS first,
    doc_lens: (num_docs,) with sum == N."""
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"tokens must be uint16 or uint32, got {tokens.dtype}")
    lens = np.ascontiguousarray(doc_lens, dtype="<u4")
    if int(lens.sum(dtype=np.int64)) != len(tokens):
        raise ValueError(f"doc_lens sum to {int(lens.sum())}, but there are {len(tokens)} tokens")
    cctx = _zstd().ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    raw = lens.tobytes() + np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<")).tobytes()
    payload = cctx.compress(raw)
    header = HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, len(lens), len(tokens), len(payload))
    return header, payload


class ShardWriter:
    """Accumulates documents of one split and writes `{split}_{k:05d}.bin.zst` files of >= shard_tokens tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._tokens: list[np.ndarray] = []
        self._lens: list[np.ndarray] = []
        self._num_buffered = 0

    def add(self, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
        """Documents back to back (BOS included) and their lengths."""
        if len(doc_lens) == 0:
            return
        self._tokens.append(tokens.astype(self.dtype, copy=False))
        self._lens.append(np.asarray(doc_lens, dtype=np.int64))
        self._num_buffered += len(tokens)
        while self._num_buffered >= self.shard_tokens:
            tokens, lens = np.concatenate(self._tokens), np.concatenate(self._lens)
            ends = np.cumsum(lens)
            cut = int(np.searchsorted(ends, self.shard_tokens)) + 1  # docs [0, cut) reach shard_tokens
            self._write(tokens[: ends[cut - 1]], lens[:cut])
            self._tokens, self._lens = [tokens[ends[cut - 1]:]], [lens[cut:]]
            self._num_buffered = len(self._tokens[0])

    def close(self) -> list[dict]:
        if self._num_buffered:
            self._write(np.concatenate(self._tokens), np.concatenate(self._lens))
        self._tokens, self._lens, self._num_buffered = [], [], 0
        return self.shards

    def _write(self, tokens: np.ndarray, lens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin.zst"
        header, payload = encode_shard(tokens, lens)
        _atomic_write(self.out_dir / name, [header, payload])
        sha = hashlib.sha256(header)
        sha.update(payload)
        self.shards.append({"file": name, "num_docs": len(lens), "num_tokens": len(tokens),
                            "num_bytes": len(header) + len(payload), "sha256": sha.hexdigest()})


def _remove_stale(out_dir: Path) -> None:
    # The manifest goes first: from here until the new one is written the directory reads as unfinished.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for p in out_dir.iterdir():
        if p.name.endswith(".tmp") or (p.name.endswith(".bin.zst") and p.name.split("_")[0] in SPLITS):
            p.unlink()


def write_manifest(out_dir: Path, key: dict, writers: dict[str, ShardWriter], extra: dict | None = None) -> dict:
    splits = {}
    for name, w in writers.items():
        shards = w.close()
        splits[name] = {"num_docs": sum(s["num_docs"] for s in shards),
                        "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards}
    manifest = {**key, "splits": splits, **(extra or {})}
    _atomic_write(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def write_token_shards(out_dir: str | os.PathLike, docs: Iterable[tuple[str, np.ndarray]], *, vocab_size: int,
                       bos_id: int, shard_tokens: int = DEFAULT_SHARD_TOKENS, key: dict | None = None) -> dict:
    """Shards + manifest from already-tokenized documents: (split, tokens with BOS first) pairs. The tokenizing
    path below batches instead; this one serves synthetic data (tests, tools) that has no tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    dtype = dtype_for_vocab(vocab_size)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    for split, tokens in docs:
        writers[split].add(np.asarray(tokens), np.array([len(tokens)]))
    key = {"format": FORMAT, "tokenizer": {"ranks_sha256": None, "vocab_size": vocab_size, "bos_id": bos_id},
           "dtype": dtype.name, "shard_tokens": shard_tokens, **(key or {})}
    return write_manifest(out, key, writers)


# ------------------------------------------------------------------------------------------ tokenizing

def _offline_fingerprint() -> dict:
    versions = {"python": platform.python_version()}
    for dist in PINNED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


_DOC_SUFFIXES = (".txt", ".jsonl", ".parquet")  # the files train.corpus.iter_directory_documents reads


def _directory_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix in _DOC_SUFFIXES),
                  key=lambda p: p.relative_to(root).as_posix())


# The offline corpus comes source by source (all of Shakespeare, then the chats, then CPython's docs); a run that
# reads a tenth of it would see one source only. Its ~8K documents are shuffled once, with a fixed seed, before
# they are written (nanochat's pretraining shards are shuffled upstream; a directory keeps its file order).
OFFLINE_ORDER = "shuffled:seed=0"


def _shuffled_offline_documents() -> Iterator[Document]:
    docs = list(iter_offline_documents())  # ~21 MB of text
    random.Random(0).shuffle(docs)
    yield from docs


def _input_spec(input_path: str | None, val: str) -> tuple[dict, Callable[[], Iterator[Document]],
                                                             Callable[[Document], str]]:
    """(fingerprint for the manifest, document stream factory, document -> split)."""
    if input_path is None:
        if val != "hash":
            raise ValueError("--val last-file needs --input DIR (the offline corpus splits by hash)")
        return ({"kind": "offline", "versions": _offline_fingerprint(), "val": val, "order": OFFLINE_ORDER},
                _shuffled_offline_documents, split_of)
    root = Path(input_path).resolve()
    files = _directory_files(root)
    if not files:
        raise ValueError(f"{root}: no .txt, .jsonl or .parquet files")
    listing = [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    fingerprint = {"kind": "directory", "path": str(root), "val": val,
                   "files_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(), "num_files": len(files)}
    if val == "hash":
        return fingerprint, lambda: iter_directory_documents(root), split_of
    if len(files) < 2:
        raise ValueError(f"{root}: --val last-file needs at least 2 files, found {len(files)}")
    last = listing[-1][0]
    fingerprint["val_file"] = last

    def split_by_file(doc: Document) -> str:
        # iter_directory_documents names a .txt document by its path and the others "path:row".
        return "val" if doc.doc_id == last or doc.doc_id.startswith(last + ":") else "train"

    return fingerprint, lambda: iter_directory_documents(root), split_by_file


def _batches(docs: Iterator[Document], split_fn: Callable[[Document], str], batch_chars: int,
             out: queue.Queue) -> None:
    """Producer thread: (split, texts) batches of ~batch_chars, then None; an exception is passed on."""
    try:
        pending: dict[str, list[str]] = {s: [] for s in SPLITS}
        chars = dict.fromkeys(SPLITS, 0)
        for doc in docs:
            split = split_fn(doc)
            pending[split].append(doc.text)
            chars[split] += len(doc.text)
            if chars[split] >= batch_chars:
                out.put((split, pending[split]))
                pending[split], chars[split] = [], 0
        for split in SPLITS:
            if pending[split]:
                out.put((split, pending[split]))
        out.put(None)
    except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
        out.put(e)


def tokenize_to_shards(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, input_path: str | None = None,
                       *, shard_tokens: int = DEFAULT_SHARD_TOKENS, val: str = "hash",
                       batch_chars: int = DEFAULT_BATCH_CHARS, force: bool = False,
                       log: Callable[[str], None] = print) -> tuple[dict, bool]:
    """Tokenize `input_path` (a directory; None: the offline corpus) into `out_dir`.
    Returns (manifest, skipped): skipped is True when a matching manifest was already there."""
    import bpe_rs

    if shard_tokens <= 0 or batch_chars <= 0:
        raise ValueError(f"shard_tokens and batch_chars must be positive, got {shard_tokens}, {batch_chars}")
    if val not in ("hash", "last-file"):
        raise ValueError(f"val must be 'hash' or 'last-file', got {val!r}")
    tok = bpe_rs.Tokenizer.load(tokenizer_dir)
    ranks_sha = hashlib.sha256((Path(tokenizer_dir) / bpe_rs.RANKS_FILE).read_bytes()).hexdigest()
    fingerprint, make_docs, split_fn = _input_spec(input_path, val)
    dtype = dtype_for_vocab(tok.vocab_size)
    key = {"format": FORMAT, "tokenizer": {"ranks_sha256": ranks_sha, "vocab_size": tok.vocab_size,
                                           "bos_id": tok.bos_id}, "dtype": dtype.name,
           "shard_tokens": shard_tokens, "input": fingerprint}
    out = Path(out_dir)
    if not force and (existing := _matching_manifest(out, key)) is not None:
        log(f"{out / MANIFEST} matches this tokenizer and input: nothing to do")
        return existing, True
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)

    t0 = time.perf_counter()
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    batches: queue.Queue = queue.Queue(maxsize=2)  # bounded: reading runs at most two batches ahead
    reader = threading.Thread(target=_batches, args=(make_docs(), split_fn, batch_chars, batches), daemon=True)
    reader.start()
    num_chars = 0
    while (item := batches.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        split, texts = item
        num_chars += sum(map(len, texts))
        # disallowed_special=(): "<|bos|>" written in a web page is text, never a real BOS.
        ids, offsets = tok.encode_batch_flat(texts, disallowed_special=())
        ids_np = np.frombuffer(ids, dtype=np.uint32)
        offs = np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)
        tokens = np.insert(ids_np, offs[:-1], tok.bos_id)  # one BOS before each document
        writers[split].add(tokens, np.diff(offs) + 1)
    reader.join()
    if not writers["train"].shards and not writers["train"]._num_buffered:
        raise ValueError(f"{input_path or 'the offline corpus'}: no training documents (all went to val)")
    seconds = time.perf_counter() - t0
    manifest = write_manifest(out, key, writers, {"num_chars": num_chars, "seconds": round(seconds, 3)})
    for s in SPLITS:
        info = manifest["splits"][s]
        mb = sum(x["num_bytes"] for x in info["shards"]) / 1e6
        log(f"{s:<5} {info['num_docs']:>9,} docs {info['num_tokens']:>13,} tokens {len(info['shards']):>5} shards "
            f"{mb:>9.2f} MB ({info['num_tokens'] * dtype.itemsize / 1e6 / max(mb, 1e-9):.2f}x)")
    num_tokens = sum(manifest["splits"][s]["num_tokens"] for s in SPLITS)
    log(f"{num_chars:,} chars -> {num_tokens:,} tokens in {seconds:.1f} s ({num_tokens / seconds / 1e6:.2f} M tok/s)")
    return manifest, False


def _matching_manifest(out: Path, key: dict) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text("utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if any(manifest.get(k) != v for k, v in key.items()):
        return None
    for split in manifest.get("splits", {}).values():
        for s in split["shards"]:
            p = out / s["file"]
            if not p.is_file() or p.stat().st_size != s["num_bytes"]:
                return None
    return manifest


# ---------------------------------------------------------------------------------------------- reading

@dataclass(frozen=True, slots=True)
class ShardInfo:
    path: Path
    num_docs: int
    num_tokens: int
    num_bytes: int
    sha256: str | None
    bos_id: int


@dataclass(frozen=True, slots=True)
class Shard:
    path: Path
    tokens: np.ndarray  # (num_tokens,) uint16|uint32, documents back to back, each starting with BOS
    offsets: np.ndarray  # (num_docs + 1,) int64; document k is tokens[offsets[k]:offsets[k+1]]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, k: int) -> np.ndarray:
        return self.tokens[self.offsets[k]: self.offsets[k + 1]]


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {shard_dir} is not a finished `python -m train.shards` output "
                         f"(the manifest is written last, so an interrupted tokenization has none)")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: unknown format (expected {FORMAT!r})")
    return manifest


def open_split(shard_dir: str | os.PathLike, split: str) -> list[ShardInfo]:
    """The shards of one split, in canonical order (the order documents were written)."""
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{Path(shard_dir) / MANIFEST} has no split {split!r}; it has {list(manifest['splits'])}")
    bos = manifest["tokenizer"]["bos_id"]
    return [ShardInfo(Path(shard_dir) / s["file"], s["num_docs"], s["num_tokens"], s["num_bytes"], s["sha256"], bos)
            for s in manifest["splits"][split]["shards"]]


def read_shard(shard: ShardInfo | str | os.PathLike) -> Shard:
    """Decompress and check one shard (ShardInfo: also against the manifest's counts and sha256)."""
    info = shard if isinstance(shard, ShardInfo) else None
    path = Path(info.path if info else shard)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file missing") from None
    if len(data) < HEADER.size:
        raise ShardError(f"{path}: truncated ({len(data)} bytes, shorter than the {HEADER.size}-byte header)")
    magic, version, itemsize, num_docs, num_tokens, payload_bytes = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic!r}, not a flashchat token shard")
    if version != VERSION or itemsize not in (2, 4):
        raise ShardError(f"{path}: unsupported version {version} / token size {itemsize}")
    if len(data) != HEADER.size + payload_bytes:
        raise ShardError(f"{path}: truncated or padded: {len(data)} bytes, header says {HEADER.size + payload_bytes}")
    if info is not None:
        if info.sha256 is not None and hashlib.sha256(data).hexdigest() != info.sha256:
            raise ShardError(f"{path}: sha256 does not match the manifest (corrupt, or from another tokenization)")
        if (num_docs, num_tokens) != (info.num_docs, info.num_tokens):
            raise ShardError(f"{path}: {num_docs} docs / {num_tokens} tokens, manifest says "
                             f"{info.num_docs} / {info.num_tokens}")
    zstd = _zstd()
    raw_size = 4 * num_docs + itemsize * num_tokens
    try:
        raw = zstd.ZstdDecompressor().decompress(memoryview(data)[HEADER.size:], max_output_size=raw_size)
    except zstd.ZstdError as e:
        raise ShardError(f"{path}: corrupt zstd payload ({e})") from None
    if len(raw) != raw_size:
        raise ShardError(f"{path}: payload holds {len(raw)} bytes, header says {raw_size}")
    lens = np.frombuffer(raw, dtype="<u4", count=num_docs)
    tokens = np.frombuffer(raw, dtype="<u2" if itemsize == 2 else "<u4", offset=4 * num_docs)
    offsets = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] != num_tokens or (num_docs and lens.min() == 0):
        raise ShardError(f"{path}: document lengths do not add up to {num_tokens} tokens")
    if info is not None and num_docs and not np.all(tokens[offsets[:-1]] == info.bos_id):
        raise ShardError(f"{path}: a document does not start with BOS {info.bos_id}")
    return Shard(path, tokens, offsets)


def iter_documents(shards: Iterable[ShardInfo]) -> Iterator[np.ndarray]:
    """Each document's tokens (a read-only view, BOS first), one shard decompressed at a time."""
    for info in shards:
        shard = read_shard(info)
        for k in range(shard.num_docs):
            yield shard.doc(k)


# -------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Tokenize documents once into zstd-compressed token shards.")
    p.add_argument("--tokenizer", metavar="DIR", required=True, help="a directory written by train.tok_train")
    p.add_argument("--input", metavar="PATH", default=None,
                   help="directory of .txt/.jsonl/.parquet files (default: the offline corpus)")
    p.add_argument("--out", metavar="DIR", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (approx.)")
    p.add_argument("--val", choices=("hash", "last-file"), default="hash",
                   help="held-out split: split_of()'s stable hash, or the last file of --input (nanochat)")
    p.add_argument("--batch-chars", type=int, default=DEFAULT_BATCH_CHARS, help="characters per encode call")
    p.add_argument("--force", action="store_true", help="re-tokenize even when the manifest matches")
    args = p.parse_args(argv)
    tokenize_to_shards(args.tokenizer, args.out, args.input, shard_tokens=args.shard_tokens, val=args.val,
                       batch_chars=args.batch_chars, force=args.force)


if __name__ == "__main__":
    main()
