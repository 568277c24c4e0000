#!/usr/bin/env python3
"""DivPrune reference: the authors' own selection function on the fixtures' tensors, and
greedy tokens of transformers' LLaVA on the pruned embeddings.

DivPrune (Alvar et al., CVPR 2025) is github.com/vbdi/divprune. Its selection lives in
LLaVA/llava/model/llava_arch.py (methods `pairwise_cosine_similarity` and `DivPrune` of
LlavaMetaForCausalLM). That repository is CC BY-NC 4.0, so it is not vendored here: this
script reads the file from a local clone at the pinned commit, checks its sha256, and runs
the two functions' source text exactly as written (extracted with `ast`, nothing edited):

    git clone https://github.com/vbdi/divprune /tmp/divprune        # any clone holding UPSTREAM_COMMIT
    OMP_NUM_THREADS=1 /work/wt/venv-fix/bin/python tools/divprune_ref.py --upstream /tmp/divprune

(`--upstream` may also be a bare git directory.) CI never runs this; its outputs,
tests/fixtures/reference/<model>/divprune.json, are committed (about 30 s for both models).

For each model, image case and budget N (16, 32, 64, 128, 192, those within the image's tokens):
- inputs: the decoder input embeddings exactly as transformers builds them from the committed
  expanded ids and pixel values (tools/visipruner_ref.py's case_inputs, which also checks the
  projector output against the committed reference);
- selection: upstream's DivPrune on the image rows, as upstream calls it (prepare_inputs_
  labels_for_multimodal: `threshold_ratio = N / 576`, so `int(round(ratio * 576)) = N`),
  in float64 (what the engine computes in; the reference) and in float32 (recorded whether
  it agrees: near ties flip with the dtype), and the smallest gap between the winning score and the runner-up over
  all greedy steps is recorded (`selection_margin`);
- pruned run: upstream then keeps `sort(prefix + selected + suffix)` rows of the input
  embeddings and hands them to the language model with no position ids, i.e. the kept
  rows are renumbered 0..S'-1. Here: the same rows through transformers'
  LlamaForCausalLM.generate(inputs_embeds=...) (greedy, 16 new tokens), its first-step
  logits (top 5) and per-step top-1 minus top-2 margins.
"""

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import torch
import transformers
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402
from visipruner_ref import case_inputs  # noqa: E402

UPSTREAM_REPO = "github.com/vbdi/divprune"
UPSTREAM_COMMIT = "799e2d950aa01ba7860907f5a6d86061f885dca6"
UPSTREAM_PATH = "LLaVA/llava/model/llava_arch.py"
UPSTREAM_SHA256 = "6df2e3369d8d747ab3a8e74b0a829aaabb1ecf43fa2a5fb7eb801d15864b315c"
FUNCTIONS = ("pairwise_cosine_similarity", "DivPrune")
MODELS = ("tiny-llava-mha", "tiny-llava-gqa")
# The papers' 64/128/192 of 576; 16 and 32 as well, since tiny-llava-gqa's image has 65 tokens
# (budgets above an image's token count are invalid and skipped).
BUDGETS = (16, 32, 64, 128, 192)
# Runs whose selection has a smaller gap between the winner and the runner-up at some step
# are kept for the index check on the committed embeddings (float64, exact) but left out of
# the through-the-engine check: the engine's own projector output differs from
# transformers' by float rounding, which may flip such a near tie.
MIN_SELECTION_MARGIN = 1e-5
# ... and runs with a greedy step whose top-1 minus top-2 logit is below this (as in
# tools/visipruner_ref.py): the f16 KV cache moves logits by a few 1e-3.
MIN_STEP_MARGIN = 1e-2


def upstream_source(path):
    """llava_arch.py at UPSTREAM_COMMIT from a clone (work tree or bare), sha256-checked."""
    git_dir = path if os.path.exists(os.path.join(path, "HEAD")) and not os.path.exists(
        os.path.join(path, ".git")) else os.path.join(path, ".git")
    text = subprocess.run(["git", "--git-dir", git_dir, "show", f"{UPSTREAM_COMMIT}:{UPSTREAM_PATH}"],
                          check=True, capture_output=True).stdout
    got = hashlib.sha256(text).hexdigest()
    if got != UPSTREAM_SHA256:
        raise SystemExit(f"{UPSTREAM_PATH} at {UPSTREAM_COMMIT}: sha256 {got}, expected {UPSTREAM_SHA256}")
    return text.decode()


class Upstream:
    """The two upstream methods, their source text unchanged, bound to this object."""

    def __init__(self, source):
        tree = ast.parse(source)
        lines = source.splitlines(keepends=True)
        ns = {"torch": torch}
        found = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS:
                text = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
                exec(compile(text, f"{UPSTREAM_PATH}:{node.name}", "exec"), ns)
                found[node.name] = ns[node.name]
        missing = [f for f in FUNCTIONS if f not in found]
        if missing:
            raise SystemExit(f"{UPSTREAM_PATH}: functions {missing} not found")
        self.pairwise_cosine_similarity = found["pairwise_cosine_similarity"].__get__(self)
        self.DivPrune = found["DivPrune"].__get__(self)


def selection_margin(feats, selected):
    """Smallest gap, over the greedy steps, between the chosen score and the best other one
    (float64, the engine's arithmetic), recomputed from upstream's own definition."""
    x = feats.to(torch.float64)
    n = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - n @ n.t()
    margin = float("inf")
    for i, pick in enumerate(selected):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[selected[:i]].min(dim=0).values
        others = torch.cat([scores[:pick], scores[pick + 1:]])
        margin = min(margin, float(scores[pick] - others.max()))
    return margin


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", required=True, help="a clone of github.com/vbdi/divprune (or its git dir)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    up = Upstream(upstream_source(args.upstream))
    for name in MODELS:
        model_dir = os.path.join(mf.FIX, name)
        ref_dir = os.path.join(mf.REF_DIR, name)
        with open(os.path.join(ref_dir, "expected.json")) as f:
            exp = json.load(f)
        arrays = load_file(os.path.join(ref_dir, "arrays.safetensors"))
        llava = mf.load_reference_model(model_dir)
        lm = llava.language_model
        runs = []
        for case in exp["cases"]:
            with torch.no_grad():
                emb, span = case_inputs(llava, exp, arrays, case)
            if span is None:
                continue
            s, e = span
            n_img = e - s
            for keep in [b for b in BUDGETS if b <= n_img]:
                with torch.no_grad():
                    picks = {}
                    for dt in (torch.float64, torch.float32):
                        sel, _ = up.DivPrune(emb[s:e].to(dt), n_img, None, threshold_ratio=keep / n_img)
                        picks[dt] = sel.tolist()
                    order = picks[torch.float64]
                    # Upstream's argmax may pick a token again once every remaining token is
                    # at distance ~0 from the picked ones (duplicate patches: flat image
                    # regions); from then on its order is float noise. The engine picks
                    # distinct tokens; it is compared on the prefix before the first repeat.
                    first_repeat = next((i for i in range(len(order)) if order[i] in order[:i]), None)
                    distinct = order if first_repeat is None else order[:first_repeat]
                    margin = selection_margin(emb[s:e], distinct)
                    if first_repeat is not None:
                        runs.append({
                            "case": case, "prune": {"method": "divprune", "keep": keep},
                            "image_span": [s, e], "selection_order": order,
                            "upstream_first_repeat": first_repeat,
                            "selection_margin": round(margin, 9),
                            "float32_selection_equal": picks[torch.float32] == order,
                            "engine_check": False,
                        })
                        print(f"  {name} {case:12s} keep {keep:3d}: upstream repeats a token at pick {first_repeat}")
                        continue
                    keep_rows = torch.cat((torch.arange(s), torch.tensor(order) + s, torch.arange(e, emb.shape[0])))
                    keep_rows = keep_rows.sort().values
                    pruned = emb[keep_rows][None]
                    out = lm.generate(inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long),
                                      max_new_tokens=mf.MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                      output_logits=True, return_dict_in_generate=True,
                                      eos_token_id=exp["eos_token_id"], pad_token_id=exp["eos_token_id"])
                generated = out.sequences[0].tolist()
                first = out.logits[0][0]
                top5 = torch.topk(first, 5)
                margins = []
                for step in out.logits:
                    t2 = torch.topk(step[0], 2).values
                    margins.append(round(float(t2[0] - t2[1]), 6))
                runs.append({
                    "case": case,
                    "prune": {"method": "divprune", "keep": keep},
                    "image_span": [s, e],
                    "selection_order": order,
                    "upstream_first_repeat": None,
                    "kept_image_tokens": sorted(order),
                    "selection_margin": round(margin, 9),
                    "float32_selection_equal": picks[torch.float32] == order,
                    "engine_check": margin >= MIN_SELECTION_MARGIN and min(margins) >= MIN_STEP_MARGIN,
                    "layer_seq_len": int(pruned.shape[1]),
                    "first_logits_top5": [[int(i), float(v)] for v, i in zip(top5.values, top5.indices)],
                    "generated_ids": generated,
                    "step_margins": margins,
                })
                print(f"  {name} {case:12s} keep {keep:3d}: seq {pruned.shape[1]} margin {margin:.2e} "
                      f"f32 {'=' if picks[torch.float32] == order else '!='} "
                      f"min step margin {min(margins):.4f} ids {generated[:6]}...")
        out = {
            "generator": "tools/divprune_ref.py",
            "upstream": {"repo": UPSTREAM_REPO, "commit": UPSTREAM_COMMIT, "path": UPSTREAM_PATH,
                         "sha256": UPSTREAM_SHA256, "functions": list(FUNCTIONS)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "model": name,
            "min_selection_margin": MIN_SELECTION_MARGIN,
            "min_step_margin": MIN_STEP_MARGIN,
            "runs": runs,
        }
        with open(os.path.join(ref_dir, "divprune.json"), "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
