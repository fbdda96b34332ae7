"""Task base class, the multiple-choice renderer and the answer parsers shared by the tasks (nanochat §7.1, §8.2).

A Task is a read-only, indexable view over a list of raw rows: `task[i]` renders row i into an example dict
    {"messages": [...conversation, the last message the assistant's reference answer...], <task fields>}
and `task.evaluate(example, answer_text) -> bool` grades a model's answer to that example. `kind` says how an
eval drives it: "categorical" (compare the logits of `example["letters"]` at the end of the prompt) or
"generative" (sample a turn, then grade the text). `split` is the source split; tasks from "test"/"validation"
splits are eval-only and `check_trainable` refuses them, so a training mixture cannot silently include them.

Shuffling is deterministic: `subset(n, seed)` permutes with `random.Random(seed)` (independent of the global RNG
and of PYTHONHASHSEED) and keeps the first n, so the same (n, seed) gives the same examples on every machine.

Limits: rows are held in memory (the largest offline set, MMLU test, is ~14K rows / ~8 MB); no mixtures yet.
"""

from __future__ import annotations

import copy
import random
import re
from decimal import Decimal, InvalidOperation

EVAL_ONLY_SPLITS = ("test", "validation")


class Task:
    """Base class: subclasses set name/split/kind and implement `render(row)` and `evaluate(example, answer)`."""

    name: str = "task"
    split: str = "test"
    kind: str = "generative"  # "categorical" | "generative"

    def __init__(self, rows: list):
        self._rows = rows
        self._index = list(range(len(rows)))

    # -- views ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        if not isinstance(i, int):
            raise TypeError(f"{self.name}: index must be an int, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} examples")
        return self.render(self._rows[self._index[i]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def subset(self, n: int | None = None, seed: int | None = 0) -> "Task":
        """A view of n examples: shuffled with random.Random(seed) (seed=None: keep file order), then the first n
        (n=None: all). Asking for more examples than exist is an error, not a silent shorter list."""
        if n is not None and not 0 <= n <= len(self):
            raise ValueError(f"{self.name}: asked for {n} examples, only {len(self)} available")
        index = list(self._index)
        if seed is not None:
            random.Random(seed).shuffle(index)
        view = copy.copy(self)  # shares the rows; only the index list is new
        view._index = index if n is None else index[:n]
        return view

    # -- per task ------------------------------------------------------------------------------------------------
    def render(self, row) -> dict:
        raise NotImplementedError

    def evaluate(self, example: dict, answer_text: str) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, kind={self.kind!r}, n={len(self)})"


def check_trainable(tasks) -> None:
    """Raise if any task comes from an eval-only split: a test set in a training mixture invalidates its eval."""
    bad = [f"{t.name} ({t.split})" for t in tasks if t.split in EVAL_ONLY_SPLITS]
    if bad:
        raise ValueError(f"eval-only splits cannot be used for training: {', '.join(bad)}")


# ---- multiple choice ------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def render_mc(question: str, letters: str | list[str], choices: list[str]) -> str:
    """nanochat's multiple-choice prompt (tasks/common.py render_mc): one line per choice "- choice=LETTER".
    The letter comes *after* the choice (better binding for small models) with no space before it, so the prompt
    holds the same "A" token the assistant answers with (" A" is a different token)."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def mc_example(question: str, choices: list[str], answer_index: int, **fields) -> dict:
    """Example dict for a categorical task: the conversation, the choice letters and the correct letter."""
    if not 0 <= answer_index < len(choices) <= len(LETTERS):
        raise ValueError(f"answer index {answer_index} for {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    answer = letters[answer_index]
    messages = [{"role": "user", "content": render_mc(question, letters, choices)},
                {"role": "assistant", "content": answer}]
    return {"messages": messages, "letters": letters, "answer": answer, **fields}


def grade_mc(example: dict, answer_text: str) -> bool:
    """Correct iff the answer is the right letter, allowing surrounding whitespace and one trailing '.' or ')'."""
    text = answer_text.strip().rstrip(".)").strip()
    return text == example["answer"]


# ---- numeric answers ("#### n") -------------------------------------------------------------------------------

# "####", optional "$", then a number: optional minus, digits with optional thousands commas, optional decimals.
_FINAL_RE = re.compile(r"####\s*\$?\s*(-?(?:\d[\d,]*)?\.?\d+)")


def extract_final_number(text: str) -> Decimal | None:
    """The number after the *last* "####" in text, as an exact Decimal ("1,234" → 1234, "3.50" → 3.50); None when
    there is no "####" followed by a number. Text after the number ("#### 18 dollars.") is ignored."""
    matches = _FINAL_RE.findall(text)
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return None
