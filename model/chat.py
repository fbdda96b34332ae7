"""Conversations → token ids and loss masks: the only place in flashchat that renders a chat (nanochat §7.1).

    ids, mask = render_conversation(tok, messages)          # SFT: train where mask == 1
    prompt = render_for_completion(tok, messages)           # RL / evals / servers: ends in <|assistant_start|>
    parts = parse_assistant_parts(tok, generated_ids)       # the model's turn back into text / python parts

messages: a list of {"role": "system" | "user" | "assistant", "content": ...}. An optional first "system"
message is merged into the first user message as "system\\n\\nuser". Then roles strictly alternate user,
assistant, user, ... starting with user. User (and system) content is a string; assistant content is a string or
a list of parts {"type": "text" | "python" | "python_output", "text": str}.

Token stream and mask (1 = the model is trained to produce this token):
    <|bos|>                                              0
    <|user_start|> user text <|user_end|>                0
    <|assistant_start|>                                  0   (the prompt asks for the turn; it is not predicted)
      text                                               1
      <|python_start|> code <|python_end|>               1   (the model writes the tool call)
      <|output_start|> tool output <|output_end|>        0   (the sandbox writes it; forced at inference)
    <|assistant_end|>                                    1   (the model learns to stop)
Text is encoded with `encode_ordinary`: special-token strings typed by a user (or inside a tool's output) stay
plain text and can never become control tokens.
Limits: no truncation unless asked — a conversation longer than `max_tokens` is an error naming both numbers;
`truncate=True` cuts ids and mask at `max_tokens` (nanochat's behaviour, which may cut mid-answer).
"""

from __future__ import annotations

from collections.abc import Sequence

PART_TYPES = ("text", "python", "python_output")
# (start, end) special tokens of each part type that is wrapped, and whether its tokens are trained.
_WRAP = {
    "python": ("<|python_start|>", "<|python_end|>", 1),
    "python_output": ("<|output_start|>", "<|output_end|>", 0),
}


class ChatFormatError(ValueError):
    """A conversation or a generated turn that does not follow the chat format."""


def _check_content_str(i: int, role: str, content) -> str:
    if not isinstance(content, str):
        raise ChatFormatError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
    return content


def assistant_parts(i: int, content) -> list[dict]:
    """Validated list of parts of an assistant message's content (a string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ChatFormatError(f"message {i} (assistant): content must be a string or a list of parts, "
                              f"got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ChatFormatError(f"message {i} (assistant) part {j}: expected {{'type': one of {PART_TYPES}, "
                                  f"'text': str}}, got {part!r}")
    return content


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Merge a leading system message into the first user message and check strict user/assistant alternation.
    Returns new message dicts (the input is not modified)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {m!r}")
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] == "system":
        system = _check_content_str(0, "system", msgs[0]["content"])
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise ChatFormatError("message 0 is a system message, so message 1 must be a user message")
        user = _check_content_str(1, "user", msgs[1]["content"])
        msgs = [{"role": "user", "content": system + "\n\n" + user}] + msgs[2:]
        offset = 1  # error messages name indices of the caller's list
    else:
        offset = 0
    for j, m in enumerate(msgs):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            i = j + offset if j else 0
            what = "the first message (after an optional system message)" if j == 0 else f"message {i}"
            raise ChatFormatError(f"{what} must have role {expected!r} (roles alternate user/assistant, starting "
                                  f"with user), got {m['role']!r} at index {i}")
        if expected == "user":
            _check_content_str(j + offset, "user", m["content"])
        else:
            assistant_parts(j + offset, m["content"])
    return msgs


def render_conversation(tokenizer, messages: Sequence[dict], max_tokens: int | None = None,
                        truncate: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (same length, mask in {0, 1}); see the module docstring."""
    special = tokenizer.special_id
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], m: int) -> None:
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    add([special("<|bos|>")], 0)
    for j, msg in enumerate(normalize_messages(messages)):
        if msg["role"] == "user":
            add([special("<|user_start|>")], 0)
            add(tokenizer.encode_ordinary(msg["content"]), 0)
            add([special("<|user_end|>")], 0)
        else:
            add([special("<|assistant_start|>")], 0)
            for part in assistant_parts(j, msg["content"]):
                trained = 1 if part["type"] == "text" else _WRAP[part["type"]][2]
                add(_part_tokens(tokenizer, part), trained)
            add([special("<|assistant_end|>")], 1)
    if max_tokens is not None and len(ids) > max_tokens:
        if not truncate:
            raise ChatFormatError(f"conversation is {len(ids)} tokens, over max_tokens={max_tokens} "
                                  f"(pass truncate=True to cut it)")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def _part_tokens(tokenizer, part: dict) -> list[int]:
    body = tokenizer.encode_ordinary(part["text"])
    if part["type"] == "text":
        return body
    start, end, _ = _WRAP[part["type"]]
    return [tokenizer.special_id(start)] + body + [tokenizer.special_id(end)]


def render_for_completion(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Prompt ids for the model to write the next assistant turn: a trailing assistant message (the reference
    answer of an eval or RL example) is dropped, and <|assistant_start|> is appended."""
    msgs = list(messages)
    if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    ids, _ = render_conversation(tokenizer, msgs)  # alternation after the drop means it ends with a user turn
    return ids + [tokenizer.special_id("<|assistant_start|>")]


def parse_assistant_parts(tokenizer, ids: Sequence[int]) -> list[dict]:
    """The parts of one assistant turn from its token ids — the inverse of rendering one assistant message.

    ids may start with <|assistant_start|> and may end with <|assistant_end|> (both are stripped). Text between
    blocks becomes "text" parts; <|python_start|>…<|python_end|> a "python" part; <|output_start|>…<|output_end|>
    a "python_output" part. Empty text runs produce no part. An unterminated block, a block inside a block, or
    any other special token is a ChatFormatError naming the token index."""
    specials = {v: k for k, v in tokenizer.special_tokens.items()}
    ids = list(ids)
    first = 0  # error messages name indices of the caller's list
    if ids and specials.get(ids[0]) == "<|assistant_start|>":
        ids, first = ids[1:], 1
    if ids and specials.get(ids[-1]) == "<|assistant_end|>":
        ids = ids[:-1]
    openers = {start: (kind, end) for kind, (start, end, _) in _WRAP.items()}
    parts: list[dict] = []
    run: list[int] = []
    kind, closer = "text", None

    def flush(part_type: str) -> None:
        if run or part_type != "text":
            parts.append({"type": part_type, "text": tokenizer.decode(run)})
        run.clear()

    for pos, tid in enumerate(ids):
        name = specials.get(tid)
        if name is None:
            run.append(tid)
        elif kind == "text" and name in openers:
            flush("text")
            kind, closer = openers[name]
        elif kind != "text" and name == closer:
            flush(kind)
            kind, closer = "text", None
        else:
            inside = "text" if kind == "text" else f"a {kind} block"
            raise ChatFormatError(f"unexpected special token {name} at index {pos + first} in {inside} "
                                  f"of an assistant turn")
    if kind != "text":
        raise ChatFormatError(f"assistant turn ends inside a {kind} block (missing {closer})")
    flush("text")
    return parts
