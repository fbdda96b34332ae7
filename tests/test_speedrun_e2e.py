"""The cpu tier end to end at a reduced size: every real stage (tokenizer → base → evals → mid → SFT → GRPO →
report) runs as the subprocess the speedrun starts; then report.md must have every section with numbers, the CLI
must answer from the trained checkpoint, and a second run must skip every finished stage.

Reduced: the cpu tier's recipe with a 1,024-token vocabulary, a 2-layer 64-wide model and a few steps per stage
(the real cpu tier: `./run_speedrun.sh`, minutes per stage). Marked slow; CI runs it.
"""

import dataclasses
import re
import subprocess
import sys

import pytest

from train import speedrun as S

TINY = dataclasses.replace(
    S.TIERS["cpu"], name="tiny", depth=2, vocab_size=1024, max_seq_len=128, device_batch_size=8, model_dim=64,
    head_dim=32, tok_max_chars=2_000_000,
    base=["--total-batch-size", "1024", "--num-iterations", "8", "--eval-every", "4", "--eval-tokens", "2048",
          "--sample-every", "8", "--save-every", "4"],
    mid=["--mixture", "offline", "--num-iterations", "4", "--eval-every", "2", "--eval-tokens", "2048",
         "--synthetic-examples", "64"],
    sft=["--mixture", "offline", "--num-iterations", "4", "--eval-every", "2", "--eval-tokens", "2048",
         "--synthetic-examples", "64"],
    rl=["--task", "synthetic", "--num-steps", "2", "--examples-per-step", "2", "--num-samples", "2",
        "--max-new-tokens", "16", "--eval-every", "2", "--eval-examples", "2", "--eval-samples", "2"],
    base_eval=["--core-bundle", "offline", "--max-per-task", "2", "--bpb-tokens", "2048"],
    chat_eval=["--max-problems", "2", "--max-tokens", "16"],
    rl_eval=["--max-problems", "2", "--max-tokens", "16"])


@pytest.mark.slow
def test_cpu_tier_end_to_end(tmp_path):
    lines = []
    run = S.Speedrun(TINY, tmp_path / "tiny", gpus=0, log=lines.append)
    run.run()
    stages = run.stages()
    assert stages == ["tokenizer", "tok_eval", "shards", "base", "base_eval", "mid", "mid_eval", "sft", "sft_eval",
                      "rl", "rl_eval", "report"]
    root = tmp_path / "tiny"
    report = (root / "report.md").read_text()

    # Every stage's section, with numbers in it.
    for title in ("## Tokenizer", "## Base model", "## Mid-training", "## SFT", "## RL (GRPO)"):
        section = report.split(title + "\n", 1)[1].split("\n## ", 1)[0]
        assert re.search(r"\| [\w -]+ \| -?\d+\.\d{4} \|", section), (title, section)
    summary = report.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    assert "| Metric | BASE | MID | SFT | RL |" in summary
    for metric in ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {metric} |"))
        assert re.search(r"\| -?\d\.\d{4} \|", row), row  # a number in at least one stage's column
    assert "Total wall clock" in report and "Cost estimate" in report

    # The CLI answers from the trained checkpoint (greedy, a few tokens).
    cli = subprocess.run([sys.executable, "-m", "infer.cli", "--checkpoint", str(root / "rl"), "--tokenizer",
                          str(root / "tokenizer"), "--prompt", "What is 2 + 3?", "--temperature", "0",
                          "--max-tokens", "8", "--no-tools"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip(), cli.stderr  # it said something
    assert "KV cache" in cli.stderr  # the engine started from that checkpoint

    # A second run skips every finished stage.
    lines.clear()
    run.run()
    skipped = [line for line in lines if line.endswith("skipping")]
    assert len(skipped) == len(stages), lines
