#!/usr/bin/env bash
# llama.cpp's LLaVA-1.6 path (llama-cpp-python 0.3.8, built as bench/peer_llamacpp.sh builds
# it) next to visi-cli bench on the tiny LLaVA-NeXT Mistral fixture, same Vulkan adapter.
# llama.cpp runs the committed GGUF pair tests/fixtures/gguf/tiny-next-mistral (made from the
# fixture with llama.cpp's own converters; the pair equals the safetensors load in
# tests/tests/gguf_pair.rs); its clip.cpp tiles the image by the mmproj's grid pinpoints and
# adds the newline rows. visi runs the fixture directory. Both get a square image of the
# tower's size (visi: seeded synthetic pixels, llama.cpp: seeded noise), 35 prefix tokens,
# the image tokens, then suffix tokens up to --prompt-len, greedy decode.
#
#   bench/peer_next.sh [--prompt-len 640] [--decode-tokens 16] [--reps 3] [--warmup 1] [--threads 2]
#
# Env: VISI_CLI (a built visi-cli; default: cargo build --release -p visi-cli),
#      PEER_VENV (default .venv-peer), PEER_WORK (default /tmp/peer-next).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROMPT_LEN=640
DECODE=16
REPS=3
WARMUP=1
THREADS=2
while [ $# -gt 0 ]; do
    case $1 in
        --prompt-len) PROMPT_LEN=$2; shift 2 ;;
        --decode-tokens) DECODE=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
MODEL=$ROOT/tests/fixtures/tiny-next-mistral
PAIR=$ROOT/tests/fixtures/gguf/tiny-next-mistral
TEXT=$PAIR/tiny-next-mistral.f16.gguf
MMPROJ=$PAIR/mmproj-tiny-next-mistral.f16.gguf
VENV=${PEER_VENV:-$ROOT/.venv-peer}
WORK=${PEER_WORK:-/tmp/peer-next}
mkdir -p "$WORK"
PEER_VENV=$VENV "$ROOT/bench/peer_llamacpp.sh" --build-only
PY=$VENV/bin/python
SIZE=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vision_config']['image_size'])" "$MODEL/config.json")

if [ -z "${VISI_CLI:-}" ]; then
    (cd "$ROOT" && cargo build --release -p visi-cli -j 2 >&2)
    VISI_CLI=${CARGO_TARGET_DIR:-$ROOT/target}/release/visi-cli
fi
echo "peer-next: visi-cli bench on $MODEL" >&2
"$VISI_CLI" bench --model "$MODEL" --device gpu --skip-kernels --json --methods dense,visipruner \
    --prompt-len "$PROMPT_LEN" --decode-tokens "$DECODE" --reps "$REPS" --warmup "$WARMUP" \
    >"$WORK/visi.json" 2>"$WORK/visi.err" || { cat "$WORK/visi.err" >&2; exit 1; }

echo "peer-next: llama.cpp, all layers and CLIP on Vulkan" >&2
"$PY" "$ROOT/bench/peer_llamacpp.py" llama "$TEXT" --mmproj "$MMPROJ" --image-size "$SIZE" \
    --n-gpu-layers -1 --label "Vulkan (all layers; LLaVA-1.6 CLIP on Vulkan0)" \
    --prompt-len "$PROMPT_LEN" --decode-tokens "$DECODE" --reps "$REPS" --warmup "$WARMUP" \
    --threads "$THREADS" >"$WORK/llava16-vk.json" 2>"$WORK/llava16-vk.json.err" ||
    { tail -30 "$WORK/llava16-vk.json.err" >&2; }
VK=$(grep -h -m1 -o "ggml_vulkan: 0 = .*" "$WORK/llava16-vk.json.err" | head -1 || true)

echo
echo "model $MODEL (GGUF pair $PAIR for llama.cpp): prompt $PROMPT_LEN tokens, $DECODE greedy decode tokens, reps $REPS, warm-up $WARMUP"
echo "llama.cpp device: ${VK:-no ggml_vulkan device line found}"
"$PY" "$ROOT/bench/peer_llamacpp.py" table "$WORK/visi.json" "$WORK/llava16-vk.json" --prompt-len "$PROMPT_LEN"
