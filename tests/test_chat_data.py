"""train/chat_data.py: targets follow the render mask on hand-checked conversations (tool calls, several turns,
a system message); packing never splits a conversation and pads instead; padded rows hold one conversation each;
loader state resumes exactly; ranks read disjoint conversations; offline conversations and the mixture guard."""

import numpy as np
import pytest

import bpe_rs
from train.chat_data import (Conversations, PackedChatLoader, PaddedChatLoader, build_mixture,
                             chatterbot_conversations, chitchat_conversations, mixture_of, row_to_batch)
from model.chat import render_conversation
from tests.test_chat import TOOL_CONVERSATION
from train.tasks_synthetic import ArithmeticWordProblems


@pytest.fixture(scope="module")
def tok():
    texts = ["The quick brown fox jumps over the lazy dog. What is 12 times 7? The answer is 84.",
             "You are a helpful assistant. Let me compute that. Thanks! You are welcome. How are you doing today?"]
    return bpe_rs.train_from_iterator(texts * 20, vocab_size=300)


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """n distinct conversations of varied length (1-2 exchanges, answers of 1-7 words)."""
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over the lazy dog and you are welcome".split()
    out = []
    for i in range(n):
        msgs = []
        for j in range(int(rng.integers(1, 3))):
            msgs.append({"role": "user", "content": f"q{i}.{j}"})
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 8))))})
        out.append(msgs)
    return out


def test_targets_follow_the_mask(tok):
    ids, mask = render_conversation(tok, TOOL_CONVERSATION)
    inputs, targets = row_to_batch(np.array([ids]), np.array([mask]), "cpu")
    assert inputs[0].tolist() == ids[:-1]
    trained = [t for t in targets[0].tolist() if t >= 0]
    S, enc = tok.special_id, tok.encode_ordinary
    # Hand-checked: the assistant's text, its tool call with delimiters and each <|assistant_end|>; never the
    # system/user text, <|assistant_start|>, the tool output or BOS.
    assert trained == (enc("Let me compute that.") + [S("<|python_start|>")] + enc("12 * 7") + [S("<|python_end|>")]
                       + enc("The answer is 84.") + [S("<|assistant_end|>")] + enc("You are welcome.")
                       + [S("<|assistant_end|>")])
    # Position by position: target t is token t+1 exactly where that token's mask is 1.
    for t in range(len(ids) - 1):
        assert targets[0, t].item() == (ids[t + 1] if mask[t + 1] else -1)


def test_packing_keeps_conversations_whole(tok):
    data = Conversations("toy", "train", conversations(300))
    renders = [render_conversation(tok, c) for c in data._rows]
    T = 256
    assert max(len(ids) for ids, _ in renders) <= T + 1  # none needs cropping at this T
    loader = PackedChatLoader(data, tok, B=4, T=T, buffer_size=8)
    seen = []
    for _ in range(2):  # ~200 conversations: within the first epoch
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, T)
        for b in range(4):
            x, y = inputs[b].tolist(), targets[b].tolist()
            p = 0
            while p < T and any(t != tok.bos_id for t in x[p:]):
                # The next tokens are one whole conversation (its last token may be the row's T+1-th).
                k = next((k for k, (ids, _) in enumerate(renders)
                          if len(ids) <= T + 1 - p and x[p: p + len(ids)] == ids[: T - p]), None)
                assert k is not None, f"row {b} at {p}: not the start of a whole conversation"
                ids, mask = renders[k]
                n = min(len(ids), T - p)
                # Targets line up with the mask: inside the conversation, and its first token (BOS) is never one.
                assert y[p: p + n - 1] == [i if m else -1 for i, m in zip(ids[1:n], mask[1:n])]
                if p > 0:
                    assert y[p - 1] == -1
                seen.append(k)
                p += len(ids)
            assert all(t == tok.bos_id for t in x[p:]) and all(t == -1 for t in y[max(p - 1, 0):])  # padding
    assert len(seen) == len(set(seen))  # no conversation twice within an epoch
    assert loader.pad_tokens > 0


def test_long_conversation_is_cropped_and_counted(tok):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the lazy dog " * 40}]
    data = Conversations("toy", "train", [long] + conversations(5))
    loader = PackedChatLoader(data, tok, B=1, T=32, buffer_size=1)
    inputs, _ = next(loader)
    ids = render_conversation(tok, long)[0]
    assert inputs[0].tolist() == ids[:32]  # the first 33 tokens fill the row; the rest is dropped and counted
    assert loader.stream.num_cropped == 1 and loader.stream.cropped_tokens == len(ids) - 33


def test_padded_rows_hold_one_conversation(tok):
    data = Conversations("toy", "train", conversations(8))
    loader = PaddedChatLoader(data, tok, B=4, T=128)
    inputs, targets = next(loader)
    lengths = [len(render_conversation(tok, c)[0]) for c in data._rows[:4]]
    assert len(set(lengths)) > 1  # so some rows are padded
    assert inputs.shape == (4, max(lengths) - 1)
    for b, n in enumerate(lengths):
        ids, mask = render_conversation(tok, data._rows[b])
        assert inputs[b, : n - 1].tolist() == ids[:-1]
        assert (inputs[b, n:] == tok.bos_id).all() and (targets[b, n - 1:] == -1).all()  # BOS padding, no targets
        assert targets[b, : n - 1].tolist() == [i if m else -1 for i, m in zip(ids[1:], mask[1:])]


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_loader_state_resumes_exactly(tok, kind):
    data = Conversations("toy", "train", conversations(30))
    make = (lambda: PackedChatLoader(data, tok, B=3, T=64, buffer_size=5)) if kind == "packed" else \
        (lambda: PaddedChatLoader(data, tok, B=3, T=64))
    a = make()
    for _ in range(7):  # past an epoch boundary
        next(a)
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.equal(xb) and ya.equal(yb)
    assert a.stream.epoch >= 1
    with pytest.raises(ValueError, match="T: saved 64, here 32"):
        (PackedChatLoader(data, tok, B=3, T=32) if kind == "packed" else PaddedChatLoader(data, tok, B=3, T=32)
         ).load_state_dict(state)


def test_ranks_read_disjoint_conversations(tok):
    data = Conversations("toy", "train", conversations(12))
    rows = [PaddedChatLoader(data, tok, B=3, T=128, rank=r, world_size=2) for r in range(2)]
    first = [[tuple(x.tolist()) for x in next(loader)[0]] for loader in rows]
    assert not set(first[0]) & set(first[1])


def test_offline_conversations_alternate_and_split():
    train, val = chitchat_conversations("train"), chitchat_conversations("validation")
    assert len(train) > 10_000 and 100 < len(val) < 0.05 * len(train)
    for conv in list(train)[:200] + list(val)[:50]:
        roles = [m["role"] for m in conv["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 8
    bot = chatterbot_conversations("train")
    assert len(bot) > 500 and bot[0]["messages"][1]["role"] == "assistant"
    assert {tuple(map(str, c["messages"])) for c in list(val)[:50]}.isdisjoint(
        {tuple(map(str, c["messages"])) for c in train})


def test_training_mixture_refuses_eval_splits():
    rows = conversations(3)
    with pytest.raises(ValueError, match=r"eval-only splits .*leaked \(test\)"):
        mixture_of([Conversations("ok", "train", rows), Conversations("leaked", "test", rows)], "train")
    with pytest.raises(ValueError, match=r"chitchat \(validation\)"):
        mixture_of([chitchat_conversations("validation")], "train")
    synthetic_val = ArithmeticWordProblems(5, 1000)
    synthetic_val.split = "validation"
    with pytest.raises(ValueError, match="eval-only"):
        mixture_of([synthetic_val], "train")
    mixture_of([Conversations("leaked", "test", rows)], "val")  # evaluating on it is fine
    with pytest.raises(ValueError, match="mixture 'nope'"):
        build_mixture("nope", "mid", "train")
