"""train/download.py against a real HTTP server on 127.0.0.1 serving small fixture parquet shards.

The server (http.server.ThreadingHTTPServer on an ephemeral port, in a thread) counts hits per file, records
Range headers, supports Range requests (switchable), and plays scripted faults per file: drop the connection
mid-body, stall mid-body, serve a corrupt body (bad magic, or a flipped byte in the middle), answer 500; a missing
file is a 404. Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import random
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train import download as dl

FAST = dict(backoff=0.001, timeout=5.0)  # keep retries instant; tests never wait on real backoff
DS = dl.Dataset(name="fixture", base_url="http://unused.invalid", num_shards=6, subdir="base_data_fixture")

_SUBJECTS = ["The river delta", "A medieval guild", "The enzyme lactase", "Photosynthesis", "The printing press",
             "A neutron star", "The Silk Road", "Plate tectonics", "The violin", "Compound interest"]
_VERBS = ["shaped", "explains", "was studied in", "changed", "depends on", "is often confused with"]
_OBJECTS = ["the economy of coastal towns", "how cells store energy", "early modern Europe",
            "the way students learn algebra", "trade between distant cities", "the sound of an orchestra"]


def make_shard_bytes(seed: int, num_rows: int = 300) -> bytes:
    """A small parquet shard in nanochat's layout: one `text` column, zstd, several row groups."""
    rng = random.Random(seed)
    texts = [" ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
                      for _ in range(rng.randint(2, 8))) for _ in range(num_rows)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=64, compression="zstd")
    return sink.getvalue().to_pybytes()


class FakeHub:
    """Shared state of the fixture server; the test thread scripts faults and reads counters."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header) in arrival order
        self.faults: dict[str, list[str]] = defaultdict(list)  # file name -> faults for its next requests
        self.supports_range = True
        self.delay_s = 0.0
        self.stall_s = 1.0
        self.on_request = None  # optional callback(file name), called before answering

    def body(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            rng = self.headers.get("Range")
            with hub.lock:
                hub.hits[name] += 1
                hub.requests.append((name, rng))
                fault = hub.faults[name].pop(0) if hub.faults[name] else None
            if hub.on_request:
                hub.on_request(name)
            if hub.delay_s:
                time.sleep(hub.delay_s)
            if fault == "500":
                self.send_error(500, "scripted failure")
                return
            path = hub.root / name
            if not path.is_file():
                self.send_error(404)
                return
            body = path.read_bytes()
            if fault == "corrupt":  # bad magic, right length
                body = b"JUNK" + body[4:]
            elif fault == "corrupt_middle":  # magic and footer intact: only a checksum can tell
                mid = len(body) // 2
                body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1:]
            start = 0
            if rng and hub.supports_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            part = body[start:]
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if fault in ("drop", "stall"):
                self.wfile.write(part[: len(part) // 2])
                if fault == "stall":
                    time.sleep(hub.stall_s)
                self.connection.shutdown(socket.SHUT_RDWR)  # FIN after the half body: the client sees a short read
                self.close_connection = True
                return
            self.wfile.write(part)

    return Handler


@contextlib.contextmanager
def serve_in_thread(handler: type[BaseHTTPRequestHandler]):
    """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port) serving in a daemon thread; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    for i in [0, 1, 2, 3, DS.val_index]:
        (root / dl.shard_name(i)).write_bytes(make_shard_bytes(seed=i))
    hub = FakeHub(root)
    with serve_in_thread(_make_handler(hub)) as port:
        hub.url = f"http://127.0.0.1:{port}/datasets/fixture/resolve/main"
        yield hub


def _download(hub, tmp_path, indices, **kw):
    return dl.download_shards(indices, DS, base_url=hub.url, cache_dir=tmp_path / "cache", **{**FAST, **kw})


def _shard_dir(tmp_path) -> Path:
    return tmp_path / "cache" / DS.subdir


def _assert_intact(hub, path: Path):
    assert path.read_bytes() == hub.body(path.name)
    assert pq.read_table(path).column("text").length() == 300


def _leftovers(tmp_path) -> list[str]:
    return sorted(p.name for p in _shard_dir(tmp_path).glob("*.tmp.*"))


# ---------------------------------------------------------------------------------------------------------------


def test_names_indices_and_datasets():
    assert dl.shard_name(7) == "shard_00007.parquet"
    assert dl.shard_names("climbmix", 2) == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert dl.shard_indices("fineweb-edu", 1) == [0, 1822]
    assert len(dl.shard_indices(DS, -1)) == DS.num_shards  # -1: every training shard, then validation
    with pytest.raises(ValueError, match="training shards"):
        dl.shard_indices(DS, DS.num_shards)
    assert dl.DATASETS["climbmix"].subdir == "base_data_climbmix"


def test_cache_dir_precedence(tmp_path):
    env = {dl.BASE_DIR_ENV: str(tmp_path / "from_env")}
    assert dl.cache_dir(tmp_path / "arg", env) == tmp_path / "arg"  # the argument wins
    assert dl.cache_dir(None, env) == tmp_path / "from_env"
    assert dl.cache_dir(None, {}) == Path.home() / ".cache" / "flashchat"


def test_all_shards_arrive_intact(hub, tmp_path):
    indices = [0, 1, 2, 3, DS.val_index]
    paths = _download(hub, tmp_path, indices, num_workers=4)
    assert [p.name for p in paths] == [dl.shard_name(i) for i in indices]
    for p in paths:
        _assert_intact(hub, p)
    assert all(hub.hits[p.name] == 1 for p in paths)
    assert _leftovers(tmp_path) == []


def test_dropped_connection_resumes_with_range(hub, tmp_path):
    name = dl.shard_name(1)
    hub.faults[name] = ["drop"]
    (path,) = _download(hub, tmp_path, [1])
    _assert_intact(hub, path)
    ranges = [r for n, r in hub.requests if n == name]
    assert ranges == [None, f"bytes={len(hub.body(name)) // 2}-"]  # the retry continued where the drop left off


def test_dropped_connection_without_range_support_restarts(hub, tmp_path):
    hub.supports_range = False
    hub.faults[dl.shard_name(2)] = ["drop", "drop"]
    (path,) = _download(hub, tmp_path, [2])
    _assert_intact(hub, path)
    assert hub.hits[path.name] == 3


def test_stalled_read_times_out_and_retries(hub, tmp_path):
    hub.faults[dl.shard_name(0)] = ["stall"]
    (path,) = _download(hub, tmp_path, [0], timeout=0.3)
    _assert_intact(hub, path)
    assert hub.hits[path.name] == 2


def test_server_error_is_retried(hub, tmp_path):
    hub.faults[dl.shard_name(3)] = ["500", "500"]
    (path,) = _download(hub, tmp_path, [3])
    _assert_intact(hub, path)
    assert hub.hits[path.name] == 3


def test_corrupt_body_is_refetched_and_never_in_place(hub, tmp_path):
    name = dl.shard_name(2)
    final = _shard_dir(tmp_path) / name
    hub.faults[name] = ["corrupt"]
    seen_final = []
    hub.on_request = lambda n: seen_final.append(final.exists())
    (path,) = _download(hub, tmp_path, [2])
    _assert_intact(hub, path)
    assert hub.hits[name] == 2
    assert seen_final == [False, False]  # the corrupt body was never renamed into place
    assert [r for n, r in hub.requests] == [None, None]  # refetched from byte 0, not resumed from a bad partial


def test_always_corrupt_fails_and_leaves_nothing(hub, tmp_path):
    name = dl.shard_name(0)
    hub.faults[name] = ["corrupt"] * 3
    with pytest.raises(dl.DownloadError, match="corrupt download"):
        _download(hub, tmp_path, [0], retries=2)
    assert hub.hits[name] == 3
    assert not (_shard_dir(tmp_path) / name).exists()
    assert _leftovers(tmp_path) == []


def test_manifest_checksum_catches_corruption_the_magic_check_misses(hub, tmp_path):
    import hashlib

    name = dl.shard_name(1)
    body = hub.body(name)
    manifest = {name: {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}}
    hub.faults[name] = ["corrupt_middle"]
    (path,) = _download(hub, tmp_path, [1], manifest=manifest)
    _assert_intact(hub, path)
    assert hub.hits[name] == 2


def test_404_is_a_clear_error_and_not_retried(hub, tmp_path):
    missing = dl.shard_name(4)  # index in range for DS but not served
    with pytest.raises(dl.ShardNotFoundError) as info:
        _download(hub, tmp_path, [4], retries=5)
    assert f"{hub.url}/{missing}" in str(info.value) and "404" in str(info.value)
    assert hub.hits[missing] == 1
    assert sorted(p.name for p in _shard_dir(tmp_path).iterdir()) == [f"{missing}.lock"]  # no partial, no file


def test_404_does_not_stop_the_other_shards(hub, tmp_path):
    with pytest.raises(dl.DownloadError, match="1 of 2 shards failed"):
        _download(hub, tmp_path, [0, 4])
    _assert_intact(hub, _shard_dir(tmp_path) / dl.shard_name(0))


def test_resume_partial_tmp_with_range(hub, tmp_path):
    name = dl.shard_name(0)
    body = hub.body(name)
    half = len(body) // 3
    _shard_dir(tmp_path).mkdir(parents=True)
    (_shard_dir(tmp_path) / f"{name}.tmp.4242").write_bytes(body[:half])  # left by a killed process
    (path,) = _download(hub, tmp_path, [0])
    _assert_intact(hub, path)
    assert hub.requests == [(name, f"bytes={half}-")]
    assert _leftovers(tmp_path) == []


def test_resume_partial_tmp_without_range_support_restarts(hub, tmp_path):
    hub.supports_range = False
    name = dl.shard_name(0)
    body = hub.body(name)
    _shard_dir(tmp_path).mkdir(parents=True)
    (_shard_dir(tmp_path) / f"{name}.tmp.4242").write_bytes(body[:100])
    (path,) = _download(hub, tmp_path, [0])
    _assert_intact(hub, path)
    assert hub.hits[name] == 1  # the 200 answer to the Range request is taken as the whole file


def test_complete_partial_tmp_is_finished_without_refetching_the_body(hub, tmp_path):
    name = dl.shard_name(0)
    _shard_dir(tmp_path).mkdir(parents=True)
    (_shard_dir(tmp_path) / f"{name}.tmp.4242").write_bytes(hub.body(name))  # killed just before the rename
    (path,) = _download(hub, tmp_path, [0])
    _assert_intact(hub, path)
    assert hub.hits[name] == 1  # one 416 answer, no body


def test_existing_files_are_not_downloaded_again(hub, tmp_path):
    paths = _download(hub, tmp_path, [0, 1])
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert _download(hub, tmp_path, [0, 1]) == paths
    assert sum(hub.hits.values()) == 2
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


def test_truncated_existing_file_is_replaced(hub, tmp_path):
    name = dl.shard_name(0)
    _shard_dir(tmp_path).mkdir(parents=True)
    (_shard_dir(tmp_path) / name).write_bytes(hub.body(name)[:1000])  # e.g. copied in by hand, cut short
    (path,) = _download(hub, tmp_path, [0])
    _assert_intact(hub, path)
    assert hub.hits[name] == 1


def _rank_download(url: str, cache: str, barrier) -> None:
    # Runs in a spawned child: line up with the other "rank", then download the same shards.
    barrier.wait(timeout=60)
    dl.download_shards([0, 1, 2, 3], DS, base_url=url, cache_dir=cache, num_workers=4, **FAST)


@pytest.mark.dist
def test_two_processes_fetch_each_shard_once(hub, tmp_path):
    hub.delay_s = 0.3  # hold each download open long enough that the other process must wait on the lock
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_rank_download, args=(hub.url, str(tmp_path / "cache"), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    for i in range(4):
        name = dl.shard_name(i)
        assert hub.hits[name] == 1, f"{name} fetched {hub.hits[name]} times"
        _assert_intact(hub, _shard_dir(tmp_path) / name)
    assert _leftovers(tmp_path) == []


def test_main_downloads_train_and_validation_shards(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(dl.BASE_DIR_ENV, str(tmp_path / "env_base"))  # --base-dir must win over the env
    (hub.root / dl.shard_name(6542)).write_bytes(make_shard_bytes(seed=6542))
    dl.main(["--dataset", "climbmix", "-n", "2", "--workers", "2", "--base-url", hub.url,
             "--base-dir", str(tmp_path / "base")])
    out = capsys.readouterr().out
    shard_dir = tmp_path / "base" / "base_data_climbmix"
    assert sorted(p.name for p in shard_dir.glob("*.parquet")) == dl.shard_names("climbmix", 2)
    assert "[3/3]" in out and "done: 3 shards" in out
    assert not (tmp_path / "env_base").exists()
