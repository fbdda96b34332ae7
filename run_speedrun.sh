#!/usr/bin/env bash
# flashchat: the whole pipeline in one command, from an empty machine to a trained model.
#
#   ./run_speedrun.sh [ARGS]       set up .venv (once), then run every pipeline stage (train/speedrun.py; ARGS:
#                                  --tier cpu|d20|d26|d32, --depth N, --gpus N, --from STAGE, --dry-run, --no-rl)
#   ./run_speedrun.sh test [ARGS]  set up .venv (once), then run the test suite (ARGS go to pytest)
#
# Set-up is idempotent: pinned dependencies (pyproject.toml) are installed into .venv when that file changes, and
# bpe_rs (Rust) is rebuilt when its sources change; otherwise both are reused and set-up takes a second or two.
# Outputs go under $FLASHCHAT_BASE_DIR (default ~/.cache/flashchat). A stage whose outputs exist and load is
# skipped, so re-running after a crash resumes.
#
# Environment: PYTHON (interpreter for the venv, default python3), FLASHCHAT_VENV (default ./.venv),
# FLASHCHAT_BASE_DIR (outputs: <base dir>/<tier>/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${FLASHCHAT_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
PY="$VENV/bin/python"
export FLASHCHAT_BASE_DIR="${FLASHCHAT_BASE_DIR:-$HOME/.cache/flashchat}"

log() { printf '[speedrun %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
hash_files() { sha256sum "$@" | sha256sum | cut -c1-16; }

# Requirement lines of pyproject.toml: [project] dependencies when no group is named, else those groups.
read_requirements() {
    "$PY" - pyproject.toml "$@" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
groups = sys.argv[2:]
reqs = [r for g in groups for r in project["optional-dependencies"][g]]
if "nodeps" not in groups:
    reqs = project["dependencies"] + reqs
print("\n".join(reqs))
PY
}

setup_env() {
    command -v "$PYTHON_BIN" >/dev/null || die "$PYTHON_BIN not found: install Python 3.11 or newer"
    if [ ! -x "$PY" ]; then
        log "creating the virtual environment $VENV"
        "$PYTHON_BIN" -m venv "$VENV"
    fi
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ is needed; $PY is $("$PY" --version)"

    local deps_hash
    deps_hash=$(hash_files pyproject.toml)
    if [ ! -f "$VENV/.flashchat-deps-$deps_hash" ]; then
        log "installing the pinned dependencies of pyproject.toml into $VENV"
        local reqs nodeps
        mapfile -t reqs < <(read_requirements corpus evaldata build test)
        mapfile -t nodeps < <(read_requirements nodeps)
        "$PY" -m pip install --disable-pip-version-check -q "${reqs[@]}"
        "$PY" -m pip install --disable-pip-version-check -q --no-deps "${nodeps[@]}"
        rm -f "$VENV"/.flashchat-deps-*
        touch "$VENV/.flashchat-deps-$deps_hash"
    fi

    local src_hash
    src_hash=$(cd bpe_rs && hash_files Cargo.toml Cargo.lock pyproject.toml $(find src python -type f -not -name '*.pyc' | sort))
    if [ ! -f "$VENV/.flashchat-bpe_rs-$src_hash" ] || ! "$PY" -c 'import bpe_rs._native' 2>/dev/null; then
        command -v cargo >/dev/null || die "cargo not found: bpe_rs is a Rust crate, install a Rust toolchain first"
        log "building bpe_rs (Rust, release) and installing its wheel"
        rm -rf bpe_rs/dist
        "$VENV/bin/maturin" build --release --quiet -m bpe_rs/Cargo.toml -i "$PY" -o bpe_rs/dist
        "$PY" -m pip install --disable-pip-version-check -q --force-reinstall --no-deps bpe_rs/dist/bpe_rs-*.whl
        rm -f "$VENV"/.flashchat-bpe_rs-*
        touch "$VENV/.flashchat-bpe_rs-$src_hash"
    fi
    mkdir -p build
    build_native
}

build_native() {
    # CMakeLists.txt's native pieces that are not Python packages: the tool sandbox's seccomp launcher
    # (infer/sandbox.py uses it when present). cmake comes from PyPI into the venv; rebuilt when its sources change.
    local native_hash
    native_hash=$(hash_files CMakeLists.txt native/*.c)
    if [ ! -f "build/.flashchat-native-$native_hash" ] || [ ! -x build/native/fc_seccomp_exec ]; then
        log "building the native pieces (cmake: the sandbox's seccomp launcher)"
        if "$VENV/bin/cmake" -S . -B build -DFLASHCHAT_PYTHON="$PY" >build/cmake.log 2>&1 \
                && "$VENV/bin/cmake" --build build --target fc_seccomp_exec >>build/cmake.log 2>&1; then
            rm -f build/.flashchat-native-*
            touch "build/.flashchat-native-$native_hash"
        else
            log "warning: the native build failed (see build/cmake.log): the tool sandbox runs without seccomp"
        fi
    fi
}

run_tests() {
    setup_env
    log "running the test suite"
    exec "$PY" -m pytest "$@"
}

run_pipeline() {
    setup_env
    # The stages, their skip/resume logic, tiers and the report live in train/speedrun.py (testable Python).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
    exec "$PY" -m train.speedrun "$@"
}

case "${1:-}" in
    test) shift; run_tests "$@" ;;
    -h|--help) sed -n '2,16p' "$0" ;;
    *) run_pipeline "$@" ;;
esac
