"""Real text for the tokenizer benchmarks, gathered from what every machine with this venv has on disk.

`python_source(mb)`: the CPython standard library's .py files (sorted by path), then the venv's site-packages
.py files, until `mb` megabytes -- "Python source" as in the issue's anchor numbers (50 MB, vocab 32,768).
`text_files(gb)`: for the memory test, UTF-8 text files of many kinds (.py .c .h .rst .md .txt .html .js ...)
found under the interpreter's prefix, the venv, /usr and ~/.rustup, deduplicated by content, until `gb` gigabytes.
Files that are not valid UTF-8 are skipped. Nothing here is generated or repeated.
"""

from __future__ import annotations

import hashlib
import site
import sys
import sysconfig
from pathlib import Path

TEXT_SUFFIXES = {".py", ".pyi", ".c", ".h", ".cpp", ".hpp", ".rs", ".rst", ".md", ".txt", ".html", ".js", ".ts",
                 ".css", ".json", ".toml", ".cfg", ".ini", ".sh", ".tex", ".xml", ".yaml", ".yml"}


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_utf8(p: Path) -> str | None:
    try:
        return p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def python_source(mb: float) -> list[str]:
    """Documents (one per file) of Python source totalling at least `mb` MB (or all there is)."""
    limit = int(mb * 1e6)
    roots = [_stdlib_dir()] + [Path(p) for p in site.getsitepackages()]
    docs, total, seen = [], 0, set()
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            if root == _stdlib_dir() and "site-packages" in p.parts:
                continue
            text = _read_utf8(p)
            if not text:
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if digest in seen:
                continue
            seen.add(digest)
            docs.append(text)
            total += len(text.encode())
            if total >= limit:
                return docs
    return docs


def text_files(gb: float) -> list[Path]:
    """Distinct UTF-8 text files totalling at least `gb` GB, or all that were found."""
    limit = int(gb * 1e9)
    # Interpreter and venv (Python, C headers, docs), the system's shared text, and the Rust toolchain's docs and
    # sources (present wherever bpe_rs was built: rustup installs them).
    roots = [Path(sys.base_prefix), Path(sys.prefix), Path("/usr/share"), Path("/usr/lib"), Path("/usr/include"),
             Path.home() / ".rustup"]
    out, total, seen = [], 0, set()
    for root in roots:
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.suffix not in TEXT_SUFFIXES or not p.is_file() or p.is_symlink():
                continue
            data = p.read_bytes() if p.stat().st_size < 64 << 20 else b""
            if not data:
                continue
            digest = hashlib.sha1(data).digest()
            if digest in seen:
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            seen.add(digest)
            out.append(p)
            total += len(data)
            if total >= limit:
                return out
    return out
