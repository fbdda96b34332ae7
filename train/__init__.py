"""Datasets and loaders, tokenizer training/evaluation, and (later) the pretraining, mid-training and SFT loops.

Built so far: the offline text corpus (train/corpus.py) and the tokenizer CLIs (train/tok_train.py,
train/tok_eval.py). Muon/AdamW, FSDP, the training loops, evaluation and the report arrive with their issues.
"""
