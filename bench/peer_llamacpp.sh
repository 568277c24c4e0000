#!/usr/bin/env bash
# llama.cpp (llama-cpp-python 0.3.8, Vulkan backend) next to visi-cli bench on the same
# decoder weights, prompt length and Vulkan adapter. See bench/README.md ("Peer: llama.cpp").
#
#   bench/peer_llamacpp.sh [--model LLAVA_DIR] [--prompt-len 640] [--decode-tokens 16]
#                          [--reps 3] [--warmup 1] [--threads 2] [--setup-only] [--build-only]
#
# --build-only stops once llama-cpp-python is built (bench/peer_gguf.sh needs no converter).
#
# Env: VISI_CLI (a built visi-cli; default: cargo build --release -p visi-cli),
#      PEER_VENV (default .venv-peer), PEER_WORK (GGUF and logs; default /tmp/peer-work),
#      TORCH_SITE (a site-packages holding torch, used only if the venv cannot get one).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=$ROOT/tests/fixtures/tiny-llava-mha
PROMPT_LEN=640
DECODE=16
REPS=3
WARMUP=1
THREADS=2
SETUP_ONLY=0
BUILD_ONLY=0
while [ $# -gt 0 ]; do
    case $1 in
        --model) MODEL=$2; shift 2 ;;
        --prompt-len) PROMPT_LEN=$2; shift 2 ;;
        --decode-tokens) DECODE=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --setup-only) SETUP_ONLY=1; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
MODEL=$(cd "$MODEL" && pwd)
VENV=${PEER_VENV:-$ROOT/.venv-peer}
WORK=${PEER_WORK:-/tmp/peer-work}
TORCH_SITE=${TORCH_SITE:-/tmp/venv-fix/lib/python3.11/site-packages}
VERSION=0.3.8 # the newest release that builds against Debian 12's Vulkan headers
mkdir -p "$WORK"

# ---- 1. Debian packages for the Vulkan backend (shader compiler, headers, loader) ----
need=()
for p in glslc glslang-tools spirv-headers libvulkan-dev cmake; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "peer: apt-get install ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi

# ---- 2. Own venv, llama-cpp-python built from its sdist with GGML_VULKAN ----
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
SDIST=$VENV/sdist/llama_cpp_python-$VERSION.tar.gz
SRC=$VENV/src/llama_cpp_python-$VERSION
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download --no-binary llama-cpp-python --no-deps \
        "llama-cpp-python==$VERSION" -d "$VENV/sdist"
fi
[ -d "$SRC" ] || { mkdir -p "$VENV/src" && tar -xzf "$SDIST" -C "$VENV/src"; }
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "peer: building llama-cpp-python $VERSION with Vulkan (long: shader generation);" \
        "log in $WORK/build.log" >&2
    CMAKE_ARGS="-DGGML_VULKAN=on" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        nice -n 10 "$PY" -m pip install -v --no-binary llama-cpp-python "$SDIST" \
        >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; exit 1; }
fi

[ $BUILD_ONLY = 1 ] && { echo "peer: llama-cpp-python $VERSION built" >&2; exit 0; }

# ---- 3. The converter that ships inside the sdist, and what it imports ----
LLAMA_CPP=$SRC/vendor/llama.cpp
if ! "$PY" -c "import numpy, sentencepiece, transformers, gguf" 2>/dev/null; then
    "$PY" -m pip install -q "numpy~=1.26.4" "sentencepiece~=0.2.0" \
        "transformers>=4.45.1,<5.0.0" "protobuf>=4.21.0,<5.0.0" "$LLAMA_CPP/gguf-py"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    # convert_hf_to_gguf.py imports torch. Its CPU wheel comes from download.pytorch.org;
    # where that is unreachable, borrow an existing torch (appended after the venv's own
    # packages, so the venv's numpy and transformers still win).
    if ! "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; then
        if [ -d "$TORCH_SITE/torch" ]; then
            SP=$("$PY" -c "import site; print(site.getsitepackages()[0])")
            echo "$TORCH_SITE" >"$SP/zz-peer-torch.pth"
        else
            # Last resort: PyPI's torch (large: it brings the CUDA libraries along).
            echo "peer: installing torch==2.5.1 from PyPI for the converter (large download)" >&2
            "$PY" -m pip install -q torch==2.5.1 ||
                { echo "peer: no torch for the converter; set TORCH_SITE" >&2; exit 1; }
        fi
    fi
fi
[ $SETUP_ONLY = 1 ] && { echo "peer: setup done" >&2; exit 0; }

# ---- 4. The same decoder weights as GGUF f16 ----
NAME=$(basename "$MODEL")
TEXT=$WORK/$NAME-text
GGUF=$WORK/$NAME-text-f16.gguf
if [ ! -f "$GGUF" ] || [ "$GGUF" -ot "$MODEL/config.json" ]; then
    "$PY" "$ROOT/bench/peer_llamacpp.py" extract "$MODEL" "$TEXT"
    "$PY" "$LLAMA_CPP/convert_hf_to_gguf.py" "$TEXT" --outtype f16 --outfile "$GGUF" \
        >"$WORK/convert.log" 2>&1 || { tail -20 "$WORK/convert.log" >&2; exit 1; }
fi

# The CLIP tower and projector as llama.cpp's mmproj GGUF, with the converter from the
# same sdist (examples/llava), for the LLaVA rows.
MMDIR=$WORK/$NAME-mm
MMPROJ=$MMDIR/mmproj-model-f16.gguf
if [ ! -f "$MMPROJ" ] || [ "$MMPROJ" -ot "$MODEL/config.json" ]; then
    "$PY" "$ROOT/bench/peer_llamacpp.py" extract-mm "$MODEL" "$MMDIR"
    "$PY" "$LLAMA_CPP/examples/llava/convert_image_encoder_to_gguf.py" -m "$MMDIR" \
        --llava-projector "$MMDIR/llava.projector" --output-dir "$MMDIR" \
        --clip-model-is-vision >"$WORK/convert-mm.log" 2>&1 || { tail -20 "$WORK/convert-mm.log" >&2; exit 1; }
fi

# ---- 5. visi on the LLaVA dir (wgpu adapter), dense and VisiPruner ----
if [ -z "${VISI_CLI:-}" ]; then
    (cd "$ROOT" && cargo build --release -p visi-cli -j 2 >&2)
    VISI_CLI=${CARGO_TARGET_DIR:-$ROOT/target}/release/visi-cli
fi
echo "peer: visi-cli bench on $MODEL" >&2
"$VISI_CLI" bench --model "$MODEL" --device gpu --skip-kernels --json \
    --prompt-len "$PROMPT_LEN" --decode-tokens "$DECODE" --reps "$REPS" --warmup "$WARMUP" \
    >"$WORK/visi.json" 2>"$WORK/visi.err" || { cat "$WORK/visi.err" >&2; exit 1; }

# ---- 6. llama.cpp: everything offloaded to Vulkan, then nothing offloaded ----
# With n_gpu_layers=0 llama.cpp still sends large batched matmuls (the 640-token prefill)
# to the Vulkan device; only its decode is then CPU-only. The label says so.
run_llama() { # NGL LABEL OUT [ENV=VALUE] [--mmproj FILE]
    echo "peer: llama.cpp n_gpu_layers=$1 ${4:-} ${6:-}" >&2
    env ${4:-} "$PY" "$ROOT/bench/peer_llamacpp.py" llama "$GGUF" --n-gpu-layers "$1" --label "$2" ${5:+"$5" "$6"} \
        --prompt-len "$PROMPT_LEN" --decode-tokens "$DECODE" --reps "$REPS" \
        --warmup "$WARMUP" --threads "$THREADS" >"$3" 2>"$3.err" || { tail -20 "$3.err" >&2; }
}
run_llama -1 "Vulkan (all layers; CLIP on Vulkan0)" "$WORK/llava-vk.json" "" --mmproj "$MMPROJ"
run_llama -1 "Vulkan (all layers)" "$WORK/llama-vk.json"
run_llama 0 "CPU layers, Vulkan for big batched matmuls" "$WORK/llama-ngl0.json"
# Pure CPU: no Vulkan driver visible to the loader, so ggml registers no Vulkan device.
run_llama 0 "CPU only (no Vulkan device)" "$WORK/llama-cpu.json" VK_ICD_FILENAMES=/nonexistent.json
VK=$(grep -h -m1 -o "ggml_vulkan: 0 = .*" "$WORK/llama-vk.json.err" | head -1 || true)

echo
echo "model $MODEL: prompt $PROMPT_LEN tokens, $DECODE greedy decode tokens, reps $REPS, warm-up $WARMUP"
echo "llama.cpp device: ${VK:-no ggml_vulkan device line found}"
"$PY" "$ROOT/bench/peer_llamacpp.py" table "$WORK/visi.json" "$WORK/llava-vk.json" "$WORK/llama-vk.json" \
    "$WORK/llama-ngl0.json" "$WORK/llama-cpu.json" --prompt-len "$PROMPT_LEN"
