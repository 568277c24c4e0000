#!/usr/bin/env python3
"""VisiPruner / FastV reference on top of transformers: a layer-by-layer LLaVA prefill that
physically removes pruned image tokens, per-layer KV caches, and greedy decode.

Semantics: docs/visipruner.md (VisiPruner) and pruner/src/fastv.rs (FastV, as the engine
defines it). CI never runs this; its outputs (tests/fixtures/reference/<model>/pruning.json)
are committed.

Environment (exact versions in tools/requirements-fixtures.txt; torch 2.5.1, transformers 4.46.3):

    python3 -m venv /tmp/venv-fix
    /tmp/venv-fix/bin/pip install -r tools/requirements-fixtures.txt

Run from anywhere, CPU only, deterministic (no randomness; thresholds are searched):

    OMP_NUM_THREADS=1 /tmp/venv-fix/bin/python tools/visipruner_ref.py            # both models
    OMP_NUM_THREADS=1 /tmp/venv-fix/bin/python tools/visipruner_ref.py --only tiny-llava-gqa

(about 4 minutes for both on one thread; rerunning rewrites pruning.json byte for byte.)

It needs the committed checkpoints and reference/<model>/{expected.json,arrays.safetensors}
(from tools/make_fixtures.py): prompts, expanded ids and pixel values come from there.

Every run first checks that the dense path of this loop reproduces the committed transformers
references (first-step logits, 16 greedy ids): it aborts otherwise.

The model is the saved checkpoint reloaded in float32 with eager attention
(make_fixtures.load_reference_model). Each LlamaDecoderLayer is run piece by piece with
transformers' own modules (input_layernorm, q/k/v_proj, rotary_emb + apply_rotary_pos_emb
with explicit position ids, repeat_kv, f32 softmax, o_proj, post_attention_layernorm, mlp),
mirroring LlamaAttention's eager path operation for operation, so that with no pruning the
numbers are transformers' own.
"""

import argparse
import json
import math
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

SILENT_COS = 0.999           # deep stage: a layer is vision-silent when every cos_j >= this
SILENT_LAYERS_TO_EXIT = 2    # ... and image tokens leave after this many silent layers
MIN_DECISION_MARGIN = 1e-3   # relative distance of every compared value from its threshold
# ... except on the deep stage's silent test: cos <= 1 caps its relative margin at
# (1 - 0.999) / 0.999 = 1.001e-3 (reached only at cos >= 0.999999), so a silent layer must have
# min cos >= 0.999 * (1 + 9e-4) ~ 0.9999, far from the bound for f32 (errors ~1e-6).
MIN_SILENT_MARGIN = 9e-4
MIN_STEP_MARGIN = 1e-2       # top-1 minus top-2 logit at every greedy step
MODELS = ("tiny-llava-mha", "tiny-llava-gqa")


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
def parse_config(cfg, num_layers):
    """Validates a --prune JSON config (visipruner.md's rules) and returns it normalised."""
    method = cfg.get("method", "visipruner")
    if method == "dense":
        return {"method": "dense"}
    if method == "fastv":
        k, r = cfg["k"], cfg["ratio"]
        if not (isinstance(k, int) and 1 <= k < num_layers) or not (0.0 <= r < 1.0):
            raise ValueError(f"bad fastv config {cfg}")
        return {"method": "fastv", "k": k, "ratio": float(r)}
    if method != "visipruner":
        raise ValueError(f"unknown method {method}")
    mode = cfg["mode"]
    if not isinstance(mode, list) or not mode or any(m not in ("shallow", "middle", "deep") for m in mode) \
            or len(set(mode)) != len(mode):
        raise ValueError(f"bad mode {mode}")
    out = {"method": "visipruner", "mode": set(mode), "layer0": cfg.get("layer0", "sink")}
    if out["layer0"] not in ("sink", "split", "none"):
        raise ValueError(f"bad layer0 {out['layer0']}")
    if "shallow" in mode or "middle" in mode:
        s = cfg["shallow_mid_layer"]
        if not (isinstance(s, int) and 1 <= s < num_layers):
            raise ValueError(f"shallow_mid_layer {s} not in [1, {num_layers})")
        out["smid"] = s
    if "middle" in mode:
        for key in ("layer_threshold", "tokens_threshold"):
            v = cfg[key]
            if not (0.0 < v < 1.0):
                raise ValueError(f"{key} {v} not in (0, 1)")
            out[key] = v
    if "deep" in mode and "middle" not in mode:
        d = cfg["mid_deep_layer"]
        if not (isinstance(d, int) and 1 <= d < num_layers):
            raise ValueError(f"mid_deep_layer {d} not in [1, {num_layers})")
        out["mid_deep_layer"] = d
    return out


# ----------------------------------------------------------------------------------------
# The layer loop
# ----------------------------------------------------------------------------------------
class Lm:
    """The LLaVA text decoder's pieces, from a float32 eager LlavaForConditionalGeneration."""

    def __init__(self, llava):
        lm = llava.language_model
        self.llava = llava
        self.model = lm.model
        self.lm_head = lm.lm_head
        self.layers = list(lm.model.layers)
        c = lm.config
        self.num_layers = c.num_hidden_layers
        self.heads = c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.min_f32 = torch.finfo(torch.float32).min

    def rope(self, x, positions, layer=None):
        """transformers' rotary embedding (rope scaling included) at explicit position ids
        (Llama keeps it on the model; transformers 4.46's Mistral on each attention)."""
        pos = torch.tensor([positions], dtype=torch.long)  # [1, S]
        emb = getattr(self.model, "rotary_emb", None) or layer.self_attn.rotary_emb
        return emb(x, pos)

    def qkv(self, layer, x, positions):
        """x [1, S, H] -> q [1, heads, S, d], k/v [1, kv_heads, S, d] (k, q rotated)."""
        a = layer.self_attn
        s = x.shape[1]
        q = a.q_proj(x).view(1, s, self.heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(1, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(1, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(v, positions, layer)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def finish_layer(self, layer, h, attn):
        """attn [1, heads, S, d] (P.V) -> the layer's output hidden states [1, S, H]."""
        s = attn.shape[2]
        attn = attn.transpose(1, 2).contiguous().reshape(1, s, -1)
        h = h + layer.self_attn.o_proj(attn)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h_last):
        return self.lm_head(self.model.norm(h_last))[0, -1]  # [V]


def shallow_mask_kind(cfg, layer, n_img):
    """Which post-softmax mask a prefill layer applies (visipruner.md 'Shallow')."""
    if cfg["method"] != "visipruner" or "shallow" not in cfg["mode"] or n_img == 0 or layer >= cfg["smid"]:
        return "none"
    if layer == 0:
        return {"sink": "layer0_sink", "split": "layer0_split", "none": "none"}[cfg["layer0"]]
    return "text_to_image"


def apply_shallow_mask_runs(p, kind, runs):
    """Several separate image runs [(a, b), ...] of rows/cols (text between them): the masks act
    on (query kind, key kind) pairs, text between images being text (pruner crate docs):
    layer0_sink: every query from the first image row on loses all image keys, text queries put
    that mass back on the first image key; layer0_split: image queries lose all image keys, text
    queries the first half (rounded down) of every run; text_to_image: text queries lose all image
    keys. No renormalisation."""
    if len(runs) <= 1 or kind == "none":
        s, e = runs[0] if runs else (p.shape[-1], p.shape[-1])
        return apply_shallow_mask(p, kind, s, e)
    S = p.shape[-1]
    img = torch.zeros(S, dtype=torch.bool)
    half = torch.zeros(S, dtype=torch.bool)
    for a, b in runs:
        img[a:b] = True
        half[a:a + (b - a) // 2] = True
    a0 = runs[0][0]
    rows = torch.arange(S)
    text_q = ~img & (rows >= a0)                    # text queries that can see an image key
    p = p.clone()
    if kind == "layer0_sink":
        sink = (p * img[None, None, None, :]).sum(-1)  # [1, heads, S] each query's image mass
        zero = (rows >= a0)[:, None] & img[None, :]
        p = p.masked_fill(zero[None, None], 0.0)
        p[:, :, text_q, a0] = sink[:, :, text_q]
    elif kind == "layer0_split":
        zero = (img[:, None] & img[None, :]) | (~img[:, None] & half[None, :])
        p = p.masked_fill(zero[None, None], 0.0)
    elif kind == "text_to_image":
        zero = ~img[:, None] & img[None, :]
        p = p.masked_fill(zero[None, None], 0.0)
    else:
        raise ValueError(kind)
    return p


def apply_shallow_mask(p, kind, s, e):
    """p [1, heads, S, S] post-softmax probabilities; image rows/cols [s, e); no renormalisation."""
    if kind == "none":
        return p
    p = p.clone()
    if kind == "layer0_sink":
        sink = p[:, :, e:, s:e].sum(-1)        # [1, heads, T] each text query's image mass
        p[:, :, s:, s:e] = 0.0
        p[:, :, e:, s] = sink
    elif kind == "layer0_split":
        p[:, :, s:e, s:e] = 0.0
        p[:, :, e:, s:s + (e - s) // 2] = 0.0  # first half, rounded down (576 -> 288, 65 -> 32)
    elif kind == "text_to_image":
        p[:, :, e:, s:e] = 0.0
    else:
        raise ValueError(kind)
    return p


def contributions(p_last, v_rep, attn_last, rows):
    """Last prompt token's per-image-token contributions (visipruner.md 'Middle').

    p_last [heads, S] probabilities of the last row, v_rep [heads, S, d] (repeated) values,
    attn_last [heads, d] its attention output (P.V) before o_proj.
    Returns (norm [n], cos [n]) with c_j = concat_h P_h[t,j] V_h[j], o = attn output,
    cos_j = cos(o - c_j, o), all in f32.
    """
    c = (p_last[:, rows, None] * v_rep[:, rows, :]).permute(1, 0, 2).reshape(len(rows), -1)  # [n, heads*d]
    o = attn_last.reshape(1, -1)                                                          # [1, heads*d]
    norm = torch.linalg.vector_norm(c, dim=-1)
    cos = torch.nn.functional.cosine_similarity(o - c, o, dim=-1)
    return norm, cos


def fastv_keep_count(n, ratio):
    """round(n * (1 - ratio)), halves away from zero (pruner/src/fastv.rs keep_count)."""
    return min(n, max(0, int(math.floor(n * (1.0 - ratio) + 0.5))))


class Run:
    """Everything one prefill + decode produced."""


@torch.no_grad()
def run(lm, embeds, span, cfg, steps=mf.MAX_NEW_TOKENS, trace=False, all_rows=False):
    """Prefill `embeds [S, H]` with the pruning schedule `cfg`, then greedy-decode `steps` tokens.

    span: (s, e) image rows, a list of such spans (several images; prompt order), or None.
    Every row of every span is an image token; offsets run over all spans in prompt order.
    Shallow masks over image rows that form several separate runs act on every run
    (apply_shallow_mask_runs). With trace=True also records
    per-layer min cos / norms for the threshold search (the schedule does not depend on it).
    """
    L = lm.num_layers
    seq = embeds.shape[0]
    h = embeds[None]                                  # [1, S, H]
    positions = list(range(seq))                      # original position ids of the rows present
    spans = [] if span is None else ([tuple(span)] if isinstance(span[0], int) else [tuple(x) for x in span])
    img_rows = [i for a, b in spans for i in range(a, b)]  # current rows of the image tokens present
    img = list(range(len(img_rows)))                  # original offsets of the image rows present
    span = spans or None
    method = cfg["method"]
    r = Run()
    r.fusion_layer, r.kept, r.text_only_from = None, None, None
    r.layer_seq_lens, r.checks, r.trace = [], [], {}
    silent = 0
    caches = []                                       # per layer: (k [1, kv_heads, S_l, d], v)
    for l, layer in enumerate(lm.layers):
        cur, n_img = h.shape[1], len(img)
        r.layer_seq_lens.append(cur)
        runs = []
        for i in img_rows:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        kind = shallow_mask_kind(cfg, l, n_img) if span is not None else "none"
        x = layer.input_layernorm(h)
        q, k, v = lm.qkv(layer, x, positions)
        caches.append((k, v))
        kr, vr = repeat_kv(k, lm.groups), repeat_kv(v, lm.groups)
        w = torch.matmul(q, kr.transpose(2, 3)) / math.sqrt(lm.head_dim)            # [1, heads, S, S]
        causal = torch.full((cur, cur), lm.min_f32).triu(1)[None, None]            # transformers' additive mask
        p = torch.nn.functional.softmax(w + causal, dim=-1, dtype=torch.float32)
        p = apply_shallow_mask_runs(p, kind, [tuple(r) for r in runs])
        attn = torch.matmul(p, vr)                                                   # [1, heads, S, d]

        # What the pruner looks at, computed before the layer's output (which it never changes).
        action = None
        if span is not None and n_img > 0 and method == "visipruner":
            mode = cfg["mode"]
            want_middle = "middle" in mode and r.fusion_layer is None and l > cfg["smid"]
            # A silent count on the last layer could change nothing (same as the engine).
            want_deep = ("deep" in mode and "middle" in mode and r.fusion_layer is not None
                         and l > r.fusion_layer and l + 1 < L and silent < SILENT_LAYERS_TO_EXIT)
            if want_middle or want_deep:
                norm, cos = contributions(p[0, :, -1], vr[0], attn[0, :, -1], img_rows)
                if trace:
                    r.trace[l] = {"norm": norm.clone(), "cos": cos.clone()}
            if want_middle:
                lt = torch.tensor(cfg["layer_threshold"], dtype=torch.float32)
                tt = torch.tensor(cfg["tokens_threshold"], dtype=torch.float32)
                r.checks.append(("layer_threshold", l, cos, float(lt)))
                if bool((cos < lt).any()):
                    keep = [img[i] for i in range(n_img) if bool(norm[i] > tt)]
                    r.checks.append(("tokens_threshold", l, norm, float(tt)))
                    r.fusion_layer, r.kept = l, keep
                    if l + 1 < L:
                        action = keep
                        if not keep:
                            r.text_only_from = l + 1
            elif want_deep:
                r.checks.append(("silent", l, cos, SILENT_COS))
                if bool((cos >= torch.tensor(SILENT_COS, dtype=torch.float32)).all()):
                    silent += 1
                    if silent >= SILENT_LAYERS_TO_EXIT:
                        action, r.text_only_from = [], l + 1
            elif "deep" in mode and "middle" not in mode and l + 1 == cfg["mid_deep_layer"]:
                action, r.text_only_from = [], l + 1
        elif span is not None and n_img > 0 and method == "fastv" and l + 1 == cfg["k"]:
            a = p[0, :, -1, img_rows].mean(0)                                       # [n] mean over heads
            order = sorted(range(n_img), key=lambda i: (-float(a[i]), i))
            n_keep = fastv_keep_count(n_img, cfg["ratio"])
            chosen = sorted(order[:n_keep])
            r.fastv_attn = a
            if 0 < n_keep < n_img:
                hi, lo = float(a[order[n_keep - 1]]), float(a[order[n_keep]])
                r.checks.append(("fastv_gap", l, torch.tensor([hi]), lo))
            action = [img[i] for i in chosen]
            r.kept = action
            if not action:
                r.text_only_from = l + 1

        h = lm.finish_layer(layer, h, attn)
        if action is not None:
            keep_row = [True] * cur
            for i in img_rows:
                keep_row[i] = False
            for j in action:
                keep_row[img_rows[img.index(j)]] = True
            rows = [i for i in range(cur) if keep_row[i]]
            was_image = set(img_rows)
            img_rows = [k for k, i in enumerate(rows) if i in was_image]
            idx = torch.tensor(rows, dtype=torch.long)
            h = h[:, idx]
            positions = [positions[i] for i in rows]
            img = list(action)

    # all_rows: lm_head over every prompt row as LlamaForCausalLM does (the GEMM shape changes
    # the f32 rounding); only the last row is used.
    logits = lm.logits(h if all_rows else h[:, -1:])
    r.first_logits = logits
    r.generated, r.step_margins = [], []
    for step in range(steps):
        top = torch.topk(logits, 2)
        r.step_margins.append(float(top.values[0] - top.values[1]))
        t = int(top.indices[0])
        r.generated.append(t)
        if t == mf.EOS or step + 1 == steps:
            break
        pos = seq + step                              # the unpruned position of the new token
        hh = lm.model.embed_tokens(torch.tensor([[t]]))
        for l, layer in enumerate(lm.layers):
            x = layer.input_layernorm(hh)
            q, k, v = lm.qkv(layer, x, [pos])
            kc = torch.cat([caches[l][0], k], 2)
            vc = torch.cat([caches[l][1], v], 2)
            caches[l] = (kc, vc)
            w = torch.matmul(q, repeat_kv(kc, lm.groups).transpose(2, 3)) / math.sqrt(lm.head_dim)
            p = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32)
            attn = torch.matmul(p, repeat_kv(vc, lm.groups))
            hh = lm.finish_layer(layer, hh, attn)
        logits = lm.logits(hh)
    r.cache_lens = [c[0].shape[2] for c in caches]
    return r


def margins(r):
    """Per kind of decision, the smallest relative distance from its threshold (see decision_margin)."""
    out = {}
    for kind, _, vals, thr in r.checks:
        if kind == "fastv_gap":
            m = (float(vals[0]) - thr) / abs(float(vals[0]))
        elif kind == "tokens_threshold":
            m = float(((vals.double() - thr).abs() / thr).min())
        else:
            m = abs(float(vals.min()) - thr) / thr
        out[kind] = min(out.get(kind, math.inf), m)
    return out


def margins_ok(r):
    return all(m >= (MIN_SILENT_MARGIN if k == "silent" else MIN_DECISION_MARGIN) for k, m in margins(r).items())


def decision_margin(r):
    """Smallest relative distance |v - thr| / thr over every threshold decision prefill took.

    `any(cos_j < layer_threshold)` and `all(cos_j >= 0.999)` are decided by min_j cos_j, so
    that is the value measured for them; K is decided token by token, so every norm_j counts;
    FastV's is the relative gap between the last kept and the first dropped attention.
    """
    m = math.inf
    for kind, _, vals, thr in r.checks:
        if kind == "fastv_gap":
            m = min(m, (float(vals[0]) - thr) / abs(float(vals[0])))
        elif kind == "tokens_threshold":
            m = min(m, float(((vals.double() - thr).abs() / thr).min()))
        else:
            m = min(m, abs(float(vals.min()) - thr) / thr)
    return None if m == math.inf else m


# ----------------------------------------------------------------------------------------
# Inputs from the committed references
# ----------------------------------------------------------------------------------------
def case_inputs(llava, exp, arrays, case):
    """(embeds [S, H], span or None) exactly as Llava builds them from the expanded ids."""
    c = exp["cases"][case]
    ids = torch.tensor([c["input_ids_expanded"]])
    emb = llava.get_input_embeddings()(ids)[0]                                          # [S, H]
    if c["image_span"] is None:
        return emb, None
    s, e = c["image_span"]
    pv = arrays[f"{case}.pixel_values"][None]
    feats = llava.get_image_features(pv, exp["vision_feature_layer"], exp["vision_feature_select_strategy"])[0]
    assert torch.equal(feats, arrays[f"{case}.projector_out"]), "projector output differs from the reference"
    emb = emb.clone()
    emb[s:e] = feats
    return emb, (s, e)


def dense_sanity(lm, exp, arrays, inputs):
    """The dense loop must reproduce transformers: first logits and the greedy ids."""
    worst = 0.0
    for case, c in exp["cases"].items():
        emb, span = inputs[case]
        r = run(lm, emb, span, {"method": "dense"}, all_rows=True)
        ref = arrays[f"{case}.logits"]
        diff = float((r.first_logits - ref).abs().max())
        worst = max(worst, diff)
        if r.generated != c["generated_ids"]:
            raise SystemExit(f"dense sanity: {case}: greedy ids {r.generated} != transformers {c['generated_ids']}")
        if diff > 1e-4:
            raise SystemExit(f"dense sanity: {case}: first logits differ by {diff}")
        # decode steps too: generate's per-step margins (rounded to 1e-6 in expected.json)
        for step, (got, want) in enumerate(zip(r.step_margins, c["step_margins"])):
            if abs(got - want) > 1e-4:
                raise SystemExit(f"dense sanity: {case}: step {step}: margin {got} vs transformers {want}")
        print(f"  dense {case}: ids match, max |logit diff| {diff:.3g}")
    return worst


# ----------------------------------------------------------------------------------------
# Threshold search
# ----------------------------------------------------------------------------------------
def summarize(r, cfg_json, case, name, span):
    top = torch.topk(r.first_logits, 5)
    dm = decision_margin(r)
    return {
        "case": case, "name": name, "prune": cfg_json,
        "image_span": (list(span) if isinstance(span[0], int) else [list(x) for x in span]) if span else None,
        "fusion_layer": r.fusion_layer,
        "kept_image_tokens": r.kept,
        "text_only_from_layer": r.text_only_from,
        "layer_seq_lens": r.layer_seq_lens,
        "first_logits_top5": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
        "generated_ids": r.generated,
        "step_margins": [round(m, 6) for m in r.step_margins],
        "decision_margin": None if dm is None else round(dm, 6),
        # the same, per kind of decision: layer_threshold (fusion tests), tokens_threshold (K),
        # silent (deep-stage tests against 0.999), fastv_gap
        "decision_margins": {k: round(m, 6) for k, m in margins(r).items()},
    }


def score(r):
    """>= 1 when both margins meet their bars; higher is more robust."""
    a = min([m / (MIN_SILENT_MARGIN if k == "silent" else MIN_DECISION_MARGIN) for k, m in margins(r).items()],
            default=math.inf)
    return min(a, min(r.step_margins) / MIN_STEP_MARGIN)


def visi_candidates(lm, emb, span, shallow, layer0, per_cell=6):
    """VisiPruner configs whose middle stage should fire on a chosen layer f and keep a strict
    non-empty subset, with both thresholds in the middle of gaps.

    For each shallow_mid_layer a probe (middle stage that never fires) gives min_j cos_j per
    layer and the norms; layer_threshold goes halfway between min cos on f and the smallest
    min cos on the layers before it (so f is the first to fire), tokens_threshold halfway
    between two neighbouring sorted norms on f.
    """
    L = lm.num_layers
    n = n_image(span)
    mode = (["shallow"] if shallow else []) + ["middle", "deep"]
    out = []
    for smid in range(1, L - 2):
        probe = {"method": "visipruner", "mode": set(mode) - {"deep"}, "layer0": layer0, "smid": smid,
                 "layer_threshold": 1e-30, "tokens_threshold": 0.5}
        pr = run(lm, emb, span, probe, steps=1, trace=True)
        mins = {l: float(t["cos"].min()) for l, t in pr.trace.items()}
        for f in range(smid + 1, L - 1):
            hi = min([mins[l] for l in range(smid + 1, f)], default=1.0)
            lo = mins[f]
            lt = (lo + hi) / 2
            if not (0 < lt < 1 and (lt - lo) / lt > 1.5 * MIN_DECISION_MARGIN
                    and (hi - lt) / lt > 1.5 * MIN_DECISION_MARGIN):
                continue
            norms = sorted(float(x) for x in pr.trace[f]["norm"])
            cells = []
            for kept in range(1, n):
                a, b = norms[n - kept - 1], norms[n - kept]
                tt = (a + b) / 2
                if 0 < tt < 1 and (b - tt) / tt > 1.5 * MIN_DECISION_MARGIN:
                    cells.append(((b - a) / tt, kept, tt))
            # the widest gaps, and the smallest K (an exit needs few, quiet tokens)
            pick = sorted(cells, reverse=True)[:per_cell] + sorted(cells, key=lambda c: c[1])[:per_cell]
            seen = set()
            for _, kept, tt in pick:
                if kept in seen:
                    continue
                seen.add(kept)
                # 7 significant digits: short JSON; margins are measured on the rounded values
                cfg = {"mode": mode, "shallow_mid_layer": smid, "layer_threshold": float(f"{lt:.7g}"),
                       "tokens_threshold": float(f"{tt:.7g}")}
                if shallow and layer0 != "sink":
                    cfg["layer0"] = layer0
                out.append(cfg)
    return out


def n_image(span):
    """Image tokens of one span (s, e) or of a list of spans."""
    return span[1] - span[0] if isinstance(span[0], int) else sum(e - s for s, e in span)


def search_case(lm, emb, span, case):
    """Runs (a) exit, (b) no_exit, (c) split, (d) fastv for one image case."""
    L = lm.num_layers
    n = n_image(span)
    pools = {"exit": [], "no_exit": [], "split": []}
    for shallow, layer0 in ((True, "sink"), (True, "none"), (False, "sink"), (True, "split")):
        for cfg in visi_candidates(lm, emb, span, shallow, layer0):
            r = run(lm, emb, span, parse_config(cfg, L), steps=1)
            if r.fusion_layer is None or not r.kept or len(r.kept) >= n or r.fusion_layer + 1 >= L:
                continue
            if not margins_ok(r):
                continue
            dm = score(r)
            if layer0 == "split":
                pools["split"].append((dm, cfg))
            elif r.text_only_from is not None:
                pools["exit"].append((dm, cfg))
            else:
                pools["no_exit"].append((dm, cfg))
    runs = []
    for name, pool in pools.items():
        best = None
        # full runs (decode included) for the most robust schedules first
        for dm, cfg in sorted(pool, key=lambda x: -x[0])[:25]:
            r = run(lm, emb, span, parse_config(cfg, L))
            # prefer schedules that drop at least half the image, then the most robust
            sc = (len(r.kept) <= n // 2, score(r))
            if sc[1] >= 1 and (best is None or sc > best[0]):
                best = (sc, cfg, r)
        print(f"  {case} {name}: {len(pool)} schedules, best score {None if best is None else round(best[0][1], 2)}",
              flush=True)
        if best is not None:
            runs.append(summarize(best[2], best[1], case, name, span))
    # Fixed schedules without thresholds (margins: greedy steps only): shallow masks alone,
    # and deep without middle (every image token leaves at mid_deep_layer).
    for name, cfg in (("shallow_only", {"mode": ["shallow"], "shallow_mid_layer": L // 2}),
                      ("deep_fixed", {"mode": ["shallow", "deep"], "shallow_mid_layer": 2,
                                      "mid_deep_layer": L // 2 + 1})):
        r = run(lm, emb, span, parse_config(cfg, L))
        ok = score(r) >= 1
        print(f"  {case} {name}: step margin {min(r.step_margins):.4f}{'' if ok else ' (too small: left out)'}",
              flush=True)
        if ok:
            runs.append(summarize(r, cfg, case, name, span))
    best = None
    for k in range(1, L):
        for ratio in (0.5, 0.75, 0.25, 0.9):
            cfg = {"method": "fastv", "k": k, "ratio": ratio}
            r = run(lm, emb, span, parse_config(cfg, L))
            sc = score(r)
            if sc >= 1 and (best is None or sc > best[0]):
                best = (sc, cfg, r)
    print(f"  {case} fastv: best score {None if best is None else round(best[0], 2)}", flush=True)
    if best is not None:
        runs.append(summarize(best[2], best[1], case, "fastv", span))
    return runs


NEXT_MODELS = ("tiny-next-mistral", "tiny-next-llama", "tiny-llava-mha-two-images")


def llava15_two_inputs(c):
    """(model, embeds [S, H], spans) of reference-next/tiny-llava-mha-two-images' case `c`: the
    LLaVA-1.5 fixture, CLIPImageProcessor (crop) over its two images, one projector output per
    `<image>` span."""
    from PIL import Image
    from transformers import CLIPImageProcessor
    model_dir = os.path.join(mf.FIX, "tiny-llava-mha")
    model = mf.load_reference_model(model_dir)
    imgs = [Image.open(os.path.join(mf.FIX, p)).convert("RGB") for p in c["images"]]
    pv = CLIPImageProcessor.from_pretrained(model_dir)(images=imgs, return_tensors="pt")["pixel_values"]
    cfg = model.config
    feats = model.get_image_features(pv, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
    ids = torch.tensor([c["input_ids_expanded"]])
    emb = model.get_input_embeddings()(ids)[0].clone()
    spans = [tuple(x) for x in c["image_spans"]]
    for (a, b), f in zip(spans, feats):
        emb[a:b] = f
    return model, emb, spans


@torch.no_grad()
def next_main():
    """LLaVA-NeXT fixtures (tools/make_next_fixtures.py): every image-token position of every
    span (base tile, unpadded tile rows, newline rows) is an image token. Writes
    reference-next/<model>/pruning.json for every case and schedule (the two-image cases with the
    multi-image shallow masks), and for the two-image LLaVA-1.5 prompt of tiny-llava-mha."""
    import make_next_fixtures as mn
    for name in NEXT_MODELS:
        model_dir = os.path.join(mf.FIX, name)
        ref_dir = os.path.join(mf.FIX, "reference-next", name)
        with open(os.path.join(ref_dir, "expected.json")) as f:
            exp = json.load(f)
        arrays = load_file(os.path.join(ref_dir, "arrays.safetensors"))
        runs, worst = [], 0.0
        print(f"{name}: dense sanity")
        if name == "tiny-llava-mha-two-images":
            c = exp["cases"]["two"]
            model, emb, spans = llava15_two_inputs(c)
            lm = Lm(model)
            r = run(lm, emb, spans, {"method": "dense"}, steps=len(c["generated_ids"]), all_rows=True)
            worst = float((r.first_logits - arrays["two.logits"]).abs().max())
            if r.generated != c["generated_ids"] or worst > 1e-4:
                raise SystemExit(f"dense sanity: {name}: {r.generated} vs {c['generated_ids']}, {worst}")
            print(f"  dense two: ids match, max |logit diff| {worst:.3g}")
            runs += search_case(lm, emb, spans, "two")
            write_next_pruning(ref_dir, name, lm, worst, runs)
            continue
        model = mn.load_reference_model(model_dir)
        lm = Lm(model)
        for case, c in exp["cases"].items():
            ids = torch.tensor([c["input_ids_expanded"]])
            emb = model.get_input_embeddings()(ids)[0].clone()
            sizes = torch.tensor(c["image_sizes_hw"])
            per_image = model.get_image_features(arrays[f"{case}.pixel_values"], sizes, mn.FEATURE_LAYER, "default")
            feats, _ = model.pack_image_features(per_image, sizes, "default", image_newline=model.image_newline)
            assert torch.equal(feats, arrays[f"{case}.image_features"]), "packed features differ"
            spans = [tuple(x) for x in c["image_spans"]]
            emb[torch.tensor(c["input_ids_expanded"]) == mf.IMAGE_TOKEN_INDEX] = feats
            r = run(lm, emb, spans, {"method": "dense"}, steps=len(c["generated_ids"]), all_rows=True)
            diff = float((r.first_logits - arrays[f"{case}.logits"]).abs().max())
            worst = max(worst, diff)
            if r.generated != c["generated_ids"] or diff > 1e-4:
                raise SystemExit(f"dense sanity: {name} {case}: {r.generated} vs {c['generated_ids']}, {diff}")
            print(f"  dense {case}: ids match, max |logit diff| {diff:.3g}")
            span = spans[0] if len(spans) == 1 else spans
            runs += search_case(lm, emb, span, case)
        write_next_pruning(ref_dir, name, lm, worst, runs)


def write_next_pruning(ref_dir, name, lm, worst, runs):
    """reference-next/<name>/pruning.json."""
    for rr in runs:
        print(f"  {rr['case']:10s} {rr['name']:12s} fusion {rr['fusion_layer']} "
              f"kept {None if rr['kept_image_tokens'] is None else len(rr['kept_image_tokens'])} "
              f"exit {rr['text_only_from_layer']} lens {rr['layer_seq_lens']} prune {json.dumps(rr['prune'])}")
    out = {"generator": "tools/visipruner_ref.py --next",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "model": name, "num_layers": lm.num_layers, "silent_cos": SILENT_COS,
           "silent_layers_to_exit": SILENT_LAYERS_TO_EXIT, "min_decision_margin": MIN_DECISION_MARGIN,
           "min_silent_margin": MIN_SILENT_MARGIN, "min_step_margin": MIN_STEP_MARGIN,
           "dense_sanity_max_abs_logit_diff": worst, "runs": runs}
    with open(os.path.join(ref_dir, "pruning.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=MODELS)
    ap.add_argument("--next", action="store_true",
                    help="the LLaVA-NeXT fixtures instead (reference-next/<model>/pruning.json)")
    ap.add_argument("--embeds-out", metavar="DIR",
                    help="also write DIR/emb-<model>.safetensors (the decoder input per case, f32 [S, H]) "
                         "for tools/xcheck_pruning")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.next:
        return next_main()
    for name in MODELS:
        if args.only and name != args.only:
            continue
        model_dir = os.path.join(mf.FIX, name)
        ref_dir = os.path.join(mf.REF_DIR, name)
        with open(os.path.join(ref_dir, "expected.json")) as f:
            exp = json.load(f)
        arrays = load_file(os.path.join(ref_dir, "arrays.safetensors"))
        llava = mf.load_reference_model(model_dir)
        lm = Lm(llava)
        with torch.no_grad():
            inputs = {c: case_inputs(llava, exp, arrays, c) for c in exp["cases"]}
        if args.embeds_out:
            os.makedirs(args.embeds_out, exist_ok=True)
            save_file({c: e.contiguous() for c, (e, _) in inputs.items()},
                      os.path.join(args.embeds_out, f"emb-{name}.safetensors"))
        print(f"{name}: dense sanity")
        worst = dense_sanity(lm, exp, arrays, inputs)
        runs = []
        for case, c in exp["cases"].items():
            emb, span = inputs[case]
            if span is None:
                # A prompt without an image is left alone by every policy: record it once.
                cfg = {"mode": ["shallow", "middle", "deep"], "shallow_mid_layer": 1,
                       "layer_threshold": 0.995, "tokens_threshold": 0.2}
                r = run(lm, emb, None, parse_config(cfg, lm.num_layers))
                runs.append(summarize(r, cfg, case, "text_noop", None))
                continue
            runs += search_case(lm, emb, span, case)
        for rr in runs:
            print(f"  {rr['case']:12s} {rr['name']:8s} fusion {rr['fusion_layer']} "
                  f"kept {None if rr['kept_image_tokens'] is None else len(rr['kept_image_tokens'])} "
                  f"exit {rr['text_only_from_layer']} lens {rr['layer_seq_lens']} "
                  f"dm {rr['decision_margin']} step {min(rr['step_margins']):.4f} prune {json.dumps(rr['prune'])}")
        out = {
            "generator": "tools/visipruner_ref.py",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "model": name,
            "num_layers": lm.num_layers,
            "num_image_tokens": exp["num_image_tokens"],
            "silent_cos": SILENT_COS,
            "silent_layers_to_exit": SILENT_LAYERS_TO_EXIT,
            "min_decision_margin": MIN_DECISION_MARGIN,
            "min_silent_margin": MIN_SILENT_MARGIN,
            "min_step_margin": MIN_STEP_MARGIN,
            "dense_sanity_max_abs_logit_diff": worst,
            "runs": runs,
        }
        with open(os.path.join(ref_dir, "pruning.json"), "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
