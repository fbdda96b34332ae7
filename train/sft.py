"""Supervised fine-tuning: `python -m train.sft` (1 process) or `torchrun --nproc_per_node=N -m train.sft`.

    python -m train.sft --run-name d20                           # from <run>/mid's latest checkpoint, nanochat mix
    python -m train.sft --run-dir runs/cpu/sft --mixture offline --num-iterations 100     # the CPU tier

The mid-training stage (train/mid.py: same loop, checkpoints, exact --resume, optimizer warm start, val loss/bpb,
report record) with nanochat §7.3's choices:
- source: the latest complete checkpoint of `<run_root>/mid/checkpoints` (or --from);
- rows: one conversation per row, padded with BOS to the longest row of the micro-batch (targets −1 on padding
  and wherever the render mask is 0), never concatenated — the model sees each conversation alone, as at test
  time; a conversation longer than T is cropped (counted and reported);
- schedule: LRs 0.8 × the inherited ones, no warmup, constant, then linear to 0 over the last 50% of steps;
  Muon momentum 0.85 → 0.95 over 300 steps; Muon weight decay 0;
- horizon: one epoch of the mixture (exact: one conversation per row) unless --num-iterations;
- val loss and bpb (assistant tokens only) every 200 steps; `<run_root>/report/sft.json` at the end.
Mixtures: "nanochat" = SmolTalk train + MMLU auxiliary_train ×3 + GSM8K train ×4; "offline" = the CPU tier's
synthetic tasks (another seed than mid's) + offline conversations (train/chat_data.py).

Limits: rows padded to the micro-batch's longest conversation waste compute on short ones (nanochat HEAD packs
best-fit instead); tok/s and MFU count the padding as forwarded tokens.
"""

from __future__ import annotations

import torch.distributed as dist

from train.mid import StageDefaults, parse_args, run_stage

SFT = StageDefaults(stage="sft", source_stage="mid", init_lr_frac=0.8, warmdown_ratio=0.5, eval_every=200,
                    packed=False)


def main(argv: list[str] | None = None) -> dict:
    return run_stage(parse_args(argv, SFT), SFT)


if __name__ == "__main__":
    main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
