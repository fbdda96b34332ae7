"""bpe_rs against its oracles: the `regex` package (pre-tokenizer), a pure-Python BPE (training and encoding),
tiktoken (encoding with the same ranks) and HF tokenizers (the tokenizer.json export)."""

import inspect
import json
import textwrap
import unicodedata

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpe_rs
from tests import bpe_oracle

# Real text of several kinds; the multilingual lines exercise every class of the pre-tokenizer.
MULTILINGUAL = [
    "Hello world! I'm here, you're there; they'll go, we've gone. It's 2025-11-27 12:34:56.",
    "DON'T SHOUT, SHE'D SAID. 'Twas brillig. rock'n'roll ſ'S",
    "The price rose 12.5% to $1,234,567.89 (up 3x) — remarkable!\r\n\r\nNext line\ttabbed  spaced   ",
    "日本語のテキストと中文文本，還有한국어 문장도 있습니다. Ελληνικά και русский текст.",
    "العربية ١٢٣٤٥ हिन्दी १२३ ไทย ภาษา",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 and combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "\u00a0non-breaking\u00a0space\u3000ideographic\u2028line\u2029para\x0bvt\x0cff\x85nel",
    "    leading spaces and trailing   \n\n\n   \n",
    "x = [1, 2, 3]; y = {'a': 1}; print(f\"{x!r:>10}\") // comment /* c */ <html>&amp;</html>",
]


def stdlib_text(*modules) -> str:
    return "\n".join(inspect.getsource(m) for m in modules)


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return stdlib_text(textwrap, json.decoder, inspect)[:150_000] + "\n".join(MULTILINGUAL * 3)


@pytest.fixture(scope="module")
def tok(corpus_text) -> bpe_rs.Tokenizer:
    return bpe_rs.train_from_iterator([corpus_text], vocab_size=3000)


# ---- pre-tokenizer vs the regex package ------------------------------------------------------------------------

# Characters assigned in the Unicode version of bpe_rs's tables (16.0, tiktoken's); `regex` knows newer ones.
assigned = st.characters(exclude_categories=("Cs",)).filter(lambda c: bpe_rs.char_class(c) != "unassigned")
interesting = st.sampled_from(
    list("aZé中한ß' \t\r\n\u00a0\u3000\u2028\x0b\x85.,!?-_#\"'0123456789٣١ſsdmtlLvVeErR😀👍\u0301\u200d")
)
texts = st.text(st.one_of(interesting, interesting, assigned), max_size=60)


def test_character_classes_match_regex_on_every_code_point():
    # The generated tables against `regex`'s \p{L}, \p{N}, \s, for every code point assigned in our version.
    assert bpe_rs.unicode_version() == "16.0.0"
    classify = regex.compile(r"(\p{L})|(\p{N})|(\s)")
    names = {1: "letter", 2: "number", 3: "space"}
    wrong = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        ours = bpe_rs.char_class(ch)
        if ours == "unassigned":
            continue
        m = classify.match(ch)
        theirs = names[m.lastindex] if m else "other"
        if ours != theirs:
            wrong.append(f"U+{cp:04X} {unicodedata.name(ch, '?')}: ours {ours}, regex {theirs}")
    assert not wrong, "\n".join(wrong[:20])


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_pattern_is_nanochats_and_gpt4s(digits):
    p = bpe_rs.pattern(digits)
    assert f"\\p{{N}}{{1,{digits}}}" in p
    assert bpe_rs.pattern_digits(p) == digits
    assert bpe_rs.pattern_digits(r"\w+") is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, digits=st.sampled_from([1, 2, 3]))
def test_pretokenizer_matches_regex(text, digits):
    assert bpe_rs.pretokenize(text, digits) == regex.findall(bpe_rs.pattern(digits), text)


@pytest.mark.parametrize("line", MULTILINGUAL)
def test_pretokenizer_matches_regex_on_real_text(line):
    for digits in (1, 2, 3):
        assert bpe_rs.pretokenize(line, digits) == regex.findall(bpe_rs.pattern(digits), line)


def test_pretokenizer_on_long_real_text():
    text = stdlib_text(textwrap, inspect)
    assert bpe_rs.pretokenize(text) == regex.findall(bpe_rs.pattern(2), text)


# ---- training vs the oracle ------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2, 3])
def test_training_matches_oracle(threads):
    docs = [stdlib_text(textwrap)[:12_000]] + MULTILINGUAL
    num_ranks = 256 + 250
    expected = bpe_oracle.train(docs, bpe_rs.pattern(2), num_ranks)
    tok = bpe_rs.train_from_iterator(docs, vocab_size=num_ranks + 9, num_threads=threads, batch_size=3)
    assert tok.vocab() == expected
    assert tok.vocab_size == num_ranks + 9
    assert tok.special_tokens == {s: num_ranks + i for i, s in enumerate(bpe_rs.SPECIAL_TOKENS)}


def test_training_reuses_an_existing_token_for_duplicate_bytes():
    # "aaa" can be built as "aa"+"a" and "a"+"aa": the vocabulary must never hold the same bytes twice.
    docs = ["aaaa aaa aa a aaaaa aaaaaaa " * 20]
    expected = bpe_oracle.train(docs, bpe_rs.pattern(2), 256 + 6)
    tok = bpe_rs.train_from_iterator(docs, vocab_size=256 + 6, special_tokens=())
    assert tok.vocab() == expected
    assert len(set(tok.vocab())) == len(tok.vocab())


def test_training_is_deterministic_across_threads(corpus_text):
    a = bpe_rs.train_from_iterator([corpus_text], vocab_size=1500, num_threads=1).vocab()
    b = bpe_rs.train_from_iterator([corpus_text], vocab_size=1500, num_threads=4).vocab()
    assert a == b


def test_training_from_files_equals_iterator(tmp_path, corpus_text):
    # Several files, one larger than the reader's block, each one document.
    parts = [corpus_text[: len(corpus_text) // 2], corpus_text[len(corpus_text) // 2 :], "small file\n"]
    paths = []
    for i, p in enumerate(parts):
        path = tmp_path / f"part{i}.txt"
        path.write_text(p, "utf-8")
        paths.append(path)
    from_files = bpe_rs.train_from_files(paths, vocab_size=1200).vocab()
    from_iter = bpe_rs.train_from_iterator(parts, vocab_size=1200).vocab()
    assert from_files == from_iter


def test_trainer_fed_from_several_python_threads(corpus_text):
    # cffi releases the GIL, so threads really do call into one trainer at once; counts are sums, so the
    # result must equal feeding everything from one thread.
    import threading

    docs = [corpus_text[i : i + 5000] for i in range(0, len(corpus_text), 5000)]
    trainer = bpe_rs.Trainer()
    threads = [threading.Thread(target=trainer.feed, args=(docs[k::4],), kwargs={"batch_size": 2}) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert trainer.train(1000).vocab() == bpe_rs.train_from_iterator(docs, vocab_size=1000).vocab()


def test_trainer_stats_and_max_chars():
    tr = bpe_rs.Trainer()
    used = tr.feed(["abc def", "ghi jkl"], max_chars=10)
    assert used == 10
    chunks, nbytes = tr.stats()
    assert nbytes == 10 and chunks == 3  # "abc", " def", "ghi" (the second text is cut to 3 chars)


# ---- encoding vs tiktoken and the oracle -----------------------------------------------------------------------

def test_encode_matches_oracle(tok):
    vocab = tok.vocab()
    for line in MULTILINGUAL:
        assert tok.encode(line) == bpe_oracle.encode(line, tok.pattern, vocab), line


def test_encode_matches_tiktoken_on_real_text(tok, corpus_text):
    enc = tok.to_tiktoken()
    text = stdlib_text(inspect) + "\n".join(MULTILINGUAL)
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    # Long chunks take the heap-based merge path.
    long = " " * 500 + "x" * 300 + "😀" * 100 + "\n" * 200 + "ab" * 400
    assert tok.encode_ordinary(long) == enc.encode_ordinary(long)


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_encode_matches_tiktoken_on_random_text(tok, text):
    assert tok.encode_ordinary(text) == tok.to_tiktoken().encode_ordinary(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids, errors="strict") == text
    assert sum(tok.token_byte_lengths()[i] for i in ids) == len(text.encode())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_round_trip(tok, data):
    ids = tok.encode_bytes(data)
    assert tok.decode_bytes(ids) == data
    assert tok.decode(ids) == data.decode("utf-8", "replace")


def test_encode_batch_equals_encode(tok):
    texts = MULTILINGUAL * 5 + ["", "x"]
    for threads in (1, 2, 0):
        assert tok.encode_ordinary_batch(texts, num_threads=threads) == [tok.encode_ordinary(t) for t in texts]
    assert tok.encode_batch(["<|bos|>hi"], allowed_special="all") == [[tok.bos_id] + tok.encode("hi")]
    ids, offsets = tok.encode_batch_flat(texts)
    assert ids.itemsize == 4 and len(offsets) == len(texts) + 1
    assert [ids[offsets[k] : offsets[k + 1]].tolist() for k in range(len(texts))] == tok.encode_ordinary_batch(texts)
    assert tok.encode_batch_flat([]) == (ids[:0], offsets[:1])


def test_special_tokens(tok):
    enc = tok.to_tiktoken()
    text = "<|bos|>Hello<|user_start|> world<|user_end|><|assistant_start|>"
    ids = tok.encode(text, allowed_special="all")
    assert ids == enc.encode(text, allowed_special="all")
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
    # Not allowed (the default): an error naming the token.
    with pytest.raises(bpe_rs.BpeError, match=r"<\|bos\|>"):
        tok.encode(text)
    # Encoded as ordinary text on request, exactly as tiktoken does.
    plain = tok.encode(text, disallowed_special=())
    assert plain == enc.encode(text, disallowed_special=()) == tok.encode_ordinary(text)
    assert tok.bos_id not in plain
    # Some allowed, some disallowed.
    assert tok.encode("<|bos|>x", allowed_special={"<|bos|>"}) == enc.encode("<|bos|>x", allowed_special={"<|bos|>"})
    with pytest.raises(bpe_rs.BpeError, match="user_start"):
        tok.encode("<|bos|><|user_start|>", allowed_special={"<|bos|>"})
    with pytest.raises(bpe_rs.BpeError, match="unknown special"):
        tok.encode("x", allowed_special={"<|nope|>"})
    assert tok.token_byte_lengths()[tok.bos_id] == 0


def test_stream_decoder_never_splits_a_character(tok):
    text = "日本語 😀👍🏽 👨‍👩‍👧‍👦 naïve café"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Some emoji is split across byte-level tokens, so some push returned "" while waiting for the rest.
    assert "" in pieces[:-1]


# ---- files: save/load, tiktoken and HF exports -----------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    back = bpe_rs.Tokenizer.load(tmp_path / "t")
    assert back.vocab() == tok.vocab() and back.special_tokens == tok.special_tokens
    for line in MULTILINGUAL:
        assert back.encode(line) == tok.encode(line)


def test_tiktoken_loads_our_ranks_file(tok, tmp_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    enc = tiktoken.Encoding(
        "flashchat",
        pat_str=meta["pattern"],
        mergeable_ranks=load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken")),
        special_tokens=meta["special_tokens"],
    )
    text = stdlib_text(textwrap) + "\n".join(MULTILINGUAL) + "<|assistant_end|>"
    assert enc.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_hf_tokenizers_export_encodes_identically(tok, tmp_path):
    import tokenizers

    path = tok.export_hf(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    text_lines = MULTILINGUAL + stdlib_text(textwrap).splitlines()[:300]
    for line in text_lines:
        assert hf.encode(line, add_special_tokens=False).ids == tok.encode_ordinary(line), line
    special = "<|bos|>Hi there<|user_end|>日本😀"
    assert hf.encode(special, add_special_tokens=False).ids == tok.encode(special, allowed_special="all")
    assert hf.decode(tok.encode(special, allowed_special="all"), skip_special_tokens=False) == special


# ---- bad input gets a clear error ------------------------------------------------------------------------------

def test_invalid_utf8_training_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\n" * 10 + b"oops \xff\xfe here\n")
    with pytest.raises(bpe_rs.BpeError, match=r"bad\.txt is not valid UTF-8 at byte offset 125"):
        bpe_rs.train_from_files([bad], vocab_size=300)
    with pytest.raises(bpe_rs.BpeError, match="cannot open"):
        bpe_rs.train_from_files([tmp_path / "missing.txt"], vocab_size=300)


def test_empty_corpus():
    with pytest.raises(bpe_rs.BpeError, match="empty"):
        bpe_rs.train_from_iterator([], vocab_size=300)
    with pytest.raises(bpe_rs.BpeError, match="empty"):
        bpe_rs.train_from_iterator(["", ""], vocab_size=300)


def test_vocab_too_small_or_too_large():
    with pytest.raises(bpe_rs.BpeError, match="at least 256 byte tokens \\+ 9 special tokens = 265"):
        bpe_rs.train_from_iterator(["some text"], vocab_size=264)
    with pytest.raises(bpe_rs.BpeError, match="too small for this vocabulary"):
        bpe_rs.train_from_iterator(["tiny corpus"], vocab_size=5000)


def test_surrogates_and_non_str():
    with pytest.raises(bpe_rs.BpeError, match="not valid Unicode"):
        bpe_rs.train_from_iterator(["ok", "bad \ud800"], vocab_size=300)
    with pytest.raises(TypeError):
        bpe_rs.train_from_iterator([b"bytes"], vocab_size=300)


def test_corrupt_and_truncated_ranks_file(tok, tmp_path):
    d = tok.save(tmp_path / "t")
    ranks = (d / "tokenizer.tiktoken").read_bytes()
    # Truncated: caught by the checksum in the metadata.
    (d / "tokenizer.tiktoken").write_bytes(ranks[: len(ranks) // 2])
    with pytest.raises(bpe_rs.BpeError, match="corrupt or truncated"):
        bpe_rs.Tokenizer.load(d)
    # Parsed directly (no metadata to check against): each kind of damage is named with its line.
    specials = tok.special_tokens
    lines = ranks.decode().splitlines()
    bad_b64 = "\n".join(lines[:300] + ["!!!! 300"] + lines[301:])
    with pytest.raises(bpe_rs.BpeError, match="line 301: invalid base64"):
        bpe_rs.Tokenizer.from_ranks(bad_b64.encode(), tok.pattern, specials)
    with pytest.raises(bpe_rs.BpeError, match="no token with rank 300"):
        bpe_rs.Tokenizer.from_ranks("\n".join(lines[:300] + lines[301:]).encode(), tok.pattern, specials)
    with pytest.raises(bpe_rs.BpeError, match="line 2: rank 0 appears twice"):
        bpe_rs.Tokenizer.from_ranks(("\n".join(lines[:1] + ["AQ== 0"] + lines[1:])).encode(), tok.pattern, specials)
    with pytest.raises(bpe_rs.BpeError, match="no token for the single byte 0x00"):
        bpe_rs.Tokenizer.from_ranks(b"AQ== 0\n", tok.pattern, {})
    with pytest.raises(bpe_rs.BpeError, match="collides"):
        bpe_rs.Tokenizer.from_ranks(ranks, tok.pattern, {"<|x|>": 5})
    with pytest.raises(bpe_rs.BpeError, match="not implemented"):
        bpe_rs.Tokenizer.from_ranks(ranks, r"\w+|\s+", specials)
    (d / "tokenizer_meta.json").write_text("{not json")
    with pytest.raises(bpe_rs.BpeError, match="not valid JSON"):
        bpe_rs.Tokenizer.load(d)
    with pytest.raises(bpe_rs.BpeError, match="not found"):
        bpe_rs.Tokenizer.load(tmp_path / "nowhere")


def test_decode_unknown_id(tok):
    with pytest.raises(bpe_rs.BpeError, match=f"token id {tok.vocab_size} .* not in the vocabulary"):
        tok.decode([1, tok.vocab_size])


def test_rust_panic_becomes_python_exception():
    with pytest.raises(bpe_rs.BpeError, match="Rust panic"):
        bpe_rs._debug_panic()
    # The library still works afterwards.
    assert bpe_rs.pretokenize("still fine") == ["still", " fine"]


@pytest.mark.slow
def test_rust_unit_tests():
    # The crate's own tests (pre-tokenizer cases, merge paths, base64, thread-count determinism).
    import shutil
    import subprocess
    from pathlib import Path

    cargo = shutil.which("cargo")
    assert cargo, "cargo is needed to build bpe_rs"
    crate = Path(__file__).resolve().parent.parent / "bpe_rs"
    out = subprocess.run([cargo, "test", "--release", "--quiet"], cwd=crate, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "test result: ok" in out.stdout
