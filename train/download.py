"""Download nanochat's pretraining corpus: parquet shards `shard_00000.parquet` ... served under a base URL.

    python -m train.download --dataset climbmix -n 8 [--workers 8]

fetches training shards 0..7 plus the validation shard (always the dataset's last shard) into
`<base dir>/<dataset subdir>/`, where the base dir is --base-dir, else $FLASHCHAT_BASE_DIR, else ~/.cache/flashchat.

How a shard gets to disk, and why:
  - Parallel: a thread pool; downloads are network-bound, so threads (not processes) are enough.
  - Retried with exponential backoff and jitter (so many ranks/threads do not retry in lockstep) on connection
    errors, timeouts, 408/429/5xx and truncated bodies (fewer bytes than Content-Length / Content-Range said).
    A 404 is not retried: it raises ShardNotFoundError naming the URL. Other 4xx fail at once too.
  - Resumable: bytes go to `<name>.tmp.<pid>`; a dropped connection, or a partial left by a killed process, is
    continued with an HTTP Range request when the server answers 206, else restarted from byte 0.
  - Verified before it is renamed into place: 'PAR1' magic at both ends, a parquet footer pyarrow can read and,
    when a manifest of expected sizes/sha256 is given, those. A corrupt body is deleted and refetched; the final
    path only ever holds a verified file (fsync, then an atomic os.replace, then fsync of the directory).
  - Skipped when present: a file at the final path with the right magic (and manifest size) is not refetched.
    Only files this module verified get there, so the fast path does not re-hash 100 MB per shard.
  - Locked: an fcntl lock file per shard (`<name>.lock` beside it), so concurrent ranks on one machine download
    each shard once; the others block on the lock and then find the finished file.

Limits: the lock is fcntl.flock, so it is per machine and POSIX only; on NFS-like shared filesystems flock may not
exclude other hosts (give each node its own cache dir there). Lock files are left behind on purpose (unlinking one
while another process waits on it would let two processes hold "the" lock). A resumed partial is not checked
against the server's ETag; a changed remote file is caught only by the parquet check or the manifest. Without a
manifest, a body that is a readable parquet file with wrong data pages in the middle is not detected. No
manifest for the real datasets ships here (Hugging Face's tree API lists sha256 per file; not wired up yet).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from model.fsutil import fsync_path


@dataclass(frozen=True)
class Dataset:
    name: str
    base_url: str  # shard i lives at f"{base_url}/{shard_name(i)}"
    num_shards: int  # indices 0..num_shards-1; the last one is the validation split, the rest are training
    subdir: str  # directory under the base cache dir (nanochat's names, so the two trees look alike)

    @property
    def val_index(self) -> int:
        return self.num_shards - 1


# Facts from nanochat (shared/reference/nanochat.md §2 and §6; v0's nanochat/dataset.py): both are Karpathy's
# re-packs into parquet shards of >=250M characters, one `text` column, zstd, row groups of 1,024 documents.
# ClimbMix: 6,543 shards (0..6542, ~100 MB each), nanochat's default since Mar 2026. FineWeb-EDU-100B: the v0
# dataset, 1,823 shards (MAX_SHARD = 1822 in v0's dataset.py). Uncertain: the shard counts are the repos' state
# when nanochat pinned them (a re-upload could change them; a 404 on the last index would say so), and the
# FineWeb-EDU subdir `base_data` is v0's name (HEAD only reads it as a legacy fallback).
DATASETS: dict[str, Dataset] = {
    "climbmix": Dataset(
        name="climbmix",
        base_url="https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
        num_shards=6543,
        subdir="base_data_climbmix",
    ),
    "fineweb-edu": Dataset(
        name="fineweb-edu",
        base_url="https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        num_shards=1823,
        subdir="base_data",
    ),
}

BASE_DIR_ENV = "FLASHCHAT_BASE_DIR"
CHUNK_BYTES = 1 << 20  # read/write granularity; also how much progress a dropped connection can lose at most
MAGIC = b"PAR1"  # a parquet file starts with it and ends with <4-byte footer length> + it
MAX_BACKOFF_S = 60.0


class DownloadError(RuntimeError):
    """A shard could not be downloaded (after retries, or at once for a non-retryable answer)."""


class ShardNotFoundError(DownloadError):
    """The server answered 404 for a shard URL: wrong dataset, base URL or index. Never retried."""


class _Transient(Exception):
    """Worth retrying: network error, timeout, 408/429/5xx, truncated body. The partial .tmp is kept to resume."""


class _Corrupt(Exception):
    """The whole body arrived but is not the expected file: delete it and refetch from byte 0."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def _as_dataset(dataset: str | Dataset) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    return DATASETS[dataset]


def shard_indices(dataset: str | Dataset, num_shards: int) -> list[int]:
    """Training shards 0..num_shards-1 (all of them if num_shards < 0) followed by the validation shard."""
    ds = _as_dataset(dataset)
    num_train = ds.num_shards - 1
    if num_shards > num_train:
        raise ValueError(f"{ds.name} has {num_train} training shards; asked for {num_shards}")
    n = num_train if num_shards < 0 else num_shards
    return list(range(n)) + [ds.val_index]


def shard_names(dataset: str | Dataset, num_shards: int) -> list[str]:
    """File names of shard_indices(dataset, num_shards): the first training shards, then the validation shard."""
    return [shard_name(i) for i in shard_indices(dataset, num_shards)]


def cache_dir(base_dir: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The one flashchat base directory: base_dir if given, else $FLASHCHAT_BASE_DIR, else ~/.cache/flashchat.

    This is the only place the environment is consulted; entry points pass os.environ explicitly, and
    environ=None means os.environ (so a library call with no directory behaves like the CLI)."""
    if base_dir is not None:
        return Path(base_dir).expanduser()
    env = os.environ if environ is None else environ
    if env.get(BASE_DIR_ENV):
        return Path(env[BASE_DIR_ENV]).expanduser()
    return Path.home() / ".cache" / "flashchat"


_resolve_cache_dir = cache_dir  # download_shards has a parameter named cache_dir that shadows the function


# ---------------------------------------------------------------------------------------------------------------
# Checks


def looks_complete(path: Path, expected_size: int | None = None) -> bool:
    """Cheap completeness check (no hashing, no parquet parse): size, 'PAR1' at both ends, a footer that fits."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < 12 or (expected_size is not None and size != expected_size):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
    footer_len = int.from_bytes(tail[:4], "little")
    return head == MAGIC and tail[4:] == MAGIC and footer_len <= size - 12


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def verify_shard(path: Path, expected: Mapping | None = None) -> str | None:
    """None if `path` is a complete parquet file (and matches expected {size, sha256} if given), else why not."""
    expected = expected or {}
    size = path.stat().st_size
    if expected.get("size") is not None and size != expected["size"]:
        return f"size {size} != expected {expected['size']}"
    if not looks_complete(path):
        return "not a complete parquet file (no 'PAR1' magic at both ends)"
    import pyarrow.parquet as pq  # here, not at module top: pyarrow costs ~0.2 s to import

    try:
        pq.read_metadata(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for a bad footer
        return f"unreadable parquet footer: {e}"
    if expected.get("sha256") and (digest := _sha256(path)) != expected["sha256"].lower():
        return f"sha256 {digest} != expected {expected['sha256']}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# One shard


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel when the process dies, so a crashed rank never wedges the others.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _claim_partial(final: Path) -> Path:
    """Our tmp path, seeded with the largest stale partial of this shard if there is one.

    Called with the shard's lock held, so every existing `<name>.tmp.*` is stale (from a killed process, or an
    earlier call of ours that gave up) and safe to take over."""
    tmp = final.with_name(f"{final.name}.tmp.{os.getpid()}")
    stale = sorted(final.parent.glob(f"{final.name}.tmp.*"), key=lambda p: p.stat().st_size, reverse=True)
    for i, p in enumerate(stale):
        if i == 0 and p != tmp:
            os.replace(p, tmp)
        elif i > 0:
            p.unlink(missing_ok=True)
    return tmp


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _fetch_into(url: str, tmp: Path, timeout: float) -> None:
    """One HTTP request: append to (206) or rewrite (200) `tmp`, fsync it; raise _Transient on a partial."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "flashchat-download/1"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")  # kept across redirects (HF resolve/ redirects to a CDN)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        content_range = e.headers.get("Content-Range", "") if e.headers else ""
        e.close()
        if e.code == 404:
            raise ShardNotFoundError(
                f"404 Not Found: {url} (no such file; check the dataset, base URL and index)") from None
        if e.code == 416 and offset:
            if content_range == f"bytes */{offset}":
                return  # the partial already holds the whole file (killed between the last write and the rename)
            tmp.unlink(missing_ok=True)
            raise _Transient(f"HTTP 416 for a {offset}-byte partial; restarting from byte 0") from None
        if e.code >= 500 or e.code in (408, 429):
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"HTTP {e.code} {e.reason}: {url}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, DNS, timeout
        raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    with resp:
        total = None  # the full file size, when the server says it
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != offset:
                tmp.unlink(missing_ok=True)
                raise _Transient(f"unusable Content-Range {resp.headers.get('Content-Range')!r}; restarting")
            total = None if m[3] == "*" else int(m[3])
            mode = "ab"
        else:  # 200: we sent no Range, or the server ignored it and sends the whole file: start over
            offset, mode = 0, "wb"
            if (length := resp.headers.get("Content-Length")) is not None:
                total = int(length)
        written = offset
        with open(tmp, mode) as f:
            while True:
                try:
                    block = resp.read(CHUNK_BYTES)
                except (http.client.HTTPException, OSError) as e:  # reset or timeout mid-body; bytes so far stay
                    raise _Transient(f"connection lost after {written} bytes: {type(e).__name__}: {e}") from None
                if not block:
                    break
                f.write(block)  # disk errors here are not network errors: they propagate, unretried
                written += len(block)
            f.flush()
            os.fsync(f.fileno())
    # http.client's read(n) returns b"" on an early EOF instead of raising, so a short body is caught here.
    if total is not None and written != total:
        raise _Transient(f"truncated body: {written} of {total} bytes")


def _backoff_s(attempt: int, base_s: float) -> float:
    # Exponential, capped, with "equal jitter" (uniform in [d/2, d]): threads and ranks that failed together
    # (a CDN hiccup) spread out instead of retrying in lockstep.
    d = min(MAX_BACKOFF_S, base_s * 2**attempt)
    return random.uniform(d / 2, d)


def _download_one(url: str, final: Path, *, expected: Mapping | None, retries: int, backoff: float,
                  timeout: float, log: Callable[[str], None], verify: Callable[[Path], str | None] | None = None,
                  is_present: Callable[[Path], bool] | None = None) -> int:
    """Make `final` a verified copy of `url`. Returns the bytes fetched by this call (0 if already present).

    verify(tmp) -> a problem or None, is_present(final) -> bool: the file-type checks, parquet's by default
    (verify_shard against `expected`, looks_complete); other downloaders (a zip) pass their own."""
    expected_size = (expected or {}).get("size")
    verify = verify or (lambda p: verify_shard(p, expected))
    is_present = is_present or (lambda p: looks_complete(p, expected_size))
    if is_present(final):
        return 0  # fast path without the lock: os.replace is atomic, so a present file is a finished one
    with _file_lock(final.with_name(final.name + ".lock")):
        if is_present(final):
            return 0  # another process finished it while we waited for the lock
        tmp = _claim_partial(final)
        for attempt in range(retries + 1):
            try:
                _fetch_into(url, tmp, timeout)
                if problem := verify(tmp):
                    raise _Corrupt(problem)
                size = tmp.stat().st_size
                os.replace(tmp, final)
                fsync_path(final.parent)  # make the rename itself durable
                return size
            except _Corrupt as e:
                tmp.unlink(missing_ok=True)  # never resume from (or rename) a bad body
                reason = f"corrupt download: {e}"
            except _Transient as e:
                reason = str(e)
            if attempt == retries:
                raise DownloadError(f"{url}: gave up after {retries + 1} attempts; last error: {reason}")
            delay = _backoff_s(attempt, backoff)
            log(f"  retry {attempt + 1}/{retries} {final.name} in {delay:.1f}s: {reason}")
            time.sleep(delay)
    raise AssertionError("unreachable")



# ---------------------------------------------------------------------------------------------------------------
# Many shards


def download_shards(indices: Iterable[int], dataset: str | Dataset = "climbmix", *, base_url: str | None = None,
                    cache_dir: str | os.PathLike | None = None, num_workers: int = 8, retries: int = 5,
                    backoff: float = 1.0, timeout: float = 30.0, manifest: Mapping[str, Mapping] | None = None,
                    log: Callable[[str], None] | None = None) -> list[Path]:
    """Download shards `indices` of `dataset` into `<cache_dir>/<dataset.subdir>/`; return their paths in order.

    base_url: overrides the dataset's (a mirror, or a test server). cache_dir: the flashchat base dir
    (None: cache_dir()). retries: extra attempts per shard after the first. backoff: base delay in seconds,
    doubled per retry, jittered. timeout: seconds a connect or a read may stall. manifest: {file name:
    {"size": int, "sha256": hex}} (either key optional) to verify against. log: progress lines (None: silent).
    Raises DownloadError (ShardNotFoundError for a 404) listing every shard that failed, after the others finish.
    """
    ds = _as_dataset(dataset)
    indices = list(indices)
    if bad := [i for i in indices if not 0 <= i < ds.num_shards]:
        raise ValueError(f"shard indices {bad} out of range: {ds.name} has {ds.num_shards} shards (0..{ds.val_index})")
    log = log or (lambda _msg: None)
    root = (base_url or ds.base_url).rstrip("/")
    shard_dir = _resolve_cache_dir(cache_dir) / ds.subdir
    shard_dir.mkdir(parents=True, exist_ok=True)
    paths = {i: shard_dir / shard_name(i) for i in indices}
    unique = list(dict.fromkeys(indices))

    t0 = time.perf_counter()
    failures: list[DownloadError] = []
    with ThreadPoolExecutor(max_workers=max(1, min(num_workers, len(unique) or 1))) as pool:
        futures = {
            pool.submit(_download_one, f"{root}/{shard_name(i)}", paths[i],
                        expected=(manifest or {}).get(shard_name(i)), retries=retries, backoff=backoff,
                        timeout=timeout, log=log): i
            for i in unique
        }
        for done, fut in enumerate(as_completed(futures), 1):
            name = shard_name(futures[fut])
            try:
                nbytes = fut.result()
            except DownloadError as e:
                failures.append(e)
                log(f"[{done}/{len(unique)}] {name} FAILED: {e}")
                continue
            elapsed = time.perf_counter() - t0
            status = "already present" if nbytes == 0 else f"{nbytes / 1e6:.1f} MB"
            log(f"[{done}/{len(unique)}] {name} {status} ({elapsed:.1f}s elapsed)")
    if failures:
        kind = ShardNotFoundError if all(isinstance(e, ShardNotFoundError) for e in failures) else DownloadError
        msg = f"{len(failures)} of {len(unique)} shards failed:\n" + "\n".join(f"  {e}" for e in failures)
        raise kind(msg) from failures[0]
    return [paths[i] for i in indices]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Download pretraining parquet shards (+ the validation shard).")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="climbmix")
    p.add_argument("-n", "--num-shards", type=int, default=8,
                   help="training shards 0..n-1 to fetch, -1 for all; the validation shard is always added")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (threads)")
    p.add_argument("--retries", type=int, default=5, help="extra attempts per shard after the first")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a connect or read may stall")
    p.add_argument("--base-dir", help=f"flashchat base dir (default ${BASE_DIR_ENV} or ~/.cache/flashchat)")
    p.add_argument("--base-url", help="override the dataset's base URL (a mirror)")
    p.add_argument("--manifest", help='JSON file {"shard_00000.parquet": {"size": bytes, "sha256": hex}, ...}')
    args = p.parse_args(argv)

    base = cache_dir(args.base_dir, os.environ)
    ds = DATASETS[args.dataset]
    manifest = json.loads(Path(args.manifest).read_text()) if args.manifest else None
    indices = shard_indices(ds, args.num_shards)
    print(f"{ds.name}: {len(indices)} shards ({len(indices) - 1} train + validation {shard_name(ds.val_index)}) "
          f"-> {base / ds.subdir}", flush=True)
    t0 = time.perf_counter()
    try:
        paths = download_shards(indices, ds, base_url=args.base_url, cache_dir=base, num_workers=args.workers,
                                retries=args.retries, timeout=args.timeout, manifest=manifest,
                                log=lambda msg: print(msg, flush=True))
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    total = sum(p.stat().st_size for p in paths)
    print(f"done: {len(paths)} shards, {total / 1e9:.2f} GB on disk, {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
