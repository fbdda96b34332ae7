#!/usr/bin/env bash
# flashchat: the whole pipeline in one command, from an empty machine to a trained model.
#
#   ./run_speedrun.sh              set up .venv (once), then run every stage that is built so far
#   ./run_speedrun.sh test [ARGS]  set up .venv (once), then run the test suite (ARGS go to pytest)
#
# Set-up is idempotent: pinned dependencies (pyproject.toml) are installed into .venv when that file changes, and
# bpe_rs (Rust) is rebuilt when its sources change; otherwise both are reused and set-up takes a second or two.
# Outputs go under $FLASHCHAT_BASE_DIR (default ~/.cache/flashchat). A stage whose outputs exist and load is
# skipped, so re-running after a crash resumes.
#
# Environment: PYTHON (interpreter for the venv, default python3), FLASHCHAT_VENV (default ./.venv),
# FLASHCHAT_BASE_DIR, VOCAB_SIZE (tokenizer vocabulary; the cpu tier's default is 8192, small enough for its tiny
# model), BASE_STEPS (optimizer steps of the cpu tier's base pretraining, default 60).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${FLASHCHAT_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
PY="$VENV/bin/python"
export FLASHCHAT_BASE_DIR="${FLASHCHAT_BASE_DIR:-$HOME/.cache/flashchat}"
VOCAB_SIZE="${VOCAB_SIZE:-8192}"
BASE_STEPS="${BASE_STEPS:-60}"

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
}

run_tests() {
    setup_env
    log "running the test suite"
    exec "$PY" -m pytest "$@"
}

run_pipeline() {
    setup_env
    local tier=cpu
    if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
        log "a GPU is present, but the GPU tiers (d20, d26, d32) are not built yet: running the cpu tier"
    fi
    local out="$FLASHCHAT_BASE_DIR/$tier"
    mkdir -p "$out"
    log "tier $tier, outputs in $out"

    # Stage 1: tokenizer training on the offline corpus (skipped when a complete tokenizer of this size is there;
    # retraining invalidates the base run, which was trained on the old ids).
    if "$PY" -c 'import sys, bpe_rs; sys.exit(bpe_rs.Tokenizer.load(sys.argv[1]).vocab_size != int(sys.argv[2]))' \
            "$out/tokenizer" "$VOCAB_SIZE" 2>/dev/null; then
        log "stage tokenizer: done already ($out/tokenizer), skipping"
    else
        log "stage tokenizer: training a $VOCAB_SIZE-token BPE vocabulary on the offline corpus"
        rm -rf "$out/base"
        "$PY" -m train.tok_train --vocab-size "$VOCAB_SIZE" --out "$out/tokenizer"
    fi

    # Stage 2: tokenizer evaluation (bytes per token against the reference tokenizers available offline).
    log "stage tokenizer evaluation"
    "$PY" -m train.tok_eval --tokenizer "$out/tokenizer" --out "$out/tok_eval.md"

    # Stage 3: tokenize the offline corpus once into token shards (skips itself when its manifest matches).
    log "stage shards: tokenizing the offline corpus"
    "$PY" -m train.shards --tokenizer "$out/tokenizer" --out "$out/shards"

    # Stage 4: base pretraining of a tiny model (a smoke run on CPU: minutes, not a useful model yet).
    local ckpt="$out/base/checkpoints"
    if [ -f "$ckpt/step_$(printf %06d "$BASE_STEPS")/COMPLETE" ]; then
        log "stage base: done already ($ckpt), skipping"
    else
        local resume=()
        if compgen -G "$ckpt/step_*/COMPLETE" >/dev/null; then resume=(--resume); fi
        log "stage base: pretraining a depth-4 model for $BASE_STEPS steps"
        OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" "$PY" -m train.base --depth 4 --model-dim 256 --head-dim 64 \
            --max-seq-len 256 --device-batch-size 16 --total-batch-size 4096 --num-iterations "$BASE_STEPS" \
            --eval-every 20 --eval-tokens 16384 --sample-every "$BASE_STEPS" --save-every 20 \
            --data "$out/shards" --tokenizer "$out/tokenizer" --run-dir "$out/base" "${resume[@]}"
    fi

    log "done. Built so far: tokenizer training and evaluation, token shards, base pretraining (a tiny cpu-tier run)."
    log "chat with it: .venv/bin/python -m infer.cli   (a base model only continues text until SFT exists)"
    log "not built yet: mid-training, SFT, GRPO, chat evaluation, report.md, web UI and OpenAI-compatible API."
}

case "${1:-}" in
    test) shift; run_tests "$@" ;;
    "") run_pipeline ;;
    -h|--help) sed -n '2,15p' "$0" ;;
    *) die "unknown argument '$1' (usage: ./run_speedrun.sh [test [pytest args]])" ;;
esac
