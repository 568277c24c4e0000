#!/usr/bin/env python3
"""Prints the markdown results table of one `visi-cli bench --json` report (stdin or file)."""
import json
import sys

r = json.load(open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin)
m = r["methods"]
print(f"{r['model']['name']} on {r['device']['adapter']} ({r['device']['backend']}), "
      f"prompt {r['prompt']['len']} ({r['prompt']['image_tokens']} image), reps {r['reps']}, "
      f"warm-up {r['warmup']}, {r['decode_tokens']} decode tokens, schedule {json.dumps(r['schedule'])}")
print()
print("| method | layer seq lens | vision ms (med) | prefill ms (min / med) | TTFT ms (med) | decode tok/s (med) | KV MiB | realised prefill speedup | analytic FLOPs speedup | efficiency |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ["dense", "visipruner", "fastv"]:
    if name not in m:
        continue
    x = m[name]
    seq = x["layer_seq_lens"]
    runs, i = [], 0
    while i < len(seq):
        j = i
        while j < len(seq) and seq[j] == seq[i]:
            j += 1
        runs.append(f"{seq[i]}×{j - i}")
        i = j
    s = x["speedup"]
    print(f"| {name} | {' '.join(runs)} | {x['vision_ms']['median']:.0f} | "
          f"{x['prefill_ms']['min']:.0f} / {x['prefill_ms']['median']:.0f} | {x['ttft_ms']['median']:.0f} | "
          f"{x['decode_tokens_per_s']['median']:.2f} | {x['kv_bytes'] / 2**20:.1f} | "
          f"{s['realised_prefill']:.2f}× | {s['analytic_prefill']:.2f}× | {100 * s['efficiency']:.0f}% |")
k = r.get("kernel_efficiency")
if k:
    print()
    print(f"Kernels ({k['timing']}): FMA peak {k['fma_peak_gflops']:.1f} GFLOP/s, copy peak {k['copy_peak_gbps']:.1f} GB/s")
    print()
    print("| kernel | weights | M | K×N | achieved | fraction of peak |")
    print("|---|---|---|---|---|---|")
    for row in k["rows"]:
        w = row.get("weights", "f16")
        if row["m"] == 1:
            print(f"| {row.get('kernel', 'gemv')} | {w} | 1 | {row['k']}×{row['n']} | {row['gbps']:.1f} GB/s | {100 * row['frac_of_copy_peak']:.0f}% of copy |")
        else:
            print(f"| {row.get('kernel', 'gemm')} | {w} | {row['m']} | {row['k']}×{row['n']} | {row['gflops']:.1f} GFLOP/s | {100 * row['frac_of_fma_peak']:.0f}% of FMA |")
