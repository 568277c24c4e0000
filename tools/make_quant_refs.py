#!/usr/bin/env python3
"""Reference vectors for engine-core's GGUF block dequantisers and quantizers.

The reference is the `gguf` Python package (llama.cpp's gguf-py), not visi:
  pip install gguf==0.19.0 numpy
  python tools/make_quant_refs.py > engine-core/tests/data/quant_refs.json
Random (seeded) block bytes with finite f16 scales go through gguf.quants.dequantize; random
f32 rows go through gguf.quants.quantize for the formats gguf-py can quantize.
"""
import json

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

rng = np.random.default_rng(7)
BLOCK = {T.Q8_0: (32, 34), T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q4_K: (256, 144)}
NAMES = {T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q4_K: "q4_k"}


def f16_bytes(n, lo, hi):
    return np.float16(rng.uniform(lo, hi, n)).tobytes()


def random_blocks(t, nblocks):
    size, nbytes = BLOCK[t]
    out = bytearray()
    for _ in range(nblocks):
        raw = bytearray(rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
        # Scales (and Q4_1's min, Q4_K's dmin) as sane f16 values; the rest random bits.
        nscales = 2 if t in (T.Q4_1, T.Q4_K) else 1
        raw[: 2 * nscales] = f16_bytes(nscales, -0.1, 0.1)
        out += raw
    return bytes(out)


cases = []
for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K):
    size, nbytes = BLOCK[t]
    nblocks = 6 if size == 32 else 2
    data = random_blocks(t, nblocks)
    arr = np.frombuffer(data, dtype=np.uint8).reshape(1, -1)
    deq = quants.dequantize(arr, t).reshape(-1).astype(np.float32)
    case = {
        "type": NAMES[t],
        "blocks_hex": data.hex(),
        "dequantized": [float(v) for v in deq],
    }
    if t != T.Q4_K:
        x = rng.normal(0, 1, size * 4).astype(np.float32)
        x[5] = 0.0
        q = quants.quantize(x.reshape(1, -1), t)
        case["quantize_input"] = [float(v) for v in x]
        case["quantize_hex"] = q.tobytes().hex()
    cases.append(case)

print(json.dumps({"generator": "tools/make_quant_refs.py (gguf-py 0.19.0)", "cases": cases}))
