#!/usr/bin/env python3
"""VisiPruner / FastV references over MobileVLM V2's 144 image tokens (issue 23): the layer
loop of tools/visipruner_ref.py (the semantics of docs/visipruner.md and pruner/src/fastv.rs,
LLaVA's pruning references come from it) run over the tiny MobileVLM fixture's decoder, fed
the embeddings the authors' code builds (tools/make_mobilevlm_fixtures.py: ids from
`tokenizer_image_token`, the LDPv2 projector's output spliced at the `<image>` position).

    OMP_NUM_THREADS=2 /work/wt/venv-fix/bin/python tools/mobilevlm_pruning_ref.py

Writes tests/fixtures/reference-mobilevlm/pruning.json (the format of
reference/<model>/pruning.json; tests/tests/mobilevlm.rs reads it). Before searching it
checks that the loop's dense run reproduces the committed reference's first-step top-5
logits and 16 greedy ids.
"""

import json
import os
import sys
import types

import torch
import transformers
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_mobilevlm_fixtures as mm  # noqa: E402
import visipruner_ref as vr  # noqa: E402

REF = os.path.join(mm.FIX, mm.REF)


def load_decoder():
    """The saved checkpoint's decoder in float32, eager attention, as MobileLlamaForCausalLM
    builds it (a LlamaForCausalLM over the same config keys)."""
    d = os.path.join(mm.FIX, mm.EXT)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    lc = LlamaConfig(**cfg)
    lc._attn_implementation = "eager"
    m = LlamaForCausalLM(lc)
    sd = {k: v.float() for k, v in load_file(os.path.join(d, "model.safetensors")).items()
          if not k.startswith("model.mm_projector.")}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return m.float().eval()


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with open(os.path.join(REF, "expected.json")) as f:
        exp = json.load(f)
    arrays = load_file(os.path.join(REF, "arrays.safetensors"))
    llama = load_decoder()
    lm = vr.Lm(types.SimpleNamespace(language_model=llama))
    runs = []
    for case, c in exp["cases"].items():
        ids = c["input_ids"]
        s = ids.index(exp["image_token_index"])
        with torch.no_grad():
            embed = llama.get_input_embeddings()
            emb = torch.cat([embed(torch.tensor(ids[:s])), arrays[f"{case}.projector_out"],
                             embed(torch.tensor(ids[s + 1:]))])
        span = tuple(c["image_span"])
        r = vr.run(lm, emb, span, {"method": "dense"}, all_rows=True)
        top = torch.topk(r.first_logits, 5)
        got = [[int(i), float(v)] for v, i in zip(top.values, top.indices)]
        assert [g[0] for g in got] == [w[0] for w in c["first_logits_top5"]], (got, c["first_logits_top5"])
        diff = max(abs(g[1] - w[1]) for g, w in zip(got, c["first_logits_top5"]))
        assert diff < 1e-4, diff
        assert r.generated == c["generated_ids"], (r.generated, c["generated_ids"])
        print(f"  dense {case}: ids match, top-5 |logit diff| {diff:.3g}", flush=True)
        runs += vr.search_case(lm, emb, span, case)
    for rr in runs:
        print(f"  {rr['case']:8s} {rr['name']:12s} fusion {rr['fusion_layer']} "
              f"kept {None if rr['kept_image_tokens'] is None else len(rr['kept_image_tokens'])} "
              f"exit {rr['text_only_from_layer']} lens {rr['layer_seq_lens']} prune {json.dumps(rr['prune'])}")
    out = {
        "generator": "tools/mobilevlm_pruning_ref.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": mm.INSIDE,
        "num_layers": lm.num_layers,
        "num_image_tokens": exp["num_image_tokens"],
        "silent_cos": vr.SILENT_COS,
        "silent_layers_to_exit": vr.SILENT_LAYERS_TO_EXIT,
        "min_decision_margin": vr.MIN_DECISION_MARGIN,
        "min_silent_margin": vr.MIN_SILENT_MARGIN,
        "min_step_margin": vr.MIN_STEP_MARGIN,
        "runs": runs,
    }
    with open(os.path.join(REF, "pruning.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
