"""Conversation data for mid-training and SFT: mixtures by name, and loaders that turn conversations into
(inputs, targets) rows whose targets are −1 wherever model/chat.py's render mask is 0.

    train = build_mixture("offline", "mid", "train")                         # a TaskMixture, check_trainable'd
    loader = PackedChatLoader(train, tok, B=8, T=256, rank=r, world_size=w)  # mid: best-fit packed rows
    loader = PaddedChatLoader(train, tok, B=8, T=256, rank=r, world_size=w)  # SFT: one conversation per row
    inputs, targets = next(loader)                                           # (B, T') int64; T' = T when packed

Rows and masks. A conversation renders to ids and mask (render_conversation: 1 on assistant text, tool calls and
<|assistant_end|>; 0 on BOS, user text, <|assistant_start|> and tool outputs). A row holds T+1 tokens; inputs =
row[:-1], targets[t] = row[t+1] where mask[t+1] == 1, else −1. So the model is trained only to write the
assistant's part; the first token of the next conversation (its BOS) and padding are never targets.

Packing (mid, nanochat §7.2 "BOS best-fit"): a buffer of `buffer_size` whole conversations; into the row goes the
largest buffered conversation that fits entirely (ties: the earliest arrival); when none fits, the rest of the row
is padding (BOS tokens, targets −1) — conversations are never split across rows. A conversation longer than T+1
is cropped to T+1 when it enters the buffer (the loader counts them: `num_cropped`, `cropped_tokens`).
Padding (SFT, nanochat §7.3, "as at test time"): B conversations per micro-batch, one per row, each row padded
with BOS (targets −1) to the longest row of the micro-batch (so T' ≤ T varies between batches; never more than T).

Distribution and resume: rank r reads stream positions k = 0, 1, …, i.e. dataset examples (r + k·world) mod len
(epoch = (r + k·world) // len). `state_dict()` is the stream position plus the buffered positions (and counters):
plain JSON; conversations are re-rendered from the dataset (deterministic by index), so resume is exact.

Mixtures (`build_mixture(name, stage, split)`):
  "offline"   the CPU tier, all offline: the project's SYNTHETIC tasks (train/tasks_synthetic.py: GSM8K-format
              arithmetic with calculator tool calls, MMLU-style multiple choice, spelling/counting, identity
              chats; clearly not the real benchmarks) + chitchat-dataset conversations (chunked into ≤4 exchanges)
              + chatterbot-corpus English conversations. Val: the same generators with another seed + the
              conversations held out by train.corpus.split_of (the same documents base pretraining held out).
  "nanochat"  nanochat's mixtures through train.tasks.remote.load (imported only here, lazily): mid = SmolTalk
              train + MMLU auxiliary_train + GSM8K train + identity ×2 + spelling; sft = SmolTalk train + MMLU
              auxiliary_train ×3 + GSM8K train ×4; val = SmolTalk test + MMLU test[:5200] + GSM8K test[:420].
Training mixtures go through train.tasks.common.check_trainable: a test/validation split is refused.

Limits: rendering is pure Python + bpe_rs per conversation (~10-100 µs), far below a step; chitchat is informal
chat with typos, chatterbot is tiny and repetitive; the synthetic tasks lack a `split` attribute of their own, so
the builder sets it on the instances it creates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from model.chat import render_conversation
from train.corpus import PINNED, Document, chitchat_turns, package_dir, split_of
from train.tasks.common import Task, check_trainable
from train.tasks_synthetic import (ArithmeticWordProblems, IdentityChats, MultipleChoice, SpellingCount,
                                   TaskMixture)

MIXTURES = ("offline", "nanochat")
STAGES = ("mid", "sft")
MAX_EXCHANGES = 4  # chitchat conversations are cut into pieces of ≤ 4 user/assistant exchanges (fit small T)


# ---- offline conversations ---------------------------------------------------------------------------------------
class Conversations(Task):
    """Ready-made conversations (message lists) as a Task; split "train" or "validation" (eval-only)."""

    kind = "generative"

    def __init__(self, name: str, split: str, rows: list[list[dict]]):
        super().__init__(rows)
        self.name, self.split = name, split

    def render(self, row) -> dict:
        return {"messages": row}


def _held_out(source: str, doc_id: str) -> bool:
    return split_of(Document(source, doc_id, "")) == "val"


@functools.lru_cache(maxsize=1)  # one parse of the 40 MB JSON for both splits
def _chitchat_rows() -> dict[str, list[list[dict]]]:
    rows: dict[str, list[list[dict]]] = {"train": [], "validation": []}
    for uuid, turns in chitchat_turns():
        split = "validation" if _held_out("chitchat", uuid) else "train"
        for i in range(0, len(turns) - 1, 2 * MAX_EXCHANGES):
            piece = turns[i: i + 2 * MAX_EXCHANGES]
            piece = piece[: len(piece) // 2 * 2]
            if piece:
                rows[split].append([{"role": "user" if j % 2 == 0 else "assistant", "content": t}
                                    for j, t in enumerate(piece)])
    return rows


def chitchat_conversations(split: str) -> Conversations:
    """chitchat-dataset: each conversation's turns (runs of one sender's messages) alternate user/assistant from
    the first sender; cut into pieces of ≤ MAX_EXCHANGES exchanges; a trailing user turn is dropped."""
    return Conversations("chitchat", split, _chitchat_rows()["validation" if split == "validation" else "train"])


@functools.lru_cache(maxsize=4)
def chatterbot_conversations(split: str) -> Conversations:
    """chatterbot-corpus English: each listed conversation (q, a, q, a, ...) as one chat, exact repeats dropped;
    held out by file as train.corpus does (a whole file is train or val)."""
    import yaml

    data = package_dir("chatterbot_corpus", f"chatterbot-corpus=={PINNED['chatterbot-corpus']}") / "data"
    seen: dict[tuple, None] = {}
    for path in sorted((data / "english").glob("*.yml")):
        if _held_out("chatterbot", path.relative_to(data).with_suffix("").as_posix()) != (split == "validation"):
            continue
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in content.get("conversations") or []:
            if isinstance(conv, list):
                lines = tuple(str(x).strip() for x in conv if x is not None and str(x).strip())
                if len(lines) >= 2:
                    seen[lines[: len(lines) // 2 * 2]] = None
    rows = [[{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(c)] for c in seen]
    return Conversations("chatterbot", split, rows)


# ---- mixtures ----------------------------------------------------------------------------------------------------
def offline_tasks(stage: str, split: str, synthetic_examples: int = 2000) -> list:
    n = synthetic_examples
    if split == "train":
        seed = {"mid": 0, "sft": 1}[stage]  # SFT sees fresh synthetic problems, not mid's again
        # One-step problems beside the 2-4-step ones: a curriculum a small model can start learning from.
        synth = [ArithmeticWordProblems(n, seed), ArithmeticWordProblems(n, seed, ops=(1, 1)), MultipleChoice(n, seed),
                 SpellingCount(n // 2, seed), IdentityChats(max(1, n // 4), seed)]
        return synth + [chitchat_conversations("train"), chatterbot_conversations("train")]
    n = max(1, n // 20)
    held_out = {"seed": 1000, "split": "validation"}
    synth = [ArithmeticWordProblems(n, **held_out), ArithmeticWordProblems(n, ops=(1, 1), **held_out),
             MultipleChoice(n, **held_out), SpellingCount(n, **held_out), IdentityChats(max(1, n // 4), **held_out)]
    tasks = synth + [chitchat_conversations("validation")]
    held_out_bot = chatterbot_conversations("validation")
    return tasks + ([held_out_bot] if len(held_out_bot) else [])


def nanochat_tasks(stage: str, split: str, cache_dir=None) -> list:
    from train.tasks import remote  # another module's downloads; imported only when this mixture is asked for

    def load(name: str, source_split: str):
        return remote.load(name, source_split, cache_dir=cache_dir)

    if split != "train":
        return [load("smoltalk", "test"), load("mmlu", "test").subset(5200, seed=None),
                load("gsm8k", "test").subset(420, seed=None)]
    smoltalk, mmlu, gsm8k = load("smoltalk", "train"), load("mmlu", "auxiliary_train"), load("gsm8k", "train")
    if stage == "mid":  # §7.2's 848K rows (SpellingBee 80K + SimpleSpelling 200K → our SpellingCount 280K)
        identity = IdentityChats(1000, 0)
        return [smoltalk, mmlu, gsm8k, identity, identity, SpellingCount(280_000, 0)]
    return [smoltalk, mmlu, mmlu, mmlu, gsm8k, gsm8k, gsm8k, gsm8k]  # §7.3: MMLU ×3 epochs, GSM8K ×4


def build_mixture(name: str, stage: str, split: str, *, seed: int = 42, synthetic_examples: int = 2000,
                  cache_dir=None) -> TaskMixture:
    """The deterministic shuffle (TaskMixture, seed) of the named mixture's tasks for `stage` and `split`
    ("train" or "val"). Every example of every task appears once per epoch (repeated tasks: once per copy)."""
    if name not in MIXTURES or stage not in STAGES or split not in ("train", "val"):
        raise ValueError(f"mixture {name!r} / stage {stage!r} / split {split!r}: expected one of {MIXTURES} / "
                         f"{STAGES} / ('train', 'val')")
    tasks = offline_tasks(stage, split, synthetic_examples) if name == "offline" else \
        nanochat_tasks(stage, split, cache_dir)
    return mixture_of(tasks, split, seed)


def mixture_of(tasks: Sequence, split: str, seed: int = 42) -> TaskMixture:
    """A TaskMixture of `tasks`; for split "train" every task must pass check_trainable (no test/validation)."""
    if split == "train":
        check_trainable(tasks)
    empty = [getattr(t, "name", type(t).__name__) for t in tasks if len(t) == 0]
    if empty:
        raise ValueError(f"{split} mixture: tasks with no examples: {empty}")
    return TaskMixture(tasks, seed=seed)


# ---- rows --------------------------------------------------------------------------------------------------------
def row_to_batch(rows: np.ndarray, masks: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) tokens and render masks → inputs = rows[:, :-1]; targets = rows[:, 1:] where masks[:, 1:] else −1."""
    inputs = torch.from_numpy(rows[:, :-1].copy())
    targets = torch.from_numpy(np.where(masks[:, 1:] == 1, rows[:, 1:], -1))
    return inputs.to(device), targets.to(device)


class _ChatStream:
    """This rank's stream of rendered conversations (see the module docstring), cropped to T+1 tokens."""

    def __init__(self, dataset, tokenizer, T: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} conversations cannot feed {world_size} ranks")
        self.dataset, self.tok, self.T = dataset, tokenizer, T
        self.rank, self.world = rank, world_size
        self.bos = tokenizer.bos_id
        self.position = 0  # next stream position
        self.num_conversations = self.num_cropped = self.cropped_tokens = 0

    @property
    def epoch(self) -> int:
        return (self.rank + self.position * self.world) // len(self.dataset)

    def render(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = render_conversation(self.tok, self.dataset[(self.rank + k * self.world) % len(self.dataset)]
                                        ["messages"])
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8)

    def take(self) -> tuple[int, np.ndarray, np.ndarray]:
        k = self.position
        self.position += 1
        ids, mask = self.render(k)
        self.num_conversations += 1
        if len(ids) > self.T + 1:  # longer than a row: the only case where a conversation is cut
            self.num_cropped += 1
            self.cropped_tokens += len(ids) - (self.T + 1)
        return k, ids[: self.T + 1], mask[: self.T + 1]

    def counters(self) -> dict:
        return {"position": self.position, "num_conversations": self.num_conversations,
                "num_cropped": self.num_cropped, "cropped_tokens": self.cropped_tokens}

    def load_counters(self, state: dict) -> None:
        self.position, self.num_conversations = state["position"], state["num_conversations"]
        self.num_cropped, self.cropped_tokens = state["num_cropped"], state["cropped_tokens"]

    def _check(self, state: dict, kind: str) -> None:
        want = {"kind": kind, "T": self.T, "rank": self.rank, "world_size": self.world, "len": len(self.dataset)}
        diffs = [f"{k}: saved {state.get(k)!r}, here {v!r}" for k, v in want.items() if state.get(k) != v]
        if diffs:
            raise ValueError(f"chat loader state from another configuration: {'; '.join(diffs)}")


class PackedChatLoader:
    """Mid-training rows: best-fit packing of whole conversations, padding where none fits (module docstring)."""

    def __init__(self, dataset, tokenizer, B: int, T: int, *, rank: int = 0, world_size: int = 1,
                 buffer_size: int = 100, device="cpu"):
        self.stream = _ChatStream(dataset, tokenizer, T, rank, world_size)
        self.B, self.T, self.buffer_size, self.device = B, T, buffer_size, device
        self.buffer: list[tuple[int, np.ndarray, np.ndarray]] = []  # (stream position, ids, mask), arrival order
        self.pad_tokens = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = self.B, self.T + 1
        rows = np.full((B, L), self.stream.bos, dtype=np.int64)
        masks = np.zeros((B, L), dtype=np.int8)
        for b in range(B):
            filled = 0
            while filled < L:
                while len(self.buffer) < self.buffer_size:
                    self.buffer.append(self.stream.take())
                best = -1
                for i, (_, ids, _) in enumerate(self.buffer):  # largest that fits; first arrival wins ties
                    if len(ids) <= L - filled and (best < 0 or len(ids) > len(self.buffer[best][1])):
                        best = i
                if best < 0:
                    break  # nothing fits what is left: pad it (BOS inputs, −1 targets)
                _, ids, mask = self.buffer.pop(best)
                rows[b, filled: filled + len(ids)] = ids
                masks[b, filled: filled + len(ids)] = mask
                filled += len(ids)
            self.pad_tokens += L - filled
        return row_to_batch(rows, masks, self.device)

    def state_dict(self) -> dict:
        return {"kind": "packed", "T": self.T, "rank": self.stream.rank, "world_size": self.stream.world,
                "len": len(self.stream.dataset), "buffer_size": self.buffer_size, "pad_tokens": self.pad_tokens,
                "buffer": [k for k, _, _ in self.buffer], **self.stream.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.stream._check(state, "packed")
        self.buffer = []
        for k in state["buffer"]:  # re-render; buffered conversations were cropped on entry, so crop again
            ids, mask = self.stream.render(k)
            self.buffer.append((k, ids[: self.T + 1], mask[: self.T + 1]))
        self.stream.load_counters(state)
        self.pad_tokens = state["pad_tokens"]


class PaddedChatLoader:
    """SFT rows: one conversation per row, padded with BOS (targets −1) to the longest row of the micro-batch."""

    def __init__(self, dataset, tokenizer, B: int, T: int, *, rank: int = 0, world_size: int = 1, device="cpu"):
        self.stream = _ChatStream(dataset, tokenizer, T, rank, world_size)
        self.B, self.T, self.device = B, T, device
        self.pad_tokens = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        convs = [self.stream.take() for _ in range(self.B)]
        L = max(len(ids) for _, ids, _ in convs)
        rows = np.full((self.B, L), self.stream.bos, dtype=np.int64)
        masks = np.zeros((self.B, L), dtype=np.int8)
        for b, (_, ids, mask) in enumerate(convs):
            rows[b, : len(ids)], masks[b, : len(ids)] = ids, mask
            self.pad_tokens += L - len(ids)
        return row_to_batch(rows, masks, self.device)

    def state_dict(self) -> dict:
        return {"kind": "padded", "T": self.T, "rank": self.stream.rank, "world_size": self.stream.world,
                "len": len(self.stream.dataset), "pad_tokens": self.pad_tokens, **self.stream.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.stream._check(state, "padded")
        self.stream.load_counters(state)
        self.pad_tokens = state["pad_tokens"]


def mean_conversation_tokens(dataset, tokenizer, max_samples: int = 2000) -> float:
    """Mean rendered length over up to max_samples conversations at an even stride (a horizon estimate)."""
    n = len(dataset)
    stride = max(1, math.ceil(n / max_samples))
    lengths = [len(render_conversation(tokenizer, dataset[i]["messages"])[0]) for i in range(0, n, stride)]
    return sum(lengths) / len(lengths)
