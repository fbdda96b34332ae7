"""CORE (DCLM, arXiv 2406.11794): in-context-learning accuracy of a base model, as nanochat measures it.

    out = evaluate_core(model, tokenizer, "eval_bundle", max_per_task=500)   # out["core"], out["centered"][label]
    python -m train.core_eval --checkpoint runs/d20/model --tokenizer runs/tokenizer --bundle eval_bundle

Bundle format (the DCLM `eval_bundle` directory nanochat downloads; reference §8.1):
- `core.yaml`: `icl_tasks:` a list of {label, dataset_uri, icl_task_type ∈ multiple_choice | schema |
  language_modeling, num_fewshot: [k] (a one-element list; a bare int is accepted too), continuation_delimiter
  (default " ")}.
- `eval_data/<dataset_uri>`: JSONL, one item a line. multiple_choice: {query, choices: [str], gold: int};
  schema: {context_options: [str], continuation, gold: int}; language_modeling: {context, continuation}.
- `eval_meta_data.csv`: columns "Eval Task" (= label) and "Random baseline" (in percent).

Per task (nanochat `core_eval.py` + `base_eval.py`): items shuffled with random.Random(1337), cut to
`max_per_task`; item i gets k few-shot items drawn by random.Random(1234 + i) from the other (kept) items; the
prompt is the few-shot blocks joined by blank lines, then the item (nanochat's Jinja templates, rendered here in
plain Python); BOS is prepended; rows are right-padded with BOS, padding never counted.
- multiple_choice: one row per choice, same context → the continuation is what follows the rows' common token
  prefix; predict the choice of lowest mean loss over its continuation tokens.
- schema: one row per context option, same continuation → the common token suffix; lowest mean loss.
- language_modeling: one row (context + continuation, the context's tokens must be a prefix); correct iff the
  greedy argmax reproduces every continuation token.
Accuracy per task; centered = (acc − b)/(1 − b) with b = baseline%/100; CORE = mean centered over the tasks.

Scoring goes through `score_fn(rows, spans, with_argmax)` (see `model_score_fn`): the model in production, a
hand-written loss table in the tests, so the selection and averaging logic is checked against known answers.
Batching: whole items are packed into forwards of at most `batch_size` rows (an item with more rows than that
gets a forward of its own); multiple_choice/schema use the fused loss (no (B, T, V) logits); language_modeling
materialises logits only at the continuation positions.

Limits / deviations from nanochat:
- An empty continuation (a choice whose tokens are a prefix of another's) scores +inf (never chosen); nanochat
  gets a NaN mean and an order-dependent pick.
- Few-shot k is clamped to the number of other items (nanochat PR #551); real tasks are never that small.
- No rank striding: under torchrun every rank runs the whole evaluation (FSDP needs every rank in every forward).
- Rows longer than `max_seq_len` (when given) are cropped on the left as nanochat does for fixed-context models;
  an item whose scored tokens would be cut counts as wrong (`num_too_long` per task says how many; a short-context
  model cannot score it). Without max_seq_len the model's own length check applies.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # nanochat base_eval: data order before the max_per_task cut
FEWSHOT_SEED = 1234  # nanochat core_eval: random.Random(1234 + idx) per item

# score_fn(rows, spans, with_argmax) -> per row (nats, preds): nats (e − s,) fp32, the loss of tokens row[s:e]
# (each predicted from the tokens before it); preds (e − s,) int64, the argmax prediction of those same tokens,
# or None when with_argmax is False.
ScoreFn = Callable[[list[list[int]], list[tuple[int, int]], bool], list[tuple[torch.Tensor, torch.Tensor | None]]]


@dataclass
class Task:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str = " "


# ---- bundle parsing ------------------------------------------------------------------------------------------
def load_tasks(bundle_dir: str | Path) -> list[Task]:
    import yaml  # only the bundle reader needs it

    path = Path(bundle_dir) / "core.yaml"
    config = yaml.safe_load(path.read_text("utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{path}: expected a mapping with an 'icl_tasks' list")
    tasks = []
    for i, t in enumerate(config["icl_tasks"]):
        missing = [k for k in ("label", "dataset_uri", "icl_task_type", "num_fewshot") if k not in t]
        if missing:
            raise ValueError(f"{path}: icl_tasks[{i}] lacks {missing}")
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{path}: task {t['label']!r} has icl_task_type {t['icl_task_type']!r}, "
                             f"expected one of {TASK_TYPES}")
        k = t["num_fewshot"]
        k = k[0] if isinstance(k, list) else k  # DCLM writes [10]; nanochat takes the first entry
        tasks.append(Task(t["label"], t["icl_task_type"], t["dataset_uri"], int(k),
                          t.get("continuation_delimiter", " ")))
    return tasks


def load_baselines(bundle_dir: str | Path) -> dict[str, float]:
    """label → random-guess accuracy in percent, from eval_meta_data.csv."""
    path = Path(bundle_dir) / "eval_meta_data.csv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Eval Task", "Random baseline"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs columns 'Eval Task' and 'Random baseline', has {reader.fieldnames}")
        return {row["Eval Task"]: float(row["Random baseline"]) for row in reader}


def load_items(bundle_dir: str | Path, task: Task) -> list[dict]:
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def centered_accuracy(acc: float, baseline_percent: float) -> float:
    b = 0.01 * baseline_percent
    return (acc - b) / (1.0 - b)


# ---- prompts (nanochat's Jinja templates, in Python) -------------------------------------------------------
def render_prompts(task_type: str, item: dict, delim: str, fewshot: Sequence[dict]) -> list[str]:
    """multiple_choice: one prompt per choice; schema: one per context option; language_modeling:
    [context without continuation (stripped, as nanochat), context with continuation]."""
    if task_type == "multiple_choice":
        head = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{head}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        # Jinja's `trim` on contexts; the prompt without is stripped whole (its trailing delimiter would merge
        # into the continuation's first token otherwise — nanochat's comment on tokenizers).
        head = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{head}{item['context'].strip()}{delim}"
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}")


def common_length(seqs: Sequence[Sequence[int]], from_right: bool = False) -> int:
    """Length of the common token prefix (or suffix) of all sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_right else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def build_rows(task_type: str, prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """The scored span [s, e) of each row (rows already start with BOS)."""
    ends = [len(r) for r in prompt_ids]
    if task_type == "multiple_choice":
        start = common_length(prompt_ids)
        return [(start, e) for e in ends]
    if task_type == "schema":
        suffix = common_length(prompt_ids, from_right=True)
        return [(e - suffix, e) for e in ends]
    without, with_ = prompt_ids
    if not (len(without) < len(with_) and with_[: len(without)] == without):
        raise ValueError("language_modeling: the context's tokens are not a strict prefix of context+continuation")
    return [(len(without), len(with_))]


# ---- scoring -------------------------------------------------------------------------------------------------
def model_score_fn(model, pad_id: int) -> ScoreFn:
    """The production ScoreFn: one forward over the right-padded rows (pad = BOS, never counted)."""
    device = next(iter(model.buffers())).device

    @torch.no_grad()
    def score(rows, spans, with_argmax):
        B, T = len(rows), max(len(r) for r in rows)
        idx = torch.full((B, T), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        idx = idx.to(device)
        if not with_argmax:
            # targets[t] = idx[t + 1] inside the span only: the fused loss, no (B, T, V) logits.
            targets = torch.full((B, T), -1, dtype=torch.long, device=device)
            for i, (s, e) in enumerate(spans):
                targets[i, s - 1: e - 1] = idx[i, s:e]
            nats = model(idx, targets, loss_reduction="none").float().cpu()  # (B, T)
            return [(nats[i, s - 1: e - 1], None) for i, (s, e) in enumerate(spans)]
        # Logits only at the positions that predict a scored token of some row: (B, P, V).
        pos = sorted({t for s, e in spans for t in range(s - 1, e - 1)})
        where = {t: j for j, t in enumerate(pos)}
        logits = model(idx, logits_positions=torch.tensor(pos, dtype=torch.long, device=device)).float()
        out = []
        for i, (s, e) in enumerate(spans):
            cols = torch.tensor([where[t] for t in range(s - 1, e - 1)], device=device)
            lg = logits[i, cols]  # (e − s, V)
            nats = F.cross_entropy(lg, idx[i, s:e], reduction="none")
            out.append((nats.cpu(), lg.argmax(dim=-1).cpu()))
        return out

    return score


def _crop(row: list[int], span: tuple[int, int], max_seq_len: int | None) -> tuple[list[int], tuple[int, int]] | None:
    """The row cropped on the left to max_seq_len tokens, or None when that would cut into its scored tokens."""
    if max_seq_len is None or len(row) <= max_seq_len:
        return row, span
    cut = len(row) - max_seq_len
    if span[0] - 1 < cut:
        return None
    return row[cut:], (span[0] - cut, span[1] - cut)


def evaluate_task(task: Task, items: list[dict], tokenizer, score_fn: ScoreFn, batch_size: int = 32,
                  max_seq_len: int | None = None, counts: dict | None = None) -> float:
    """Accuracy of one task over `items` (already shuffled and cut; the few-shot pool is these items).

    An item whose scored tokens (plus the token before them) do not fit in max_seq_len cannot be scored by this
    model: it counts as wrong, never silently dropped, and `counts["too_long"]` (when given) says how many."""
    bos = tokenizer.bos_id
    with_argmax = task.task_type == "language_modeling"

    def prepare(i: int):
        item = items[i]
        k = min(task.num_fewshot, len(items) - 1)
        # k of the other items, drawn as indices into "all but i" (the same draw as sampling that list, without
        # building it per item: O(k), not O(len(items)))
        picks = random.Random(FEWSHOT_SEED + i).sample(range(len(items) - 1), k) if k > 0 else []
        fewshot = [items[j + (j >= i)] for j in picks]
        prompts = render_prompts(task.task_type, item, task.continuation_delimiter, fewshot)
        ids = [[bos] + p for p in tokenizer.encode_batch(prompts, disallowed_special=())]
        spans = build_rows(task.task_type, ids)
        if task.task_type == "language_modeling":
            ids = ids[1:]  # only the row with the continuation is forwarded
        cropped = [_crop(r, sp, max_seq_len) for r, sp in zip(ids, spans)]
        return None if any(c is None for c in cropped) else cropped

    def resolve(i: int, scored) -> bool:
        if task.task_type == "language_modeling":
            (row, (s, e)), (_, preds) = scored[0]
            return bool(torch.equal(preds, torch.tensor(row[s:e], dtype=preds.dtype)))
        means = [nats.mean().item() if nats.numel() else math.inf for _, (nats, _) in scored]
        return means.index(min(means)) == items[i]["gold"]

    num_correct, pending, pending_rows = 0, [], 0

    def flush():
        nonlocal num_correct, pending, pending_rows
        rows = [r for _, prepared in pending for r, _ in prepared]
        spans = [sp for _, prepared in pending for _, sp in prepared]
        results = score_fn(rows, spans, with_argmax)
        n = 0
        for i, prepared in pending:
            num_correct += resolve(i, list(zip(prepared, results[n: n + len(prepared)])))
            n += len(prepared)
        pending, pending_rows = [], 0

    too_long = 0
    for i in range(len(items)):
        prepared = prepare(i)
        if prepared is None:
            too_long += 1
            continue
        if pending and pending_rows + len(prepared) > batch_size:
            flush()
        pending.append((i, prepared))
        pending_rows += len(prepared)
    if pending:
        flush()
    if counts is not None:
        counts["too_long"] = too_long
    return num_correct / len(items)


def evaluate_core(model, tokenizer, bundle_dir: str | Path, max_per_task: int | None = None, batch_size: int = 32,
                  score_fn: ScoreFn | None = None, max_seq_len: int | None = None, log=print) -> dict:
    """CORE over every task of the bundle. Returns {"core", "accuracy": {label: acc}, "centered": {label: c},
    "num_examples": {label: n}, "seconds": {label: wall time}}. `score_fn` defaults to the model's losses
    (`model` is unused, and may be None, when score_fn is given)."""
    if score_fn is None:
        score_fn = model_score_fn(model, tokenizer.bos_id)
    tasks, baselines = load_tasks(bundle_dir), load_baselines(bundle_dir)
    missing = [t.label for t in tasks if t.label not in baselines]
    if missing:
        raise ValueError(f"eval_meta_data.csv has no random baseline for tasks {missing}")
    out = {"accuracy": {}, "centered": {}, "num_examples": {}, "seconds": {}, "num_too_long": {}}
    for task in tasks:
        t0 = time.perf_counter()
        items = load_items(bundle_dir, task)
        random.Random(SHUFFLE_SEED).shuffle(items)
        if max_per_task is not None and max_per_task > 0:
            items = items[:max_per_task]
        if not items:
            raise ValueError(f"task {task.label!r}: {task.dataset_uri} has no items")
        counts: dict = {}
        acc = evaluate_task(task, items, tokenizer, score_fn, batch_size, max_seq_len, counts)
        out["accuracy"][task.label] = acc
        out["num_too_long"][task.label] = counts["too_long"]
        out["centered"][task.label] = centered_accuracy(acc, baselines[task.label])
        out["num_examples"][task.label] = len(items)
        out["seconds"][task.label] = time.perf_counter() - t0
        if log:
            log(f"{task.label:<36} {task.task_type:<18} {task.num_fewshot:>2}-shot  n={len(items):<6} "
                f"acc {acc:.4f}  centered {out['centered'][task.label]:+.4f}  {out['seconds'][task.label]:.1f}s"
                + (f"  ({counts['too_long']} too long for the context: counted wrong)" if counts["too_long"] else ""))
    out["core"] = sum(out["centered"].values()) / len(out["centered"])
    if log:
        log(f"CORE {out['core']:.4f} over {len(tasks)} tasks")
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="CORE evaluation of a base checkpoint on a DCLM eval bundle")
    p.add_argument("--checkpoint", required=True, help="model directory written by model.io.save_model")
    p.add_argument("--tokenizer", required=True, help="bpe_rs tokenizer directory")
    p.add_argument("--bundle", required=True, help="eval_bundle directory (core.yaml, eval_data/, eval_meta_data.csv)")
    p.add_argument("--max-per-task", type=int, default=None, help="items per task after the shuffle (default all)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the result dict as JSON here")
    args = p.parse_args(argv)

    import bpe_rs  # native library: imported here so `--help` works without it
    from model.io import load_model

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = load_model(args.checkpoint, device=args.device, compute_dtype=dtype).eval()
    tok = bpe_rs.Tokenizer.load(args.tokenizer)
    out = evaluate_core(model, tok, args.bundle, max_per_task=args.max_per_task, batch_size=args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n", "utf-8")
    return out


if __name__ == "__main__":
    main()
