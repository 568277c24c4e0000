#!/usr/bin/env python3
"""Regenerates tests/fixtures/ops/: torch reference values for every backend op.

Needs torch 2.5.1, transformers 4.46.3, numpy and safetensors (CI never runs this; the
outputs are committed). Run from the repository root:

    /tmp/venv-fix/bin/python tools/gen_op_refs.py

Each op family gets one `<family>.safetensors` holding, per case, tensors named
`<case>.<role>` (inputs and expected outputs) and a metadata entry `<case>` whose value is
a JSON object of the case's scalar parameters. Inputs are small, seeded and random;
outputs come from torch's own functions (F.linear, F.gelu, F.layer_norm, F.softmax,
F.conv2d, F.embedding, transformers' LlamaRMSNorm / LlamaRotaryEmbedding /
apply_rotary_pos_emb) computed in float64 where the op accumulates, so the references
carry no f32 summation error of their own. The VisiPruner masks are written here from
shared/docs/visipruner.md (zeroing on torch's softmax output), not from the Rust code.

Dtypes on disk: F32, F16, U32; `*.bf16bits` tensors hold raw bfloat16 bits as U16.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "ops")


class Family:
    """Collects the tensors and per-case parameters of one fixture file."""

    def __init__(self, name):
        self.name = name
        self.tensors = {}
        self.meta = {}

    def case(self, case, params=None, **tensors):
        assert case not in self.meta, case
        self.meta[case] = json.dumps(params or {}, sort_keys=True)
        for role, t in tensors.items():
            self.tensors[f"{case}.{role}"] = to_np(t)

    def save(self):
        path = os.path.join(OUT, f"{self.name}.safetensors")
        save_file(self.tensors, path, metadata=self.meta)
        print(f"{path}: {len(self.meta)} cases, {os.path.getsize(path)} bytes")


def to_np(t):
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t)
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float64:
        t = t.float()
    if t.dtype in (torch.int64, torch.int32):
        return t.numpy().astype(np.uint32)
    return t.numpy()


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


# ---------------------------------------------------------------------------------------


def gen_linear():
    fam = Family("linear")
    g = torch.Generator().manual_seed(1)
    # (case, x shape, N, weight dtype, bias): row counts straddle the matrix-vector / GEMM
    # switch and the 128-row task split; K crosses the 256 K-block and is not a multiple
    # of 16; N is not a multiple of the 16-wide register block.
    cases = [
        ("m1_f32", (1, 300), 70, torch.float32, True),
        ("m3_f16", (3, 300), 70, torch.float16, True),
        ("m4_f32_nobias", (4, 33), 17, torch.float32, False),
        ("m5_f16", (5, 64), 20, torch.float16, True),
        ("m37_f32", (37, 300), 70, torch.float32, True),
        ("m37_f16", (37, 300), 70, torch.float16, False),
        ("m300_f16", (300, 40), 24, torch.float16, True),
        ("rank3_f32", (2, 7, 48), 33, torch.float32, True),
        ("n1_f32", (9, 20), 1, torch.float32, True),
    ]
    for name, xs, n, wdt, has_b in cases:
        k = xs[-1]
        x = randn(g, *xs)
        w = randn(g, n, k, scale=k**-0.5).to(wdt)
        b = randn(g, n) if has_b else None
        y = F.linear(x.double(), w.double(), None if b is None else b.double())
        t = {"x": x, "w": w, "y": y}
        if b is not None:
            t["b"] = b
        fam.case(name, {}, **t)
    fam.save()


def gen_elementwise():
    fam = Family("elementwise")
    g = torch.Generator().manual_seed(2)
    # Wide range: GELU's tails (erf saturates) and quick_gelu / silu at large |x|.
    x = torch.cat([randn(g, 200, scale=3.0), torch.linspace(-12.0, 12.0, 97), torch.tensor([0.0, -0.0, 1e-7, -1e-7, 30.0, -30.0, 88.0, -88.0])]).reshape(-1, 61)
    fam.case("gelu", {}, x=x, y=F.gelu(x.double(), approximate="none"))
    # HF QuickGELUActivation, in f32 as CLIP runs it.
    fam.case("quick_gelu", {}, x=x, y=x * torch.sigmoid(1.702 * x))
    gate, up = randn(g, 7, 45, scale=4.0), randn(g, 7, 45)
    fam.case("silu_mul", {}, gate=gate, up=up, y=F.silu(gate.double()) * up.double())
    a, b, row = randn(g, 3, 4, 19), randn(g, 3, 4, 19), randn(g, 19)
    fam.case("add_same", {}, a=a, b=b, y=a + b)
    fam.case("add_row", {}, a=a, b=row, y=a + row)
    fam.case("mul_same", {}, a=a, b=b, y=a * b)
    fam.case("mul_row", {}, a=a, b=row, y=a * row)
    fam.save()


def gen_norms():
    fam = Family("norms")
    g = torch.Generator().manual_seed(3)
    for name, rows, n, eps, shift in [("small", 5, 24, 1e-6, 0.0), ("wide", 3, 1000, 1e-5, 3.0)]:
        x = randn(g, rows, n) + shift
        w = randn(g, n) * 0.5 + 1.0
        b = randn(g, n) * 0.1
        norm = LlamaRMSNorm(n, eps=eps).double()
        with torch.no_grad():
            norm.weight.copy_(w.double())
            rms = norm(x.double())
        fam.case(f"rms_{name}", {"eps": eps}, x=x, w=w, y=rms)
        ln = F.layer_norm(x.double(), (n,), w.double(), b.double(), eps)
        fam.case(f"ln_{name}", {"eps": eps}, x=x, w=w, b=b, y=ln)
    # Softmax, including rows with huge logits (needs the max subtraction) and a constant row.
    x = randn(g, 6, 33, scale=5.0)
    x[2] += 1000.0
    x[3] = -1e4
    x[4, 5] = 90.0
    x[5] = 0.0
    fam.case("softmax", {}, x=x, y=F.softmax(x.double(), dim=-1))
    x3 = randn(g, 2, 3, 9)
    fam.case("softmax_rank3", {}, x=x3, y=F.softmax(x3.double(), dim=-1))
    fam.save()


def gen_rope():
    fam = Family("rope")
    g = torch.Generator().manual_seed(4)
    cases = [
        # name, heads, head_dim, theta, linear factor, positions
        ("basic", 3, 16, 10000.0, None, [0, 1, 2, 3, 4, 5, 6]),
        ("gaps", 2, 32, 10000.0, None, [0, 1, 5, 9, 36, 100, 611, 2047, 4095]),
        ("linear2", 2, 16, 10000.0, 2.0, [0, 3, 7, 640, 1500]),
        ("theta5e5", 1, 8, 500000.0, None, [1, 2, 300, 10000]),
    ]
    for name, h, d, theta, factor, pos in cases:
        s = len(pos)
        cfg = LlamaConfig(
            hidden_size=h * d,
            num_attention_heads=h,
            head_dim=d,
            rope_theta=theta,
            max_position_embeddings=8192,
            rope_scaling=None if factor is None else {"type": "linear", "factor": factor},
        )
        rot = LlamaRotaryEmbedding(config=cfg)
        x = randn(g, s, h * d)
        pid = torch.tensor([pos], dtype=torch.int64)
        cos, sin = rot(x, pid)  # [1, S, d], f32 as HF computes them
        xh = x.reshape(1, s, h, d).transpose(1, 2)  # [1, H, S, d]
        y, _ = apply_rotary_pos_emb(xh, xh, cos, sin)
        y = y.transpose(1, 2).reshape(s, h * d)
        params = {"head_dim": d, "theta": theta, "scaling_factor": factor or 1.0}
        fam.case(name, params, x=x, positions=torch.tensor(pos, dtype=torch.int64), y=y)
    fam.save()


# ----- attention ------------------------------------------------------------------------


def apply_mask(p, mask, q_offset):
    """The shallow masks of shared/docs/visipruner.md on probabilities `p [H, Sq, L]`.

    Query `i` sits at cache row `q_offset + i`; `(kind, s, e)` is the image span.
    """
    if mask is None:
        return p
    kind, s, e = mask
    p = p.clone()
    for i in range(p.shape[1]):
        r = q_offset + i
        if kind == "sink":
            # For every query i >= s zero the image keys; text queries (i >= e) get their sum
            # S_i put back on key s.
            if r >= s:
                total = p[:, i, s:e].sum(dim=-1)
                p[:, i, s:e] = 0.0
                if r >= e:
                    p[:, i, s] = total
        elif kind == "split":
            # Image queries lose all image keys; text queries the first half of the span.
            if s <= r < e:
                p[:, i, s:e] = 0.0
            elif r >= e:
                p[:, i, s : s + (e - s) // 2] = 0.0
        elif kind == "text2image":
            # Text queries lose all image keys.
            if r >= e:
                p[:, i, s:e] = 0.0
        else:
            raise ValueError(kind)
    return p


def reference_attention(q, k, v, h, kvh, d, scale, causal, q_offset, kv_len, mask):
    """Explicit softmax attention in float64: returns (out [Sq, H*D], probs [H, Sq, kv_len])."""
    sq = q.shape[0]
    qh = q.double().reshape(sq, h, d).transpose(0, 1)  # [H, Sq, d]
    kh = k[:kv_len].double().reshape(kv_len, kvh, d).transpose(0, 1)  # [KvH, L, d]
    vh = v[:kv_len].double().reshape(kv_len, kvh, d).transpose(0, 1)
    group = h // kvh
    # GQA: query head h uses kv head h // group.
    kh = kh.repeat_interleave(group, dim=0)
    vh = vh.repeat_interleave(group, dim=0)
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale  # [H, Sq, L]
    if causal:
        rows = torch.arange(sq)[:, None] + q_offset
        cols = torch.arange(kv_len)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = apply_mask(p, mask, q_offset)
    out = torch.matmul(p, vh).transpose(0, 1).reshape(sq, h * d)
    return out, p


def contributions(probs_last, v, h, kvh, d, kv_len, start, end):
    """[‖c_j‖, cos(o − c_j, o)] for keys start..end, float64, straight from the definition."""
    p = probs_last.double()  # [H, kv_len]
    vh = v[:kv_len].double().reshape(kv_len, kvh, d).repeat_interleave(h // kvh, dim=1)  # [L, H, d]
    c = (p.transpose(0, 1)[:, :, None] * vh).reshape(kv_len, h * d)  # c_j = concat_h P_h[j] v_h[j]
    o = c.sum(dim=0)
    out = []
    for j in range(start, end):
        r = o - c[j]
        nr, no = r.norm(), o.norm()
        cos = 1.0 if nr == 0 or no == 0 else float(torch.dot(r, o) / (nr * no))
        out.append([float(c[j].norm()), cos])
    return torch.tensor(out, dtype=torch.float64).reshape(end - start, 2)


def gen_attention():
    fam = Family("attention")
    g = torch.Generator().manual_seed(5)
    # name, H, KvH, d, Sq, q_offset, kv_len, cache rows L, causal, mask, contributions span
    cases = [
        ("prefill_mha", 2, 2, 8, 6, 0, 6, 6, True, None, (0, 6)),
        ("gqa_offset", 4, 2, 8, 5, 7, 12, 16, True, None, (3, 9)),
        ("decode_gqa", 8, 2, 16, 1, 20, 21, 32, True, None, (0, 21)),
        ("clip_full", 3, 3, 8, 7, 0, 7, 7, False, None, (2, 5)),
        ("sink", 4, 2, 8, 14, 0, 14, 14, True, ("sink", 3, 9), (3, 9)),
        ("split", 4, 4, 8, 14, 0, 14, 14, True, ("split", 3, 9), (3, 9)),
        ("split_odd", 2, 1, 8, 12, 0, 12, 12, True, ("split", 2, 9), (2, 9)),
        ("text2image", 4, 2, 8, 14, 0, 14, 14, True, ("text2image", 3, 9), (3, 9)),
        # Chunked prefill: the queries start inside the image span, so the masks must use
        # cache-row coordinates.
        ("sink_offset", 2, 2, 8, 8, 6, 14, 16, True, ("sink", 3, 9), (0, 14)),
        ("split_offset", 2, 1, 8, 8, 6, 14, 16, True, ("split", 3, 9), (0, 14)),
        ("text2image_offset", 2, 2, 8, 8, 6, 14, 16, True, ("text2image", 3, 9), (0, 14)),
    ]
    for name, h, kvh, d, sq, q_offset, kv_len, cache, causal, mask, (cs, ce) in cases:
        q = randn(g, sq, h * d)
        k = randn(g, cache, kvh * d)
        v = randn(g, cache, kvh * d)
        # Rows past kv_len are cache garbage: huge values make any read of them show.
        k[kv_len:] = 1e4
        v[kv_len:] = 1e4
        scale = d**-0.5
        out, p = reference_attention(q, k, v, h, kvh, d, scale, causal, q_offset, kv_len, mask)
        last = p[:, -1, :]  # [H, kv_len]
        contrib = contributions(last, v, h, kvh, d, kv_len, cs, ce)
        params = {
            "num_heads": h,
            "num_kv_heads": kvh,
            "head_dim": d,
            "scale": scale,
            "causal": causal,
            "q_offset": q_offset,
            "kv_len": kv_len,
            "mask": None if mask is None else mask[0],
            "image_start": 0 if mask is None else mask[1],
            "image_end": 0 if mask is None else mask[2],
            "contrib_start": cs,
            "contrib_end": ce,
        }
        fam.case(name, params, q=q, k=k, v=v, out=out, last_row=last, contributions=contrib)
    # token_contributions on hand-made probabilities: a key whose contribution is all of o
    # (cos of a zero vector is 1) and keys with zero probability.
    h, kvh, d, n = 2, 1, 4, 5
    probs = torch.zeros(h, n)
    probs[:, 2] = 1.0
    v = randn(g, n, kvh * d)
    contrib = contributions(probs, v, h, kvh, d, n, 0, n)
    params = {"num_heads": h, "num_kv_heads": kvh, "head_dim": d, "kv_len": n, "contrib_start": 0, "contrib_end": n}
    fam.case("contrib_onehot", params, probs=probs, v=v, contributions=contrib)
    fam.save()


# ----- gathers, patch embedding, argmax, casts ------------------------------------------


def gen_misc():
    fam = Family("misc")
    g = torch.Generator().manual_seed(6)
    for name, c, hh, ww, patch, dim, wdt in [
        ("patch_f32", 3, 28, 42, 14, 8, torch.float32),
        ("patch_f16", 3, 28, 42, 14, 8, torch.float16),
        # conv2d drops the pixels that do not fill a whole patch.
        ("patch_ragged", 2, 11, 9, 4, 5, torch.float32),
    ]:
        px = randn(g, c, hh, ww)
        w = randn(g, dim, c, patch, patch, scale=(c * patch * patch) ** -0.5).to(wdt)
        y = F.conv2d(px.double()[None], w.double(), stride=patch)  # [1, D, gh, gw]
        y = y[0].flatten(1).transpose(0, 1)  # [gh*gw, D], row-major patch order
        fam.case(name, {"patch": patch}, pixels=px, w=w, y=y)

    for name, wdt in [("embedding_f32", torch.float32), ("embedding_f16", torch.float16)]:
        table = randn(g, 50, 12).to(wdt)
        ids = torch.tensor([0, 49, 7, 7, 13, 1], dtype=torch.int64)
        fam.case(name, {}, table=table, ids=ids, y=F.embedding(ids, table.double()))

    x = randn(g, 6, 31)
    x[1, 4] = x[1, 20] = 50.0  # a tie: the first index wins
    x[2] = 0.0  # all equal
    x[3, 30] = 99.0  # last column
    x[4, 0] = 99.0  # first column
    fam.case("argmax", {}, x=x, y=torch.argmax(x, dim=-1))

    # f32 -> f16 rounding (ties to even, overflow to inf, subnormals), as torch's .half().
    xs = torch.cat([randn(g, 64, scale=100.0), torch.tensor([65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 1e-5, 2049.0, 2051.0, 0.1, -0.0])])
    fam.case("cast_f16", {}, x=xs, y=xs.half())

    # bf16 uploads: one set that fits f16 and one that does not (stays f32).
    small = randn(g, 40).to(torch.bfloat16)
    big = torch.cat([randn(g, 10), torch.tensor([1e5, -3e38])]).to(torch.bfloat16)
    for name, t in [("bf16_fits", small), ("bf16_big", big)]:
        bits = t.view(torch.int16).numpy().view(np.uint16)
        fam.case(name, {"fits_f16": name == "bf16_fits"}, bf16bits=bits, y=t.float())
    fam.save()


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    gen_linear()
    gen_elementwise()
    gen_norms()
    gen_rope()
    gen_attention()
    gen_misc()


if __name__ == "__main__":
    main()
