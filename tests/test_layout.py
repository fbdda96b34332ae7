"""The repository layout and the dependency direction of DESIGN.md, checked by reading imports.

kernels <- model <- infer <- train <- rlgrpo: a package may import only the packages to its left (and bpe_rs,
which anyone may use). Only kernels/ imports triton. Nothing imports rlgrpo. Entry points do no work at import.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["kernels", "model", "infer", "train", "rlgrpo"]
TOP_LEVEL = ["kernels", "model", "infer", "train", "rlgrpo", "bpe_rs", "bench", "tests", "CMakeLists.txt",
             "pyproject.toml", "run_speedrun.sh", "README.md", ".ci/run"]


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module imported by a file (absolute imports; relative ones stay in-package)."""
    tree = ast.parse(path.read_text("utf-8"), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def package_files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_top_level_layout():
    missing = [p for p in TOP_LEVEL if not (ROOT / p).exists()]
    assert not missing, f"missing from the top level (DESIGN.md layout): {missing}"


@pytest.mark.parametrize("pkg", ORDER)
def test_dependency_direction(pkg):
    allowed = set(ORDER[: ORDER.index(pkg)]) | {pkg}
    forbidden = set(ORDER) - allowed
    bad = []
    for f in package_files(pkg):
        mods = imported_modules(f)
        for m in sorted(mods & forbidden):
            bad.append(f"{f.relative_to(ROOT)} imports {m}")
        if "triton" in mods and pkg != "kernels":
            bad.append(f"{f.relative_to(ROOT)} imports triton (only kernels/ may)")
    assert not bad, "dependency direction kernels <- model <- infer <- train <- rlgrpo broken:\n" + "\n".join(bad)


def test_bpe_rs_stands_alone():
    for f in package_files("bpe_rs"):
        mods = imported_modules(f)
        assert not mods & set(ORDER), f"{f} imports a flashchat package; bpe_rs must stand alone"


def test_checker_sees_violations(tmp_path):
    # The checker itself must catch a bad import, or the test above proves nothing.
    f = tmp_path / "bad.py"
    f.write_text("import os\nfrom train.corpus import x\nimport triton.language as tl\n")
    assert {"train", "triton"} <= imported_modules(f)


@pytest.mark.parametrize("pkg", ORDER)
def test_packages_import_without_side_effects(pkg):
    # Importing a package must do no work (no argparse, no model building): it is quick and prints nothing.
    out = subprocess.run([sys.executable, "-c", f"import {pkg}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
