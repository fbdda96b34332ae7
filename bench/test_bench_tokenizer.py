"""Tokenizer throughput: bpe_rs against tiktoken (encoding) and nanochat's rustbpe and HF tokenizers (training).

Both sides run in one process, on the same text, in the same session, so the ratios are comparable even though
absolute numbers depend on the machine. The text is Python source from this machine (bench/textdata.py);
FLASHCHAT_BENCH_MB sets its size (default 4 MB, about the least that holds a 32,768 vocabulary, keeps `pytest bench/` under a minute; the issue's anchor numbers use 50).

    ./run_speedrun.sh test bench/test_bench_tokenizer.py                       # quick
    FLASHCHAT_BENCH_MB=50 ./run_speedrun.sh test bench/ --benchmark-json=...   # the recorded numbers

Peak memory of each trainer is measured in a fresh subprocess (VmHWM, with the text already loaded) and
attached to the benchmark entry as extra_info. The 1 GB memory check runs only with FLASHCHAT_BENCH_GB set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bpe_rs
from bench.textdata import python_source, text_files

ROOT = Path(__file__).resolve().parent.parent
MB = float(os.environ.get("FLASHCHAT_BENCH_MB", "4"))
VOCAB = 32768
RESULTS: dict[str, float] = {}  # seconds per round, filled by the benchmarks, read by the ratio checks


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return python_source(MB)


@pytest.fixture(scope="module")
def text(docs) -> str:
    return "".join(docs)


@pytest.fixture(scope="module")
def tok(docs) -> bpe_rs.Tokenizer:
    return bpe_rs.train_from_iterator(docs, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tiktoken_enc(tok):
    return tok.to_tiktoken()


def nbytes(docs) -> int:
    return sum(len(d.encode()) for d in docs)


def record(benchmark, key: str, num_bytes: int) -> None:
    secs = benchmark.stats.stats.min
    RESULTS[key] = secs
    benchmark.extra_info["MB"] = round(num_bytes / 1e6, 2)
    benchmark.extra_info["MB_per_s"] = round(num_bytes / 1e6 / secs, 2)


# ---- encoding --------------------------------------------------------------------------------------------------

@pytest.mark.benchmark(group="encode-1-thread")
def test_encode_1thread_bpe_rs(benchmark, tok, tiktoken_enc, text):
    ids = benchmark.pedantic(tok.encode_ordinary, args=(text,), rounds=3, warmup_rounds=0)
    assert ids == tiktoken_enc.encode_ordinary(text)  # identical ids, or the speed means nothing
    record(benchmark, "encode1_ours", len(text.encode()))


@pytest.mark.benchmark(group="encode-1-thread")
def test_encode_1thread_tiktoken(benchmark, tiktoken_enc, text):
    benchmark.pedantic(tiktoken_enc.encode_ordinary, args=(text,), rounds=3, warmup_rounds=0)
    record(benchmark, "encode1_tiktoken", len(text.encode()))


@pytest.mark.benchmark(group="encode-all-threads")
def test_encode_batch_bpe_rs(benchmark, tok, tiktoken_enc, docs):
    ids = benchmark.pedantic(tok.encode_ordinary_batch, args=(docs,), rounds=3, warmup_rounds=0)
    assert ids == tiktoken_enc.encode_ordinary_batch(docs, num_threads=os.cpu_count())
    record(benchmark, "encodeN_ours", nbytes(docs))


@pytest.mark.benchmark(group="encode-all-threads")
def test_encode_batch_flat_bpe_rs(benchmark, tok, docs):
    # The same work returning flat uint32 arrays (what a shard writer wants) instead of Python lists.
    benchmark.pedantic(tok.encode_batch_flat, args=(docs,), kwargs={"disallowed_special": ()}, rounds=3, warmup_rounds=0)
    record(benchmark, "encodeN_flat_ours", nbytes(docs))


@pytest.mark.benchmark(group="encode-all-threads")
def test_encode_batch_tiktoken(benchmark, tiktoken_enc, docs):
    benchmark.pedantic(
        tiktoken_enc.encode_ordinary_batch, args=(docs,), kwargs={"num_threads": os.cpu_count()}, rounds=3,
        warmup_rounds=0,
    )
    record(benchmark, "encodeN_tiktoken", nbytes(docs))


# ---- training --------------------------------------------------------------------------------------------------

def train_bpe_rs(docs):
    return bpe_rs.train_from_iterator(docs, vocab_size=VOCAB)


def train_rustbpe(docs):
    import rustbpe

    t = rustbpe.Tokenizer()
    # rustbpe's vocab_size counts bytes + merges; nanochat adds its 9 special tokens afterwards.
    t.train_from_iterator(iter(docs), vocab_size=VOCAB - len(bpe_rs.SPECIAL_TOKENS), pattern=bpe_rs.pattern(2))
    return t


def train_hf(docs):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(bpe_rs.pattern(2)), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(bpe_rs.SPECIAL_TOKENS),
    )
    t.train_from_iterator(docs, trainer=trainer)
    return t


TRAINERS = {"bpe_rs": train_bpe_rs, "rustbpe": train_rustbpe, "hf_tokenizers": train_hf}

# Peak RSS comes from /proc/self/status VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
# through fork/exec, so a child of a big pytest process would report the parent's peak. Writing 5 to
# /proc/self/clear_refs resets VmHWM, so the peak is measured from just before training.
HWM = """
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
"""

PEAK_SCRIPT = HWM + """
import json, sys, time
sys.path.insert(0, {root!r})
from bench.textdata import python_source
from bench.test_bench_tokenizer import TRAINERS
docs = python_source({mb})
reset_hwm()
before = hwm_mb()
t0 = time.perf_counter()
TRAINERS[{name!r}](docs)
secs = time.perf_counter() - t0
print(json.dumps({{"secs": secs, "peak_mb": hwm_mb(), "before_mb": before}}))
"""


def peak_memory(name: str) -> dict:
    code = PEAK_SCRIPT.format(root=str(ROOT), mb=MB, name=name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(TRAINERS))
@pytest.mark.benchmark(group=f"train-vocab-{VOCAB}")
def test_train(benchmark, docs, name):
    # One timed round: the peak-memory subprocess below trains once more, and each run takes seconds.
    benchmark.pedantic(TRAINERS[name], args=(docs,), rounds=1, warmup_rounds=0)
    record(benchmark, f"train_{name}", nbytes(docs))
    mem = peak_memory(name)
    benchmark.extra_info["peak_rss_MB"] = round(mem["peak_mb"], 1)
    benchmark.extra_info["rss_before_training_MB"] = round(mem["before_mb"], 1)


# ---- the targets, from the numbers above (same run) ----------------------------------------------------

def ratio(slow: str, fast: str) -> float:
    if slow not in RESULTS or fast not in RESULTS:
        pytest.skip("run the whole file: the ratio needs both sides measured in this session")
    return RESULTS[slow] / RESULTS[fast]


def test_target_encode_at_least_2x_tiktoken_one_thread():
    r = ratio("encode1_tiktoken", "encode1_ours")
    print(f"encode, 1 thread: bpe_rs is {r:.2f}x tiktoken")
    assert r >= 2.0


def test_target_training_faster_than_rustbpe_and_hf():
    r1, r2 = ratio("train_rustbpe", "train_bpe_rs"), ratio("train_hf_tokenizers", "train_bpe_rs")
    print(f"training vocab {VOCAB}: bpe_rs is {r1:.2f}x rustbpe and {r2:.2f}x HF tokenizers")
    assert r1 > 1.0 and r2 > 1.0


@pytest.mark.slow
@pytest.mark.skipif("FLASHCHAT_BENCH_GB" not in os.environ, reason="set FLASHCHAT_BENCH_GB=1 for the memory check")
def test_training_peak_memory_on_1gb(tmp_path):
    """Peak RSS of training a 65,536 vocabulary from ~1 GB of distinct real text files (target: under 4 GB)."""
    files = text_files(float(os.environ["FLASHCHAT_BENCH_GB"]))
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)))
    code = HWM + (
        "import sys, time, bpe_rs\n"
        f"paths = open({str(listing)!r}).read().split('\\n')\n"
        "t = time.perf_counter(); tr = bpe_rs.Trainer()\n"
        "for p in paths: tr.feed_file(p)\n"
        "chunks, nbytes = tr.stats(); t1 = time.perf_counter() - t\n"
        "tok = tr.train(65536); t2 = time.perf_counter() - t\n"
        "print(nbytes, chunks, round(t1, 1), round(t2, 1), int(hwm_mb()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    nbytes, chunks, count_s, total_s, peak_mb = out.stdout.split()
    print(f"{int(nbytes) / 1e9:.2f} GB in {len(files)} files, {chunks} unique chunks: counted in {count_s} s, "
          f"trained in {total_s} s total, peak RSS {peak_mb} MB")
    assert int(peak_mb) < 4096
