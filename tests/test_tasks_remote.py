"""train/tasks/remote.py against a real HTTP server on 127.0.0.1 serving fixture files in the hub's layout.

The fixture files are tiny parquet files written here in the datasets' real column schemas (smol-smoltalk's
list<struct<content, role>> messages, cais/mmlu's int answer, ai2_arc's {text, label} choices struct, ...) and a
small eval-bundle zip. The server counts requests per path, records Range headers, supports Range requests and
plays scripted faults per path (503, truncated body, corrupt body); a missing file is a 404. Nothing leaves
127.0.0.1.
"""
from __future__ import annotations

import io
import json
import re
import socket
import threading
import zipfile
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.chat import normalize_messages
from tests.test_download import serve_in_thread
from train import core_eval
from train import download as dl
from train.tasks import remote
from train.tasks.common import check_trainable

FAST = dict(backoff=0.001, timeout=5.0)  # retries are instant; no test waits on real backoff

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
               "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]
MMLU_ROWS = [
    {"question": "Find the degree for the given field extension Q(sqrt(2)) over Q.", "subject": "abstract_algebra",
     "choices": ["0", "2", "1", "3"], "answer": 1},
    {"question": "Which planet is known as the Red Planet?", "subject": "astronomy",
     "choices": ["Venus", "Jupiter", "Mars", "Saturn"], "answer": 2},
]
ARC_ROWS = [  # numeric labels, as some real ARC rows have: lettered A.. in file order
    {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite "
                                          "impact. Which is the most likely effect of this increase in rotation?",
     "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                          "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                 "label": ["1", "2", "3", "4"]},
     "answerKey": "3"},
]
SMOLTALK_ROWS = [
    {"messages": [{"content": "You are a concise assistant.", "role": "system"},
                  {"content": "What is the capital of France?", "role": "user"},
                  {"content": "Paris.", "role": "assistant"}], "source": "smol-constraints"},
    {"messages": [{"content": "Hi!", "role": "user"}, {"content": "Hello! How can I help?", "role": "assistant"},
                  {"content": "Name a prime.", "role": "user"}, {"content": "7", "role": "assistant"}],
     "source": "everyday-conversations"},
]
HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/53", "prompt": "def add(x: int, y: int):\n    \"\"\"Add two numbers x and y\"\"\"\n",
     "canonical_solution": "    return x + y\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
]

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
SCHEMAS = {  # the hub files' column types
    "gsm8k": pa.schema([("question", pa.string()), ("answer", pa.string())]),
    "mmlu": pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                       ("answer", pa.int64())]),
    "arc": pa.schema([("id", pa.string()), ("question", pa.string()),
                      ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                      ("answerKey", pa.string())]),
    "smoltalk": pa.schema([("messages", MESSAGES), ("source", pa.string())]),
    "humaneval": pa.schema([(c, pa.string()) for c in ("task_id", "prompt", "canonical_solution", "test",
                                                       "entry_point")]),
}


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


def bundle_zip_bytes() -> bytes:
    """A tiny eval bundle laid out like nanochat's eval_bundle.zip: everything under a top-level eval_bundle/."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("eval_bundle/core.yaml", "icl_tasks:\n- label: copa\n  dataset_uri: commonsense/copa.jsonl\n"
                                             "  num_fewshot: [0]\n  icl_task_type: multiple_choice\n")
        zf.writestr("eval_bundle/eval_data/commonsense/copa.jsonl",
                    json.dumps({"query": "The man broke his toe because", "choices": ["he dropped a hammer on "
                                "his foot.", "he got a hole in his sock."], "gold": 0}) + "\n")
        zf.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
    return buf.getvalue()


def hub_path(name: str, split: str, i: int = 0) -> str:
    src = remote.SOURCES[name]
    return f"datasets/{src.repo}/resolve/main/{src.splits[split][i]}"


class FakeHub:
    """Shared state of the fixture server; a test scripts faults and reads the counters."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.ranges: list[tuple[str, str | None]] = []
        self.faults: dict[str, list[str]] = defaultdict(list)

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.ranges.clear()
            self.faults.clear()


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = self.path.lstrip("/")
            rng = self.headers.get("Range")
            with hub.lock:
                hub.hits[path] += 1
                hub.ranges.append((path, rng))
                fault = hub.faults[path].pop(0) if hub.faults[path] else None
            if fault == "503":
                self.send_error(503, "scripted outage")
                return
            file = hub.root / path
            if not file.is_file():
                self.send_error(404)
                return
            body = file.read_bytes()
            if fault == "corrupt":  # same length, garbage: a captive-portal page or a bad mirror
                body = b"<html>" + b"x" * (len(body) - 6)
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1]) if rng else 0
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            part = body[start:]
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if fault == "truncate":  # promise the whole body, send half, hang up
                self.wfile.write(part[: len(part) // 2])
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(part)

    return Handler


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    files = {
        hub_path("gsm8k", "train"): parquet_bytes(GSM8K_ROWS, SCHEMAS["gsm8k"]),
        hub_path("gsm8k", "test"): parquet_bytes(GSM8K_ROWS[:1], SCHEMAS["gsm8k"]),
        hub_path("mmlu", "test"): parquet_bytes(MMLU_ROWS, SCHEMAS["mmlu"]),
        hub_path("mmlu", "auxiliary_train"): parquet_bytes(MMLU_ROWS[::-1], SCHEMAS["mmlu"]),
        hub_path("arc_challenge", "test"): parquet_bytes(ARC_ROWS, SCHEMAS["arc"]),
        hub_path("smoltalk", "test"): parquet_bytes(SMOLTALK_ROWS[1:], SCHEMAS["smoltalk"]),
        hub_path("humaneval", "test"): parquet_bytes(HUMANEVAL_ROWS, SCHEMAS["humaneval"]),
        "s3/eval_bundle.zip": bundle_zip_bytes(),
        "s3/not_a_zip.zip": b"<html>Access Denied</html>",
    }
    for i in range(4):  # smoltalk train is four shards upstream: one row in each of the first two, none after
        files[hub_path("smoltalk", "train", i)] = parquet_bytes(SMOLTALK_ROWS[i:i + 1], SCHEMAS["smoltalk"])
    for path, body in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(body)
    hub = FakeHub(root)
    with serve_in_thread(_make_handler(hub)) as port:
        hub.url = f"http://127.0.0.1:{port}"
        yield hub


@pytest.fixture
def hub(server):
    server.reset()
    return server


def _load(hub, tmp_path, name, split, **kw):
    return remote.load(name, split, cache_dir=tmp_path / "cache", base_url=hub.url, **{**FAST, **kw})


# ---- rendering ------------------------------------------------------------------------------------------------

def test_gsm8k_renders_calculator_calls_and_a_cache_hit_makes_no_request(hub, tmp_path):
    task = _load(hub, tmp_path, "gsm8k", "train")
    assert (task.name, task.split, task.kind, len(task)) == ("gsm8k", "train", "generative", 2)
    ex = task[0]
    assert ex["messages"][0] == {"role": "user", "content": GSM8K_ROWS[0]["question"]}
    parts = ex["messages"][1]["content"]
    assert parts[:3] == [{"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
                         {"type": "python_output", "text": "24"}]
    assert [p["text"] for p in parts if p["type"] == "python"] == ["48/2", "48+24"]
    assert "".join(p["text"] for p in parts if p["type"] == "text").endswith("#### 72")
    assert ex["answer"] == "72" and ex["id"] == "train-0" and task[1]["answer"] == "10"
    assert task.evaluate(ex, "so the total is\n#### 72") and not task.evaluate(ex, "#### 71")
    check_trainable([task])  # a train split is allowed in a mixture
    assert hub.hits[hub_path("gsm8k", "train")] == 1

    again = _load(hub, tmp_path, "gsm8k", "train")
    assert again[1] == task[1]
    assert sum(hub.hits.values()) == 1  # served from the cache: no second request


def test_mmlu_letters_and_eval_splits_are_refused_for_training(hub, tmp_path):
    test = _load(hub, tmp_path, "mmlu", "test")
    assert (test.kind, test.split, len(test)) == ("categorical", "test", 2)
    ex = test[1]
    assert ex["letters"] == ["A", "B", "C", "D"] and ex["answer"] == "C" and ex["subject"] == "astronomy"
    assert "- Mars=C\n" in ex["messages"][0]["content"] and ex["messages"][1] == {"role": "assistant",
                                                                                 "content": "C"}
    assert test.evaluate(ex, " C.") and not test.evaluate(ex, "B")
    aux = _load(hub, tmp_path, "mmlu", "auxiliary_train")
    assert aux.split == "auxiliary_train" and aux[0]["answer"] == "C"  # rows reversed in that fixture
    check_trainable([aux])
    with pytest.raises(ValueError, match=r"mmlu \(test\)"):
        check_trainable([aux, test])


def test_arc_numeric_labels_become_letters(hub, tmp_path):
    task = _load(hub, tmp_path, "arc_challenge", "test")
    ex = task[0]
    assert (task.name, task.kind) == ("arc_challenge", "categorical")
    assert ex["answer"] == "C" and ex["letters"] == ["A", "B", "C", "D"] and ex["id"] == "Mercury_7175875"
    assert "- Planetary days will become shorter.=C\n" in ex["messages"][0]["content"]
    with pytest.raises(ValueError, match="arc_challenge"):
        check_trainable([task])


def test_smoltalk_conversations_keep_the_system_message(hub, tmp_path):
    task = _load(hub, tmp_path, "smoltalk", "train")
    assert len(task) == 2  # rows from four shards, in shard order (two of them empty)
    first, second = task[0]["messages"], task[1]["messages"]
    assert first == [dict(role=m["role"], content=m["content"]) for m in SMOLTALK_ROWS[0]["messages"]]
    assert normalize_messages(first)[0]["content"] == "You are a concise assistant.\n\nWhat is the capital of France?"
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    assert len(list(task.subset(2, seed=1))) == 2
    check_trainable([task])
    assert sorted(p.name for p in (tmp_path / "cache" / "HuggingFaceTB" / "smol-smoltalk" / "data").iterdir()
                  if p.suffix == ".parquet") == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    with pytest.raises(ValueError, match=r"smoltalk \(test\)"):
        check_trainable([_load(hub, tmp_path, "smoltalk", "test")])


def test_humaneval_graded_in_the_sandbox(hub, tmp_path):
    task = _load(hub, tmp_path, "humaneval", "test")
    ex = task[0]
    assert ex["task_id"] == "HumanEval/53" and ex["entry_point"] == "add"
    assert ex["messages"][1]["content"] == HUMANEVAL_ROWS[0]["prompt"] + HUMANEVAL_ROWS[0]["canonical_solution"]
    assert task.evaluate(ex, "```python\n" + ex["messages"][1]["content"] + "```")
    assert not task.evaluate(ex, "    return x - y\n")


# ---- download behaviour ---------------------------------------------------------------------------------------

def test_two_503s_then_success_is_retried(hub, tmp_path):
    path = hub_path("gsm8k", "test")
    hub.faults[path] = ["503", "503"]
    logs = []
    task = _load(hub, tmp_path, "gsm8k", "test", log=logs.append)
    assert len(task) == 1 and hub.hits[path] == 3
    assert sum("HTTP 503" in line for line in logs) == 2


def test_truncated_body_is_resumed_and_corrupt_body_refetched(hub, tmp_path):
    path = hub_path("gsm8k", "test")
    hub.faults[path] = ["truncate"]
    (cached,) = remote.fetch("gsm8k", "test", cache_dir=tmp_path / "a", base_url=hub.url, **FAST)
    assert cached.read_bytes() == (hub.root / path).read_bytes()
    assert hub.hits[path] == 2 and hub.ranges[-1][1] is not None  # the second request asked for the rest only

    hub.reset()
    hub.faults[path] = ["corrupt"]
    (cached,) = remote.fetch("gsm8k", "test", cache_dir=tmp_path / "b", base_url=hub.url, **FAST)
    assert cached.read_bytes() == (hub.root / path).read_bytes()
    assert hub.hits[path] == 2 and hub.ranges[-1][1] is None  # a bad body is never resumed from
    assert not list(cached.parent.glob("*.tmp.*"))


def test_404_and_unknown_names_give_clear_errors(hub, tmp_path):
    with pytest.raises(dl.ShardNotFoundError, match=re.escape(f"{hub.url}/{hub_path('arc_easy', 'train')}")):
        _load(hub, tmp_path, "arc_easy", "train")
    assert hub.hits[hub_path("arc_easy", "train")] == 1  # a 404 is not retried
    with pytest.raises(KeyError, match="known: smoltalk, mmlu, arc_easy, arc_challenge, gsm8k, humaneval"):
        remote.load("hellaswag", "validation", cache_dir=tmp_path)
    with pytest.raises(KeyError, match="known: train, test"):
        remote.fetch("gsm8k", "validation", cache_dir=tmp_path)
    with pytest.raises(dl.DownloadError, match="gave up after 2 attempts"):
        hub.faults[hub_path("gsm8k", "test")] = ["503", "503"]
        remote.fetch("gsm8k", "test", cache_dir=tmp_path / "c", base_url=hub.url, retries=1, **FAST)


# ---- CORE bundle ----------------------------------------------------------------------------------------------

def test_core_bundle_extracts_and_parses(hub, tmp_path):
    url = f"{hub.url}/s3/eval_bundle.zip"
    hub.faults["s3/eval_bundle.zip"] = ["truncate"]
    bundle = remote.fetch_core_bundle(tmp_path / "cache", url, **FAST)
    assert bundle == tmp_path / "cache" / "eval_bundle"
    tasks = core_eval.load_tasks(bundle)
    assert [(t.label, t.task_type, t.num_fewshot) for t in tasks] == [("copa", "multiple_choice", 0)]
    assert core_eval.load_baselines(bundle) == {"copa": 50.0}
    assert core_eval.load_items(bundle, tasks[0])[0]["gold"] == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["eval_bundle", "eval_bundle.lock",
                                                                      "eval_bundle.zip.lock"]
    assert remote.fetch_core_bundle(tmp_path / "cache", url, **FAST) == bundle
    assert hub.hits["s3/eval_bundle.zip"] == 2  # the truncated try and the resume; the second call hit the cache


def test_core_bundle_that_is_not_a_zip_fails_and_leaves_nothing(hub, tmp_path):
    with pytest.raises(dl.DownloadError, match="not a zip archive"):
        remote.fetch_core_bundle(tmp_path, f"{hub.url}/s3/not_a_zip.zip", retries=1, **FAST)
    assert hub.hits["s3/not_a_zip.zip"] == 2
    assert not (tmp_path / "eval_bundle").exists() and not list(tmp_path.glob("eval_bundle.zip*.tmp*"))


def test_cli_prefetches_with_the_endpoint_from_the_environment(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(remote.ENDPOINT_ENV, hub.url)
    remote.main(["--task", "gsm8k", "--split", "test", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "gsm8k test: 1 file(s)" in out and hub.hits[hub_path("gsm8k", "test")] == 1
    assert (tmp_path / "openai" / "gsm8k" / "main" / "test-00000-of-00001.parquet").is_file()
    with pytest.raises(SystemExit):
        remote.main(["--task", "arc_easy", "--split", "train", "--cache-dir", str(tmp_path), "--retries", "0"])
    assert "404 Not Found" in capsys.readouterr().err
