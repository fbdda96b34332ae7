"""Train flashchat's BPE tokenizer with bpe_rs and save it: `python -m train.tok_train --out DIR`.

    python -m train.tok_train --out runs/tokenizer                          # offline corpus, train split
    python -m train.tok_train --input shards/ --vocab-size 32768 --max-chars 2000000000 --out runs/tokenizer

What it does, as nanochat's tok_train.py: stream documents (each cut to --doc-cap characters, the stream cut to
--max-chars) into bpe_rs's parallel chunk counter, learn merges up to --vocab-size (256 byte tokens + merges +
the 9 special tokens of bpe_rs.SPECIAL_TOKENS), check that a mixed string round-trips, and write into DIR:

    tokenizer.tiktoken     ranks (tiktoken's file format)             } Tokenizer.save; tokenizer_meta.json
    tokenizer_meta.json    pattern, special tokens, ranks checksum    } is written last of everything
    hf/tokenizer.json      the same tokenizer for HF `tokenizers`
    tok_train.json         metrics: chars, bytes, unique chunks, timings, peak RSS, threads

DIR is complete only once tokenizer_meta.json exists: a stale one is deleted before anything else is written and
the new one is the last file written, so a run killed half-way never leaves a directory that looks finished.
(`Tokenizer.load` would also catch mismatched ranks through the checksum, but not a stale hf/ or metrics file.)

Limits: input is the offline corpus's train split (never its val split), or every document of a directory of
.txt/.jsonl/.parquet files (train.corpus reads them; a user directory has no held-out split here: hold out val
files yourself, as nanochat does with its last shard). Chunk counts are kept in memory: memory grows with the
number of unique chunks, not with the text, and peak RSS is reported so you can see it. No per-token
`token_bytes` table is written: `Tokenizer.token_byte_lengths()` computes it from the saved ranks on demand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import bpe_rs

from train.corpus import iter_texts

METRICS_FILE = "tok_train.json"
HF_DIR = "hf"
# nanochat caps each document at 10,000 characters for tokenizer training so a few huge documents (a book, a
# data dump) cannot dominate the chunk counts.
DEFAULT_DOC_CAP = 10_000
# The round-trip probe: every branch of the split pattern and every UTF-8 length (1-4 bytes). nanochat checks
# a similar string; ours adds code with tabs/newlines, digit runs longer than max_digits and a ZWJ emoji.
ROUND_TRIP_TEXT = (
    "Hello world! It's 2025-06-30, and we'll pay $1,234.56 (or 3.14159e10) -- isn't that 100% fine?\n"
    "I'M SURE you'VE seen it... \"quotes\" & <tags> {braces} [brackets] #hashtag @user ~tilde^caret|pipe\n"
    "def f(x: int) -> list[int]:\n\treturn [i ** 2 for i in range(x) if i % 3 != 0]  # comment\n\n"
    "中文分词测试，日本語のテキスト、한국어 문장입니다. Ünïcödé façade naïve café — “smart” ‘quotes’ …\n"
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 and math ∑∫√∞ ≤ ≥ ≠, numbers 00012345678901234567890  \r\n   trailing spaces   "
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the BPE tokenizer (bpe_rs) and save it into --out.")
    p.add_argument("--input", metavar="PATH", default=None,
                   help="directory of .txt/.jsonl/.parquet files (default: the offline corpus, train split only)")
    p.add_argument("--vocab-size", type=_positive_int, default=bpe_rs.DEFAULT_VOCAB_SIZE,
                   help="total vocabulary in tokens: 256 bytes + merges + 9 special tokens (default: %(default)s)")
    p.add_argument("--max-chars", type=_positive_int, default=None,
                   help="stop reading after this many characters in total (default: all; nanochat uses 2e9)")
    p.add_argument("--doc-cap", type=_positive_int, default=DEFAULT_DOC_CAP,
                   help="characters kept from the start of each document (default: %(default)s)")
    p.add_argument("--max-digits", type=_positive_int, default=bpe_rs.DEFAULT_MAX_DIGITS,
                   help="longest digit run the pre-tokenizer keeps in one chunk, in digits (default: %(default)s)")
    p.add_argument("--threads", type=_non_negative_int, default=0,
                   help="threads for chunk counting and merging (default: 0 = all cores)")
    p.add_argument("--out", metavar="DIR", required=True, help="directory to write the tokenizer into")
    p.add_argument("--report-root", metavar="DIR", default=None,
                   help="record the training numbers in this run's report (train/report.py, stage 'tokenizer')")
    return p.parse_args(argv)


def _counting(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Pass texts through, counting them in counter[0] (Trainer.feed only reports characters)."""
    for text in texts:
        counter[0] += 1
        yield text


def check_round_trip(tok: bpe_rs.Tokenizer, text: str = ROUND_TRIP_TEXT) -> int:
    """Raise unless decode(encode(text)) == text and each special token encodes to its own id; returns #tokens."""
    ids = tok.encode_ordinary(text)
    decoded = tok.decode(ids, errors="strict")
    if decoded != text:
        at = next((i for i, (a, b) in enumerate(zip(text, decoded)) if a != b), min(len(text), len(decoded)))
        raise RuntimeError(f"round-trip check failed at character {at}: {text[at:at + 20]!r} came back as "
                           f"{decoded[at:at + 20]!r} ({len(ids)} tokens)")
    for name, sid in tok.special_tokens.items():
        if tok.encode(name, allowed_special="all") != [sid]:
            raise RuntimeError(f"special token {name!r} does not encode to its id {sid}")
    return len(ids)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS); it covers the Rust allocations too (same process).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _resolved_threads(requested: int) -> int:
    # bpe_rs resolves 0 with Rust's available_parallelism, which honours CPU affinity like sched_getaffinity.
    if requested:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    # bpe_rs's floor, checked before reading anything: on a 2e9-character input bpe_rs would only say so after
    # minutes of counting. bpe_rs.Trainer.train checks it again with the same rule.
    min_vocab = 256 + len(bpe_rs.SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        raise bpe_rs.BpeError(f"vocab_size {args.vocab_size} is too small: it must be at least 256 byte tokens "
                              f"+ {len(bpe_rs.SPECIAL_TOKENS)} special tokens = {min_vocab}")
    trainer = bpe_rs.Trainer(max_digits=args.max_digits, num_threads=args.threads)  # validates max_digits
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / bpe_rs.META_FILE).unlink(missing_ok=True)  # the directory no longer counts as complete

    # The offline corpus's val split is what bpb is measured on later: the tokenizer never sees it.
    split = "train" if args.input is None else None
    texts = iter_texts(args.input, max_chars=args.max_chars, doc_cap=args.doc_cap, split=split)
    num_docs = [0]
    t0 = time.perf_counter()
    num_chars = trainer.feed(_counting(texts, num_docs))
    feed_seconds = time.perf_counter() - t0
    num_unique_chunks, num_bytes = trainer.stats()  # before train(), which consumes the counts

    t0 = time.perf_counter()
    tok = trainer.train(args.vocab_size, bpe_rs.SPECIAL_TOKENS)
    train_seconds = time.perf_counter() - t0
    del trainer
    num_probe_tokens = check_round_trip(tok)

    metrics = {
        "input": str(Path(args.input).resolve()) if args.input else "offline corpus (train split)",
        "num_docs": num_docs[0],
        "num_chars": num_chars,
        "num_bytes": num_bytes,
        "num_unique_chunks": num_unique_chunks,
        "vocab_size": tok.vocab_size,
        "num_merges": tok.num_ranks - 256,
        "num_special_tokens": len(tok.special_tokens),
        "max_digits": tok.max_digits,
        "doc_cap_chars": args.doc_cap,
        "max_chars": args.max_chars,
        "feed_seconds": round(feed_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "threads": args.threads,
        "threads_used": _resolved_threads(args.threads),
        "round_trip_tokens": num_probe_tokens,
    }
    # Order matters: everything else first, Tokenizer.save last (it writes the ranks, then tokenizer_meta.json).
    (out / HF_DIR).mkdir(exist_ok=True)
    tok.export_hf(out / HF_DIR / bpe_rs.HF_FILE)
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / METRICS_FILE)
    tok.save(out)
    # Read back what was written: catches a broken save before a multi-hour pretraining run does.
    if bpe_rs.Tokenizer.load(out).encode_ordinary(ROUND_TRIP_TEXT) != tok.encode_ordinary(ROUND_TRIP_TEXT):
        raise RuntimeError(f"{out}: the saved tokenizer encodes differently from the trained one")
    return metrics


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        m = train(args)
    except (ValueError, ModuleNotFoundError, OSError) as e:  # BpeError is a ValueError
        # Bad arguments and bad input are the user's to fix: one line, no traceback. A failed round-trip
        # check (RuntimeError) is a bug in bpe_rs and keeps its traceback.
        print(f"tok_train: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"trained {m['vocab_size']:,}-token vocabulary ({m['num_merges']:,} merges, max_digits={m['max_digits']}) "
          f"on {m['num_docs']:,} docs / {m['num_chars']:,} chars / {m['num_bytes'] / 1e6:.1f} MB "
          f"({m['num_unique_chunks']:,} unique chunks)")
    print(f"feed {m['feed_seconds']:.2f} s, train {m['train_seconds']:.2f} s on {m['threads_used']} threads, "
          f"peak RSS {m['peak_rss_mb']:.0f} MB; round-trip OK ({m['round_trip_tokens']} tokens)")
    if args.report_root:
        from train.report import record_stage

        record_stage(args.report_root, "tokenizer", wall_s=m["feed_seconds"] + m["train_seconds"],
                     metrics={k: m[k] for k in ("vocab_size", "num_docs", "num_chars", "num_bytes", "num_merges",
                                                "train_seconds", "peak_rss_mb")},
                     config={"input": m["input"], "max_chars": m["max_chars"], "doc_cap_chars": m["doc_cap_chars"]})
    print(f"saved to {args.out} ({bpe_rs.RANKS_FILE}, {bpe_rs.META_FILE}, {HF_DIR}/{bpe_rs.HF_FILE}, {METRICS_FILE})")


if __name__ == "__main__":
    main()
