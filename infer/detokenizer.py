"""Incremental detokenization: token ids in, text deltas out, never half a character.

    detok = IncrementalDetokenizer(tok)                  # one per sequence
    for t in token_ids: print(detok.push(t), end="")     # '' while an emoji / CJK character is incomplete
    print(detok.flush())                                 # end of stream: dangling bytes become U+FFFD

Byte-level BPE splits multi-byte UTF-8 characters across tokens (an emoji is 4 bytes; a small vocabulary gives
it 4 tokens). Decoding each token on its own prints U+FFFD mid-emoji (exo PR #1691, ferrox#124); holding back
text that *ends* in U+FFFD (nanochat's old server) also breaks when a real U+FFFD or an invalid byte is followed
by more text. So we keep bytes, not text: each token's bytes (from `tokenizer.vocab()`, one list shared by every
sequence) go through Python's incremental UTF-8 decoder with errors="replace", which
  - holds the bytes of an incomplete but so-far-valid sequence until it completes (then emits the character),
  - emits U+FFFD as soon as a sequence is definitively invalid (0xFF, a stray continuation byte, a lead byte
    followed by a non-continuation byte) and carries on with the next byte,
  - at `flush()` turns a still-incomplete tail into U+FFFD.
The concatenation of all deltas and the flush equals `tokenizer.decode(ids)` (errors="replace") when special
tokens are rendered; with `skip_special_tokens` it equals decoding with the specials removed, except that a
special token always ends a pending incomplete character (it becomes U+FFFD): the model put something between
those bytes, so they never form one character.

Special tokens (<|assistant_end|>, <|python_start|>, ...) are skipped by default (vLLM's default, what a chat
user should see) or rendered as their text. Combining marks are ordinary code points: a base letter and its
combining accent may arrive in separate deltas, which is correct UTF-8 streaming (grapheme clustering is the
display's job).

Not here: holding back text that could be the start of a stop string. That lives in one place,
infer.sampling.StopChecker, which wraps this detokenizer; use the detokenizer alone only without stop strings.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Per-sequence UTF-8-safe decoder of a stream of token ids (see the module docstring).

    tokenizer: a bpe_rs.Tokenizer, or anything with `vocab()` -> list[bytes] indexed by ordinary-token id and
    `special_tokens` -> {text: id}.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self._vocab: list[bytes] = tokenizer.vocab()  # cached on the tokenizer: shared, not copied
        self._specials: dict[int, str] = {i: s for s, i in tokenizer.special_tokens.items()}
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.num_tokens = 0

    def push(self, token_id: int) -> str:
        """The text completed by this token ('' while a character is still incomplete)."""
        self.num_tokens += 1
        if 0 <= token_id < len(self._vocab):
            return self._decoder.decode(self._vocab[token_id])
        special = self._specials.get(token_id)
        if special is None:
            raise ValueError(f"token id {token_id} is neither an ordinary token [0, {len(self._vocab)}) nor a "
                             f"special token {sorted(self._specials)}")
        pending = self._decoder.decode(b"", final=True)  # an interrupted character: U+FFFD (or '')
        self._decoder.reset()
        return pending if self.skip_special_tokens else pending + special

    def flush(self) -> str:
        """End of stream: any incomplete trailing bytes become U+FFFD. The detokenizer can be reused after."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out

    @property
    def has_pending_bytes(self) -> bool:
        """True while the bytes of an incomplete character are held."""
        return bool(self._decoder.getstate()[0])
