"""Synthetic chat tasks that flashchat generates itself, for the CPU tier (issue 7) — NOT real benchmarks.

    task = ArithmeticWordProblems(size=5000, seed=0)
    ex = task[17]                      # {"messages": [...], "answer": 42, ...}, built from (seed, 17) alone
    task.evaluate(ex, "... #### 42")   # True
    mix = TaskMixture([task, SpellingCount(2000), IdentityChats(200)], weights=[2, 1, 1], seed=42)

Tasks (every one has `name`, `synthetic = True`, `eval_type`, `__len__`, `__getitem__`, `evaluate`):
  ArithmeticWordProblems  GSM8K-format stories with 2-4 operations (+, -, *, exact //) on small integers; the
                          answer shows each step as a python tool call and its output and ends "#### n".
  SpellingCount           nanochat's SpellingBee idea: "How many r's are in strawberry?", answered by spelling the
                          word, a python `'strawberry'.count('r')` check, "#### 3".
  MultipleChoice          MMLU/ARC-style lettered questions with known answers (arithmetic, "which word has N
                          letters"); the assistant answers with the letter.
  IdentityChats           templated multi-turn chats in which the assistant says it is flashchat.
  TaskMixture, TaskSequence  shuffled (deterministic) / in-order concatenations of any tasks with len + getitem.

Determinism: example i of a task is generated from random.Random(f"{name}:{seed}:{i}") only (string seeds hash
with SHA-512, so PYTHONHASHSEED and the platform do not matter), so any example is produced without the others.
Limits, stated so nobody mistakes these for evaluations of general ability:
  - Scores on these tasks are only reported as "synthetic"; they say nothing about GSM8K/MMLU/ARC accuracy.
  - The problem spaces are small: different seeds give different streams but can repeat individual problems, so
    a held-out synthetic split (another seed) may overlap its training split by a small fraction.
  - Word problems use a handful of templates; a model can learn the templates rather than arithmetic.
  - The word list is a fixed embedded list of common English words (deterministic on every Python version);
    pass `words=` (e.g. `words_from_texts` over train.corpus documents) for a larger one.
  - Identity answers are templated: they teach the name and origin, not a personality.
Nothing runs at import.
"""
from __future__ import annotations

import bisect
import numbers
import random
import re
from collections.abc import Iterable, Sequence

# ----------------------------------------------------------------------------------------------------------------
# Graders

# GSM8K's rule (nanochat tasks/gsm8k.py): the first "#### " followed by a number; commas are thousands separators.
_ANSWER_RE = re.compile(r"####\s*(-?[0-9][0-9.,]*)")


def completion_text(completion) -> str:
    """The text of an assistant completion given as a string or as a list of chat parts (all parts joined)."""
    if isinstance(completion, str):
        return completion
    return "".join(part.get("text", "") for part in completion)


def extract_answer(completion) -> float | None:
    """The number after the first "#### " (commas stripped), or None when missing or not a number.
    "#### 1,234" -> 1234.0; "#### -5" -> -5.0; "#### 3." -> 3.0; "#### 1.2.3" -> None; "####" -> None."""
    match = _ANSWER_RE.search(completion_text(completion))
    if match is None:
        return None
    number = match.group(1).replace(",", "").rstrip(".")
    try:
        return float(number)
    except ValueError:
        return None


def grade_number(reference: int | float, completion) -> bool:
    """Numeric comparison of the "#### n" answer with the reference (so "#### 12.0" matches 12)."""
    predicted = extract_answer(completion)
    return predicted is not None and abs(predicted - float(reference)) < 1e-9


def extract_choice_letter(completion, letters: Sequence[str] = "ABCD") -> str | None:
    """The chosen letter of a multiple-choice answer, or None. Accepts "B", " B.", "(B)", "B) 42", "B: 42",
    "Answer: B", "The answer is (B)". Letters are upper case only: a lone "a" is an article, not a choice."""
    text = completion_text(completion).strip()
    alternatives = "".join(re.escape(letter) for letter in letters)
    match = re.match(rf"\(?([{alternatives}])(?:[.):,]|\s|$)", text)
    if match is None:
        match = re.search(rf"(?i:answer(?:\s+is)?)\s*[:\-]?\s*\(?([{alternatives}])\b", text)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------------------------------------------
# Base class


class SyntheticTask:
    """A deterministic, indexable list of generated conversations. Subclasses implement `generate(rng, i)`."""

    name = "synthetic"
    synthetic = True
    eval_type = "generative"  # or "categorical" (scored from the logits of the answer letters)

    def __init__(self, size: int, seed: int = 0, split: str = "train"):
        if not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"{self.name}: size must be a non-negative integer, got {size!r}")
        self.size = int(size)
        self.seed = int(seed)
        # What the stream is used as (train.tasks.common.check_trainable reads it): a generator has no test set of
        # its own, so a held-out stream (another seed) is labelled "validation" by whoever builds it.
        self.split = split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.generate(random.Random(f"{self.name}:{self.seed}:{_check_index(self, i)}"), i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def generate(self, rng: random.Random, i: int) -> dict:
        raise NotImplementedError

    def evaluate(self, example: dict, completion) -> bool:
        return grade_number(example["answer"], completion)


def _check_index(seq, i) -> int:
    """i as a non-negative int (negative counts from the end); IndexError naming the index and the length."""
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
        raise TypeError(f"{getattr(seq, 'name', type(seq).__name__)}: index must be an integer, got {i!r}")
    n = len(seq)
    j = int(i) + n if i < 0 else int(i)
    if not 0 <= j < n:
        raise IndexError(f"{getattr(seq, 'name', type(seq).__name__)}: index {i} out of range for {n} examples")
    return j


# ----------------------------------------------------------------------------------------------------------------
# 1. Arithmetic word problems (GSM8K format)

_NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Ines", "Kai", "Lena", "Raj", "Sara", "Tom", "Yuki", "Ben")
_ITEMS = ("apples", "marbles", "stickers", "books", "cookies", "pencils", "shells", "coins", "cards", "stamps")
_MAX_VALUE = 999  # keeps every intermediate result small enough for a tiny model's tokenizer


def _py(expr: str, value: int) -> list[dict]:
    return [{"type": "python", "text": expr}, {"type": "python_output", "text": str(value)}]


class ArithmeticWordProblems(SyntheticTask):
    """GSM8K-shaped problems: a story of 2-4 operations (`ops`, inclusive range) on one running quantity; every
    result is an exact integer. ops=(1, 1) is the one-step variant ("synthetic-arithmetic-1op"): small models learn
    it first, and the CPU tier's better-than-chance check asks it."""

    name = "synthetic-arithmetic"

    def __init__(self, size: int, seed: int = 0, split: str = "train", ops: tuple[int, int] = (2, 4)):
        super().__init__(size, seed, split)
        if not 1 <= ops[0] <= ops[1]:
            raise ValueError(f"{self.name}: ops must be a range (lo, hi) with 1 <= lo <= hi, got {ops!r}")
        self.ops = tuple(ops)
        if self.ops == (1, 1):
            self.name = "synthetic-arithmetic-1op"

    def generate(self, rng: random.Random, i: int) -> dict:
        who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        num_ops = rng.randint(*self.ops)
        story, steps, exprs = [], [], []
        if rng.random() < 0.5:  # the first operation is a product: boxes x items per box
            boxes, per_box = rng.randint(2, 9), rng.randint(2, 12)
            cur = boxes * per_box
            story.append(f"{who} has {boxes} boxes with {per_box} {item} in each box.")
            steps += [{"type": "text", "text": f"{who} has {boxes} boxes of {per_box} {item}, so "},
                      *_py(f"{boxes}*{per_box}", cur), {"type": "text", "text": f" {item}.\n"}]
            exprs.append(f"{boxes}*{per_box}")
            num_ops -= 1
        else:
            cur = rng.randint(5, 60)
            story.append(f"{who} has {cur} {item}.")
            steps.append({"type": "text", "text": f"{who} starts with {cur} {item}.\n"})
        for _ in range(num_ops):
            divisors = [d for d in range(2, 10) if cur % d == 0]
            # Weights keep products rare: repeated "k times as many" would push every answer to the cap.
            ops = {"add": 3, "sub": 3 if cur >= 3 else 0, "mul": 1 if cur * 2 <= _MAX_VALUE else 0,
                   "div": 2 if divisors else 0}
            op = rng.choices(list(ops), weights=list(ops.values()))[0]
            if op == "add":
                k = rng.randint(1, 30)
                story.append(rng.choice((f"{who} buys {k} more {item}.", f"A friend gives {who} {k} {item}.",
                                         f"{who} finds {k} more {item}.")))
                expr, new, lead = f"{cur}+{k}", cur + k, f"Adding the {k} new {item} gives "
            elif op == "sub":
                k = rng.randint(2, min(cur - 1, 40))  # >= 2: plural nouns stay grammatical
                story.append(rng.choice((f"{who} gives {k} {item} to a friend.", f"{who} loses {k} {item}.",
                                         f"{who} uses up {k} {item}.")))
                expr, new, lead = f"{cur}-{k}", cur - k, f"Taking away {k} leaves "
            elif op == "mul":
                k = rng.randint(2, min(5, _MAX_VALUE // cur))
                story.append(f"Then {who} ends up with {k} times as many {item} as before.")
                expr, new, lead = f"{cur}*{k}", cur * k, f"{k} times as many is "
            else:
                d = rng.choice(divisors)
                story.append(f"{who} splits the {item} equally into {d} bags and keeps just one bag.")
                expr, new, lead = f"{cur}//{d}", cur // d, f"One of {d} equal bags holds "
            steps += [{"type": "text", "text": lead}, *_py(expr, new), {"type": "text", "text": f" {item}.\n"}]
            exprs.append(expr)
            cur = new
        question = rng.choice((f"How many {item} does {who} have now?", f"How many {item} does {who} have at the end?"))
        steps.append({"type": "text", "text": f"{who} has {cur} {item} at the end.\n#### {cur}"})
        messages = [{"role": "user", "content": " ".join(story) + " " + question},
                    {"role": "assistant", "content": steps}]
        return {"messages": messages, "answer": cur, "expressions": exprs}


# ----------------------------------------------------------------------------------------------------------------
# 2. Spelling / counting (nanochat SpellingBee)

# Common English words, embedded so the list is identical on every machine and Python version.
_WORDS = tuple("""
strawberry banana apple orange cherry lemon mango papaya coconut pineapple raspberry blueberry grape peach
letter number answer question balloon bookkeeper committee mississippi address success necessary possible
tomorrow yesterday between different important beautiful together remember everything sometimes keyboard
computer language program function variable python integer network library elephant giraffe kangaroo
butterfly hippopotamus crocodile mountain river ocean island forest desert valley village window kitchen
bottle coffee teacher student science history geometry algebra calculus channel parallel pepper puppy
bubble rabbit hello little middle button cotton mirror carrot pizza jazz fizz buzz assessment accommodate
embarrass occurrence millennium parliament restaurant rhythm schedule separate tennis umbrella vacuum
weather whisper wizard yellow zebra quiz queue coffee toffee referee guarantee banana cinnamon dinner
summer winter autumn spring season holiday bicycle journey traveler passenger airplane engine rocket planet
galaxy universe gravity energy triangle square circle rectangle diamond pattern puzzle riddle wonder
""".split())


def words_from_texts(texts: Iterable[str], min_len: int = 3, max_len: int = 14) -> list[str]:
    """Sorted distinct lower-case alphabetic words of the texts (e.g. train.corpus documents), for `words=`."""
    found = set()
    for text in texts:
        found.update(w for w in re.findall(r"[a-z]+", text.lower()) if min_len <= len(w) <= max_len)
    return sorted(found)


class SpellingCount(SyntheticTask):
    """How many times a letter occurs in a word: spelled out by hand, then checked with a python `.count()`."""

    name = "synthetic-spelling"

    def __init__(self, size: int, seed: int = 0, words: Sequence[str] | None = None, split: str = "train"):
        super().__init__(size, seed, split)
        self.words = tuple(sorted(set(words))) if words is not None else tuple(sorted(set(_WORDS)))
        bad = [w for w in self.words if not re.fullmatch(r"[a-z]+", w)]
        if not self.words or bad:
            raise ValueError(f"{self.name}: words must be non-empty lower-case a-z words, bad: {bad[:5]}")

    def generate(self, rng: random.Random, i: int) -> dict:
        word = rng.choice(self.words)
        # Mostly a letter of the word; sometimes one that is absent, so "0" is a possible answer.
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        question = rng.choice((f"How many {letter}'s are in {word}?",
                               f"How many times does the letter '{letter}' appear in \"{word}\"?",
                               f"Count the letter {letter} in the word {word}.",
                               f"how many {letter} in {word}"))
        spelled = "-".join(word)
        positions = [str(p + 1) for p, c in enumerate(word) if c == letter]
        if positions:
            where = positions[0] if len(positions) == 1 else ", ".join(positions[:-1]) + " and " + positions[-1]
            found = f"The letter '{letter}' is at position{'s' if count > 1 else ''} {where}, so I count {count}.\n"
        else:
            found = f"The letter '{letter}' does not appear, so I count 0.\n"
        content = [{"type": "text", "text": f"Spelling \"{word}\" letter by letter: {spelled}.\n{found}"
                                            f"Checking with Python: "},
                   *_py(f"'{word}'.count('{letter}')", count),
                   {"type": "text", "text": f"\nThere {'is' if count == 1 else 'are'} {count} '{letter}' in "
                                            f"\"{word}\".\n#### {count}"}]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": content}]
        return {"messages": messages, "answer": count, "word": word, "letter": letter}


# ----------------------------------------------------------------------------------------------------------------
# 3. Multiple choice with known answers (MMLU/ARC rendering)

LETTERS = ("A", "B", "C", "D")


def render_mc(question: str, choices: Sequence[str], letters: Sequence[str] = LETTERS) -> str:
    """MMLU/ARC-style prompt: the question, one "A. choice" line per choice, then the instruction."""
    lines = [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    return f"{question}\n\n" + "\n".join(lines) + "\n\nAnswer with the letter of the correct choice."


class MultipleChoice(SyntheticTask):
    """Four-choice questions with a known answer: small arithmetic, or which word has exactly N letters."""

    name = "synthetic-mc"
    eval_type = "categorical"

    KINDS = ("arithmetic", "word_length")

    def __init__(self, size: int, seed: int = 0, words: Sequence[str] | None = None, split: str = "train",
                 kinds: Sequence[str] = KINDS):
        super().__init__(size, seed, split)
        if not kinds or any(k not in self.KINDS for k in kinds):
            raise ValueError(f"{self.name}: kinds must be a non-empty subset of {self.KINDS}, got {kinds!r}")
        self.kinds = tuple(kinds)
        if self.kinds == ("arithmetic",):
            self.name = "synthetic-arithmetic-mc"  # the speedrun's "better than chance" check (chance: 1/4)
        self.words = tuple(sorted(set(words if words is not None else _WORDS)))
        self._by_len: dict[int, list[str]] = {}
        for w in self.words:
            self._by_len.setdefault(len(w), []).append(w)
        if len(self._by_len) < len(LETTERS):
            raise ValueError(f"{self.name}: words need at least {len(LETTERS)} different lengths")

    def generate(self, rng: random.Random, i: int) -> dict:
        kind = self.kinds[0] if len(self.kinds) == 1 else ("arithmetic" if rng.random() < 0.5 else "word_length")
        if kind == "arithmetic":
            question, correct, distractors = self._arithmetic(rng)
        else:
            question, correct, distractors = self._word_length(rng)
        choices = [correct] + distractors
        rng.shuffle(choices)
        answer = LETTERS[choices.index(correct)]
        messages = [{"role": "user", "content": render_mc(question, choices)},
                    {"role": "assistant", "content": answer}]
        return {"messages": messages, "answer": answer, "letters": list(LETTERS), "choices": choices}

    @staticmethod
    def _arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
        op = rng.choice("+-*/")
        a, b = rng.randint(2, 50), rng.randint(2, 12)
        if op == "+":
            value, text = a + b, f"{a} + {b}"
        elif op == "-":
            a += b  # non-negative result
            value, text = a - b, f"{a} - {b}"
        elif op == "*":
            value, text = a * b, f"{a} x {b}"
        else:
            value, text = a, f"{a * b} / {b}"
        wrong: set[int] = set()
        while len(wrong) < 3:  # near misses, the mistakes a model actually makes
            guess = value + rng.choice((-10, -2, -1, 1, 2, 10, b, -b))
            if guess >= 0 and guess != value:
                wrong.add(guess)
        return f"What is {text}?", str(value), [str(w) for w in sorted(wrong)]

    def _word_length(self, rng: random.Random) -> tuple[str, str, list[str]]:
        lengths = rng.sample(sorted(self._by_len), len(LETTERS))
        correct = rng.choice(self._by_len[lengths[0]])
        distractors = [rng.choice(self._by_len[n]) for n in lengths[1:]]
        return f"Which of these words has exactly {lengths[0]} letters?", correct, distractors

    def evaluate(self, example: dict, completion) -> bool:
        return extract_choice_letter(completion, example["letters"]) == example["answer"]


# ----------------------------------------------------------------------------------------------------------------
# 4. Identity conversations

_GREETINGS = ("", "Hi! ", "Hello. ", "Hey there, ", "Good morning! ")
_WHO_ASKS = ("Who are you?", "What is your name?", "what are you", "Can you tell me about yourself?",
             "Which model am I talking to?", "Are you ChatGPT?", "Who made you?")
_WHO_ANSWERS = (
    "I'm flashchat, a small language model trained from scratch with the flashchat project.",
    "My name is flashchat. I am a small chat model, trained end to end by the flashchat project, a from-scratch "
    "rebuild of nanochat.",
    "I am flashchat: a compact language model whose tokenizer, pretraining and chat fine-tuning all come from the "
    "flashchat project.",
)
_FOLLOW_UPS = (
    ("Who trained you?", ("I was trained with the flashchat project's own code: its tokenizer, pretraining, "
                          "mid-training and fine-tuning stages.",
                          "The flashchat project trained me, end to end, with its own training code.")),
    ("Are you made by OpenAI?", ("No. I'm flashchat, trained with the flashchat project, not a model from OpenAI.",
                                 "No, I'm not an OpenAI model; I'm flashchat, trained with the flashchat project.")),
    ("What can you do?", ("I can chat, answer simple questions, do arithmetic with a python calculator tool, and "
                          "count letters in words. I'm small, so please double-check what I say.",
                          "Simple conversation, small arithmetic with a calculator tool, and spelling questions. "
                          "I make mistakes, so check anything important.")),
    ("How big are you?", ("I'm a small model, tiny next to today's large assistants, so my knowledge is limited.",
                          "Small: I was trained on a modest budget, so I know much less than large models.")),
)
_THANKS = (("Thanks!", "You're welcome!"), ("Cool, thank you.", "Happy to help."), ("ok bye", "Goodbye!"))


class IdentityChats(SyntheticTask):
    """1-3 turn chats: who the assistant is, optionally a follow-up about its origin or abilities, then thanks."""

    name = "synthetic-identity"

    def generate(self, rng: random.Random, i: int) -> dict:
        messages = [{"role": "user", "content": rng.choice(_GREETINGS) + rng.choice(_WHO_ASKS)},
                    {"role": "assistant", "content": rng.choice(_WHO_ANSWERS)}]
        if rng.random() < 0.6:
            question, answers = rng.choice(_FOLLOW_UPS)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": rng.choice(answers)}]
        if rng.random() < 0.3:
            thanks, reply = rng.choice(_THANKS)
            messages += [{"role": "user", "content": thanks}, {"role": "assistant", "content": reply}]
        return {"messages": messages}

    def evaluate(self, example: dict, completion) -> bool:
        return "flashchat" in completion_text(completion).lower()


# ----------------------------------------------------------------------------------------------------------------
# 5. Mixtures


class TaskSequence:
    """The tasks one after another, in order (a curriculum); index i maps to (task, local index) by bisection."""

    def __init__(self, tasks: Sequence):
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self._ends = []
        total = 0
        for task in self.tasks:
            total += len(task)
            self._ends.append(total)
        self.name = "sequence(" + ",".join(getattr(t, "name", type(t).__name__) for t in self.tasks) + ")"
        self.synthetic = all(getattr(t, "synthetic", False) for t in self.tasks)

    def __len__(self) -> int:
        return self._ends[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(task index, index inside that task) of example i."""
        i = _check_index(self, i)
        k = bisect.bisect_right(self._ends, i)
        return k, i - (self._ends[k - 1] if k else 0)

    def __getitem__(self, i: int) -> dict:
        k, j = self.locate(i)
        return self.tasks[k][j]


class TaskMixture:
    """A deterministic shuffle of several tasks (nanochat's TaskMixture).

    weights=None: every example of every task exactly once, shuffled with random.Random(seed).
    weights=[w_k]: the mixture has `size` examples (default: the sum of the task lengths), round(size * w_k / sum w)
    of them from task k — whole epochs of task k plus a seeded sample without replacement for the remainder — so
    proportions follow the weights up to rounding. The index map is built at construction, O(size) memory."""

    def __init__(self, tasks: Sequence, weights: Sequence[float] | None = None, seed: int = 42,
                 size: int | None = None):
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        lengths = [len(t) for t in self.tasks]
        rng = random.Random(f"mixture:{seed}")
        if weights is None:
            if size is not None:
                raise ValueError("TaskMixture: size is only used with weights")
            counts = lengths
        else:
            if len(weights) != len(self.tasks) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"TaskMixture: need one non-negative weight per task ({len(self.tasks)}), with a "
                                 f"positive sum; got {list(weights)}")
            total = sum(lengths) if size is None else size
            counts = [round(total * w / sum(weights)) for w in weights]
        index: list[tuple[int, int]] = []
        for k, (n, length) in enumerate(zip(counts, lengths)):
            if n and not length:
                raise ValueError(f"TaskMixture: task {k} is empty but has a positive weight")
            epochs, remainder = divmod(n, length) if length else (0, 0)
            index += [(k, j) for _ in range(epochs) for j in range(length)]
            index += [(k, j) for j in sorted(rng.sample(range(length), remainder))]
        rng.shuffle(index)
        self._index = index
        self.name = "mixture(" + ",".join(getattr(t, "name", type(t).__name__) for t in self.tasks) + ")"
        self.synthetic = all(getattr(t, "synthetic", False) for t in self.tasks)

    def __len__(self) -> int:
        return len(self._index)

    def locate(self, i: int) -> tuple[int, int]:
        """(task index, index inside that task) of example i."""
        return self._index[_check_index(self, i)]

    def __getitem__(self, i: int) -> dict:
        k, j = self.locate(i)
        return self.tasks[k][j]
