"""A slow, obviously-correct pure-Python BPE (training and encoding): the oracle bpe_rs is tested against.

Semantics shared with bpe_rs (bpe_rs/src/train.rs, tokenizer.rs):
- Pre-tokenization by the `regex` package running the split pattern (independent of bpe_rs's hand-written one).
- Training: every merge recounts all adjacent pairs of all words (overlapping pairs count), weighted by the
  word's count; the most frequent pair wins, ties go to the smaller (left id, right id). The pair is merged left
  to right without overlap in every word. Its bytes become a new token unless that byte string is a token
  already, in which case the merge produces that token. Stops when 256 + new tokens = the target.
- Encoding: tiktoken's rule -- a chunk that is a token is emitted as is; otherwise start from single bytes and
  merge the adjacent pair whose concatenation has the lowest rank, leftmost first, until none is a token.
Used only by tests: quadratic everywhere, fine for a few kilobytes.
"""

from collections import Counter

import regex


def pretokenize(text: str, pattern: str) -> list[str]:
    return regex.findall(pattern, text)


def train(texts: list[str], pattern: str, num_ranks: int) -> list[bytes]:
    """Token byte strings in rank order (256 single bytes, then merges) for `num_ranks` ordinary tokens."""
    chunks = Counter(c.encode() for t in texts for c in pretokenize(t, pattern))
    vocab = [bytes([b]) for b in range(256)]
    ids = {v: i for i, v in enumerate(vocab)}
    words = [(list(c), n) for c, n in sorted(chunks.items()) if len(c) >= 2]
    while len(vocab) < num_ranks:
        pairs: Counter = Counter()
        for w, n in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        if not pairs:
            raise ValueError(f"corpus too small: only {len(vocab)} tokens possible")
        best = max(pairs.values())
        a, b = min(p for p, c in pairs.items() if c == best)
        merged = vocab[a] + vocab[b]
        if merged not in ids:
            ids[merged] = len(vocab)
            vocab.append(merged)
        new = ids[merged]
        for w, _ in words:
            i = 0
            while i + 1 < len(w):
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [new]
                i += 1
    return vocab


def encode(text: str, pattern: str, vocab: list[bytes]) -> list[int]:
    ranks = {v: i for i, v in enumerate(vocab)}
    out = []
    for chunk in pretokenize(text, pattern):
        data = chunk.encode()
        if data in ranks:
            out.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while True:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        out.extend(ranks[p] for p in parts)
    return out
