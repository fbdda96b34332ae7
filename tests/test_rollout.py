"""Offline rollouts: the JSONL CLI (resume without duplicates, torn last line, malformed input lines reported with
their line numbers), seeds, and the calculator convention for tool calls (real sandbox)."""

import inspect
import json
import textwrap

import pytest
import torch

import bpe_rs
from model.config import ModelConfig
from model.io import save_model
from rlgrpo.rollout import done_ids, main, read_questions, sample_seed
from tests.models import random_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout")
    tok = bpe_rs.train_from_iterator([inspect.getsource(textwrap)], vocab_size=400)
    cfg = ModelConfig.for_depth(1, model_dim=64, head_dim=32, vocab_size=tok.vocab_size, sequence_len=128)
    save_model(random_model(cfg, 0.1), d / "model")
    tok.save(d / "tok")
    return d


def write_questions(path):
    lines = [json.dumps({"id": f"q{i}", "question": f"What is {i} plus {i}?", "answer": 2 * i}) for i in range(3)]
    lines.insert(1, "{not json")                                     # line 2
    lines.append(json.dumps({"id": "bad", "answer": 1}))             # line 5: neither messages nor question
    lines.append(json.dumps({"id": "q9", "question": "x", "answer": "many"}))  # line 6: non-numeric answer
    lines.append(json.dumps({"id": "q3", "messages": [{"role": "user", "content": "Name a number."}]}))  # no answer
    path.write_text("\n".join(lines) + "\n")


def cli(ckpt, inp, out, *extra):
    return main(["--checkpoint", str(ckpt / "model"), "--tokenizer", str(ckpt / "tok"), "--input", str(inp),
                 "--out", str(out), "-n", "3", "--max-new-tokens", "8", "--no-tools", "--batch-questions", "2",
                 *extra])


def test_malformed_lines_are_reported_with_their_numbers(tmp_path):
    write_questions(tmp_path / "q.jsonl")
    msgs = []
    qs = read_questions(str(tmp_path / "q.jsonl"), log=msgs.append)
    assert [q for q, _ in qs] == ["q0", "q1", "q2", "q3"]
    assert [m.split(": skipped")[0].rsplit(":", 1)[1] for m in msgs] == ["2", "5", "6"], msgs
    assert "not a number" in msgs[2]


def test_cli_writes_every_sample_and_resumes_without_duplicates(ckpt, tmp_path, capsys):
    torch.set_num_threads(1)
    inp, out = tmp_path / "q.jsonl", tmp_path / "out.jsonl"
    write_questions(inp)
    totals = cli(ckpt, inp, out, "--limit", "2")  # a first, partial run
    assert totals["questions"] == 2
    printed = capsys.readouterr().out
    assert "q.jsonl:2: skipped malformed line" in printed and "samples/s" in printed and "tok/s" in printed
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"id": "q2", "prompt_tok')  # a crash mid-write leaves a torn line
    cli(ckpt, inp, out)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert out.read_text().startswith(first)  # earlier lines untouched
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "q3"]  # each once, the torn one redone
    for r in recs:
        assert len(r["samples"]) == 3 and r["version"] == 0 and r["timing"]["batch_wall_s"] > 0
        for s in r["samples"]:
            assert len(s["tokens"]) == len(s["mask"]) >= 1 and s["finish_reason"] in ("stop", "length")
            assert (s["reward"] is None) == (r["answer"] is None)
    assert len({s["seed"] for r in recs for s in r["samples"]}) == 12  # every sample its own seed
    totals = cli(ckpt, inp, out)  # all done: nothing more is written
    assert totals["questions"] == 0 and len(out.read_text().splitlines()) == 4


def test_done_ids_cuts_a_torn_last_line(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "sam')
    assert done_ids(p, log=lambda _: None) == {"a", "b"}
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_seeds_are_distinct_and_stable():
    seeds = {sample_seed(0, s, q, g) for s in range(3) for q in range(4) for g in range(5)}
    assert len(seeds) == 60 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(1, 2, 3, 4) == sample_seed(1, 2, 3, 4)
