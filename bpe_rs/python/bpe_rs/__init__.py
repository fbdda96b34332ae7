"""bpe_rs: flashchat's byte-level BPE tokenizer -- training and tiktoken-compatible encoding, in Rust.

    import bpe_rs
    tok = bpe_rs.train_from_iterator(texts, vocab_size=65536)     # 256 bytes + merges + 9 special tokens
    ids = tok.encode("Hello world")                                # identical to tiktoken with the same ranks
    tok.save("out/tokenizer")                                      # tokenizer.tiktoken + tokenizer_meta.json
    tok = bpe_rs.Tokenizer.load("out/tokenizer")

The Rust core (see bpe_rs/src) is reached through maturin's cffi bindings: cffi releases the GIL around every
call, so `encode_batch` and training run on all cores while other Python threads go on. Errors raised in Rust,
panics included, arrive here as `BpeError` (a ValueError).

Files are pickle-free: a tiktoken ranks file (`base64(bytes) rank` per line, loadable by
`tiktoken.load.load_tiktoken_bpe`), a small JSON sidecar (pattern, special tokens, checksum), and on request an HF
`tokenizer.json` that the `tokenizers` package encodes identically.
"""

from __future__ import annotations

import array
import codecs
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ._native import ffi, lib

__all__ = [
    "BpeError",
    "DEFAULT_MAX_DIGITS",
    "DEFAULT_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "StreamDecoder",
    "Tokenizer",
    "Trainer",
    "char_class",
    "pattern",
    "pattern_digits",
    "pretokenize",
    "train_from_files",
    "train_from_iterator",
    "unicode_version",
]

# DESIGN.md: the 9 special tokens, appended after the merges (ids vocab_size-9 .. vocab_size-1).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
DEFAULT_VOCAB_SIZE = 65536
# nanochat groups digits 1-2 (measured best at d12: val_bpb 0.965 vs 0.972 for GPT-4's 1-3).
DEFAULT_MAX_DIGITS = 2

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
FORMAT = "bpe_rs/1"


class BpeError(ValueError):
    """An error reported by the Rust core (bad input, corrupt file, or an internal panic)."""


def _check(rc: int) -> None:
    if rc != 0:
        raise BpeError(ffi.string(lib.bpe_last_error()).decode("utf-8", "replace"))


def _check_ptr(ptr):
    if ptr == ffi.NULL:
        raise BpeError(ffi.string(lib.bpe_last_error()).decode("utf-8", "replace"))
    return ptr


def _take_bytes(buf) -> bytes:
    try:
        return bytes(ffi.buffer(buf.data, buf.len)) if buf.len else b""
    finally:
        lib.bpe_bytes_free(buf)


def _take_u32(buf) -> list[int]:
    try:
        return ffi.unpack(buf.data, buf.len) if buf.len else []
    finally:
        lib.bpe_u32s_free(buf)


def _take_sizes(buf) -> list[int]:
    try:
        return ffi.unpack(buf.data, buf.len) if buf.len else []
    finally:
        lib.bpe_sizes_free(buf)


def _utf8(text: str, what: str = "text") -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise BpeError(f"{what} is not valid Unicode at character {e.start}: {e.reason}") from None


def _blob(items: Sequence[bytes]):
    """Items back to back plus n+1 offsets, as cffi objects (keep both alive during the call)."""
    offsets = [0]
    for it in items:
        offsets.append(offsets[-1] + len(it))
    blob = b"".join(items)
    return ffi.from_buffer(blob), ffi.new("uintptr_t[]", offsets), blob


def pattern(max_digits: int = DEFAULT_MAX_DIGITS) -> str:
    """The split regex implemented by the pre-tokenizer (max_digits=3 gives GPT-4's digit grouping)."""
    buf = ffi.new("BpeBytes *")
    _check(lib.bpe_pattern(max_digits, buf))
    return _take_bytes(buf).decode()


def pattern_digits(pat: str) -> int | None:
    """`max_digits` of a pattern string, or None when the hand-written pre-tokenizer does not implement it."""
    raw = pat.encode()
    n = lib.bpe_pattern_digits(raw, len(raw))
    return n or None


def unicode_version() -> str:
    """Unicode version of the character tables the pre-tokenizer was generated from."""
    buf = ffi.new("BpeBytes *")
    _check(lib.bpe_unicode_version(buf))
    return _take_bytes(buf).decode()


_CLASS_NAMES = ("other", "letter", "number", "space", "unassigned")


def char_class(ch: str) -> str:
    """Pre-tokenizer class of one character: letter (\\p{L}), number (\\p{N}), space (\\s), other, or unassigned
    (no character in the tables' Unicode version, see `unicode_version()`; pre-tokenized as other)."""
    if not isinstance(ch, str) or len(ch) != 1:
        raise TypeError("char_class takes a single character")
    return _CLASS_NAMES[lib.bpe_char_class(ord(ch))]


def pretokenize(text: str, max_digits: int = DEFAULT_MAX_DIGITS) -> list[str]:
    """Split text into the chunks BPE works within (same result as `regex.findall(pattern(max_digits), text)`)."""
    raw = _utf8(text)
    buf = ffi.new("BpeSizes *")
    _check(lib.bpe_pretokenize(max_digits, raw, len(raw), buf))
    b = _take_sizes(buf)
    return [raw[b[k] : b[k + 1]].decode("utf-8") for k in range(len(b) - 1)]


class Trainer:
    """Counts chunks of text fed to it (in parallel, GIL released), then learns merges with `train`."""

    def __init__(self, max_digits: int = DEFAULT_MAX_DIGITS, num_threads: int = 0):
        self._ptr = _check_ptr(lib.bpe_trainer_new(max_digits, num_threads))
        self.max_digits = max_digits

    def __del__(self):
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None:
            lib.bpe_trainer_free(ptr)

    def feed(self, texts: Iterable[str], batch_size: int = 8192, max_chars: int | None = None) -> int:
        """Count the chunks of every text; returns the number of characters consumed (capped by max_chars)."""
        used = 0
        batch: list[bytes] = []
        for text in texts:
            if max_chars is not None and used + len(text) > max_chars:
                text = text[: max_chars - used]
            batch.append(_utf8(text, "training text"))
            used += len(text)
            if len(batch) >= batch_size:
                self._feed_batch(batch)
                batch = []
            if max_chars is not None and used >= max_chars:
                break
        if batch:
            self._feed_batch(batch)
        return used

    def _feed_batch(self, batch: list[bytes]) -> None:
        blob, offsets, _keep = _blob(batch)
        _check(lib.bpe_trainer_feed(self._ptr, blob, offsets, len(batch)))

    def feed_file(self, path: str | os.PathLike) -> None:
        """Count the chunks of a UTF-8 text file, read in blocks (never whole into memory)."""
        raw = os.fsencode(path)
        _check(lib.bpe_trainer_feed_file(self._ptr, raw, len(raw)))

    def stats(self) -> tuple[int, int]:
        """(unique chunks, bytes) counted so far."""
        u, b = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        _check(lib.bpe_trainer_stats(self._ptr, u, b))
        return u[0], b[0]

    def train(self, vocab_size: int = DEFAULT_VOCAB_SIZE, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
        """Learn merges until 256 bytes + merges + special tokens = vocab_size. Consumes the counts."""
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise BpeError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if len(set(special_tokens)) != len(special_tokens):
            raise BpeError(f"special tokens must be unique, got {list(special_tokens)}")
        specials = [_utf8(s, "special token") for s in special_tokens]
        blob, offsets, _keep = _blob(specials)
        ptr = _check_ptr(lib.bpe_trainer_train(self._ptr, vocab_size, blob, offsets, len(specials)))
        return Tokenizer._wrap(ptr)


def train_from_iterator(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    max_digits: int = DEFAULT_MAX_DIGITS,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    max_chars: int | None = None,
    num_threads: int = 0,
    batch_size: int = 8192,
) -> Tokenizer:
    """Train on an iterator of texts (each text is one document; chunks never cross documents)."""
    trainer = Trainer(max_digits, num_threads)
    trainer.feed(texts, batch_size=batch_size, max_chars=max_chars)
    return trainer.train(vocab_size, special_tokens)


def train_from_files(
    paths: Iterable[str | os.PathLike],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    max_digits: int = DEFAULT_MAX_DIGITS,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    num_threads: int = 0,
) -> Tokenizer:
    """Train on UTF-8 text files, read and counted in Rust (each file is one document)."""
    trainer = Trainer(max_digits, num_threads)
    for p in paths:
        trainer.feed_file(p)
    return trainer.train(vocab_size, special_tokens)


def _special_modes(tok: Tokenizer, allowed_special, disallowed_special):
    """tiktoken's rules: allowed specials become tokens; disallowed ones found in the text are an error."""
    names = tok._special_names
    if allowed_special == "all":
        allowed = set(names)
    else:
        allowed = set(allowed_special)
    if disallowed_special == "all":
        disallowed = set(names) - allowed
    else:
        disallowed = set(disallowed_special)
    unknown = (allowed | disallowed) - set(names)
    if unknown:
        raise BpeError(f"unknown special tokens {sorted(unknown)}; this tokenizer has {names}")
    if not allowed and not disallowed:
        return ffi.NULL
    return bytes(1 if n in allowed else 2 if n in disallowed else 0 for n in names)


class Tokenizer:
    """A trained vocabulary: encode/decode, token byte lengths, save/load, tiktoken and HF exports."""

    def __init__(self):
        raise TypeError("use bpe_rs.train_from_iterator/train_from_files or Tokenizer.load/from_ranks")

    @classmethod
    def _wrap(cls, ptr) -> Tokenizer:
        self = object.__new__(cls)
        self._ptr = ptr
        info = ffi.new("uint64_t[4]")
        _check(lib.bpe_tokenizer_info(ptr, info))
        self.num_ranks, num_specials, self.vocab_size, self.max_digits = (int(x) for x in info)
        specials: dict[str, int] = {}
        for k in range(num_specials):
            buf, sid = ffi.new("BpeBytes *"), ffi.new("uint32_t *")
            _check(lib.bpe_tokenizer_special(ptr, k, buf, sid))
            specials[_take_bytes(buf).decode("utf-8")] = int(sid[0])
        self.special_tokens = specials
        self._special_names = list(specials)
        self._vocab: list[bytes] | None = None
        return self

    def __del__(self):
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None:
            lib.bpe_tokenizer_free(ptr)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, specials={len(self.special_tokens)}, max_digits={self.max_digits})"

    @property
    def pattern(self) -> str:
        return pattern(self.max_digits)

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise BpeError(f"unknown special token {name!r}; this tokenizer has {self._special_names}") from None

    @property
    def bos_id(self) -> int:
        return self.special_id("<|bos|>")

    # ---- encoding --------------------------------------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with special-token text treated as ordinary text."""
        raw = _utf8(text)
        buf = ffi.new("BpeU32s *")
        _check(lib.bpe_encode(self._ptr, raw, len(raw), ffi.NULL, buf))
        return _take_u32(buf)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode any bytes: valid UTF-8 runs as text, other bytes as single-byte tokens (round-trips exactly)."""
        data = bytes(data)
        buf = ffi.new("BpeU32s *")
        _check(lib.bpe_encode_bytes(self._ptr, data, len(data), buf))
        return _take_u32(buf)

    def encode(self, text: str, allowed_special=(), disallowed_special="all") -> list[int]:
        """tiktoken's `encode`: specials in `allowed_special` become tokens; by default any special-token text
        in `text` is an error (pass disallowed_special=() to encode it as ordinary text)."""
        modes = _special_modes(self, allowed_special, disallowed_special)
        raw = _utf8(text)
        buf = ffi.new("BpeU32s *")
        _check(lib.bpe_encode(self._ptr, raw, len(raw), modes, buf))
        return _take_u32(buf)

    def encode_batch(
        self, texts: Sequence[str], allowed_special=(), disallowed_special="all", num_threads: int = 0
    ) -> list[list[int]]:
        """Encode many texts on `num_threads` threads (0 = all cores), without holding the GIL."""
        modes = _special_modes(self, allowed_special, disallowed_special)
        return self._encode_batch(texts, modes, num_threads)

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return self._encode_batch(texts, ffi.NULL, num_threads)

    def encode_batch_flat(
        self, texts: Sequence[str], allowed_special=(), disallowed_special="all", num_threads: int = 0
    ) -> tuple[array.array, array.array]:
        """`encode_batch` without building Python lists: all ids back to back as array('I') (uint32) and
        len(texts)+1 offsets as array('Q'); text k is ids[offsets[k]:offsets[k+1]]. Both are buffers, so
        `numpy.frombuffer(ids, dtype=numpy.uint32)` views them without a copy. This is the fast path for
        tokenizing a corpus into shards: building millions of Python ints costs as much as encoding them."""
        modes = _special_modes(self, allowed_special, disallowed_special)
        ids_buf, offs_buf = self._encode_batch_raw(texts, modes, num_threads)
        try:
            ids = array.array("I", bytes(ffi.buffer(ids_buf.data, ids_buf.len * 4)) if ids_buf.len else b"")
            offsets = array.array("Q", ffi.unpack(offs_buf.data, offs_buf.len))
            return ids, offsets
        finally:
            lib.bpe_u32s_free(ids_buf)
            lib.bpe_sizes_free(offs_buf)

    def _encode_batch(self, texts: Sequence[str], modes, num_threads: int) -> list[list[int]]:
        ids_buf, offs_buf = self._encode_batch_raw(texts, modes, num_threads)
        try:
            offs = ffi.unpack(offs_buf.data, offs_buf.len)
            return [ffi.unpack(ids_buf.data + offs[k], offs[k + 1] - offs[k]) for k in range(len(offs) - 1)]
        finally:
            lib.bpe_u32s_free(ids_buf)
            lib.bpe_sizes_free(offs_buf)

    def _encode_batch_raw(self, texts: Sequence[str], modes, num_threads: int):
        raws = [_utf8(t) for t in texts]
        blob, offsets, _keep = _blob(raws)
        ids_buf, offs_buf = ffi.new("BpeU32s *"), ffi.new("BpeSizes *")
        _check(lib.bpe_encode_batch(self._ptr, blob, offsets, len(raws), modes, num_threads, ids_buf, offs_buf))
        return ids_buf, offs_buf

    # ---- decoding --------------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        arr = ffi.new("uint32_t[]", list(ids)) if len(ids) else ffi.NULL
        buf = ffi.new("BpeBytes *")
        _check(lib.bpe_decode(self._ptr, arr, len(ids), buf))
        return _take_bytes(buf)

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        """Decode to text; bytes that are not valid UTF-8 become U+FFFD (errors="strict" raises instead)."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    def vocab(self) -> list[bytes]:
        """Byte string of every ordinary token, indexed by id (= tiktoken rank)."""
        if self._vocab is None:
            blob, offs = ffi.new("BpeBytes *"), ffi.new("BpeSizes *")
            _check(lib.bpe_tokenizer_vocab(self._ptr, blob, offs))
            data, o = _take_bytes(blob), _take_sizes(offs)
            self._vocab = [data[o[k] : o[k + 1]] for k in range(len(o) - 1)]
        return self._vocab

    def token_byte_lengths(self) -> list[int]:
        """Bytes per token id (0 for special tokens): the denominator table of bits-per-byte."""
        out = ffi.new("uint32_t[]", self.vocab_size)
        _check(lib.bpe_token_byte_lengths(self._ptr, out, self.vocab_size))
        return ffi.unpack(out, self.vocab_size)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ---- files -----------------------------------------------------------------------------------------------
    def ranks_bytes(self) -> bytes:
        """The ranks in tiktoken's file format."""
        buf = ffi.new("BpeBytes *")
        _check(lib.bpe_tokenizer_ranks(self._ptr, buf))
        return _take_bytes(buf)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.tiktoken (ranks) and tokenizer_meta.json into `directory`, each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ranks = self.ranks_bytes()
        meta = {
            "format": FORMAT,
            "pattern": self.pattern,
            "max_digits": self.max_digits,
            "special_tokens": self.special_tokens,
            "num_ranks": self.num_ranks,
            "vocab_size": self.vocab_size,
            "ranks_sha256": hashlib.sha256(ranks).hexdigest(),
        }
        _atomic_write(d / RANKS_FILE, ranks)
        _atomic_write(d / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load what `save` wrote; a corrupt or truncated ranks file is detected by its checksum."""
        d = Path(directory)
        meta_path, ranks_path = d / META_FILE, d / RANKS_FILE
        for p in (meta_path, ranks_path):
            if not p.is_file():
                raise BpeError(f"{p} not found: is {d} a directory written by Tokenizer.save?")
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BpeError(f"{meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BpeError(f"{meta_path}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        ranks = ranks_path.read_bytes()
        if hashlib.sha256(ranks).hexdigest() != meta.get("ranks_sha256"):
            raise BpeError(f"{ranks_path} is corrupt or truncated: its sha256 does not match {meta_path}")
        tok = cls.from_ranks(ranks, meta["pattern"], meta["special_tokens"])
        if tok.num_ranks != meta.get("num_ranks"):
            raise BpeError(f"{ranks_path} has {tok.num_ranks} tokens, {meta_path} says {meta.get('num_ranks')}")
        return tok

    @classmethod
    def from_ranks(cls, ranks: bytes, pat: str, special_tokens: dict[str, int]) -> Tokenizer:
        """Build from the contents of a tiktoken ranks file, its split pattern and special tokens {text: id}."""
        digits = pattern_digits(pat)
        if digits is None:
            raise BpeError(
                f"pattern {pat!r} is not implemented by bpe_rs's hand-written pre-tokenizer; "
                f"it implements {pattern(1)!r} with the digit group length 1..16"
            )
        names = [_utf8(s, "special token") for s in special_tokens]
        blob, offsets, _keep = _blob(names)
        ids = ffi.new("uint32_t[]", [int(v) for v in special_tokens.values()]) if names else ffi.NULL
        return cls._wrap(_check_ptr(lib.bpe_tokenizer_from_ranks(ranks, len(ranks), digits, blob, offsets, ids, len(names))))

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike, pat: str, special_tokens: dict[str, int]) -> Tokenizer:
        return cls.from_ranks(Path(path).read_bytes(), pat, special_tokens)

    def to_tiktoken(self, name: str = "bpe_rs"):
        """A `tiktoken.Encoding` over the same ranks, pattern and special tokens (needs the tiktoken package)."""
        import tiktoken

        ranks = {tok: i for i, tok in enumerate(self.vocab())}
        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens)

    def hf_tokenizer_json(self) -> dict:
        """The HF `tokenizers` description of this tokenizer (BPE on GPT-2 byte-level symbols)."""
        vocab = self.vocab()
        sym = _bytes_to_unicode()
        names = ["".join(sym[b] for b in t) for t in vocab]
        rank_of = {t: i for i, t in enumerate(vocab)}
        merges = []
        # Every two-token split of every token, in rank order: with ignore_merges (a chunk that is a whole token
        # is emitted directly) this reproduces tiktoken's lowest-rank-first merging.
        for r, t in enumerate(vocab):
            for cut in range(1, len(t)):
                left, right = rank_of.get(t[:cut]), rank_of.get(t[cut:])
                if left is not None and right is not None:
                    merges.append((r, left, right))
        merges.sort()
        added = [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for s, i in self.special_tokens.items()
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            },
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": True,
                "vocab": {n: i for i, n in enumerate(names)},
                "merges": [[names[a], names[b]] for _, a, b in merges],
            },
        }

    def export_hf(self, path: str | os.PathLike) -> Path:
        """Write an HF `tokenizer.json` (a directory gets `tokenizer.json` inside it)."""
        p = Path(path)
        if p.is_dir():
            p = p / HF_FILE
        _atomic_write(p, json.dumps(self.hf_tokenizer_json(), ensure_ascii=False).encode("utf-8"))
        return p


class StreamDecoder:
    """Turns a stream of token ids into text without ever emitting half a character: bytes of an incomplete
    UTF-8 sequence (an emoji or CJK character split across tokens) are held until the rest arrives."""

    def __init__(self, tok: Tokenizer):
        self._vocab = tok.vocab()
        self._tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        b = self._vocab[token_id] if 0 <= token_id < len(self._vocab) else self._tok.token_bytes(token_id)
        return self._dec.decode(b)

    def flush(self) -> str:
        """End of stream: any incomplete trailing bytes become U+FFFD."""
        return self._dec.decode(b"", final=True)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map, used by HF byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _debug_panic() -> None:
    """Trigger a deliberate panic inside the Rust core (tests use it to show panics become BpeError)."""
    _check(lib.bpe_debug_panic())
