"""Chat with a trained model in the terminal: `python -m infer.cli`.

    python -m infer.cli                                   # the latest run's most trained checkpoint
    python -m infer.cli --checkpoint RUN/checkpoints/step_000060 --tokenizer RUN/../tokenizer
    python -m infer.cli --prompt "Why is the sky blue?" --temperature 0   # one-shot: print the answer, exit

Multi-turn: every answer is appended to the conversation, which is re-rendered with model/chat.py each turn (the
engine's prefix cache makes the repeated history cheap). Tokens stream as they are generated, never splitting a
character. Commands: /clear starts a new conversation, /exit (or end of input) quits.

Tool use: a python call the model writes runs in the sandbox (infer/sandbox.py) and its output is fed back, as in
training; `--no-tools` turns that off (the call is then only printed).
Limits: the model answers as well as it was trained (a base model only continues text).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import bpe_rs

from infer.engine import Engine
from infer.sampling import SamplingParams, SamplingParamsError
from infer.sandbox import ToolExecutor
from model.chat import ChatFormatError, render_for_completion
from model.io import CheckpointError, latest_trained_model, load_model, resolve_model_dir


def find_checkpoint(checkpoint: Path | None, tokenizer: Path | None) -> tuple[Path, Path]:
    """(model dir, tokenizer dir) from the --checkpoint/--tokenizer flags of the CLI and the server: a model,
    checkpoints or stage directory, or (None) the latest run under $FLASHCHAT_BASE_DIR, its most trained stage.
    Raises CheckpointError with what to do."""
    if checkpoint is None:
        base = Path(os.environ.get("FLASHCHAT_BASE_DIR", Path.home() / ".cache" / "flashchat"))
        found = latest_trained_model(base)
        if found is None:
            raise CheckpointError(f"no checkpoint found under {base}: run ./run_speedrun.sh first, or pass "
                                  f"--checkpoint")
        return found[0], tokenizer or found[1]
    if tokenizer is None:
        raise CheckpointError("--tokenizer is needed with --checkpoint")
    return resolve_model_dir(checkpoint), tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat with a flashchat model in the terminal.")
    p.add_argument("--checkpoint", type=Path, help="a model directory (model.safetensors + config.json), a "
                   "checkpoints directory or a stage's run directory (its newest complete checkpoint); default: the "
                   "latest run under $FLASHCHAT_BASE_DIR, its most trained stage (rl > sft > mid > base)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the run's)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per answer (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--no-tools", action="store_true", help="do not run the model's python calls in the sandbox")
    return p.parse_args(argv)


def answer(engine: Engine, tok, messages: list[dict], params: SamplingParams, out) -> str:
    """Stream one assistant answer to `out`; returns its text."""
    ids = render_for_completion(tok, messages)
    budget = engine.max_model_len - len(ids)
    if budget < 1:
        raise ChatFormatError(f"the conversation is {len(ids)} tokens, the model's context is {engine.max_model_len}: "
                              f"/clear to start over")
    if params.max_tokens > budget:  # shorten the answer rather than refuse the turn; say so
        out.write(f"[answer limited to {budget} tokens by the context]\n")
        params = dataclasses.replace(params, max_tokens=budget)
    rid = engine.add_request(ids, params)
    pieces = []
    while True:
        for o in engine.step():
            if o.request_id != rid:
                continue
            out.write(o.text)
            out.flush()
            pieces.append(o.text)
            if o.finished:
                out.write("\n")
                return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ckpt, tok_dir = find_checkpoint(args.checkpoint, args.tokenizer)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        tok = bpe_rs.Tokenizer.load(tok_dir)
        model = load_model(ckpt, device=args.device)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed)
    except (bpe_rs.BpeError, CheckpointError, SamplingParamsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tools = None if args.no_tools else ToolExecutor(max_workers=2)
    engine = Engine(model, tok, tools=tools, log=lambda msg: print(msg, file=sys.stderr))
    out = sys.stdout
    if args.prompt is not None:
        answer(engine, tok, [{"role": "user", "content": args.prompt}], params, out)
        return 0
    print(f"chatting with {ckpt} (/clear: new conversation, /exit: quit)", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/clear":
            messages = []
            print("[new conversation]")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        out.write("model> ")
        try:
            reply = answer(engine, tok, messages, params, out)
        except ChatFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
