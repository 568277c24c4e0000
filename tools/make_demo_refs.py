#!/usr/bin/env python3
"""transformers' reference outputs for the trained demo model (issue 29), which
tests/tests/demo_model.rs compares visi with: greedy tokens, and at every greedy step the
top-5 logits, from LlavaForConditionalGeneration in float32 with attn_implementation="eager"
on the committed checkpoint.

    /work/wt/venv-fix/bin/python tools/make_demo_refs.py            # write tests/fixtures/demo/expected.json
    /work/wt/venv-fix/bin/python tools/make_demo_refs.py --check    # recompute, compare, write nothing

Prompts are rendered by LLaVA's own conversation.py (tools/render_upstream_prompts.py);
pixel values by transformers' CLIPImageProcessor from the checkpoint's
preprocessor_config.json; ids by the checkpoint's tokenizer.json through transformers
(AutoTokenizer), `<image>` expanded to the 576 positions as llava-hf's processor does.
"""

import argparse
import json
import os
import sys

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from render_upstream_prompts import vicuna_v1_prompt  # noqa: E402

MODEL = os.path.join(ROOT, "models", "demo", "visi-shapes-llava")
BENCH = os.path.join(ROOT, "models", "demo", "visi-shapes-bench")
OUT = os.path.join(ROOT, "tests", "fixtures", "demo", "expected.json")
MAX_NEW_TOKENS = 8
TOP = 5
# (case name, benchmark question id): one question of each kind, from the held-out split.
CASES = ["test00000_color", "test00000_shape", "test00001_position", "test00002_count",
         "test00003_exist", "test00004_caption"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    model_dir, out_path = args.model, args.out
    torch.manual_seed(0)
    questions = {}
    with open(os.path.join(BENCH, "questions.jsonl")) as f:
        for line in f:
            q = json.loads(line)
            questions[q["question_id"]] = q
    ann = json.load(open(os.path.join(BENCH, "annotations.json")))
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    cfg = model.config
    n_img = cfg.image_seq_length
    cases = []
    for qid in CASES:
        q = questions[qid]
        prompt = vicuna_v1_prompt(q["text"], 1)
        ids = tok(prompt).input_ids
        at = ids.index(cfg.image_token_index)
        expanded = ids[:at] + [cfg.image_token_index] * n_img + ids[at + 1:]
        image = Image.open(os.path.join(BENCH, "images", q["image"])).convert("RGB")
        pv = proc(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([expanded]), pixel_values=pv,
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                                 eos_token_id=cfg.text_config.eos_token_id)
        gen = out.sequences[0, len(expanded):].tolist()
        steps, margins = [], []
        for logits in out.logits:
            v, i = torch.topk(logits[0].float(), TOP)
            steps.append([[int(a), float(b)] for a, b in zip(i, v)])
            margins.append(float(v[0] - v[1]))
        text = tok.decode(gen, skip_special_tokens=True).strip()
        cases.append(dict(name=qid, image=os.path.relpath(os.path.join(BENCH, "images", q["image"]), ROOT),
                          question=q["text"], prompt=prompt, input_ids=ids, image_span=[at, at + n_img],
                          generated_ids=gen, generated_text=text, answer=ann[qid]["answer"],
                          steps_top5=steps, step_margins=margins))
        print(f"{qid}: {text!r} (truth {ann[qid]['answer']!r}), tokens {gen}, min margin {min(margins):.3f}")
    doc = dict(model=os.path.relpath(model_dir, ROOT), generator="tools/make_demo_refs.py",
               transformers=__import__("transformers").__version__, torch=torch.__version__,
               dtype="float32", attn_implementation="eager", max_new_tokens=MAX_NEW_TOKENS, cases=cases)
    text = json.dumps(doc, indent=1) + "\n"
    if args.check:
        old = open(out_path).read()
        if old != text:
            sys.exit(f"{out_path} differs from a fresh computation")
        print("identical")
        return
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
