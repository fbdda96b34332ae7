"""Chat evaluations of a mid/SFT/RL model and nanochat's ChatCORE (reference §8.2).

    task = load_task("ARC-Easy", max_problems=500)
    res = evaluate_categorical(model, tok, task, batch_size=8)                  # TaskResult: res.accuracy, ...
    with ToolExecutor(max_workers=4) as executor:
        engine = Engine(model, tok, tools=executor)
        res = evaluate_generative(engine, load_task("GSM8K"), num_samples=1)   # temperature 0, top-k 50, 512 tokens
    score = chatcore({"ARC-Easy": 0.39, "ARC-Challenge": 0.28, "MMLU": 0.32, "GSM8K": 0.05, "HumanEval": 0.09})

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU, synthetic-mc): the prompt is `render_for_completion` of the
example's conversation (the reference answer dropped, <|assistant_start|> appended); the logits at the prompt's last
position, restricted to the token ids of the example's letters, pick the letter (argmax), which `task.evaluate`
grades. Many prompts go through one forward: rows right-padded with BOS (causal attention: padding after a row's
last prompt token cannot change that token's logits), logits read at each row's own last position. Prompts are
sorted by length before batching so a batch pads little; results come back in the task's order.

Generative tasks (GSM8K, HumanEval, synthetic-arithmetic, -spelling, -identity): every problem × num_samples is
queued on one `infer.engine.Engine` (continuous batching; more are added as the engine's queue drains), tool calls
run in the sandbox through the engine's `tools`, and each finished sample is graded on a thread pool while the
others still generate (HumanEval runs every program in the sandbox). The graded text is the assistant turn's text
parts (`parse_assistant_parts`): tool calls and tool outputs are not part of the answer. A sample that is correct
on any of its `num_samples` draws makes the problem correct (pass@num_samples, nanochat's rule); `pass_at_k` also
gives the unbiased estimator 1 − C(n−c, k)/C(n, k) (Chen et al. 2021, the Codex paper) for every k ≤ n.

ChatCORE = mean over ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval of (acc − b)/(1 − b), b = 0.25 for the
three multiple-choice tasks and 0 for the two generative ones; defined only when all five ran.

Limits and deviations from nanochat:
- Context: a prompt that does not fit the model's `sequence_len` (categorical: the prompt; generative: the prompt
  plus at least one new token) is scored wrong and counted in `num_too_long` — never cropped; a generative sample's
  max_tokens is lowered to the room its prompt leaves (the engine refuses prompt + max_tokens over the context).
- `max_problems` takes a seeded shuffle's first n (`Task.subset(n, seed)`) of the real tasks, not the file's first
  n (MMLU's file order is by subject); without it every problem runs in file order.
- Synthetic tasks are generated with seed SYNTHETIC_SEED (training uses other seeds, but their small problem
  spaces can repeat a problem, see train.tasks_synthetic); their scores say nothing about the real benchmarks.
- GSM8K-format calculator calls are bare expressions ("48/2"); the engine's ToolExecutor prints their value as the
  training data shows it (infer.sandbox.calculator_program: "24", no newline).
- No rank striding: one process evaluates everything.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from infer.sampling import SamplingParams
from model.chat import ChatFormatError, parse_assistant_parts, render_for_completion

# Display name → offline loader name (train.tasks.offline.load).
OFFLINE_TASKS = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge", "MMLU": "mmlu", "GSM8K": "gsm8k",
                 "HumanEval": "humaneval"}
SYNTHETIC_TASKS = ("synthetic-arithmetic", "synthetic-arithmetic-1op", "synthetic-spelling", "synthetic-mc",
                   "synthetic-arithmetic-mc", "synthetic-identity")
SYNTHETIC_SIZE = 256  # problems per synthetic task without --max-problems (nanochat's SpellingBee eval size)
SYNTHETIC_SEED = 7_777_777  # the eval stream: a seed no training mixture uses
# ChatCORE's tasks and their random baselines (nanochat chat_eval.py).
CHATCORE_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CATEGORICAL_CHATCORE = ("ARC-Easy", "ARC-Challenge", "MMLU")  # nanochat's ChatCORE_cat, logged during SFT
DEFAULT_TASKS = tuple(CHATCORE_BASELINES) + ("synthetic-arithmetic", "synthetic-arithmetic-1op", "synthetic-spelling",
                                             "synthetic-mc", "synthetic-arithmetic-mc")
KNOWN_TASKS = tuple(OFFLINE_TASKS) + SYNTHETIC_TASKS


@dataclass
class TaskResult:
    name: str
    kind: str  # "categorical" | "generative"
    synthetic: bool
    num_problems: int
    num_correct: int  # problems counted correct (generative: any of the num_samples samples)
    num_too_long: int  # problems whose prompt did not fit the context (scored wrong)
    seconds: float
    num_samples: int = 1
    pass_at_k: dict[int, float] = field(default_factory=dict)  # generative: unbiased pass@k for k ≤ num_samples
    answers: list[list[str]] = field(default_factory=list)  # per problem, the graded text of each sample

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_problems


# ---- tasks --------------------------------------------------------------------------------------------------------

def load_task(name: str, max_problems: int | None = None, seed: int = 0, sandbox_timeout_s: float = 5.0):
    """A task by display name (KNOWN_TASKS). max_problems: a seeded subset of that many (real tasks; more than the
    task has is an error) or the size of a synthetic task (default SYNTHETIC_SIZE)."""
    if max_problems is not None and max_problems <= 0:
        raise ValueError(f"{name}: max_problems must be positive, got {max_problems}")
    if name in OFFLINE_TASKS:
        from train.tasks import offline  # deferred: reads package data files

        task = (offline.HumanEval(timeout_s=sandbox_timeout_s) if name == "HumanEval"
                else offline.load(OFFLINE_TASKS[name]))
        return task if max_problems is None else task.subset(min(max_problems, len(task)), seed=seed)
    if name in SYNTHETIC_TASKS:
        import train.tasks_synthetic as ts

        size = max_problems or SYNTHETIC_SIZE
        if name == "synthetic-arithmetic-mc":
            return ts.MultipleChoice(size, SYNTHETIC_SEED, kinds=("arithmetic",))
        if name == "synthetic-arithmetic-1op":
            return ts.ArithmeticWordProblems(size, SYNTHETIC_SEED, ops=(1, 1))
        cls = {"synthetic-arithmetic": ts.ArithmeticWordProblems, "synthetic-spelling": ts.SpellingCount,
               "synthetic-mc": ts.MultipleChoice, "synthetic-identity": ts.IdentityChats}[name]
        return cls(size=size, seed=SYNTHETIC_SEED)
    raise KeyError(f"unknown chat eval task {name!r}; known: {', '.join(KNOWN_TASKS)}")


def task_kind(task) -> str:
    """"categorical" or "generative": offline tasks say `kind`, synthetic ones `eval_type`."""
    kind = getattr(task, "kind", None) or getattr(task, "eval_type", None)
    if kind not in ("categorical", "generative"):
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no kind 'categorical' or 'generative' ({kind!r})")
    return kind


def is_synthetic(task) -> bool:
    return bool(getattr(task, "synthetic", False))


# ---- categorical --------------------------------------------------------------------------------------------------

def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    """The one token id of each answer letter (the assistant answers "A", rendered with encode_ordinary)."""
    ids = []
    for letter in letters:
        toks = tokenizer.encode_ordinary(letter)
        if len(toks) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(toks)} tokens {toks}; categorical scoring "
                             f"needs exactly one token per letter")
        ids.append(toks[0])
    return ids


@torch.no_grad()
def letter_logits(model, tokenizer, examples: Sequence[dict], batch_size: int = 8) -> list[torch.Tensor | None]:
    """Per example, the fp32 logits (len(letters),) of its letters at the end of its prompt; None for a prompt
    longer than the model's sequence_len."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    context = model.config.sequence_len
    device = model.cos.device
    prompts = [render_for_completion(tokenizer, ex["messages"]) for ex in examples]
    letters = [letter_token_ids(tokenizer, ex["letters"]) for ex in examples]
    out: list[torch.Tensor | None] = [None] * len(examples)
    fitting = sorted((i for i, p in enumerate(prompts) if len(p) <= context), key=lambda i: len(prompts[i]))
    for start in range(0, len(fitting), batch_size):
        rows = fitting[start:start + batch_size]
        T = max(len(prompts[i]) for i in rows)
        idx = torch.full((len(rows), T), tokenizer.bos_id, dtype=torch.long)
        for r, i in enumerate(rows):
            idx[r, :len(prompts[i])] = torch.tensor(prompts[i])
        # GPT.forward takes one position list for every row: ask for the distinct last positions of this batch,
        # then keep each row's own ((B, P, V) with P ≤ B; sorting by length keeps P small).
        lasts = sorted({len(prompts[i]) - 1 for i in rows})
        logits = model(idx.to(device), logits_positions=torch.tensor(lasts, device=device))
        for r, i in enumerate(rows):
            out[i] = logits[r, lasts.index(len(prompts[i]) - 1), letters[i]].float().cpu()
    return out


def evaluate_categorical(model, tokenizer, task, batch_size: int = 8, name: str | None = None,
                         log: Callable[[str], None] | None = print) -> TaskResult:
    t0 = time.perf_counter()
    examples = list(task)
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples")
    scores = letter_logits(model, tokenizer, examples, batch_size)
    correct = 0
    for ex, s in zip(examples, scores):
        if s is not None:
            correct += bool(task.evaluate(ex, ex["letters"][int(s.argmax())]))
    res = TaskResult(name or task.name, "categorical", is_synthetic(task), len(examples), correct,
                     sum(s is None for s in scores), time.perf_counter() - t0)
    if log:
        log(_result_line(res))
    return res


# ---- generative ---------------------------------------------------------------------------------------------------

def assistant_text(tokenizer, token_ids: Sequence[int], eos_token_ids: Sequence[int] = ()) -> str:
    """The text parts of a generated assistant turn (tool calls and outputs dropped). A malformed turn (a tool call
    cut off by max_tokens, a stray special token) falls back to the text of its non-special tokens."""
    ids = list(token_ids)
    if ids and ids[-1] in eos_token_ids:
        ids = ids[:-1]
    try:
        parts = parse_assistant_parts(tokenizer, ids)
    except ChatFormatError:
        specials = set(tokenizer.special_tokens.values())
        return tokenizer.decode([t for t in ids if t not in specials])
    return "".join(p["text"] for p in parts if p["type"] == "text")


def chance_rate(task) -> float:
    """The accuracy of guessing without reading the question: 1/(number of choices) for a multiple-choice task; for
    a task with a numeric answer, the best constant guess (the most common reference answer's share)."""
    first = task[0]
    if "letters" in first:
        return 1.0 / len(first["letters"])
    answers = collections.Counter(str(task[i]["answer"]) for i in range(len(task)))
    return answers.most_common(1)[0][1] / len(task)


def binomial_tail(n: int, c: int, p: float) -> float:
    """P(X ≥ c) for X ~ Binomial(n, p): the one-sided p-value of c correct out of n against chance p."""
    return min(1.0, sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(c, n + 1)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct of n samples: 1 − C(n−c, k)/C(n, k) (Chen et al. 2021),
    computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def run_requests(engine, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
                 on_finish: Callable[[int, list[int]], None]) -> None:
    """Generate every prompt on `engine` (which must be idle), keeping its waiting queue full; on_finish(k, ids) is
    called with each request's generated ids (forced tool outputs included) as soon as it finishes."""
    if engine.has_unfinished():
        raise RuntimeError("the engine already has unfinished requests; chat evals need it to themselves")
    engine.generate(list(prompts), list(params), on_finish=lambda k, completion: on_finish(k, completion.token_ids))


def evaluate_generative(engine, task, *, num_samples: int = 1, temperature: float = 0.0, top_k: int = 50,
                        max_tokens: int = 512, seed: int = 0, grade_workers: int = 4, name: str | None = None,
                        log: Callable[[str], None] | None = print) -> TaskResult:
    """Sample num_samples answers per problem through `engine` and grade them (see the module docstring)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
    t0 = time.perf_counter()
    tok = engine.tokenizer
    context = engine.max_model_len
    examples = list(task)
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples")
    rendered = [render_for_completion(tok, ex["messages"]) for ex in examples]
    fits = [i for i, p in enumerate(rendered) if len(p) < context]
    prompts, params, owner = [], [], []
    for i in fits:
        budget = min(max_tokens, context - len(rendered[i]))
        for j in range(num_samples):
            # A seed per sample: reproducible runs; identical samples only when temperature is 0.
            params.append(SamplingParams(temperature=temperature, top_k=top_k, max_tokens=budget,
                                         seed=seed * 1_000_003 + i * num_samples + j))
            prompts.append(rendered[i])
            owner.append(i)
    grades: list[Future | None] = [None] * len(prompts)
    texts: list[str] = [""] * len(prompts)
    with ThreadPoolExecutor(max_workers=grade_workers, thread_name_prefix="grade") as pool:
        def grade(k: int, ids: list[int]) -> None:
            texts[k] = assistant_text(tok, ids, engine.eos_token_ids)
            grades[k] = pool.submit(task.evaluate, examples[owner[k]], texts[k])

        run_requests(engine, prompts, params, grade)
        num_correct_samples = [0] * len(examples)
        answers: list[list[str]] = [[] for _ in examples]
        for k, fut in enumerate(grades):
            num_correct_samples[owner[k]] += bool(fut.result())
            answers[owner[k]].append(texts[k])
    ks = sorted({1, num_samples} | {k for k in (5, 10, 100) if k < num_samples})
    # Problems that did not fit have 0 correct samples: they count as wrong at every k.
    pass_k = {k: sum(pass_at_k(num_samples, c, k) for c in num_correct_samples) / len(examples) for k in ks}
    res = TaskResult(name or task.name, "generative", is_synthetic(task), len(examples),
                     sum(c > 0 for c in num_correct_samples), len(examples) - len(fits), time.perf_counter() - t0,
                     num_samples, pass_k, answers)
    if log:
        log(_result_line(res))
    return res


# ---- ChatCORE -----------------------------------------------------------------------------------------------------

def chatcore(accuracies: Mapping[str, float], tasks: Sequence[str] = tuple(CHATCORE_BASELINES)) -> float:
    """Mean over `tasks` of (acc − baseline)/(1 − baseline). Every task must have run: a ValueError names those
    that ran and those missing (nanochat prints ChatCORE only when all its tasks were evaluated)."""
    unknown = [t for t in tasks if t not in CHATCORE_BASELINES]
    if unknown:
        raise ValueError(f"no ChatCORE baseline for {unknown}; known: {list(CHATCORE_BASELINES)}")
    missing = [t for t in tasks if t not in accuracies]
    if missing:
        ran = [t for t in tasks if t in accuracies]
        raise ValueError(f"ChatCORE needs all of {list(tasks)}: ran {ran or 'none'}, missing {missing}")
    b = CHATCORE_BASELINES
    return sum((accuracies[t] - b[t]) / (1.0 - b[t]) for t in tasks) / len(tasks)


def _result_line(res: TaskResult) -> str:
    extra = "".join(f"  pass@{k} {v:.4f}" for k, v in res.pass_at_k.items() if k != 1) if res.num_samples > 1 else ""
    long_ = f"  too long {res.num_too_long}" if res.num_too_long else ""
    return (f"{res.name:<22} {res.kind:<11} n={res.num_problems:<5} acc {res.accuracy:.4f} "
            f"({res.num_correct}/{res.num_problems}){extra}{long_}  {res.seconds:.1f}s")
