"""Rollouts: G samples per question through infer's continuous-batching engine, scored; and the offline CLI.

    groups = rollout(engine, tok, examples, num_samples=16, params=SamplingParams(temperature=1.0, top_k=50,
                     max_tokens=256), seed=0, step=7)            # one list of Samples per question
    python -m rlgrpo.rollout --checkpoint DIR --tokenizer DIR --task gsm8k --split test --out out.jsonl -n 16
    python -m rlgrpo.rollout --checkpoint DIR --tokenizer DIR --input questions.jsonl --out out.jsonl -n 16

Every question's prompt is `model.chat.render_for_completion` of its conversation; its G requests go into the
engine together with all other questions' (one `Engine.generate` call: continuous batching, and the G copies of
a prompt share its prefix blocks). Each request has its own seed, a hash of (seed, step, question, sample), so a
rollout is reproducible and independent of batch composition and of the number of ranks (infer/sampling.py).
Tool calls run in the sandbox (an `infer.sandbox.ToolExecutor`); their forced output tokens
come back with mask 0 in `Sample.mask` and are never trained on.

Weights version: every Sample carries the engine's `version` of the weights that produced it; `rollout` checks
the version did not change during the call (Completion carries no per-request version, so it is read before and
after the synchronous generate), and GRPO asserts it equals the weights it is about to update.

Calculator tools: the chat data (GSM8K `<<48/2=24>>`, the synthetic tasks) writes tool calls as bare expressions
and expects their value back, nanochat's calculator convention; the ToolExecutor prints such a call's value
(infer.sandbox.calculator_program) and runs any other program as is.

CLI output (JSONL, one line per question, written whole and flushed): id, prompt_tokens, answer, samples (tokens,
mask, text, finish_reason, reward, seed), version, timing (wall seconds of the batch it ran in, its share of
tokens). Resumable: ids already in the output are skipped; a torn last line (a crash mid-write) is cut off before
appending; nothing is ever written twice. A malformed input line is reported with its line number and skipped.
Limits: one process (no multi-GPU sharding of the CLI); questions are batched `--batch-questions` at a time, so a
crash loses at most one batch; reward needs a numeric "answer" (absent: reward null).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from infer.engine import Engine
from infer.sampling import SamplingParams
from model.chat import ChatFormatError, render_for_completion
from rlgrpo.rewards import answer_reward, reference_number, reward


@dataclass
class Sample:
    question: int  # the question's index in the batch's example list
    sample: int  # index within its group
    prompt_ids: list[int]
    token_ids: list[int]
    mask: list[int]  # per token: 1 sampled by the policy, 0 forced (tool output)
    text: str
    finish_reason: str
    reward: float
    correct: bool
    version: int  # engine weights version that generated it
    seed: int


def sample_seed(seed: int, step: int, question: int, sample: int) -> int:
    """A 63-bit seed from (seed, step, question, sample): distinct requests never share a random stream."""
    h = hashlib.blake2b(f"{seed}:{step}:{question}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def example_prompt(tokenizer, example: dict) -> list[int]:
    return render_for_completion(tokenizer, example["messages"])


def rollout(engine: Engine, tokenizer, examples: list[dict], num_samples: int, params: SamplingParams, *,
            seed: int = 0, step: int = 0, question_ids: list[int] | None = None,
            format_bonus: float = 0.0) -> list[list[Sample]]:
    """num_samples completions per example in one engine call; returns one group of Samples per example.
    question_ids: global ids used in the seeds (default 0..len−1), so a rank's share samples what one rank would."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    qids = list(range(len(examples))) if question_ids is None else list(question_ids)
    if len(qids) != len(examples):
        raise ValueError(f"{len(qids)} question ids for {len(examples)} examples")
    prompts, plist, seeds = [], [], []
    for ex, q in zip(examples, qids):
        prompt = example_prompt(tokenizer, ex)
        # A short-context model: the answer may use what the prompt leaves of the context (never a cropped prompt).
        room = engine.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"question {q}: its prompt is {len(prompt)} tokens, the model's context is "
                             f"{engine.max_model_len}: no room to answer")
        for g in range(num_samples):
            s = sample_seed(seed, step, q, g)
            prompts.append(prompt)
            plist.append(replace(params, seed=s, max_tokens=min(params.max_tokens, room)))
            seeds.append(s)
    version = engine.version
    completions = engine.generate(prompts, plist)
    if engine.version != version:  # generate is synchronous, so this can only be a push from another thread
        raise RuntimeError(f"the engine's weights changed during a rollout (version {version} -> {engine.version})")
    groups = []
    for i, ex in enumerate(examples):
        group = []
        for g in range(num_samples):
            k = i * num_samples + g
            c = completions[k]
            ref = ex.get("answer")
            r = reward(c.text, ref, c.finish_reason, format_bonus) if ref is not None else 0.0
            correct = ref is not None and answer_reward(c.text, ref) == 1.0
            group.append(Sample(i, g, c.prompt_token_ids, c.token_ids, c.mask, c.text, c.finish_reason, r,
                                correct, version, seeds[k]))
        groups.append(group)
    return groups


# ---- the offline CLI -------------------------------------------------------------------------------------------
def read_questions(path: str, log=print) -> list[tuple[str, dict]]:
    """(id, example) per valid line of a questions JSONL: {"id"?, "messages" | "question", "answer"?}. A bad line is
    reported with its line number and skipped. The id defaults to "line-<n>"."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                if "messages" in obj:
                    messages = obj["messages"]
                elif isinstance(obj.get("question"), str):
                    messages = [{"role": "user", "content": obj["question"]}]
                else:
                    raise ValueError("needs 'messages' (a conversation) or 'question' (a string)")
                ex = {"messages": messages}
                if obj.get("answer") is not None:
                    reference_number(obj["answer"])  # refuse a non-numeric answer here, not mid-run
                    ex["answer"] = obj["answer"]
                qid = str(obj.get("id", f"line-{n}"))
            except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                log(f"{path}:{n}: skipped malformed line: {e}")
                continue
            out.append((qid, ex))
    return out


def done_ids(out_path: Path, log=print) -> set[str]:
    """Ids already in the output; a torn last line (no trailing newline, or not JSON) is cut off the file."""
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    ids, good_end = set(), 0
    for line in data[:keep].splitlines(keepends=True):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            break  # a damaged line: keep what came before it, rewrite from here
        good_end += len(line)
    if good_end < len(data):
        log(f"{out_path}: cutting {len(data) - good_end} bytes of an unfinished or damaged line at the end")
        with open(out_path, "r+b") as f:
            f.truncate(good_end)
    return ids


def task_questions(name: str, split: str) -> list[tuple[str, dict]]:
    if name != "gsm8k":
        raise SystemExit(f"--task {name!r}: only gsm8k is supported")
    if split == "test":
        from train.tasks.offline import load
        task = load("gsm8k")
    else:
        from train.tasks.remote import load  # network; written beside this module's issue
        task = load("gsm8k", split)
    return [(f"gsm8k-{split}-{i}", task[i]) for i in range(len(task))]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Offline batched rollouts through the engine, to JSONL (resumable).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model directory (model/io.py, or a checkpoint step dir)")
    p.add_argument("--tokenizer", required=True, help="bpe_rs tokenizer directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="questions JSONL: {id?, messages | question, answer?} per line")
    src.add_argument("--task", help="a named task: gsm8k")
    p.add_argument("--split", default="test", help="split of --task (test is offline; train downloads)")
    p.add_argument("--out", required=True, help="output JSONL (appended to; existing ids are skipped)")
    p.add_argument("-n", "--num-samples", type=int, default=16, help="samples per question")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="base seed; each sample's seed hashes (seed, question, index)")
    p.add_argument("--batch-questions", type=int, default=32, help="questions per engine call (and per write)")
    p.add_argument("--no-tools", action="store_true", help="do not run tool calls in the sandbox")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import bpe_rs
    import torch

    from infer.sandbox import ToolExecutor
    from model.io import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    tok = bpe_rs.Tokenizer.load(args.tokenizer)
    model = load_model(args.checkpoint, device=device, compute_dtype=dtype)
    questions = read_questions(args.input) if args.input else task_questions(args.task, args.split)
    if args.limit is not None:
        questions = questions[: args.limit]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
    todo, seen = [], set(done)
    for qid, ex in questions:
        if qid in seen:
            continue  # already written (or a repeated id in the input): never twice
        seen.add(qid)
        todo.append((qid, ex))
    print(f"{len(questions)} questions, {len(done)} already in {out_path}, {len(todo)} to do, "
          f"{args.num_samples} samples each", flush=True)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens)
    executor = None if args.no_tools else ToolExecutor(max_workers=4)
    engine = Engine(model, tok, tools=executor)
    totals = {"questions": 0, "samples": 0, "tokens": 0, "wall_s": 0.0}
    t_start = time.perf_counter()
    try:
        with open(out_path, "a", encoding="utf-8") as f:
            for b in range(0, len(todo), args.batch_questions):
                batch = []
                for qid, ex in todo[b: b + args.batch_questions]:
                    try:
                        example_prompt(tok, ex)
                    except (ChatFormatError, KeyError) as e:
                        print(f"question {qid}: skipped: {e}", flush=True)
                        continue
                    batch.append((qid, ex))
                if not batch:
                    continue
                t0 = time.perf_counter()
                try:
                    groups = rollout(engine, tok, [ex for _, ex in batch], args.num_samples, params,
                                     seed=args.seed, question_ids=[_stable_int(q) for q, _ in batch])
                except ValueError as e:  # e.g. a prompt that does not fit the context: name it, go on alone
                    print(f"batch at question {batch[0][0]}: {e}; retrying its questions one by one", flush=True)
                    groups = []
                    for qid, ex in batch:
                        try:
                            groups += rollout(engine, tok, [ex], args.num_samples, params, seed=args.seed,
                                              question_ids=[_stable_int(qid)])
                        except ValueError as e1:
                            print(f"question {qid}: skipped: {e1}", flush=True)
                            groups.append(None)
                wall = time.perf_counter() - t0
                n_tok = sum(len(s.token_ids) for g in groups if g for s in g)
                for (qid, ex), group in zip(batch, groups):
                    if group is None:
                        continue
                    tokens = sum(len(s.token_ids) for s in group)
                    rec = {"id": qid, "prompt_tokens": group[0].prompt_ids, "answer": ex.get("answer"),
                           "version": group[0].version,
                           "samples": [{"tokens": s.token_ids, "mask": s.mask, "text": s.text,
                                        "finish_reason": s.finish_reason, "seed": s.seed,
                                        "reward": s.reward if ex.get("answer") is not None else None}
                                       for s in group],
                           "timing": {"batch_wall_s": round(wall, 4), "batch_questions": len(batch),
                                      "generated_tokens": tokens}}
                    f.write(json.dumps(rec) + "\n")  # one whole line per question, then flushed
                    totals["questions"] += 1
                    totals["samples"] += len(group)
                f.flush()
                os.fsync(f.fileno())
                totals["tokens"] += n_tok
                el = time.perf_counter() - t_start
                print(f"{len(done) + totals['questions']}/{len(questions)} questions | "
                      f"{totals['samples'] / el:,.1f} samples/s | {totals['tokens'] / el:,.0f} tok/s | "
                      f"batch {wall:.1f}s", flush=True)
    finally:
        if executor is not None:
            executor.shutdown()
    totals["wall_s"] = time.perf_counter() - t_start
    return totals


def _stable_int(qid: str) -> int:
    """An integer from a question id for the seed hash (ids are strings in the JSONL)."""
    return int.from_bytes(hashlib.blake2b(qid.encode(), digest_size=7).digest(), "little")


if __name__ == "__main__":
    main()
    sys.exit(0)
