#!/usr/bin/env bash
# One command for a lent GPU machine (the `device` tool runs it in the repository root): builds
# visi-cli, then prints the whole table within 10 minutes:
#   1. bench-kernels: the peaks, gemm/gemv (f16 and quantized) at the 7B shapes, attention
#      prefill 640x640 and decode over 640 / 4096 keys, each as a share of the same-run peak;
#   2. llava-7b (synthetic weights): dense and VisiPruner prefill and decode (f16 KV), then
#      dense prefill and decode with f16 and q4_k weights side by side (`--quant f16,q4_k`).
# Each step gets a share of the time left, so a slow step cannot eat the others'; the JSON
# and logs go to $OUT when the tool sets it (else ./device-out).
# Needs cargo, and a Vulkan loader with the NVIDIA ICD (see /work/.library/device/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-./device-out}"
mkdir -p "$out"
start=$(date +%s)
left() { echo $((590 - ($(date +%s) - start))); }

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found (install a Rust toolchain first)" >&2
  exit 2
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi

echo "== build ($(nproc) cores)"
timeout "$(left)" cargo build --release -q -p visi-cli || { echo "error: build failed" >&2; exit 1; }
cli=target/release/visi-cli
$cli devices || true

echo "== bench-kernels ($(left) s left)"
if timeout "$(($(left) / 3))" $cli bench-kernels >"$out/kernels.json" 2>"$out/kernels.log"; then
  python3 - "$out/kernels.json" <<'PY'
import json, sys
k = json.load(open(sys.argv[1]))
fma, copy = k["peak"]["fma_gflops"], k["peak"]["copy_gbps"]
print(f'{k["adapter"]} ({k["api"]}), {k["timing"]}: FMA peak {fma:.0f} GFLOP/s, copy peak {copy:.0f} GB/s')
for r in k["linear"]:
    if r["m"] == 1:
        print(f'  {r["kernel"]:<12} {r["weights"]:<5} M=1   {r["k"]}x{r["n"]}: {r["gbps"]:8.1f} GB/s  {100*r["frac_of_copy_peak"]:5.1f}% of copy')
    else:
        print(f'  {r["kernel"]:<12} {r["weights"]:<5} M={r["m"]} {r["k"]}x{r["n"]}: {r["gflops"]:8.1f} GFLOP/s {100*r["frac_of_fma_peak"]:5.1f}% of FMA')
for r in k.get("attention", []):
    if r["phase"] == "prefill":
        print(f'  {r["kernel"]:<12} prefill {r["queries"]}x{r["keys"]}: {r["gflops"]:8.1f} GFLOP/s {100*r["frac_of_fma_peak"]:5.1f}% of FMA')
    else:
        print(f'  {r["kernel"]:<12} decode 1x{r["keys"]}: {r["gbps"]:8.1f} GB/s  {100*r["frac_of_copy_peak"]:5.1f}% of copy')
PY
else
  tail -3 "$out/kernels.log"
fi

echo "== llava-7b: dense and VisiPruner, f16 and q4_k weights, f16 KV ($(left) s left)"
timeout "$(left)" $cli bench --shape llava-7b --reps 2 --warmup 1 --decode-tokens 16 \
  --methods dense,visipruner --quant f16,q4_k --skip-kernels --kv-dtype f16 \
  2>"$out/llava7b.log" | tee "$out/llava7b.txt" || tail -3 "$out/llava7b.log"
echo "== done in $(($(date +%s) - start)) s"
