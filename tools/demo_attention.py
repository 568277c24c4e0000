#!/usr/bin/env python3
"""Where the demo model's decoder attends, layer by layer (issue 29: do VisiPruner's three
stages show?). For the first N held-out questions, transformers (float32, eager attention)
runs the vicuna_v1 prompt and, per decoder layer, averages over heads and questions:

    img_mass    attention of the question tokens (after the image) on the 576 image tokens
    top1_share  the largest single image token's share of that image mass (sinks: high)
    top5_share  the 5 largest image tokens' share
    on_object   share of the image mass on patches covered by an object (fusion: high)
    last_img    img_mass of the last prompt token alone (the one that emits the answer)

    /work/wt/venv-fix/bin/python tools/demo_attention.py --n 40 > models/demo/attention.txt
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from render_upstream_prompts import vicuna_v1_prompt  # noqa: E402
import make_shapes_data as data  # noqa: E402

MODEL = os.path.join(ROOT, "models", "demo", "visi-shapes-llava")
BENCH = os.path.join(ROOT, "models", "demo", "visi-shapes-bench")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--model", default=MODEL)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    proc = CLIPImageProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    cfg = model.config
    qs = [json.loads(line) for line in open(os.path.join(BENCH, "questions.jsonl"))][:args.n]
    L = cfg.text_config.num_hidden_layers
    acc = {k: np.zeros(L) for k in ("img_mass", "top1_share", "top5_share", "on_object", "last_img")}
    cover = 0.0
    for q in qs:
        split_index = int(q["image"].split("_")[1].split(".")[0])
        _, _, _, mask = data.scene_and_questions("test", split_index, with_mask=True)
        obj = (np.asarray(mask)[7::14, 7::14].reshape(-1) > 0)
        cover += obj.mean()
        ids = tok(vicuna_v1_prompt(q["text"], 1)).input_ids
        at = ids.index(cfg.image_token_index)
        n_img = cfg.image_seq_length
        ids = ids[:at] + [cfg.image_token_index] * n_img + ids[at + 1:]
        pv = proc(images=Image.open(os.path.join(BENCH, "images", q["image"])).convert("RGB"),
                  return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), pixel_values=pv, output_attentions=True)
        for l, a in enumerate(out.attentions):
            a = a[0].mean(0)  # heads -> [T, T]
            text_rows = a[at + n_img:]
            img = text_rows[:, at:at + n_img]  # [text, 576]
            mass = img.sum(-1)
            share = img / mass.clamp_min(1e-12)[:, None]
            srt = share.sort(-1, descending=True).values
            acc["img_mass"][l] += mass.mean().item()
            acc["top1_share"][l] += srt[:, 0].mean().item()
            acc["top5_share"][l] += srt[:, :5].sum(-1).mean().item()
            acc["on_object"][l] += share[:, torch.from_numpy(obj)].sum(-1).mean().item()
            acc["last_img"][l] += img[-1].sum().item()
    n = len(qs)
    print(f"{n} held-out questions, {args.model and os.path.relpath(args.model, ROOT)}; "
          f"image patches covered by an object: {100 * cover / max(1, len(qs)):.1f}% on average "
          f"(on_object's value under uniform attention)")
    print("layer  " + "  ".join(f"{k:>10}" for k in acc))
    for l in range(L):
        print(f"{l:>5}  " + "  ".join(f"{acc[k][l] / n:>10.3f}" for k in acc))


if __name__ == "__main__":
    main()
