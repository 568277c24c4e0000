#!/usr/bin/env bash
# One command for a machine with a real GPU (the `device` tool runs it in the repository root),
# in one run of under 8 minutes (DEVICE_BUDGET seconds, default 470):
#   0. what the machine offers: nvidia-smi, the Vulkan loader and ICD files, and wgpu's adapters
#      (`visi-cli devices`); with no Vulkan driver it says so and runs what can run (wgpu's GL
#      backend if it lists an adapter, else the CPU-side steps only);
#   1. the GPU parity and batch tests (engine-wgpu) on that adapter (CI=true: a missing
#      adapter fails instead of skipping);
#   2. bench-kernels: gemm/gemv (f16 and quantized) at the 7B shapes and attention, each as a
#      share of the same-run measured peaks and of the datasheet peaks of the card (FP32 FMA
#      without tensor cores, HBM bandwidth; H100 SXM/PCIe, H200 known, else measured only);
#   3. llava-7b (synthetic weights): dense vs VisiPruner prefill and decode (f16 weights and KV).
# Each step gets a share of the time left, so a slow step cannot eat the others'; the JSON
# and logs go to $OUT when the tool sets it (else ./device-out). Checked end to end on
# lavapipe with `DEVICE_BUDGET=300 bench/device.sh` (every step starts; the slow ones time out
# and say so).
# Needs cargo, and a Vulkan loader with the NVIDIA ICD (see /work/.library/device/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-./device-out}"
mkdir -p "$out"
budget="${DEVICE_BUDGET:-470}"
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
# A share of the time left for one step (at least 10 s).
share() { local s=$(($(left) / $1)); [ "$s" -lt 10 ] && s=10; echo "$s"; }

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found (install a Rust toolchain first)" >&2
  exit 2
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export VK_ICD_FILENAMES="$VK_DRIVER_FILES"
fi

echo "== machine ($(nproc) cores, budget ${budget} s)"
gpu_name=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
else
  echo "nvidia-smi: not found"
fi
vk_loader=no
ldconfig -p 2>/dev/null | grep 'libvulkan.so.1' >/dev/null && vk_loader=yes
icds=""
for f in ${VK_DRIVER_FILES:-} ${VK_ICD_FILENAMES:-} /usr/share/vulkan/icd.d/*.json \
  /etc/vulkan/icd.d/*.json /usr/local/nvidia/share/vulkan/icd.d/*.json; do
  [ -f "$f" ] && case " $icds " in *" $f "*) ;; *) icds="$icds $f" ;; esac
done
echo "Vulkan loader (libvulkan.so.1): $vk_loader; ICD files:${icds:- none}"
vulkan=no
[ "$vk_loader" = yes ] && [ -n "$icds" ] && vulkan=yes

echo "== build ($(left) s left)"
timeout "$(left)" cargo build --release -q -p visi-cli || { echo "error: build failed" >&2; exit 1; }
cli=target/release/visi-cli
if [ "$vulkan" = yes ]; then
  export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
else
  echo "no Vulkan driver: trying wgpu's GL backend (EGL)"
  export WGPU_BACKEND="${WGPU_BACKEND:-gl}"
fi
$cli devices | tee "$out/devices.txt" || true
if ! grep -q '^[0-9]' "$out/devices.txt"; then
  echo "no wgpu adapter on this machine: nothing below can run on a GPU; stopping here"
  exit 0
fi
adapter=$($cli devices 2>/dev/null | awk '/^[0-9]/ { print; exit }')
echo "adapter --device gpu takes: $adapter"

echo "== GPU parity and batch tests ($(left) s left)"
CI=true timeout "$(share 3)" cargo test --release -q -p engine-wgpu --test parity --test batch \
  >"$out/tests.log" 2>&1
rc=$?
grep -E '^test result|adapter|panicked|FAILED' "$out/tests.log" | head -n 20
[ "$rc" = 124 ] && echo "tests: timed out (budget share spent)"
[ "$rc" != 0 ] && [ "$rc" != 124 ] && echo "tests: FAILED (exit $rc, $out/tests.log)"

# Datasheet peaks (FP32 FMA without tensor cores, TFLOP/s; memory TB/s), by the card's name.
peaks=""
case "$gpu_name $adapter" in
  *H200*) peaks="67 4.8" ;;
  *"H100 PCIe"* | *"H100-PCIE"*) peaks="51 2.0" ;;
  *H100*) peaks="67 3.35" ;;
esac
[ -n "$peaks" ] && echo "datasheet peaks of $gpu_name: $peaks (FP32 TFLOP/s, TB/s)"

echo "== bench-kernels ($(left) s left)"
if timeout "$(share 2)" $cli bench-kernels >"$out/kernels.json" 2>"$out/kernels.log"; then
  python3 - "$out/kernels.json" $peaks <<'PY'
import json, sys
k = json.load(open(sys.argv[1]))
ds = [float(x) for x in sys.argv[2:4]] if len(sys.argv) >= 4 else None
fma, copy = k["peak"]["fma_gflops"], k["peak"]["copy_gbps"]
print(f'{k["adapter"]} ({k["api"]}), {k["timing"]}: FMA peak {fma:.0f} GFLOP/s, copy peak {copy:.0f} GB/s')
if ds:
    print(f'  measured peaks: {100*fma/(ds[0]*1e3):.1f}% of the datasheet FP32 FMA, {100*copy/(ds[1]*1e3):.1f}% of its bandwidth')
def dsf(g):  # share of the datasheet FLOP/s
    return f'  {100*g/(ds[0]*1e3):5.1f}% of datasheet' if ds else ''
def dsb(b):
    return f'  {100*b/(ds[1]*1e3):5.1f}% of datasheet' if ds else ''
for r in k["linear"]:
    if r["m"] == 1:
        print(f'  {r["kernel"]:<12} {r["weights"]:<5} M=1   {r["k"]}x{r["n"]}: {r["gbps"]:8.1f} GB/s  {100*r["frac_of_copy_peak"]:5.1f}% of copy{dsb(r["gbps"])}')
    else:
        print(f'  {r["kernel"]:<12} {r["weights"]:<5} M={r["m"]} {r["k"]}x{r["n"]}: {r["gflops"]:8.1f} GFLOP/s {100*r["frac_of_fma_peak"]:5.1f}% of FMA{dsf(r["gflops"])}')
for r in k.get("attention", []):
    if r["phase"] == "prefill":
        print(f'  {r["kernel"]:<12} prefill {r["queries"]}x{r["keys"]}: {r["gflops"]:8.1f} GFLOP/s {100*r["frac_of_fma_peak"]:5.1f}% of FMA{dsf(r["gflops"])}')
    else:
        print(f'  {r["kernel"]:<12} decode 1x{r["keys"]}: {r["gbps"]:8.1f} GB/s  {100*r["frac_of_copy_peak"]:5.1f}% of copy{dsb(r["gbps"])}')
PY
else
  echo "bench-kernels: failed or timed out"; tail -3 "$out/kernels.log"
fi

echo "== llava-7b: dense vs VisiPruner, f16 weights and KV ($(left) s left)"
timeout "$(share 1)" $cli bench --device gpu --shape llava-7b --reps 1 --warmup 1 --decode-tokens 16 \
  --methods dense,visipruner --skip-kernels --kv-dtype f16 --json \
  >"$out/llava7b.json" 2>"$out/llava7b.log"
rc=$?
if [ "$rc" = 0 ]; then
  python3 - "$out/llava7b.json" $peaks <<'PY' || head -c 2000 "$out/llava7b.json"
import json, sys
b = json.load(open(sys.argv[1]))
ds = [float(x) for x in sys.argv[2:4]] if len(sys.argv) >= 4 else None
wb = (b.get("memory") or {}).get("weight_bytes") or 0
for name, r in b["methods"].items():
    ttft = r["ttft_ms"]["min"] / 1e3
    tf = r["flops"]["ttft"] / ttft / 1e12
    tps = r["decode_tokens_per_s"]["best"]
    line = (f'  {name:<11} TTFT {ttft:7.3f} s ({tf:6.2f} TFLOP/s), decode {tps:7.2f} tok/s, '
            f'realised prefill speedup {r["speedup"]["realised_prefill"]:.2f}x '
            f'(analytic {r["speedup"]["analytic_prefill"]:.2f}x)')
    if ds:
        line += f'; {100*tf/ds[0]:.1f}% of datasheet FP32'
        if wb:
            line += f', decode {100*wb*tps/(ds[1]*1e12):.1f}% of datasheet bandwidth (weights per token)'
    print(line)
PY
else
  [ "$rc" = 124 ] && echo "llava-7b: timed out (budget share spent)"
  tail -3 "$out/llava7b.log"
fi
echo "== done in $(($(date +%s) - start)) s"
