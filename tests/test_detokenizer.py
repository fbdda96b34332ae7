"""infer/detokenizer.py: emoji, CJK and combining marks split across byte-level tokens stream without U+FFFD and
concatenate to the full text; invalid bytes become U+FFFD exactly when definitively invalid (or at flush);
special tokens skipped or rendered; the stream equals whole-sequence decoding. A tiny BPE is trained on English
text, so non-ASCII characters are split into single-byte tokens."""

import json
import os
import random
import textwrap

import pytest

import bpe_rs
from infer.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello 😀 world! 👩‍👩‍👧 family, 🇫🇷 flag.",
    "中文字符测试：你好，世界。日本語もあります。한국어",
    "café naïve e\u0301 a\u0308\u0301 Zalgo z\u0351\u0352\u0357 — “quotes” € ½",
    "mixed: abc😀def中g\u0301h 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end",
]


@pytest.fixture(scope="module")
def tok():
    # Real English text that ships with CPython: module docstrings of the standard library.
    texts = [m.__doc__ for m in (os, json, textwrap, random) if m.__doc__]
    return bpe_rs.train_from_iterator(texts, vocab_size=400)


def byte_id(tok, b: int) -> int:
    return tok.vocab().index(bytes([b]))


def stream(detok, ids):
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


def is_valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("text", TEXTS)
def test_split_characters_stream_cleanly(tok, text):
    ids = tok.encode(text)
    # The test means something only if some token is not valid UTF-8 on its own (a split character).
    assert any(not is_valid_utf8(tok.vocab()[i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    deltas, tail = stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas) and tail == ""
    assert "".join(deltas) == text
    assert not detok.has_pending_bytes


def test_incomplete_character_is_held_then_emitted(tok):
    detok = IncrementalDetokenizer(tok)
    emoji = "😀".encode()  # f0 9f 98 80
    assert [detok.push(byte_id(tok, b)) for b in emoji[:3]] == ["", "", ""]
    assert detok.has_pending_bytes
    assert detok.push(byte_id(tok, emoji[3])) == "😀"


def test_invalid_bytes_become_replacement_only_when_definitive(tok):
    detok = IncrementalDetokenizer(tok)
    assert detok.push(byte_id(tok, 0xFF)) == "\ufffd"  # never valid: at once
    assert detok.push(byte_id(tok, 0x80)) == "\ufffd"  # a stray continuation byte: at once
    assert detok.push(byte_id(tok, 0xE4)) == ""  # could still become 中
    assert detok.push(tok.encode("A")[0]) == "\ufffdA"  # ... but 'A' cannot continue it
    assert detok.push(byte_id(tok, 0xE4)) == ""
    assert detok.push(byte_id(tok, 0xB8)) == ""
    assert detok.flush() == "\ufffd"  # dangling at the end of the stream
    # The detokenizer is reusable after flush.
    assert "".join(detok.push(i) for i in tok.encode("中")) == "中"


def test_special_tokens_skipped_or_rendered(tok):
    end = tok.special_id("<|assistant_end|>")
    ids = tok.encode("hi 😀") + [end] + tok.encode(" bye")
    assert "".join(stream(IncrementalDetokenizer(tok), ids)[0]) == "hi 😀 bye"
    rendered = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(stream(rendered, ids)[0]) == "hi 😀<|assistant_end|> bye" == tok.decode(ids)
    # A special token between the bytes of one character: they never form it, so U+FFFD (as decode() gives).
    split = list("中".encode())
    ids = [byte_id(tok, split[0]), end, byte_id(tok, split[1]), byte_id(tok, split[2])]
    deltas, tail = stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids)
    assert "".join(deltas) + tail == tok.decode(ids) == "\ufffd<|assistant_end|>\ufffd\ufffd"
    deltas, tail = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) + tail == "\ufffd\ufffd\ufffd"  # one per invalid byte, as Python's decoder


def test_random_streams_equal_whole_decode(tok):
    # Random ids, specials included: the streamed text equals decode() of the whole sequence, however the bytes
    # fall; and no delta ever ends inside a character (each delta is a complete str by construction).
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        deltas, tail = stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids)
        assert "".join(deltas) + tail == tok.decode(ids)


def test_unknown_token_id(tok):
    with pytest.raises(ValueError, match="neither an ordinary token"):
        IncrementalDetokenizer(tok).push(tok.vocab_size + 5)
